// tsvmm native addon: the system calls a VMM needs, and the vCPU threads.
//
// This file holds no device logic. It opens /dev/kvm, issues ioctls on
// buffers that TypeScript lays out (sizes checked here), maps guest RAM and
// kvm_run, runs each vCPU's KVM_RUN loop on a thread of its own and hands
// every exit to the main thread, and watches fds on the main event loop.
// Errors are thrown with `code` (errno name), `errno` and `syscall`.

#include <napi.h>
#include <uv.h>

#include "sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

// ---------------------------------------------------------------------------
// Errors

const char* ErrnoName(int err) {
  switch (err) {
#define E(x) \
  case x:    \
    return #x;
    E(EPERM) E(ENOENT) E(EINTR) E(EIO) E(ENXIO) E(E2BIG) E(EBADF) E(EAGAIN)
    E(ENOMEM) E(EACCES) E(EFAULT) E(EBUSY) E(EEXIST) E(ENODEV) E(ENOTDIR)
    E(EISDIR) E(EINVAL) E(ENFILE) E(EMFILE) E(ENOTTY) E(EFBIG) E(ENOSPC)
    E(EROFS) E(ERANGE) E(ENOSYS) E(EOPNOTSUPP) E(ETIMEDOUT) E(ESRCH) E(ENOEXEC)
#undef E
    default:
      return "EUNKNOWN";
  }
}

[[noreturn]] void ThrowErrno(Napi::Env env, const std::string& syscall, int err) {
  Napi::Error e = Napi::Error::New(env, syscall + " failed: " + strerror(err) + " (" + ErrnoName(err) + ")");
  e.Set("code", Napi::String::New(env, ErrnoName(err)));
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("syscall", Napi::String::New(env, syscall));
  throw e;
}

[[noreturn]] void ThrowType(Napi::Env env, const std::string& msg) {
  throw Napi::TypeError::New(env, msg);
}

int ArgInt(const Napi::CallbackInfo& info, size_t i) {
  if (i >= info.Length() || !info[i].IsNumber()) ThrowType(info.Env(), "argument " + std::to_string(i) + " must be a number");
  return info[i].As<Napi::Number>().Int32Value();
}

uint64_t ArgU64(const Napi::CallbackInfo& info, size_t i) {
  if (i >= info.Length()) ThrowType(info.Env(), "argument " + std::to_string(i) + " missing");
  if (info[i].IsBigInt()) {
    bool lossless = false;
    uint64_t v = info[i].As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) ThrowType(info.Env(), "argument " + std::to_string(i) + " does not fit in 64 bits");
    return v;
  }
  if (!info[i].IsNumber()) ThrowType(info.Env(), "argument " + std::to_string(i) + " must be a number or bigint");
  double d = info[i].As<Napi::Number>().DoubleValue();
  if (d < 0 || d > 9007199254740991.0) ThrowType(info.Env(), "argument " + std::to_string(i) + " out of range");
  return static_cast<uint64_t>(d);
}

// A Uint8Array (or Buffer) argument as a raw byte range.
struct Bytes {
  uint8_t* data;
  size_t length;
};

Bytes ArgBytes(const Napi::CallbackInfo& info, size_t i) {
  if (i >= info.Length() || !info[i].IsTypedArray()) ThrowType(info.Env(), "argument " + std::to_string(i) + " must be a Uint8Array");
  Napi::TypedArray ta = info[i].As<Napi::TypedArray>();
  if (ta.TypedArrayType() != napi_uint8_array) ThrowType(info.Env(), "argument " + std::to_string(i) + " must be a Uint8Array");
  Napi::Uint8Array u8 = ta.As<Napi::Uint8Array>();
  return {u8.Data(), u8.ByteLength()};
}

// ---------------------------------------------------------------------------
// ioctl helpers

// struct kvm_cpuid2 and struct kvm_msrs end in a zero-length array, which
// g++ sizes differently from C (12 and 16 bytes, not 8). The ioctl numbers
// encode the struct size, so define them from the C layout: an 8-byte header.
struct CpuidHeader {
  uint32_t nent;
  uint32_t padding;
};
struct MsrsHeader {
  uint32_t nmsrs;
  uint32_t pad;
};
static_assert(sizeof(CpuidHeader) == 8 && sizeof(MsrsHeader) == 8, "C header sizes");
static_assert(sizeof(kvm_cpuid_entry2) == 40 && sizeof(kvm_msr_entry) == 16, "entry sizes");
constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, CpuidHeader);
constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, CpuidHeader);
constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, MsrsHeader);
constexpr unsigned long kSetMsrs = _IOW(KVMIO, 0x89, MsrsHeader);

int Ioctl(Napi::Env env, int fd, unsigned long req, void* arg, const char* name) {
  int r;
  do {
    r = ioctl(fd, req, arg);
  } while (r < 0 && errno == EINTR);
  if (r < 0) ThrowErrno(env, name, errno);
  return r;
}

int IoctlVal(Napi::Env env, int fd, unsigned long req, unsigned long arg, const char* name) {
  int r;
  do {
    r = ioctl(fd, req, arg);
  } while (r < 0 && errno == EINTR);
  if (r < 0) ThrowErrno(env, name, errno);
  return r;
}

// A fixed-size struct ioctl on a caller's buffer. The size check makes the
// kernel's copy_to/from_user stay inside the buffer.
Napi::Value StructIoctl(const Napi::CallbackInfo& info, unsigned long req, size_t size, const char* name) {
  int fd = ArgInt(info, 0);
  Bytes b = ArgBytes(info, 1);
  if (b.length != size) ThrowType(info.Env(), std::string(name) + ": buffer must be " + std::to_string(size) + " bytes, got " + std::to_string(b.length));
  return Napi::Number::New(info.Env(), Ioctl(info.Env(), fd, req, b.data, name));
}

#define STRUCT_IOCTL(fn, req, type)                              \
  Napi::Value fn(const Napi::CallbackInfo& info) {               \
    return StructIoctl(info, req, sizeof(struct type), #req);    \
  }

STRUCT_IOCTL(GetRegs, KVM_GET_REGS, kvm_regs)
STRUCT_IOCTL(SetRegs, KVM_SET_REGS, kvm_regs)
STRUCT_IOCTL(GetSregs, KVM_GET_SREGS, kvm_sregs)
STRUCT_IOCTL(SetSregs, KVM_SET_SREGS, kvm_sregs)
STRUCT_IOCTL(GetFpu, KVM_GET_FPU, kvm_fpu)
STRUCT_IOCTL(SetFpu, KVM_SET_FPU, kvm_fpu)
STRUCT_IOCTL(GetLapic, KVM_GET_LAPIC, kvm_lapic_state)
STRUCT_IOCTL(SetLapic, KVM_SET_LAPIC, kvm_lapic_state)
STRUCT_IOCTL(GetVcpuEvents, KVM_GET_VCPU_EVENTS, kvm_vcpu_events)
STRUCT_IOCTL(SetVcpuEvents, KVM_SET_VCPU_EVENTS, kvm_vcpu_events)
STRUCT_IOCTL(GetMpState, KVM_GET_MP_STATE, kvm_mp_state)
STRUCT_IOCTL(SetMpState, KVM_SET_MP_STATE, kvm_mp_state)
STRUCT_IOCTL(Translate, KVM_TRANSLATE, kvm_translation)

// kvm_msrs: a header counting the entries that follow. The count must match
// the buffer so the kernel reads and writes only inside it.
Napi::Value MsrsIoctl(const Napi::CallbackInfo& info, unsigned long req, const char* name) {
  int fd = ArgInt(info, 0);
  Bytes b = ArgBytes(info, 1);
  if (b.length < sizeof(MsrsHeader)) ThrowType(info.Env(), std::string(name) + ": buffer too small");
  uint32_t n;
  memcpy(&n, b.data, sizeof n);
  if (b.length != sizeof(MsrsHeader) + size_t(n) * sizeof(kvm_msr_entry))
    ThrowType(info.Env(), std::string(name) + ": buffer size does not match nmsrs");
  return Napi::Number::New(info.Env(), Ioctl(info.Env(), fd, req, b.data, name));
}
Napi::Value SetMsrs(const Napi::CallbackInfo& info) { return MsrsIoctl(info, kSetMsrs, "KVM_SET_MSRS"); }
Napi::Value GetMsrs(const Napi::CallbackInfo& info) { return MsrsIoctl(info, kGetMsrs, "KVM_GET_MSRS"); }

Napi::Value SetCpuid2(const Napi::CallbackInfo& info) {
  int fd = ArgInt(info, 0);
  Bytes b = ArgBytes(info, 1);
  if (b.length < sizeof(CpuidHeader)) ThrowType(info.Env(), "KVM_SET_CPUID2: buffer too small");
  uint32_t n;
  memcpy(&n, b.data, sizeof n);
  if (b.length != sizeof(CpuidHeader) + size_t(n) * sizeof(kvm_cpuid_entry2))
    ThrowType(info.Env(), "KVM_SET_CPUID2: buffer size does not match nent");
  Ioctl(info.Env(), fd, kSetCpuid2, b.data, "KVM_SET_CPUID2");
  return info.Env().Undefined();
}

Napi::Value GetSupportedCpuid(const Napi::CallbackInfo& info) {
  int fd = ArgInt(info, 0);
  // KVM reports E2BIG until the buffer holds every entry: grow and retry.
  for (uint32_t n = 64; n <= 4096; n *= 2) {
    size_t size = sizeof(CpuidHeader) + n * sizeof(kvm_cpuid_entry2);
    std::vector<uint8_t> buf(size, 0);
    // Safe: buf holds the header plus n entries, and vector storage is suitably aligned.
    auto* c = reinterpret_cast<CpuidHeader*>(buf.data());
    c->nent = n;
    if (ioctl(fd, kGetSupportedCpuid, c) == 0) {
      size_t used = sizeof(CpuidHeader) + c->nent * sizeof(kvm_cpuid_entry2);
      return Napi::Buffer<uint8_t>::Copy(info.Env(), buf.data(), used);
    }
    if (errno != E2BIG) ThrowErrno(info.Env(), "KVM_GET_SUPPORTED_CPUID", errno);
  }
  ThrowErrno(info.Env(), "KVM_GET_SUPPORTED_CPUID", E2BIG);
}

// ---------------------------------------------------------------------------
// Per-environment state

struct VcpuThread;
struct LoopWatcher;
struct PollWatch;

// What the addon keeps for one Node environment: the main thread's, or one
// worker_threads Worker's. The module may be loaded in several at once, each
// with its own event loop and JavaScript thread, so nothing here is shared:
// handles (vCPU, poll) are numbered per environment and only valid in it.
// When the environment ends (a Worker exits or is terminated, the main
// thread's loop runs dry), its cleanup hook, Teardown, stops what is left.
struct EnvState {
  std::map<int, VcpuThread*> vcpus;
  int nextVcpu = 1;
  // The watcher thread of this environment's event loop (one loop per
  // environment), started with its first vCPU on the loop.
  LoopWatcher* watcher = nullptr;
  // The loop vCPU whose burst is running, if any (LoopBurst): loopStep's.
  struct VcpuThread* burstVcpu = nullptr;
  std::map<int, PollWatch*> polls;
  int nextPoll = 1;
  // uv handles of the addon's whose close callbacks have not run yet. The
  // loop must not be closed before they have (it would abort), so the
  // cleanup hook ends only when this is back to 0.
  int closing = 0;
  // The cleanup hook while it waits for those close callbacks.
  napi_async_cleanup_hook_handle hookWaiting = nullptr;
  // vCPUs on threads, running (started, their thread not yet ended).
  std::atomic<int> threadedVcpus{0};
  // The direct hand-off's time this turn of the event loop (CallReport):
  // the turn is known by the loop's time (uv_now), which libuv updates as
  // each turn begins to poll.
  uint64_t directTurnMs = UINT64_MAX;
  int64_t directSpentNs = 0;
};

EnvState* StateOf(napi_env env) {
  void* data = nullptr;
  napi_get_instance_data(env, &data);
  return static_cast<EnvState*>(data);
}

// The fds the addon made (open, createVm, createVcpu, eventfd, tapOpen),
// each with the environment it made it for, until close() closes it: the
// ones still open when an environment ends are closed by its teardown, as
// Node does for a Worker's fs.open() fds. Otherwise a terminated worker
// leaks its VM (its fds, and the kernel threads KVM runs for it). Process
// wide and by fd number, like the fds themselves: a number reused after a
// close belongs to its new owner. The contract is Node's too: an fd from
// the addon is closed with close(), and not behind its back.
std::mutex fdsMutex;
std::map<int, EnvState*> ownedFds;

void ForgetVm(int fd);
void RecordSlot(void* base, int vmFd, uint32_t slot);
bool IsGuestRam(void* base, size_t size);

int Own(Napi::Env env, int fd) {
  EnvState* state = StateOf(env);
  std::lock_guard<std::mutex> lock(fdsMutex);
  ownedFds[fd] = state;
  return fd;
}

void Disown(int fd) {
  std::lock_guard<std::mutex> lock(fdsMutex);
  ownedFds.erase(fd);
}

// Closes the fds an environment still owns (at its teardown).
void CloseOwnedFds(EnvState* state) {
  std::vector<int> fds;
  {
    std::lock_guard<std::mutex> lock(fdsMutex);
    for (auto it = ownedFds.begin(); it != ownedFds.end();) {
      if (it->second == state) {
        fds.push_back(it->first);
        it = ownedFds.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (int fd : fds) {
    ForgetVm(fd);
    close(fd);
  }
}

// Every uv_close of the addon's handles goes through CloseHandle, and every
// close callback ends with HandleClosed, so that teardown can wait for them.
void CloseHandle(EnvState* state, uv_handle_t* h, uv_close_cb cb) {
  state->closing++;
  uv_close(h, cb);
}

void HandleClosed(EnvState* state) {
  if (--state->closing > 0 || state->hookWaiting == nullptr) return;
  napi_async_cleanup_hook_handle hook = state->hookWaiting;
  state->hookWaiting = nullptr;
  napi_remove_async_cleanup_hook(hook);  // teardown is over
}

// ---------------------------------------------------------------------------
// fds, system and VM ioctls

Napi::Value Open(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString()) ThrowType(info.Env(), "path must be a string");
  std::string path = info[0].As<Napi::String>();
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) ThrowErrno(info.Env(), "open " + path, errno);
  return Napi::Number::New(info.Env(), Own(info.Env(), fd));
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  int fd = ArgInt(info, 0);
  // Before the close: once closed, the number may be another's.
  Disown(fd);
  ForgetVm(fd);
  if (close(fd) < 0 && errno != EINTR) ThrowErrno(info.Env(), "close", errno);
  return info.Env().Undefined();
}

Napi::Value GetApiVersion(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), IoctlVal(info.Env(), ArgInt(info, 0), KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION"));
}

Napi::Value CheckExtension(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), IoctlVal(info.Env(), ArgInt(info, 0), KVM_CHECK_EXTENSION, ArgInt(info, 1), "KVM_CHECK_EXTENSION"));
}

// KVM_GET_TSC_KHZ on a VM fd (KVM_CAP_VM_TSC_CONTROL) or a vCPU fd: the guest's TSC frequency.
Napi::Value GetTscKhz(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), IoctlVal(info.Env(), ArgInt(info, 0), KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ"));
}

Napi::Value CreateVm(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), Own(info.Env(), IoctlVal(info.Env(), ArgInt(info, 0), KVM_CREATE_VM, 0, "KVM_CREATE_VM")));
}

Napi::Value GetVcpuMmapSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), IoctlVal(info.Env(), ArgInt(info, 0), KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"));
}

Napi::Value SetTssAddr(const Napi::CallbackInfo& info) {
  IoctlVal(info.Env(), ArgInt(info, 0), KVM_SET_TSS_ADDR, ArgU64(info, 1), "KVM_SET_TSS_ADDR");
  return info.Env().Undefined();
}

Napi::Value SetIdentityMapAddr(const Napi::CallbackInfo& info) {
  uint64_t addr = ArgU64(info, 1);
  Ioctl(info.Env(), ArgInt(info, 0), KVM_SET_IDENTITY_MAP_ADDR, &addr, "KVM_SET_IDENTITY_MAP_ADDR");
  return info.Env().Undefined();
}

Napi::Value CreateIrqchip(const Napi::CallbackInfo& info) {
  IoctlVal(info.Env(), ArgInt(info, 0), KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
  return info.Env().Undefined();
}

Napi::Value CreatePit2(const Napi::CallbackInfo& info) {
  kvm_pit_config cfg = {};
  cfg.flags = ArgInt(info, 1);
  Ioctl(info.Env(), ArgInt(info, 0), KVM_CREATE_PIT2, &cfg, "KVM_CREATE_PIT2");
  return info.Env().Undefined();
}

Napi::Value IrqLine(const Napi::CallbackInfo& info) {
  kvm_irq_level lvl = {};
  lvl.irq = ArgInt(info, 1);
  lvl.level = ArgInt(info, 2);
  Ioctl(info.Env(), ArgInt(info, 0), KVM_IRQ_LINE, &lvl, "KVM_IRQ_LINE");
  return info.Env().Undefined();
}

Napi::Value SetUserMemoryRegion(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int vmFd = ArgInt(info, 0);
  if (info.Length() < 7 || !info[4].IsArrayBuffer()) ThrowType(env, "memory must be an ArrayBuffer from allocGuestMemory");
  Napi::ArrayBuffer ab = info[4].As<Napi::ArrayBuffer>();
  uint64_t offset = ArgU64(info, 5);
  uint64_t size = ArgU64(info, 6);
  if (offset > ab.ByteLength() || size > ab.ByteLength() - offset || size == 0 || (offset & 0xfff) || (size & 0xfff))
    ThrowType(env, "memory region must be a non-empty page-aligned range inside the buffer");
  // Only allocGuestMemory's mappings back a slot: they delete their slots
  // before they are unmapped (DeleteSlots). A buffer JavaScript allocated
  // could be freed under a running guest, which would then reach the host
  // memory reused there.
  if (!IsGuestRam(ab.Data(), ab.ByteLength())) ThrowType(env, "memory must be an ArrayBuffer from allocGuestMemory, still mapped");
  kvm_userspace_memory_region r = {};
  r.slot = ArgInt(info, 1);
  r.flags = ArgInt(info, 2);
  r.guest_phys_addr = ArgU64(info, 3);
  r.memory_size = size;
  // Safe: the range was checked against the ArrayBuffer; TypeScript keeps the
  // buffer referenced for the VM's lifetime, so the mapping outlives the slot.
  r.userspace_addr = reinterpret_cast<uint64_t>(static_cast<uint8_t*>(ab.Data()) + offset);
  Ioctl(env, vmFd, KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION");
  RecordSlot(ab.Data(), vmFd, r.slot);
  return env.Undefined();
}

Napi::Value IoEventFd(const Napi::CallbackInfo& info) {
  kvm_ioeventfd io = {};
  io.addr = ArgU64(info, 1);
  io.len = ArgInt(info, 2);
  io.fd = ArgInt(info, 3);
  io.flags = ArgInt(info, 4);
  io.datamatch = ArgU64(info, 5);
  Ioctl(info.Env(), ArgInt(info, 0), KVM_IOEVENTFD, &io, "KVM_IOEVENTFD");
  return info.Env().Undefined();
}

// registerCoalesced(vmFd, addr, size, pio): writes to this range no longer
// exit; they are appended to the VM's coalesced ring (in each vCPU's mmap
// at KVM_CAP_COALESCED_MMIO pages) for the VMM to replay.
Napi::Value RegisterCoalesced(const Napi::CallbackInfo& info) {
  kvm_coalesced_mmio_zone z = {};
  z.addr = ArgU64(info, 1);
  z.size = static_cast<uint32_t>(ArgInt(info, 2));
  z.pio = static_cast<uint32_t>(ArgInt(info, 3));
  Ioctl(info.Env(), ArgInt(info, 0), KVM_REGISTER_COALESCED_MMIO, &z, "KVM_REGISTER_COALESCED_MMIO");
  return info.Env().Undefined();
}

Napi::Value IrqFd(const Napi::CallbackInfo& info) {
  kvm_irqfd f = {};
  f.fd = ArgInt(info, 1);
  f.gsi = ArgInt(info, 2);
  f.flags = ArgInt(info, 3);
  Ioctl(info.Env(), ArgInt(info, 0), KVM_IRQFD, &f, "KVM_IRQFD");
  return info.Env().Undefined();
}

// struct kvm_irq_routing ends in a zero-length array: define the ioctl from
// the C layout (an 8-byte header), as for kvm_cpuid2.
struct IrqRoutingHeader {
  uint32_t nr;
  uint32_t flags;
};
static_assert(sizeof(IrqRoutingHeader) == 8 && sizeof(kvm_irq_routing_entry) == 48, "routing sizes");
constexpr unsigned long kSetGsiRouting = _IOW(KVMIO, 0x6a, IrqRoutingHeader);

// KVM_SET_GSI_ROUTING: `buf` is a struct kvm_irq_routing laid out by
// TypeScript; its length must match the entry count in its header.
Napi::Value SetGsiRouting(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes b = ArgBytes(info, 1);
  if (b.length < sizeof(IrqRoutingHeader)) ThrowType(env, "routing buffer too small");
  IrqRoutingHeader h;
  memcpy(&h, b.data, sizeof h);
  if (b.length != sizeof(IrqRoutingHeader) + static_cast<size_t>(h.nr) * sizeof(kvm_irq_routing_entry))
    ThrowType(env, "routing buffer length does not match its entry count");
  // Safe: the buffer holds exactly the header plus nr entries (checked above).
  Ioctl(env, ArgInt(info, 0), kSetGsiRouting, b.data, "KVM_SET_GSI_ROUTING");
  return env.Undefined();
}

// KVM_SIGNAL_MSI: one message (address, data) injected now.
Napi::Value SignalMsi(const Napi::CallbackInfo& info) {
  kvm_msi msi = {};
  uint64_t address = ArgU64(info, 1);
  msi.address_lo = static_cast<uint32_t>(address);
  msi.address_hi = static_cast<uint32_t>(address >> 32);
  msi.data = static_cast<uint32_t>(ArgU64(info, 2));
  // KVM_SIGNAL_MSI returns >0 when delivered, 0 when the guest blocked it.
  return Napi::Number::New(info.Env(), Ioctl(info.Env(), ArgInt(info, 0), KVM_SIGNAL_MSI, &msi, "KVM_SIGNAL_MSI"));
}

// KVM_ENABLE_CAP on a VM or vCPU fd, with args[0].
Napi::Value EnableCap(const Napi::CallbackInfo& info) {
  kvm_enable_cap cap = {};
  cap.cap = ArgInt(info, 1);
  cap.args[0] = ArgU64(info, 2);
  Ioctl(info.Env(), ArgInt(info, 0), KVM_ENABLE_CAP, &cap, "KVM_ENABLE_CAP");
  return info.Env().Undefined();
}

Napi::Value CreateVcpu(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), Own(info.Env(), IoctlVal(info.Env(), ArgInt(info, 0), KVM_CREATE_VCPU, ArgInt(info, 1), "KVM_CREATE_VCPU")));
}

// ---------------------------------------------------------------------------
// Mappings exposed as ArrayBuffers

// A mapping is released either by unmap() or by the garbage collector,
// whichever comes first. The finalizer only unmaps what unmap() has not.
//
// Guest RAM is unmapped only after the KVM memory slots it backs are
// deleted: a slot holds host addresses, and a guest still running (a
// worker's buffers are finalized before its vCPU threads are stopped) would
// otherwise reach whatever the process maps there next, another thread's
// memory. KVM waits for running vCPUs to be out of the slot before the
// delete returns.
//
// The map is process wide (mappings of every environment, keyed by
// address, under mappingsMutex): a mapping's address is not reused before
// it is unmapped, which happens after it left the map, and the slot records
// are keyed by VM fd, unique while open (close() drops a VM's).
struct MemSlot {
  int vmFd;
  uint32_t slot;
};

struct Mapping {
  void* addr;
  size_t size;
  std::vector<MemSlot> slots;  // under mappingsMutex
  bool guestRam;  // allocGuestMemory's (a memory slot may be backed by it), not a vCPU's kvm_run
};

std::mutex mappingsMutex;
std::map<void*, Mapping*> mappings;

// Deletes the slots a mapping backs (mappingsMutex held, so that close()
// cannot close a VM fd between here and the ioctl), once out of the map.
void DeleteSlots(Mapping* m) {
  for (const MemSlot& s : m->slots) {
    kvm_userspace_memory_region r = {};
    r.slot = s.slot;  // memory_size 0: delete
    ioctl(s.vmFd, KVM_SET_USER_MEMORY_REGION, &r);
  }
  m->slots.clear();
}

// True when `base` starts a live allocGuestMemory mapping of `size` bytes.
bool IsGuestRam(void* base, size_t size) {
  std::lock_guard<std::mutex> lock(mappingsMutex);
  auto it = mappings.find(base);
  return it != mappings.end() && it->second->guestRam && it->second->size == size;
}

// After KVM_SET_USER_MEMORY_REGION: `slot` of `vmFd` is backed by the
// mapping at `base` now, and by no other.
void RecordSlot(void* base, int vmFd, uint32_t slot) {
  std::lock_guard<std::mutex> lock(mappingsMutex);
  for (auto& entry : mappings) {
    auto& v = entry.second->slots;
    for (size_t i = 0; i < v.size();) {
      if (v[i].vmFd == vmFd && v[i].slot == slot) {
        v.erase(v.begin() + i);
      } else {
        i++;
      }
    }
  }
  auto it = mappings.find(base);
  if (it != mappings.end()) it->second->slots.push_back({vmFd, slot});
}

// Before an fd is closed: if it is a VM's, its slots go with it.
void ForgetVm(int fd) {
  std::lock_guard<std::mutex> lock(mappingsMutex);
  for (auto& entry : mappings) {
    auto& v = entry.second->slots;
    for (size_t i = 0; i < v.size();) {
      if (v[i].vmFd == fd) {
        v.erase(v.begin() + i);
      } else {
        i++;
      }
    }
  }
}

// Takes the mapping at `addr` out of the map and deletes its slots; the
// caller unmaps it. Null when it is not in the map (already unmapped).
Mapping* ReleaseMapping(void* addr, Mapping* expected) {
  std::lock_guard<std::mutex> lock(mappingsMutex);
  auto it = mappings.find(addr);
  if (it == mappings.end() || (expected != nullptr && it->second != expected)) return nullptr;
  Mapping* m = it->second;
  mappings.erase(it);
  DeleteSlots(m);
  return m;
}

Napi::Value ExternalMapping(Napi::Env env, void* addr, size_t size, bool guestRam) {
  auto* m = new Mapping{addr, size, {}, guestRam};
  {
    std::lock_guard<std::mutex> lock(mappingsMutex);
    mappings[addr] = m;
  }
  return Napi::ArrayBuffer::New(env, addr, size, [](Napi::Env, void*, Mapping* hint) {
    if (hint->addr != nullptr) {
      ReleaseMapping(hint->addr, hint);
      munmap(hint->addr, hint->size);
    }
    delete hint;
  }, m);
}

// Memory JavaScript and vCPU threads share (allocShared): the fast-read
// table and the profiler's sample ring. The addon allocates it, never a
// buffer JavaScript made: JavaScript could transfer such a buffer away
// (structuredClone, postMessage) and let the collector free it while a
// vCPU thread still writes it. Node marks an ArrayBuffer with an addon's
// finalizer as untransferable (a transfer copies it instead), and a block
// is freed only when the last of its owners lets go: the ArrayBuffer's
// finalizer and each vCPU it was given to, whatever order an
// environment's teardown takes. The registry is keyed by address, which
// is not reused while the block lives.
struct SharedBlock {
  SharedBlock(void* d, size_t n) : data(d), size(n) {}
  SharedBlock(const SharedBlock&) = delete;
  SharedBlock& operator=(const SharedBlock&) = delete;
  ~SharedBlock() { free(data); }
  void* const data;
  const size_t size;
};

std::mutex sharedMutex;
std::map<void*, std::weak_ptr<SharedBlock>> sharedBlocks;

constexpr size_t kMaxSharedBytes = 1 << 20;

Napi::Value AllocShared(const Napi::CallbackInfo& info) {
  uint64_t size = ArgU64(info, 0);
  if (size == 0 || size > kMaxSharedBytes) ThrowType(info.Env(), "shared block size must be 1 to " + std::to_string(kMaxSharedBytes) + " bytes");
  size_t rounded = (size + 63) & ~size_t{63};
  void* p = aligned_alloc(64, rounded);
  if (p == nullptr) ThrowErrno(info.Env(), "allocate a shared block", ENOMEM);
  memset(p, 0, rounded);
  auto* owner = new std::shared_ptr<SharedBlock>(std::make_shared<SharedBlock>(p, size));
  {
    std::lock_guard<std::mutex> lock(sharedMutex);
    sharedBlocks[p] = *owner;
  }
  return Napi::ArrayBuffer::New(info.Env(), p, size, [](Napi::Env, void* data, std::shared_ptr<SharedBlock>* o) {
    {
      std::lock_guard<std::mutex> lock(sharedMutex);
      sharedBlocks.erase(data);
    }
    delete o;  // frees the block unless a vCPU still holds it
  }, owner);
}

// The block behind a typed array made over allocShared memory, holding
// `bytes` from the array's start; null (and a TypeError thrown) otherwise.
std::shared_ptr<SharedBlock> SharedOf(Napi::Env env, Napi::TypedArray ta, size_t bytes, const char* what) {
  Napi::ArrayBuffer ab = ta.ArrayBuffer();
  std::shared_ptr<SharedBlock> block;
  {
    std::lock_guard<std::mutex> lock(sharedMutex);
    auto it = sharedBlocks.find(ab.Data());
    if (it != sharedBlocks.end()) block = it->second.lock();
  }
  if (!block || ta.ByteOffset() > block->size || bytes > block->size - ta.ByteOffset())
    ThrowType(env, std::string(what) + " must be a view of memory from allocShared (memory JavaScript allocated could be transferred away and freed)");
  return block;
}

// Unmaps an ArrayBuffer made by ExternalMapping now and detaches it, so
// every view of it reads as empty instead of touching freed memory. A
// kvm_run mapping holds a reference on its vCPU (and so its VM): closing
// the fds alone leaves the VM alive until the collector runs.
Napi::Value Unmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArrayBuffer()) ThrowType(env, "argument 0 must be an ArrayBuffer from a tsvmm mapping");
  Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
  void* addr = ab.Data();
  Mapping* m = ReleaseMapping(addr, nullptr);
  if (m == nullptr) return env.Undefined();  // already unmapped, or not ours
  ab.Detach();
  munmap(m->addr, m->size);
  // The finalizer still runs later and frees m; it must not unmap again.
  m->addr = nullptr;
  return env.Undefined();
}

Napi::Value AllocGuestMemory(const Napi::CallbackInfo& info) {
  uint64_t size = ArgU64(info, 0);
  if (size == 0 || (size & 0xfff)) ThrowType(info.Env(), "guest memory size must be a non-zero multiple of 4096");
  // MAP_NORESERVE: guest RAM is touched lazily, like a real VMM's.
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) ThrowErrno(info.Env(), "mmap guest memory", errno);
  // KSM only when asked: merging pages across VMs is a timing side channel between them.
  if (info.Length() > 1 && info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value()) madvise(p, size, MADV_MERGEABLE);
  return ExternalMapping(info.Env(), p, size, true);
}

Napi::Value MapVcpuRun(const Napi::CallbackInfo& info) {
  int fd = ArgInt(info, 0);
  uint64_t size = ArgU64(info, 1);
  if (size < sizeof(kvm_run)) ThrowType(info.Env(), "kvm_run mapping too small");
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) ThrowErrno(info.Env(), "mmap kvm_run", errno);
  return ExternalMapping(info.Env(), p, size, false);
}

// ---------------------------------------------------------------------------
// vCPU threads
//
// Each vCPU loops on KVM_RUN on its own thread. After each return it hands
// the exit to the main thread through a thread-safe function and waits for
// the answer: device models all live on the main thread, so they need no
// locks, and asynchronous inputs (stdin, TAP, disk completions) are served by
// the same event loop. A kick is immediate_exit plus a signal, so a vCPU
// sleeping in the guest's HLT leaves KVM_RUN at once.

// 1 was a plain kick's report: stopping and sampling have their own requests now.
enum Report { kExit = 0, kStopped = 2, kError = 3, kFilterError = 4, kPaused = 5, kBurst = 6 };
// What loopStep answers (a negative number is -errno of a failed KVM_RUN).
enum Step { kStepExit = 0, kStepYield = 1, kStepStop = 2 };
enum Action { kContinue = 0, kStop = 1 };

int KickSignal() { return SIGRTMIN; }

void KickHandler(int) {}

struct VcpuThread {
  EnvState* state = nullptr;
  int id = 0;
  int fd = -1;
  std::string name;  // the thread's (pthread_setname_np)
  // The vCPU's mapping (kvm_run, the port I/O data page, the coalesced
  // ring), mapped again for the addon alone (MapRunForAddon).
  kvm_run* run = nullptr;
  size_t runSize = 0;
  // Port reads answered here without a report (setFastReads): a table
  // JavaScript writes as its devices change (see ServeFastRead); null: none.
  std::atomic<int32_t*> fastReads{nullptr};
  std::shared_ptr<SharedBlock> fastReadsBlock;  // what fastReads points into
  Napi::ThreadSafeFunction tsfn;
  std::thread thread;
  pthread_t tid{};
  std::atomic<bool> started{false};

  std::mutex mu;
  std::condition_variable cv;
  // Set under mu, read without it by a thread spinning for the answer
  // (release by the main thread, acquire by the vCPU thread).
  std::atomic<bool> replied{false};
  // The direct hand-off (see CallReport): kIdle, kMainWaiting (the main
  // thread is polling for this vCPU's next report), kDirectPending (the vCPU
  // thread left its report for the polling main thread instead of queueing
  // it on the thread-safe function).
  std::atomic<int> handoff{0};
  // The main thread's poll for the next report, adapted like KVM's
  // halt-polling (main thread only): it grows (10 us, doubling, up to
  // HandoffSpinNs) while reports come soon after the last answer, and drops
  // to 0 when a poll ends without one, so a guest that exits rarely costs no
  // polling at all.
  int64_t pollNs = 0;
  int64_t lastReplyNs = 0;
  // The environment is going away: no answer will come (under mu).
  bool abandoned = false;
  int action = kContinue;
  int report = kExit;
  int err = 0;

  std::atomic<bool> stopRequested{false};
  // Pause: the thread leaves KVM_RUN, reports kPaused, and waits on pauseCv
  // (under mu) until resumed or stopped.
  std::atomic<bool> pauseRequested{false};
  uint64_t pauseSeq = 0;  // pause requests so far (under mu)
  std::condition_variable pauseCv;
  std::atomic<bool> sampleRequested{false};

  // RIP samples: slot 0 counts samples taken, slots 1..cap hold them (a ring).
  std::mutex sampleMu;
  uint64_t* samples = nullptr;
  size_t sampleCap = 0;
  std::shared_ptr<SharedBlock> samplesBlock;  // what samples points into

  // On the event loop's own thread instead (StartVcpuOnLoop): no thread,
  // an idle handle that runs KVM_RUN bursts, and the callback called there.
  bool onLoop = false;
  bool inBurst = false;
  bool exitPending = false;  // loopStep returned an exit that JavaScript is handling
  int64_t burstDue = -1;     // when the watcher ends the burst (the loop's next timer, or kMaxBurstMs), in uv_now() time
  bool finished = false;
  bool jsGone = false;  // a report could not run: the environment is shutting down
  int openHandles = 0;  // idle and keepalive, while they close
  napi_env env = nullptr;
  uv_idle_t idle{};
  uv_prepare_t keepalive{};  // holds the loop open while the idle handle is stopped (during a burst)
  Napi::FunctionReference cb;
  napi_async_context asyncContext = nullptr;
  struct LoopWatcher* watcher = nullptr;

  // A seccomp program (struct sock_filter[]) the thread installs on itself
  // before its first KVM_RUN; empty: none.
  std::vector<uint8_t> filter;

  ~VcpuThread();
};

// kvm_run is the first page of a vCPU's mapping.
constexpr size_t kRunPage = 4096;
static_assert(sizeof(kvm_run) <= kRunPage, "kvm_run fits in its page");

// The fast-read table (an Int32Array JavaScript owns, setFastReads):
//   [0] notify: 1 asks for the next fast read made while the coalesced ring
//       holds writes to go to JavaScript after all (and sets it to 0), so
//       that the ring is drained soon after the guest starts writing;
//   [1] the coalesced ring's page in the vCPU mapping (0: no ring);
//   [2] entries in use (at most kMaxFastReads); [3] unused;
//   then per entry, 4 slots: the port; the byte a 1-byte `in` from it
//   reads, or -1 while the device must see the read itself (a read with
//   side effects, a state only the device can compute); and the reads
//   answered, a 64-bit count in the last two slots.
constexpr int kMaxFastReads = 4;
constexpr size_t kFastReadSlots = 4 + 4 * kMaxFastReads;

// The vCPU's kvm_run mapped a second time, for the addon alone: the
// ArrayBuffer JavaScript reads it through is unmapped when JavaScript says
// (unmap()) or when its environment is torn down (buffers are finalized
// before the addon's cleanup hook runs), while a vCPU thread, a kick or the
// loop watcher may still write immediate_exit. Both are MAP_SHARED mappings
// of the same page, so they see the same fields. Like any kvm_run mapping it
// holds a reference on the vCPU: it goes with the VcpuThread, as soon as the
// vCPU has stopped.
kvm_run* MapRunForAddon(Napi::Env env, int fd, size_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) ThrowErrno(env, "mmap kvm_run", errno);
  return static_cast<kvm_run*>(p);
}

VcpuThread::~VcpuThread() {
  if (run != nullptr) munmap(run, runSize);
}

// Answers the exit that KVM_RUN just returned without JavaScript when it is
// a 1-byte `in` from a port of the fast-read table whose value is known (a
// UART's line status, polled before every byte a console prints). Returns
// true when it did: the caller runs the guest again. The table's slots are
// read with relaxed atomics: JavaScript changes them between exits, or on
// another thread while this one runs, as a device's state changes, which
// the guest cannot tell apart from the read coming a moment sooner.
bool ServeFastRead(VcpuThread* v) {
  int32_t* t = v->fastReads.load(std::memory_order_acquire);
  if (t == nullptr) return false;
  kvm_run* run = v->run;
  if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_IN || run->io.size != 1 || run->io.count != 1) return false;
  if (run->io.data_offset < sizeof(kvm_run) || run->io.data_offset >= v->runSize) return false;
  int n = __atomic_load_n(&t[2], __ATOMIC_RELAXED);
  if (n > kMaxFastReads) n = kMaxFastReads;
  for (int i = 0; i < n; i++) {
    int32_t* e = t + 4 + 4 * i;
    if (__atomic_load_n(&e[0], __ATOMIC_RELAXED) != run->io.port) continue;
    int32_t value = __atomic_load_n(&e[1], __ATOMIC_RELAXED);
    if (value < 0 || value > 0xff) return false;
    uint32_t ringPage = static_cast<uint32_t>(__atomic_load_n(&t[1], __ATOMIC_RELAXED));
    if (ringPage != 0 && __atomic_load_n(&t[0], __ATOMIC_RELAXED) != 0 && (static_cast<size_t>(ringPage) + 1) * kRunPage <= v->runSize) {
      auto* ring = reinterpret_cast<uint32_t*>(reinterpret_cast<uint8_t*>(run) + ringPage * kRunPage);
      bool pending = __atomic_load_n(&ring[0], __ATOMIC_ACQUIRE) != __atomic_load_n(&ring[1], __ATOMIC_ACQUIRE);
      if (pending && __atomic_exchange_n(&t[0], 0, __ATOMIC_RELAXED) != 0) return false;
    }
    reinterpret_cast<uint8_t*>(run)[run->io.data_offset] = static_cast<uint8_t>(value);
    __atomic_fetch_add(reinterpret_cast<uint64_t*>(&e[2]), 1, __ATOMIC_RELAXED);
    return true;
  }
  return false;
}

void RecordSample(VcpuThread* v) {
  kvm_regs regs;
  if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0) return;
  std::lock_guard<std::mutex> lock(v->sampleMu);
  if (!v->samples || v->sampleCap == 0) return;
  uint64_t n = __atomic_load_n(&v->samples[0], __ATOMIC_RELAXED);
  v->samples[1 + n % v->sampleCap] = regs.rip;
  // Release: a reader that sees the new count also sees the sample.
  __atomic_store_n(&v->samples[0], n + 1, __ATOMIC_RELEASE);
}

// Calls into JavaScript from libuv callbacks and thread-safe function
// dispatch, with raw Node-API calls that never throw: a C++ exception must
// not unwind through libuv or Node (it would end the process), and
// node-addon-api throws one whenever a call fails, which every call does once
// the environment is shutting down (a worker terminated or exiting) and
// JavaScript can no longer run.

// A report callback's answer: the VcpuAction it returned (a number), else Continue.
int ReturnedAction(napi_env env, napi_value ret) {
  napi_valuetype type;
  int32_t action;
  if (napi_typeof(env, ret, &type) == napi_ok && type == napi_number && napi_get_value_int32(env, ret, &action) == napi_ok) return action;
  return kContinue;
}

// cb(report, err) with `this` undefined. False when it did not return: it
// threw (the exception stays pending, and Node raises it as uncaught once
// the dispatch returns) or JavaScript cannot run any more.
bool CallReportCallback(napi_env env, napi_value cb, int report, int err, int* action) {
  napi_value argv[2], recv, ret;
  if (napi_create_int32(env, report, &argv[0]) != napi_ok || napi_create_int32(env, err, &argv[1]) != napi_ok ||
      napi_get_undefined(env, &recv) != napi_ok || napi_call_function(env, recv, cb, 2, argv, &ret) != napi_ok)
    return false;
  *action = ReturnedAction(env, ret);
  return true;
}

// After a failed napi_make_callback from a libuv callback: an exception the
// callback threw is raised as uncaught, as Node does for its own I/O
// callbacks. Returns false when there was none: JavaScript cannot run any
// more (the environment is shutting down).
bool RaisePendingException(napi_env env) {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) != napi_ok || !pending) return false;
  napi_value e;
  if (napi_get_and_clear_last_exception(env, &e) == napi_ok) napi_fatal_exception(env, e);
  return true;
}

// The hand-off's polling. A vCPU thread that has handed an exit to the main
// thread first polls for the answer before it sleeps on its condition
// variable, and the main thread, once it has answered, polls for the same
// vCPU's next exit and takes it directly (CallReport): the common answer (a
// device handler takes a few microseconds) and the common next exit (a few
// microseconds later) then cost no futex wake-up and no reschedule of
// either thread. Like KVM's halt-polling it is bounded (HandoffSpinNs), and
// it is only done where it cannot take a core from the thread it waits for:
// while every thread that may poll (each vCPU thread, and the JavaScript
// thread of each environment that runs one) has a CPU of the process's own
// (its affinity). Tuning: TSVMM_HANDOFF_SPIN_US (0 turns it off).
std::atomic<int> gPollers{0};

constexpr int64_t kDefaultHandoffSpinUs = 50, kMaxHandoffSpinUs = 1000;

// TSVMM_HANDOFF_SPIN_US in nanoseconds, or -1 when it is not a whole number
// of microseconds from 0 to kMaxHandoffSpinUs (StartVcpu refuses to start).
int64_t HandoffSpinNs() {
  static const int64_t ns = []() -> int64_t {
    const char* e = getenv("TSVMM_HANDOFF_SPIN_US");
    if (e == nullptr || *e == '\0') return kDefaultHandoffSpinUs * 1000;
    int64_t us = 0;
    for (const char* p = e; *p != '\0'; p++) {
      if (*p < '0' || *p > '9') return -1;
      us = us * 10 + (*p - '0');
      if (us > kMaxHandoffSpinUs) return -1;
    }
    return us * 1000;
  }();
  return ns;
}

// The CPUs this process may run on (its affinity mask).
int AvailableCpus() {
  static const int n = static_cast<int>(std::max(1u, uv_available_parallelism()));
  return n;
}

bool SpinAllowed() { return HandoffSpinNs() > 0 && gPollers.load(std::memory_order_relaxed) <= AvailableCpus(); }

// Polls done() until it holds (true) or until uv_hrtime() reaches deadline
// (false, unless it held at the last look): 64 pause instructions between
// two reads of the clock.
template <typename Done>
bool SpinUntil(uint64_t deadline, Done done) {
  for (;;) {
    for (int i = 0; i < 64; i++) {
      if (done()) return true;
      __builtin_ia32_pause();
    }
    if (uv_hrtime() >= deadline) return done();
  }
}

constexpr int kIdle = 0, kMainWaiting = 1, kDirectPending = 2;

// How long, per turn of the event loop, the main thread may keep taking
// reports directly before the loop gets its thread back, which it also gets
// as soon as it wants a turn (checked every kLoopCheckNs).
constexpr int64_t kDirectBurstNs = 1000000;
constexpr int64_t kLoopCheckNs = 100000;

void Reply(VcpuThread* v, int action) {
  {
    std::lock_guard<std::mutex> lock(v->mu);
    v->action = action;
    v->replied.store(true, std::memory_order_release);
  }
  v->cv.notify_one();
}

// Whether handles started since the loop last polled wait for it to add
// their fds to its epoll set (libuv does that only when it polls): until
// then nothing can see them become ready.
bool LoopHasNewWatchers(uv_loop_t* loop) {
  void* next;
  memcpy(&next, &loop->watcher_queue, sizeof next);
  return next != static_cast<void*>(&loop->watcher_queue);
}

// What both kinds of burst that hold the loop's thread (LoopBurst, and the
// direct hand-off in CallReport) ask after each exit: whether the loop must
// have its thread back now, because of new fds to watch or work it must do
// at once (an immediate, a pending callback, a handle closing: its timeout
// is 0). Otherwise *timeoutMs is the loop's timeout (-1: none).
bool LoopNeedsTurn(uv_loop_t* loop, int* timeoutMs) {
  if (LoopHasNewWatchers(loop)) return true;
  *timeoutMs = uv_backend_timeout(loop);
  return *timeoutMs == 0;
}

// The direct hand-off's check: that, or a timer due by now, or an fd ready
// in the loop's backend (epoll) fd. (A loop vCPU's burst leaves the last two
// to its watcher thread.)
bool LoopWantsTurn(uv_loop_t* loop, uint64_t nowNs) {
  int timeout;
  if (LoopNeedsTurn(loop, &timeout)) return true;
  if (timeout > 0 && static_cast<uint64_t>(uv_now(loop)) + timeout <= nowNs / 1000000) return true;
  pollfd p = {uv_backend_fd(loop), POLLIN, 0};
  return poll(&p, 1, 0) != 0;
}

// Polls (until deadline) for this vCPU's next report, with the hand-off in
// kMainWaiting: true when the vCPU thread left one (kDirectPending, now
// taken), false when the wait ended without one (back to kIdle: the next
// report goes through the thread-safe function). Either way the hand-off is
// kIdle after it.
bool TakeDirectReport(VcpuThread* v, uint64_t deadline) {
  if (!SpinUntil(deadline, [v] { return v->handoff.load(std::memory_order_acquire) == kDirectPending; })) {
    int expected = kMainWaiting;
    if (v->handoff.compare_exchange_strong(expected, kIdle, std::memory_order_acq_rel)) return false;
    // It came just now (the failed exchange read kDirectPending, with acquire).
  }
  v->handoff.store(kIdle, std::memory_order_relaxed);
  return true;
}

// cb(report, err) in a handle scope of its own (a direct burst makes many
// calls within one dispatch of the thread-safe function).
bool CallReportInScope(napi_env env, napi_value cb, int report, int err, int* action) {
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return false;
  bool called = CallReportCallback(env, cb, report, err, action);
  napi_close_handle_scope(env, scope);
  return called;
}

// How long the main thread may poll for v's next report once it has
// answered the one that arrived at arrivedNs (0: not at all). The poll
// adapts like KVM's halt-polling: it grows (10 us, doubling, up to
// HandoffSpinNs) while reports come through the thread-safe function soon
// enough after the last answer that a poll would have caught them, and a
// poll that ends without a report sets it back to 0 (DirectBurst). It is
// never longer than what is left of this turn's kDirectBurstNs.
int64_t PollBudget(VcpuThread* v, uv_loop_t* loop, uint64_t arrivedNs) {
  if (!SpinAllowed()) return 0;
  int64_t maxPoll = HandoffSpinNs();
  if (v->lastReplyNs != 0 && static_cast<int64_t>(arrivedNs - v->lastReplyNs) < maxPoll)
    v->pollNs = v->pollNs == 0 ? std::min<int64_t>(10000, maxPoll) : std::min(v->pollNs * 2, maxPoll);
  if (v->pollNs == 0 || v->stopRequested.load(std::memory_order_relaxed) || v->pauseRequested.load(std::memory_order_relaxed)) return 0;
  EnvState* s = v->state;
  uint64_t turn = uv_now(loop);
  if (s->directTurnMs != turn) {
    s->directTurnMs = turn;
    s->directSpentNs = 0;
  }
  return std::max<int64_t>(0, kDirectBurstNs - s->directSpentNs);
}

// The main thread, having claimed v's hand-off (kMainWaiting) and answered,
// takes v's reports directly for up to budgetNs: until a poll of v->pollNs
// ends without one, a report that is not an exit or is answered Stop, a
// stop or pause request, or the loop wants a turn.
void DirectBurst(napi_env env, napi_value cb, VcpuThread* v, uv_loop_t* loop, int64_t budgetNs) {
  uint64_t start = uv_hrtime(), end = start + budgetNs, nextCheck = start + kLoopCheckNs;
  for (uint64_t now = start;;) {
    uint64_t pollEnd = std::min(now + v->pollNs, end);
    if (!TakeDirectReport(v, pollEnd)) {
      if (pollEnd < end) v->pollNs = 0;  // a real miss, not the budget's end
      v->lastReplyNs = uv_hrtime();
      break;
    }
    // Read after the hand-off's acquire: the vCPU thread wrote them before.
    int report = v->report, err = v->err, action = kStop;
    bool called = CallReportInScope(env, cb, report, err, &action);
    if (!called) action = kStop;
    now = uv_hrtime();
    bool more = called && action != kStop && report == kExit && now < end && !v->stopRequested.load(std::memory_order_relaxed) &&
                !v->pauseRequested.load(std::memory_order_relaxed);
    if (more && now >= nextCheck) {
      more = !LoopWantsTurn(loop, now);
      nextCheck = now + kLoopCheckNs;
    }
    if (more) v->handoff.store(kMainWaiting, std::memory_order_seq_cst);
    Reply(v, action);
    v->lastReplyNs = now;
    if (!more) break;
  }
  v->state->directSpentNs += static_cast<int64_t>(uv_hrtime() - start);
}

// Runs on the main thread for each report the thread-safe function brings.
// Where polling is allowed (PollBudget), the main thread claims the
// hand-off before it answers and then stays a moment for the vCPU's next
// report, which the vCPU thread leaves there instead of queueing it on the
// thread-safe function: its next exit typically follows within a few
// microseconds (DirectBurst).
void CallReport(Napi::Env env, Napi::Function cb, VcpuThread* v) {
  uint64_t arrived = uv_hrtime();
  int action = kStop;
  // Read before the answer: once answered, the vCPU thread writes the next.
  int report = v->report, err = v->err;
  // A handler that threw is a bug (the TypeScript handler catches its own
  // errors): this vCPU stops, and the error surfaces as uncaught.
  bool called = env != nullptr && cb != nullptr && CallReportCallback(env, cb, report, err, &action);
  if (!called) action = kStop;
  uv_loop_t* loop = nullptr;
  int64_t budget = 0;
  if (called && action != kStop && report == kExit && napi_get_uv_event_loop(env, &loop) == napi_ok && loop != nullptr)
    budget = PollBudget(v, loop, arrived);
  if (budget == 0) {
    Reply(v, action);
    v->lastReplyNs = uv_hrtime();
    return;
  }
  v->handoff.store(kMainWaiting, std::memory_order_seq_cst);
  Reply(v, action);
  DirectBurst(env, cb, v, loop, budget);
}

// Hands one report to the main thread and waits for its answer.
// Stop when the environment has abandoned the thread: its JavaScript will
// not answer (a report already queued is never dispatched).
int ReportAndWait(VcpuThread* v, int report, int err) {
  {
    std::lock_guard<std::mutex> lock(v->mu);
    if (v->abandoned) return kStop;
    v->report = report;
    v->err = err;
    v->replied.store(false, std::memory_order_relaxed);
  }
  // The main thread may be polling for this report (CallReport); else it
  // goes through the thread-safe function, which wakes the main thread.
  int expected = kMainWaiting;
  if (!v->handoff.compare_exchange_strong(expected, kDirectPending, std::memory_order_acq_rel) && v->tsfn.BlockingCall(v, CallReport) != napi_ok)
    return kStop;
  // The answer usually comes within microseconds: poll for it before sleeping.
  if (SpinAllowed())
    SpinUntil(uv_hrtime() + HandoffSpinNs(), [v] { return v->replied.load(std::memory_order_acquire) || v->stopRequested.load(std::memory_order_relaxed); });
  std::unique_lock<std::mutex> lock(v->mu);
  v->cv.wait(lock, [v] { return v->replied.load(std::memory_order_relaxed) || v->abandoned; });
  return v->replied.load(std::memory_order_relaxed) ? v->action : kStop;
}

void VcpuLoop(VcpuThread* v) {
  v->tid = pthread_self();
  // Named for ps/top -H and /proc/PID/task/*/comm (15 characters at most),
  // before the sandbox's filter, which does not allow prctl.
  pthread_setname_np(v->tid, v->name.substr(0, 15).c_str());
  // Only the kick signal (and the sandbox's confinement signal, and faults)
  // reach this thread: signals sent to the process (SIGINT, SIGTERM, ...)
  // are taken by the main thread, whose handlers are JavaScript's.
  sigset_t set;
  sigfillset(&set);
  for (int sig : {KickSignal(), SIGRTMIN + 1, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGSYS, SIGABRT, SIGTRAP}) sigdelset(&set, sig);
  pthread_sigmask(SIG_SETMASK, &set, nullptr);
  if (!v->filter.empty()) {
    int err = tsvmm::InstallSeccompFilter(v->filter);
    if (err != 0) {
      // Refuse to run unconfined when confinement was asked for.
      v->started.store(true);
      ReportAndWait(v, kFilterError, err);
      v->stopRequested.store(true);
    }
  }
  v->started.store(true);

  while (!v->stopRequested.load()) {
    int r = ioctl(v->fd, KVM_RUN, 0);
    int err = r < 0 ? errno : 0;
    if (r < 0 && (err == EINTR || err == EAGAIN)) {
      // Safe: run points at this vCPU's kvm_run mapping, alive while the thread runs.
      // Sequentially consistent: the flag loads below must not pass this
      // store, or a Kick between them would be lost (its 1 overwritten).
      __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
      if (v->stopRequested.load()) break;
      if (v->sampleRequested.exchange(false)) RecordSample(v);
      if (v->pauseRequested.load()) {
        // One Paused report per pause request, also for a request made
        // while the thread is still parked from the one before (a resume
        // and a pause in quick succession).
        std::unique_lock<std::mutex> lock(v->mu);
        while (v->pauseRequested.load() && !v->stopRequested.load()) {
          uint64_t seq = v->pauseSeq;
          lock.unlock();
          v->tsfn.NonBlockingCall(v, [](Napi::Env env, Napi::Function cb, VcpuThread*) {
            int ignored;
            if (env != nullptr && cb != nullptr) CallReportCallback(env, cb, kPaused, 0, &ignored);
          });
          lock.lock();
          v->pauseCv.wait(lock, [v, seq] { return !v->pauseRequested.load() || v->stopRequested.load() || v->pauseSeq != seq; });
        }
      }
      continue;
    }
    if (r == 0 && ServeFastRead(v)) continue;
    if (ReportAndWait(v, r < 0 ? kError : kExit, err) == kStop) break;
  }
  {
    std::lock_guard<std::mutex> lock(v->mu);
    v->report = kStopped;
    v->err = 0;
  }
  v->tsfn.NonBlockingCall(v, [](Napi::Env env, Napi::Function cb, VcpuThread*) {
    int ignored;
    if (env != nullptr && cb != nullptr) CallReportCallback(env, cb, kStopped, 0, &ignored);
  });
  // This thread, and its environment's JavaScript thread with its last one,
  // no longer poll (counted in StartVcpu).
  gPollers.fetch_sub(v->state->threadedVcpus.fetch_sub(1, std::memory_order_relaxed) == 1 ? 2 : 1, std::memory_order_relaxed);
  v->tsfn.Release();
}

// Once per process, however many environments (the main thread, workers)
// load the addon and start vCPUs, possibly at the same time: a function-local
// static is initialised exactly once, and a second caller waits until the
// handler is in place (a kick before it would end the process).
void InstallKickHandler() {
  static const bool installed = [] {
    struct sigaction sa = {};
    sa.sa_handler = KickHandler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
    sigaction(KickSignal(), &sa, nullptr);
    return true;
  }();
  (void)installed;
}

VcpuThread* FindVcpu(const Napi::CallbackInfo& info) {
  int h = ArgInt(info, 0);
  EnvState* state = StateOf(info.Env());
  auto it = state->vcpus.find(h);
  if (it == state->vcpus.end()) ThrowType(info.Env(), "unknown or finished vCPU handle " + std::to_string(h));
  return it->second;
}

void Kick(VcpuThread* v) {
  // immediate_exit covers the window before the thread re-enters KVM_RUN;
  // the signal covers a thread already inside it.
  __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_RELEASE);
  if (v->started.load()) pthread_kill(v->tid, KickSignal());
}

// Stops a vCPU thread without JavaScript, which will not answer any more
// (its environment is being torn down): a report it waits on ends in Stop, a
// pause ends, and KVM_RUN is kicked. The caller joins the thread.
void Abandon(VcpuThread* v) {
  {
    std::lock_guard<std::mutex> lock(v->mu);
    v->abandoned = true;
    v->stopRequested.store(true);
  }
  v->cv.notify_all();
  v->pauseCv.notify_all();
  Kick(v);
}

Napi::Value StartVcpu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt(info, 0);
  if (info.Length() < 3 || !info[1].IsArrayBuffer() || !info[2].IsFunction()) ThrowType(env, "startVcpu(fd, run, onReport[, filter[, name]])");
  Napi::ArrayBuffer run = info[1].As<Napi::ArrayBuffer>();
  if (run.ByteLength() < sizeof(kvm_run)) ThrowType(env, "run must be the vCPU's kvm_run mapping");
  std::string name = "tsvmm-vcpu";
  if (info.Length() > 4 && !info[4].IsUndefined()) {
    if (!info[4].IsString()) ThrowType(env, "name must be a string");
    name = info[4].As<Napi::String>().Utf8Value();
  }
  std::vector<uint8_t> filter;
  if (info.Length() > 3 && !info[3].IsUndefined()) {
    if (!info[3].IsBuffer()) ThrowType(env, "filter must be a Buffer of struct sock_filter");
    auto b = info[3].As<Napi::Buffer<uint8_t>>();
    filter.assign(b.Data(), b.Data() + b.Length());
    if (filter.empty() || filter.size() % 8 != 0) ThrowType(env, "filter must hold whole struct sock_filter entries");
    tsvmm::InstallSigsysHandler();
  }
  InstallKickHandler();
  // Read here, on the main thread, before any vCPU thread (whose seccomp
  // filter may forbid what reading them takes) does.
  if (HandoffSpinNs() < 0)
    ThrowType(env, "TSVMM_HANDOFF_SPIN_US must be a whole number of microseconds from 0 to " + std::to_string(kMaxHandoffSpinUs) +
                       " (0 turns the exit hand-off's polling off), not '" + getenv("TSVMM_HANDOFF_SPIN_US") + "'");
  (void)AvailableCpus();

  EnvState* state = StateOf(env);
  kvm_run* own = MapRunForAddon(env, fd, run.ByteLength());
  auto* v = new VcpuThread();
  v->state = state;
  v->runSize = run.ByteLength();
  v->filter = std::move(filter);
  v->name = std::move(name);
  v->id = state->nextVcpu++;
  v->fd = fd;
  v->run = own;
  v->tsfn = Napi::ThreadSafeFunction::New(
      env, info[2].As<Napi::Function>(), "tsvmm-vcpu", 0, 1, v,
      [](Napi::Env, void*, VcpuThread* vt) {
        // Runs on the main thread after the vCPU thread released the function,
        // which is its last act: the join returns at once. Or when the
        // environment is torn down: Teardown has stopped and joined the
        // thread already (this runs after cleanup hooks), and in case it
        // has not, it is stopped here, for the function is going away.
        if (vt->thread.joinable()) {
          Abandon(vt);
          vt->thread.join();
        }
        vt->state->vcpus.erase(vt->id);
        delete vt;  // and with it the shared blocks it held
      },
      static_cast<void*>(nullptr));
  state->vcpus[v->id] = v;
  // The new thread may poll, and so may this environment's JavaScript
  // thread once it runs one (VcpuLoop counts them out).
  gPollers.fetch_add(state->threadedVcpus.fetch_add(1, std::memory_order_relaxed) == 0 ? 2 : 1, std::memory_order_relaxed);
  v->thread = std::thread(VcpuLoop, v);
  return Napi::Number::New(env, v->id);
}

// ---------------------------------------------------------------------------
// vCPUs on the event loop's thread
//
// A vCPU started with StartVcpuOnLoop runs KVM_RUN on the JavaScript thread
// itself, from a libuv idle handle: each turn of the event loop runs one
// burst of KVM_RUN calls. JavaScript drives the burst: the idle handle calls
// the report callback once per burst (kBurst, through MakeCallback), and the
// callback calls loopStep, which runs KVM_RUN and returns on an exit, over
// and over until loopStep says the burst is over. So an exit costs KVM_RUN
// plus one call from JavaScript into the addon, and after it only the checks
// of what the exit's handler asked of the loop; the time limit of a burst is
// the watcher's to enforce. Promise jobs and nextTick callbacks run when the
// burst ends (MakeCallback returns), at most kMaxBurstMs later: an await
// after each exit cost the emulated AMD-V host a tenth of the synchronous
// loop's time per exit.
//
// A burst ends when the event loop has work. A watcher thread (one per
// loop, Electron's model for embedding a second loop) polls libuv's backend
// epoll fd with the loop's own timeout, computed just before the burst: when
// an fd is ready or a timer is due it sets immediate_exit and signals the JS
// thread, which leaves KVM_RUN with EINTR and returns to libuv. The kick
// signal is blocked on the JS thread except inside KVM_RUN
// (KVM_SET_SIGNAL_MASK), so it never interrupts the loop's own system
// calls; a pending one is consumed with sigtimedwait, as QEMU does. A guest
// idling in HLT sleeps in KVM_RUN: it costs the host nothing, and I/O wakes
// it through the watcher.

// A burst lasts at least this long before the watcher ends it, so that an
// fd that stays ready (or a loop that always has work) cannot starve the
// guest: every burst gets a slice of guest time.
constexpr auto kMinSlice = std::chrono::microseconds(50);

// A burst yields to the loop after this long even when the loop has no work
// (the watcher ends it, as for a timer), so that what waits for the end of
// a callback (promise jobs, nextTick callbacks) runs.
constexpr int64_t kMaxBurstMs = 20;

struct LoopWatcher {
  int epfd = -1;
  int wakefd = -1;
  std::thread thread;
  std::mutex mu;
  std::condition_variable cv;
  bool armed = false;
  bool kicked = false;
  bool quit = false;  // its environment is torn down: the thread ends
  uint64_t gen = 0;
  int64_t dueMs = -1;  // when the loop's next timer is due, in uv_now() time; -1: none
  pthread_t target{};
  kvm_run* run = nullptr;
  std::chrono::steady_clock::time_point armedAt;
};

void WatcherLoop(LoopWatcher* w) {
  pthread_setname_np(pthread_self(), "tsvmm-watcher");
  // The watcher must never take the kick signal itself.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, KickSignal());
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  for (;;) {
    std::unique_lock<std::mutex> lock(w->mu);
    w->cv.wait(lock, [w] { return w->armed || w->quit; });
    if (w->quit) return;
    uint64_t gen = w->gen;
    int64_t due = w->dueMs;
    auto armedAt = w->armedAt;
    lock.unlock();
    int timeout = -1;
    if (due >= 0) {
      int64_t left = due - static_cast<int64_t>(uv_hrtime() / 1000000);
      timeout = left <= 0 ? 0 : static_cast<int>(left > INT32_MAX ? INT32_MAX : left);
    }

    epoll_event ev[4];
    int n = epoll_wait(w->epfd, ev, 4, timeout);
    if (n < 0 && errno == EINTR) continue;
    bool ready = n == 0;  // timed out: a timer is due
    for (int i = 0; i < n; i++) {
      if (ev[i].data.fd == w->wakefd) {
        uint64_t drain;
        while (read(w->wakefd, &drain, sizeof drain) > 0) {
        }
      } else {
        ready = true;
      }
    }
    if (!ready) continue;  // woken because the burst ended or its deadline moved
    auto elapsed = std::chrono::steady_clock::now() - armedAt;
    if (elapsed < kMinSlice) std::this_thread::sleep_for(kMinSlice - elapsed);
    lock.lock();
    if (w->armed && w->gen == gen) {
      w->armed = false;
      w->kicked = true;
      __atomic_store_n(&w->run->immediate_exit, 1, __ATOMIC_RELEASE);
      pthread_kill(w->target, KickSignal());
    }
  }
}

LoopWatcher* WatcherFor(Napi::Env env, EnvState* state, uv_loop_t* loop) {
  if (state->watcher != nullptr) return state->watcher;
  auto* w = new LoopWatcher();
  w->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (w->epfd < 0) {
    int err = errno;
    delete w;
    ThrowErrno(env, "epoll_create1", err);
  }
  w->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  epoll_event ev = {};
  ev.events = EPOLLIN;
  ev.data.fd = w->wakefd;
  int r1 = w->wakefd < 0 ? -1 : epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wakefd, &ev);
  ev.data.fd = uv_backend_fd(loop);
  int r2 = r1 < 0 ? -1 : epoll_ctl(w->epfd, EPOLL_CTL_ADD, ev.data.fd, &ev);
  if (r2 < 0) {
    int err = errno;
    if (w->wakefd >= 0) close(w->wakefd);
    close(w->epfd);
    delete w;
    ThrowErrno(env, "epoll_ctl (event loop watcher)", err);
  }
  w->thread = std::thread(WatcherLoop, w);  // until StopWatcher, at the environment's teardown
  state->watcher = w;
  return w;
}

void Wake(LoopWatcher* w);

// Ends the watcher thread and closes its fds. It is disarmed (no burst
// runs: this is called on the loop's thread, outside LoopBurst), so it
// waits in epoll or on its condition variable, and the wake fd or the
// notify ends the wait.
void StopWatcher(LoopWatcher* w) {
  {
    std::lock_guard<std::mutex> lock(w->mu);
    w->quit = true;
    w->armed = false;
  }
  w->cv.notify_one();
  Wake(w);
  w->thread.join();
  close(w->wakefd);
  close(w->epfd);
  delete w;
}

int64_t DueMs(uv_loop_t* loop, int timeoutMs) {
  return timeoutMs < 0 ? -1 : static_cast<int64_t>(uv_now(loop)) + timeoutMs;
}

void Wake(LoopWatcher* w) {
  uint64_t one = 1;
  ssize_t r = write(w->wakefd, &one, sizeof one);
  (void)r;  // a full counter already wakes it
}

void Arm(LoopWatcher* w, kvm_run* run, int64_t dueMs) {
  {
    std::lock_guard<std::mutex> lock(w->mu);
    w->gen++;
    w->armed = true;
    w->kicked = false;
    w->dueMs = dueMs;
    w->target = pthread_self();
    w->run = run;
    w->armedAt = std::chrono::steady_clock::now();
  }
  w->cv.notify_one();
}

void Disarm(LoopWatcher* w) {
  bool wasArmed;
  {
    std::lock_guard<std::mutex> lock(w->mu);
    wasArmed = w->armed;
    w->armed = false;
    w->gen++;
  }
  if (wasArmed) Wake(w);
}

// An exit callback set a timer due sooner than the burst's deadline.
void MoveDeadline(LoopWatcher* w, int64_t dueMs) {
  {
    std::lock_guard<std::mutex> lock(w->mu);
    if (!w->armed) return;
    w->dueMs = dueMs;
  }
  Wake(w);
}

// Consumes kick signals pending on this thread (blocked outside KVM_RUN, so
// a kick that lands between two KVM_RUNs stays pending until taken here).
void EatKickSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, KickSignal());
  timespec zero = {0, 0};
  while (sigtimedwait(&set, nullptr, &zero) > 0) {
  }
}

// Calls the report callback on the loop thread; returns its VcpuAction.
// An exception from the callback is a bug (the TypeScript handler catches
// its own errors): this vCPU stops, and the error is raised as uncaught.
// Once JavaScript cannot run (jsGone), reports nothing and answers Stop.
int LoopReport(VcpuThread* v, int report, int err) {
  if (v->jsGone) return kStop;
  napi_env env = v->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return kStop;
  int action = kStop;
  napi_value argv[2], global, cb, ret;
  if (napi_create_int32(env, report, &argv[0]) == napi_ok && napi_create_int32(env, err, &argv[1]) == napi_ok &&
      napi_get_global(env, &global) == napi_ok && napi_get_reference_value(env, v->cb, &cb) == napi_ok) {
    if (napi_make_callback(env, v->asyncContext, global, cb, 2, argv, &ret) == napi_ok) {
      action = ReturnedAction(env, ret);
    } else if (!RaisePendingException(env)) {
      v->jsGone = true;
    }
  }
  napi_close_handle_scope(env, scope);
  return action;
}

// Close callback of a loop vCPU's two handles. libuv runs close callbacks
// newest first, so the VcpuThread (which holds both handles) is freed by
// whichever comes second, once libuv is done with both.
void LoopVcpuHandleClosed(uv_handle_t* h) {
  auto* vt = static_cast<VcpuThread*>(h->data);
  EnvState* state = vt->state;
  if (--vt->openHandles == 0) {
    state->vcpus.erase(vt->id);
    vt->cb.Reset();
    napi_async_destroy(vt->env, vt->asyncContext);
    delete vt;
  }
  HandleClosed(state);
}

void CloseLoopVcpu(VcpuThread* v) {
  v->finished = true;
  uv_idle_stop(&v->idle);
  v->openHandles = 2;
  CloseHandle(v->state, reinterpret_cast<uv_handle_t*>(&v->keepalive), LoopVcpuHandleClosed);
  CloseHandle(v->state, reinterpret_cast<uv_handle_t*>(&v->idle), LoopVcpuHandleClosed);
}

void FinishLoopVcpu(VcpuThread* v) {
  v->finished = true;
  uv_idle_stop(&v->idle);
  LoopReport(v, kStopped, 0);
  CloseLoopVcpu(v);
}

void LoopBurst(uv_idle_t* handle) {
  auto* v = static_cast<VcpuThread*>(handle->data);
  if (v->finished) return;
  Napi::HandleScope scope(Napi::Env(v->env));
  if (v->stopRequested.load()) return FinishLoopVcpu(v);

  // The loop's own timeout, without this idle handle (which would make it
  // 0): stopped for the burst, restarted after it; keepalive holds the loop.
  uv_loop_t* loop = handle->loop;
  uv_idle_stop(handle);
  int timeout = uv_backend_timeout(loop);
  int64_t cap = static_cast<int64_t>(uv_now(loop)) + kMaxBurstMs;
  int64_t due = DueMs(loop, timeout);
  v->burstDue = due < 0 || due > cap ? cap : due;

  v->inBurst = true;
  v->exitPending = false;
  v->state->burstVcpu = v;
  __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_RELAXED);
  Arm(v->watcher, v->run, v->burstDue);
  // JavaScript runs the burst with loopStep (StepLoopVcpu) and stops the
  // vCPU, when it must, with stopVcpu.
  LoopReport(v, kBurst, 0);
  Disarm(v->watcher);
  v->inBurst = false;
  v->state->burstVcpu = nullptr;
  if (v->stopRequested.load()) return FinishLoopVcpu(v);
  uv_idle_start(handle, LoopBurst);
}

// One step of a loop vCPU's burst: the checks after the exit JavaScript has
// just handled, then KVM_RUN until an exit (kStepExit), the loop's turn
// (kStepYield) or a stop (kStepStop).
int StepLoopVcpu(VcpuThread* v) {
  uv_loop_t* loop = v->idle.loop;
  if (v->exitPending) {
    v->exitPending = false;
    if (v->stopRequested.load(std::memory_order_relaxed)) return kStepStop;
    if (v->sampleRequested.load(std::memory_order_relaxed) && v->sampleRequested.exchange(false)) RecordSample(v);
    // What the exit's handler asked of the loop: new fds to watch, work it
    // must do now (an immediate, a pending callback, a handle closing), or
    // a timer due before the burst's deadline.
    int t;
    if (LoopNeedsTurn(loop, &t)) return kStepYield;
    int64_t d = DueMs(loop, t);
    if (d >= 0 && d < v->burstDue) {
      v->burstDue = d;
      MoveDeadline(v->watcher, d);
    }
  }
  for (;;) {
    int r = ioctl(v->fd, KVM_RUN, 0);
    int err = r < 0 ? errno : 0;
    if (r < 0 && (err == EINTR || err == EAGAIN)) {
      EatKickSignals();
      // Sequentially consistent: the flag loads below must not pass this
      // store, or a Kick between them would be lost (its 1 overwritten).
      __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
      if (v->stopRequested.load()) return kStepStop;
      if (v->sampleRequested.exchange(false)) RecordSample(v);
      bool kicked;
      {
        std::lock_guard<std::mutex> lock(v->watcher->mu);
        kicked = v->watcher->kicked;
      }
      if (kicked) return kStepYield;  // the loop has work: back to libuv
      continue;                       // some other signal: go on
    }
    if (r < 0) return -err;
    if (ServeFastRead(v)) continue;
    v->exitPending = true;
    return kStepExit;
  }
}

// loopStep(handle): see StepLoopVcpu. Only the vCPU whose burst is running
// steps (found without a lookup); any other handle answers kStepYield.
Napi::Value LoopStep(const Napi::CallbackInfo& info) {
  VcpuThread* v = StateOf(info.Env())->burstVcpu;
  int step = v != nullptr && v->id == ArgInt(info, 0) ? StepLoopVcpu(v) : kStepYield;
  return Napi::Number::New(info.Env(), step);
}

Napi::Value StartVcpuOnLoop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt(info, 0);
  if (info.Length() < 3 || !info[1].IsArrayBuffer() || !info[2].IsFunction()) ThrowType(env, "startVcpuOnLoop(fd, run, onReport)");
  Napi::ArrayBuffer run = info[1].As<Napi::ArrayBuffer>();
  if (run.ByteLength() < sizeof(kvm_run)) ThrowType(env, "run must be the vCPU's kvm_run mapping");
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) ThrowType(env, "no event loop");
  InstallKickHandler();
  EnvState* state = StateOf(env);
  LoopWatcher* w = WatcherFor(env, state, loop);

  // The kick signal: blocked on this thread, open only inside KVM_RUN.
  sigset_t block, mask;
  sigemptyset(&block);
  sigaddset(&block, KickSignal());
  pthread_sigmask(SIG_BLOCK, &block, nullptr);
  pthread_sigmask(SIG_BLOCK, nullptr, &mask);
  sigdelset(&mask, KickSignal());
  // The kernel's sigset is 64 bits on x86-64: the first 8 bytes of glibc's.
  std::vector<uint8_t> buf(sizeof(kvm_signal_mask) + 8);
  auto* km = reinterpret_cast<kvm_signal_mask*>(buf.data());
  km->len = 8;
  memcpy(km->sigset, &mask, 8);
  // The ioctl number spelled out: its size field is sizeof(struct
  // kvm_signal_mask) as C sees it (4); a C++ compiler sizes the struct with
  // its zero-length array differently (8 here), which KVM refuses.
  constexpr unsigned long kSetSignalMask = _IOC(_IOC_WRITE, KVMIO, 0x8b, sizeof(__u32));
  if (ioctl(fd, kSetSignalMask, km) < 0) ThrowErrno(env, "KVM_SET_SIGNAL_MASK", errno);

  kvm_run* own = MapRunForAddon(env, fd, run.ByteLength());
  auto* v = new VcpuThread();
  v->state = state;
  v->runSize = run.ByteLength();
  v->id = state->nextVcpu++;
  v->fd = fd;
  v->onLoop = true;
  v->env = env;
  v->watcher = w;
  v->tid = pthread_self();
  v->run = own;
  v->cb = Napi::Persistent(info[2].As<Napi::Function>());
  if (napi_async_init(env, nullptr, Napi::String::New(env, "tsvmm-vcpu"), &v->asyncContext) != napi_ok) {
    delete v;
    ThrowType(env, "napi_async_init failed");
  }
  uv_idle_init(loop, &v->idle);
  v->idle.data = v;
  uv_idle_start(&v->idle, LoopBurst);
  uv_prepare_init(loop, &v->keepalive);
  v->keepalive.data = v;
  uv_prepare_start(&v->keepalive, [](uv_prepare_t*) {});
  v->started.store(true);
  state->vcpus[v->id] = v;
  return Napi::Number::New(env, v->id);
}

// Records the guest's RIP into the sample buffer: the thread leaves
// KVM_RUN, samples, and re-enters without reporting.
Napi::Value SampleVcpu(const Napi::CallbackInfo& info) {
  VcpuThread* v = FindVcpu(info);
  if (v->onLoop) {
    // This thread is the vCPU's: outside a burst the vCPU is not in KVM_RUN,
    // so a sample is taken now; inside one (an exit callback), after it.
    if (!v->inBurst)
      RecordSample(v);
    else
      v->sampleRequested.store(true);
    return info.Env().Undefined();
  }
  v->sampleRequested.store(true);
  Kick(v);
  return info.Env().Undefined();
}

Napi::Value StopVcpu(const Napi::CallbackInfo& info) {
  EnvState* state = StateOf(info.Env());
  auto it = state->vcpus.find(ArgInt(info, 0));
  if (it == state->vcpus.end()) return info.Env().Undefined();  // already gone: stopping twice is fine
  it->second->stopRequested.store(true);
  {
    // A paused thread waits on pauseCv, not in KVM_RUN.
    std::lock_guard<std::mutex> lock(it->second->mu);
  }
  it->second->pauseCv.notify_all();
  // A loop vCPU sees the flag after the current exit callback, or at its
  // next idle turn; a threaded one is kicked out of KVM_RUN.
  if (!it->second->onLoop) Kick(it->second);
  return info.Env().Undefined();
}

// pauseVcpu(handle): the thread leaves KVM_RUN and reports kPaused once
// it is out; resumeVcpu(handle) lets it run again. Threads only: a vCPU on
// the event loop's thread is paused by the caller not running it.
Napi::Value PauseVcpu(const Napi::CallbackInfo& info) {
  VcpuThread* v = FindVcpu(info);
  if (v->onLoop) ThrowType(info.Env(), "pause needs a vCPU on a thread of its own");
  {
    std::lock_guard<std::mutex> lock(v->mu);
    v->pauseRequested.store(true);
    v->pauseSeq++;
  }
  v->pauseCv.notify_all();  // a thread still parked reports this request too
  Kick(v);
  return info.Env().Undefined();
}

Napi::Value ResumeVcpu(const Napi::CallbackInfo& info) {
  VcpuThread* v = FindVcpu(info);
  {
    std::lock_guard<std::mutex> lock(v->mu);
    v->pauseRequested.store(false);
  }
  v->pauseCv.notify_all();
  return info.Env().Undefined();
}

// getClock(vmFd) -> BigInt: KVM_GET_CLOCK's kvmclock value (ns).
Napi::Value GetClock(const Napi::CallbackInfo& info) {
  kvm_clock_data data{};
  Ioctl(info.Env(), ArgInt(info, 0), KVM_GET_CLOCK, &data, "KVM_GET_CLOCK");
  return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(data.clock));
}

// setClock(vmFd, ns: BigInt): KVM_SET_CLOCK.
Napi::Value SetClock(const Napi::CallbackInfo& info) {
  if (info.Length() < 2 || !info[1].IsBigInt()) ThrowType(info.Env(), "setClock(vmFd, ns: bigint)");
  bool lossless = false;
  kvm_clock_data data{};
  data.clock = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) ThrowType(info.Env(), "setClock: ns must fit in 64 bits");
  Ioctl(info.Env(), ArgInt(info, 0), KVM_SET_CLOCK, &data, "KVM_SET_CLOCK");
  return info.Env().Undefined();
}

Napi::Value SetSampleBuffer(const Napi::CallbackInfo& info) {
  VcpuThread* v = FindVcpu(info);
  if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_biguint64_array)
    ThrowType(info.Env(), "sample buffer must be a BigUint64Array");
  Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
  size_t n = ta.ElementLength();
  if (n < 2) ThrowType(info.Env(), "sample buffer needs at least 2 slots");
  std::shared_ptr<SharedBlock> block = SharedOf(info.Env(), ta, n * sizeof(uint64_t), "sample buffer");
  std::lock_guard<std::mutex> lock(v->sampleMu);
  // Safe: a BigUint64Array's data is 8-byte aligned; samplesBlock keeps it alive.
  v->samples = reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset());
  v->sampleCap = n - 1;
  v->samplesBlock = std::move(block);
  return info.Env().Undefined();
}

Napi::Value SetFastReads(const Napi::CallbackInfo& info) {
  VcpuThread* v = FindVcpu(info);
  if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    ThrowType(info.Env(), "fast-read table must be an Int32Array");
  Napi::TypedArray ta = info[1].As<Napi::TypedArray>();
  if (ta.ElementLength() < kFastReadSlots) ThrowType(info.Env(), "fast-read table needs " + std::to_string(kFastReadSlots) + " slots");
  if (v->fastReads.load() != nullptr) ThrowType(info.Env(), "this vCPU has its fast-read table already");
  // Set once: the vCPU may be running (on its thread) and reads the pointer
  // at every exit, so a table is never replaced. fastReadsBlock keeps it
  // alive as long as the vCPU; an Int32Array's data is 4-byte aligned, and
  // the counts' slots are 8-byte aligned within the table.
  std::shared_ptr<SharedBlock> block = SharedOf(info.Env(), ta, kFastReadSlots * sizeof(int32_t), "fast-read table");
  auto* t = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset());
  if (reinterpret_cast<uintptr_t>(t) % 8 != 0) ThrowType(info.Env(), "fast-read table must start 8-byte aligned");
  v->fastReadsBlock = std::move(block);
  v->fastReads.store(t, std::memory_order_release);
  return info.Env().Undefined();
}

Napi::Value RunOnce(const Napi::CallbackInfo& info) {
  // A signal for this thread (a profiler's SIGPROF, say) ends KVM_RUN
  // with EINTR before the guest exits: run again, as a caller would.
  int r;
  do {
    r = ioctl(ArgInt(info, 0), KVM_RUN, 0);
  } while (r < 0 && errno == EINTR);
  return Napi::Number::New(info.Env(), r < 0 ? -errno : r);
}

// ---------------------------------------------------------------------------
// eventfd, TAP, plain fd I/O, file locks

Napi::Value EventFd(const Napi::CallbackInfo& info) {
  int fd = eventfd(ArgInt(info, 0), EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) ThrowErrno(info.Env(), "eventfd", errno);
  return Napi::Number::New(info.Env(), Own(info.Env(), fd));
}

Napi::Value EventFdWrite(const Napi::CallbackInfo& info) {
  uint64_t v = ArgU64(info, 1);
  ssize_t r;
  do {
    r = write(ArgInt(info, 0), &v, sizeof v);
  } while (r < 0 && errno == EINTR);
  if (r < 0 && errno != EAGAIN) ThrowErrno(info.Env(), "eventfd write", errno);
  return info.Env().Undefined();
}

Napi::Value EventFdRead(const Napi::CallbackInfo& info) {
  uint64_t v = 0;
  ssize_t r;
  do {
    r = read(ArgInt(info, 0), &v, sizeof v);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN) return Napi::Number::New(info.Env(), 0);
    ThrowErrno(info.Env(), "eventfd read", errno);
  }
  return Napi::Number::New(info.Env(), static_cast<double>(v));
}

Napi::Value TapOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) ThrowType(env, "tap name must be a string");
  std::string name = info[0].As<Napi::String>();
  if (name.size() >= IFNAMSIZ) ThrowType(env, "tap name longer than " + std::to_string(IFNAMSIZ - 1) + " characters");
  int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) ThrowErrno(env, "open /dev/net/tun", errno);
  ifreq ifr = {};
  memcpy(ifr.ifr_name, name.c_str(), name.size());
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
    int err = errno;
    close(fd);
    ThrowErrno(env, "TUNSETIFF " + name, err);
  }
  Own(env, fd);
  Napi::Object out = Napi::Object::New(env);
  out.Set("fd", fd);
  out.Set("name", std::string(ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ)));
  return out;
}

Napi::Value TapSetOffload(const Napi::CallbackInfo& info) {
  IoctlVal(info.Env(), ArgInt(info, 0), TUNSETOFFLOAD, ArgInt(info, 1), "TUNSETOFFLOAD");
  return info.Env().Undefined();
}

Napi::Value TapSetVnetHdrSize(const Napi::CallbackInfo& info) {
  int size = ArgInt(info, 1);
  Ioctl(info.Env(), ArgInt(info, 0), TUNSETVNETHDRSZ, &size, "TUNSETVNETHDRSZ");
  return info.Env().Undefined();
}

Napi::Value Read(const Napi::CallbackInfo& info) {
  int fd = ArgInt(info, 0);
  Bytes b = ArgBytes(info, 1);
  ssize_t r;
  do {
    r = read(fd, b.data, b.length);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN) return Napi::Number::New(info.Env(), -EAGAIN);
    ThrowErrno(info.Env(), "read", errno);
  }
  return Napi::Number::New(info.Env(), static_cast<double>(r));
}

Napi::Value Writev(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt(info, 0);
  if (info.Length() < 2 || !info[1].IsArray()) ThrowType(env, "pieces must be an array of Uint8Array");
  Napi::Array arr = info[1].As<Napi::Array>();
  uint32_t n = arr.Length();
  if (n > IOV_MAX) ThrowType(env, "too many pieces for writev");
  std::vector<iovec> iov(n);
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value v = arr.Get(i);
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) ThrowType(env, "pieces must be Uint8Arrays");
    Napi::Uint8Array u8 = v.As<Napi::Uint8Array>();
    iov[i].iov_base = u8.Data();
    iov[i].iov_len = u8.ByteLength();
  }
  ssize_t r;
  do {
    r = writev(fd, iov.data(), n);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    if (errno == EAGAIN) return Napi::Number::New(env, -EAGAIN);
    ThrowErrno(env, "writev", errno);
  }
  return Napi::Number::New(env, static_cast<double>(r));
}

// peerUid(socketFd) -> the uid of the process at the other end of a Unix
// socket (SO_PEERCRED), for the control socket's owner check.
Napi::Value PeerUid(const Napi::CallbackInfo& info) {
  struct ucred cred = {};
  socklen_t len = sizeof(cred);
  if (getsockopt(ArgInt(info, 0), SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) ThrowErrno(info.Env(), "SO_PEERCRED", errno);
  return Napi::Number::New(info.Env(), cred.uid);
}

Napi::Value LockFile(const Napi::CallbackInfo& info) {
  int fd = ArgInt(info, 0);
  bool exclusive = info.Length() > 1 && info[1].ToBoolean();
  struct flock fl = {};
  fl.l_type = exclusive ? F_WRLCK : F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = 0;
  fl.l_len = 0;  // the whole file, however it grows
  // OFD locks belong to the open file, not the process: a second open in the
  // same process conflicts too, and closing an unrelated fd does not drop it.
  if (fcntl(fd, F_OFD_SETLK, &fl) < 0) ThrowErrno(info.Env(), exclusive ? "F_OFD_SETLK write lock" : "F_OFD_SETLK read lock", errno);
  return info.Env().Undefined();
}

// ---------------------------------------------------------------------------
// fd readiness on the main event loop

struct PollWatch {
  EnvState* state = nullptr;
  int id;
  uv_poll_t handle;
  Napi::FunctionReference cb;
  std::unique_ptr<Napi::AsyncContext> ctx;
  Napi::Env env;
  bool active = false;
  PollWatch(Napi::Env e) : env(e) {}
};

void OnPoll(uv_poll_t* h, int status, int events) {
  // Safe: handle.data was set to the owning PollWatch, freed only in the close callback.
  auto* w = static_cast<PollWatch*>(h->data);
  (void)events;
  (void)status;
  napi_env env = w->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value recv, cb, ret;
  // MakeCallback runs the microtask queue after the callback, as for any I/O
  // callback. When it fails without an exception, JavaScript cannot run any
  // more: the environment's teardown closes this watch.
  if (napi_create_object(env, &recv) == napi_ok && napi_get_reference_value(env, w->cb, &cb) == napi_ok &&
      napi_make_callback(env, *w->ctx, recv, cb, 0, nullptr, &ret) != napi_ok)
    RaisePendingException(env);
  napi_close_handle_scope(env, scope);
}

// Stops and frees a watch (already out of its environment's map).
void ClosePoll(PollWatch* w) {
  uv_poll_stop(&w->handle);
  w->cb.Reset();
  CloseHandle(w->state, reinterpret_cast<uv_handle_t*>(&w->handle), [](uv_handle_t* h) {
    // Safe: data is the PollWatch that owns this handle; nothing else frees it.
    auto* pw = static_cast<PollWatch*>(h->data);
    EnvState* state = pw->state;
    delete pw;
    HandleClosed(state);
  });
}

PollWatch* FindPoll(const Napi::CallbackInfo& info) {
  EnvState* state = StateOf(info.Env());
  auto it = state->polls.find(ArgInt(info, 0));
  if (it == state->polls.end()) ThrowType(info.Env(), "unknown poll handle");
  return it->second;
}

Napi::Value PollStart(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt(info, 0);
  if (info.Length() < 2 || !info[1].IsFunction()) ThrowType(env, "pollStart(fd, onReadable)");
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) ThrowType(env, "no event loop");
  EnvState* state = StateOf(env);
  auto* w = new PollWatch(env);
  w->state = state;
  w->id = state->nextPoll++;
  int r = uv_poll_init(loop, &w->handle, fd);
  if (r < 0) {
    delete w;
    ThrowErrno(env, "uv_poll_init", -r);
  }
  w->handle.data = w;
  w->cb = Napi::Persistent(info[1].As<Napi::Function>());
  w->ctx = std::make_unique<Napi::AsyncContext>(env, "tsvmm-poll");
  uv_poll_start(&w->handle, UV_READABLE, OnPoll);
  w->active = true;
  state->polls[w->id] = w;
  return Napi::Number::New(env, w->id);
}

Napi::Value PollResume(const Napi::CallbackInfo& info) {
  PollWatch* w = FindPoll(info);
  if (!w->active) {
    uv_poll_start(&w->handle, UV_READABLE, OnPoll);
    w->active = true;
  }
  return info.Env().Undefined();
}

Napi::Value PollStop(const Napi::CallbackInfo& info) {
  PollWatch* w = FindPoll(info);
  if (w->active) {
    uv_poll_stop(&w->handle);
    w->active = false;
  }
  return info.Env().Undefined();
}

Napi::Value PollClose(const Napi::CallbackInfo& info) {
  EnvState* state = StateOf(info.Env());
  auto it = state->polls.find(ArgInt(info, 0));
  if (it == state->polls.end()) return info.Env().Undefined();
  PollWatch* w = it->second;
  state->polls.erase(it);
  ClosePoll(w);
  return info.Env().Undefined();
}

// ---------------------------------------------------------------------------
// Layout and constants

#define OFF(type, field) Napi::Number::New(env, offsetof(type, field))

Napi::Object Layout(Napi::Env env) {
  Napi::Object l = Napi::Object::New(env);

  Napi::Object run = Napi::Object::New(env);
  run.Set("requestInterruptWindow", OFF(kvm_run, request_interrupt_window));
  run.Set("immediateExit", OFF(kvm_run, immediate_exit));
  run.Set("exitReason", OFF(kvm_run, exit_reason));
  run.Set("readyForInterruptInjection", OFF(kvm_run, ready_for_interrupt_injection));
  run.Set("ifFlag", OFF(kvm_run, if_flag));
  run.Set("ioDirection", OFF(kvm_run, io.direction));
  run.Set("ioSize", OFF(kvm_run, io.size));
  run.Set("ioPort", OFF(kvm_run, io.port));
  run.Set("ioCount", OFF(kvm_run, io.count));
  run.Set("ioDataOffset", OFF(kvm_run, io.data_offset));
  run.Set("mmioPhysAddr", OFF(kvm_run, mmio.phys_addr));
  run.Set("mmioData", OFF(kvm_run, mmio.data));
  run.Set("mmioLen", OFF(kvm_run, mmio.len));
  run.Set("mmioIsWrite", OFF(kvm_run, mmio.is_write));
  run.Set("internalSuberror", OFF(kvm_run, internal.suberror));
  run.Set("internalNdata", OFF(kvm_run, internal.ndata));
  run.Set("internalData", OFF(kvm_run, internal.data));
  run.Set("emulationFlags", OFF(kvm_run, emulation_failure.flags));
  run.Set("emulationInsnSize", OFF(kvm_run, emulation_failure.insn_size));
  run.Set("emulationInsnBytes", OFF(kvm_run, emulation_failure.insn_bytes));
  run.Set("failEntryReason", OFF(kvm_run, fail_entry.hardware_entry_failure_reason));
  run.Set("failEntryCpu", OFF(kvm_run, fail_entry.cpu));
  run.Set("systemEventType", OFF(kvm_run, system_event.type));
  run.Set("syncRegs", OFF(kvm_run, s.regs.regs));
  run.Set("kvmValidRegs", OFF(kvm_run, kvm_valid_regs));
  run.Set("kvmDirtyRegs", OFF(kvm_run, kvm_dirty_regs));
  l.Set("run", run);

  Napi::Object s = Napi::Object::New(env);
  s.Set("size", Napi::Number::New(env, sizeof(kvm_sregs)));
  s.Set("cs", OFF(kvm_sregs, cs));
  s.Set("ds", OFF(kvm_sregs, ds));
  s.Set("es", OFF(kvm_sregs, es));
  s.Set("fs", OFF(kvm_sregs, fs));
  s.Set("gs", OFF(kvm_sregs, gs));
  s.Set("ss", OFF(kvm_sregs, ss));
  s.Set("tr", OFF(kvm_sregs, tr));
  s.Set("ldt", OFF(kvm_sregs, ldt));
  s.Set("gdt", OFF(kvm_sregs, gdt));
  s.Set("idt", OFF(kvm_sregs, idt));
  s.Set("cr0", OFF(kvm_sregs, cr0));
  s.Set("cr2", OFF(kvm_sregs, cr2));
  s.Set("cr3", OFF(kvm_sregs, cr3));
  s.Set("cr4", OFF(kvm_sregs, cr4));
  s.Set("cr8", OFF(kvm_sregs, cr8));
  s.Set("efer", OFF(kvm_sregs, efer));
  s.Set("apicBase", OFF(kvm_sregs, apic_base));
  l.Set("sregs", s);

  Napi::Object seg = Napi::Object::New(env);
  seg.Set("size", Napi::Number::New(env, sizeof(kvm_segment)));
  seg.Set("base", OFF(kvm_segment, base));
  seg.Set("limit", OFF(kvm_segment, limit));
  seg.Set("selector", OFF(kvm_segment, selector));
  seg.Set("type", OFF(kvm_segment, type));
  seg.Set("present", OFF(kvm_segment, present));
  seg.Set("dpl", OFF(kvm_segment, dpl));
  seg.Set("db", OFF(kvm_segment, db));
  seg.Set("s", OFF(kvm_segment, s));
  seg.Set("l", OFF(kvm_segment, l));
  seg.Set("g", OFF(kvm_segment, g));
  seg.Set("avl", OFF(kvm_segment, avl));
  seg.Set("unusable", OFF(kvm_segment, unusable));
  l.Set("segment", seg);

  Napi::Object dt = Napi::Object::New(env);
  dt.Set("size", Napi::Number::New(env, sizeof(kvm_dtable)));
  dt.Set("base", OFF(kvm_dtable, base));
  dt.Set("limit", OFF(kvm_dtable, limit));
  l.Set("dtable", dt);

  l.Set("regsSize", Napi::Number::New(env, sizeof(kvm_regs)));

  Napi::Object fpu = Napi::Object::New(env);
  fpu.Set("size", Napi::Number::New(env, sizeof(kvm_fpu)));
  fpu.Set("fcw", OFF(kvm_fpu, fcw));
  fpu.Set("mxcsr", OFF(kvm_fpu, mxcsr));
  l.Set("fpu", fpu);

  l.Set("lapicSize", Napi::Number::New(env, sizeof(kvm_lapic_state)));

  Napi::Object ev = Napi::Object::New(env);
  ev.Set("size", Napi::Number::New(env, sizeof(kvm_vcpu_events)));
  ev.Set("exceptionInjected", OFF(kvm_vcpu_events, exception.injected));
  ev.Set("exceptionNr", OFF(kvm_vcpu_events, exception.nr));
  ev.Set("exceptionHasErrorCode", OFF(kvm_vcpu_events, exception.has_error_code));
  ev.Set("exceptionPending", OFF(kvm_vcpu_events, exception.pending));
  ev.Set("exceptionErrorCode", OFF(kvm_vcpu_events, exception.error_code));
  ev.Set("flags", OFF(kvm_vcpu_events, flags));
  l.Set("vcpuEvents", ev);

  Napi::Object tr = Napi::Object::New(env);
  tr.Set("size", Napi::Number::New(env, sizeof(kvm_translation)));
  tr.Set("linearAddress", OFF(kvm_translation, linear_address));
  tr.Set("physicalAddress", OFF(kvm_translation, physical_address));
  tr.Set("valid", OFF(kvm_translation, valid));
  l.Set("translation", tr);

  l.Set("cpuid2HeaderSize", Napi::Number::New(env, sizeof(CpuidHeader)));
  Napi::Object ce = Napi::Object::New(env);
  ce.Set("size", Napi::Number::New(env, sizeof(kvm_cpuid_entry2)));
  ce.Set("function", OFF(kvm_cpuid_entry2, function));
  ce.Set("index", OFF(kvm_cpuid_entry2, index));
  ce.Set("flags", OFF(kvm_cpuid_entry2, flags));
  ce.Set("eax", OFF(kvm_cpuid_entry2, eax));
  ce.Set("ebx", OFF(kvm_cpuid_entry2, ebx));
  ce.Set("ecx", OFF(kvm_cpuid_entry2, ecx));
  ce.Set("edx", OFF(kvm_cpuid_entry2, edx));
  l.Set("cpuidEntry", ce);

  l.Set("msrsHeaderSize", Napi::Number::New(env, sizeof(MsrsHeader)));
  l.Set("msrEntrySize", Napi::Number::New(env, sizeof(kvm_msr_entry)));
  l.Set("mpStateSize", Napi::Number::New(env, sizeof(kvm_mp_state)));
  Napi::Object rt = Napi::Object::New(env);
  rt.Set("headerSize", Napi::Number::New(env, sizeof(IrqRoutingHeader)));
  rt.Set("entrySize", Napi::Number::New(env, sizeof(kvm_irq_routing_entry)));
  rt.Set("gsi", Napi::Number::New(env, offsetof(kvm_irq_routing_entry, gsi)));
  rt.Set("type", Napi::Number::New(env, offsetof(kvm_irq_routing_entry, type)));
  rt.Set("flags", Napi::Number::New(env, offsetof(kvm_irq_routing_entry, flags)));
  rt.Set("irqchip", Napi::Number::New(env, offsetof(kvm_irq_routing_entry, u.irqchip.irqchip)));
  rt.Set("pin", Napi::Number::New(env, offsetof(kvm_irq_routing_entry, u.irqchip.pin)));
  rt.Set("msiAddressLo", Napi::Number::New(env, offsetof(kvm_irq_routing_entry, u.msi.address_lo)));
  rt.Set("msiAddressHi", Napi::Number::New(env, offsetof(kvm_irq_routing_entry, u.msi.address_hi)));
  rt.Set("msiData", Napi::Number::New(env, offsetof(kvm_irq_routing_entry, u.msi.data)));
  l.Set("irqRouting", rt);
  return l;
}

Napi::Object Constants(Napi::Env env) {
  Napi::Object c = Napi::Object::New(env);
#define C(x) c.Set(#x, Napi::Number::New(env, static_cast<double>(x)));
  C(KVM_API_VERSION)
  // Exit reasons, internal-error suberrors, system events, TUN_F_* and errno
  // values are ABI numbers TypeScript defines once (src/kvm/exits.ts,
  // src/virtio/net/tap.ts, node:os constants); the addon exports only what
  // TypeScript asks KVM about by name.
  C(KVM_CAP_IRQCHIP) C(KVM_CAP_HLT) C(KVM_CAP_USER_MEMORY) C(KVM_CAP_SET_TSS_ADDR) C(KVM_CAP_EXT_CPUID)
  C(KVM_CAP_NR_VCPUS) C(KVM_CAP_MAX_VCPUS) C(KVM_CAP_NR_MEMSLOTS) C(KVM_CAP_PIT2) C(KVM_CAP_IOEVENTFD)
  C(KVM_CAP_IRQFD) C(KVM_CAP_SET_IDENTITY_MAP_ADDR) C(KVM_CAP_IMMEDIATE_EXIT) C(KVM_CAP_VCPU_EVENTS)
  C(KVM_CAP_SYNC_REGS) C(KVM_CAP_IRQ_ROUTING) C(KVM_CAP_ADJUST_CLOCK) C(KVM_CAP_TSC_CONTROL)
  C(KVM_CAP_X86_ROBUST_SINGLESTEP) C(KVM_CAP_SIGNAL_MSI) C(KVM_CAP_PMU_CAPABILITY)
  C(KVM_CAP_COALESCED_MMIO) C(KVM_CAP_COALESCED_PIO) C(KVM_CAP_TSC_DEADLINE_TIMER)
#ifdef KVM_CAP_HALT_POLL
  C(KVM_CAP_HALT_POLL)
#endif
  C(KVM_PMU_CAP_DISABLE)
  C(KVM_IRQ_ROUTING_IRQCHIP) C(KVM_IRQ_ROUTING_MSI)
  C(KVM_IRQCHIP_PIC_MASTER) C(KVM_IRQCHIP_PIC_SLAVE) C(KVM_IRQCHIP_IOAPIC)
  C(KVM_MEM_LOG_DIRTY_PAGES) C(KVM_MEM_READONLY)
  C(KVM_IOEVENTFD_FLAG_DATAMATCH) C(KVM_IOEVENTFD_FLAG_PIO) C(KVM_IOEVENTFD_FLAG_DEASSIGN)
  C(KVM_IRQFD_FLAG_DEASSIGN)
  C(KVM_PIT_SPEAKER_DUMMY)
  C(KVM_MP_STATE_RUNNABLE) C(KVM_MP_STATE_UNINITIALIZED) C(KVM_MP_STATE_INIT_RECEIVED) C(KVM_MP_STATE_HALTED)
  C(KVM_MP_STATE_SIPI_RECEIVED)
  C(KVM_VCPUEVENT_VALID_NMI_PENDING) C(KVM_VCPUEVENT_VALID_SIPI_VECTOR) C(KVM_VCPUEVENT_VALID_SHADOW)
  C(KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
#undef C
  return c;
}

// ---------------------------------------------------------------------------
// Environment teardown
//
// The environment's cleanup hook: its JavaScript is gone (a Worker that
// exited or was terminated, or the main thread at the end), and what the
// addon runs for it must stop before its event loop is closed.
//
// Node runs it on the loop's thread, with JavaScript disallowed, after it
// has finalized the environment's buffers (Node 20: in a queue drained
// before any cleanup hook) and after the cleanup hooks newer than this one
// (Init adds it), among them those closing the vCPU threads' thread-safe
// functions: a report a thread queued is never dispatched, and a new one is
// refused. The functions are finalized later, from a close callback, which
// frees each VcpuThread.
//
// So guest RAM may be unmapped while vCPU threads still run: the slots it
// backed were deleted first (ReleaseMapping), and the guest sees no RAM
// there; the addon's own kvm_run mappings are still there. vCPUs on the
// loop's thread run only inside the loop, which does not run from the
// buffers' finalization to the end of this hook.
//
// In order: vCPU threads are abandoned (Abandon: stop, no answer awaited,
// kicked out of KVM_RUN or a pause) and joined; vCPUs on the loop's thread
// have their handles closed without a Stopped report; the loop watcher
// thread, which sends the kick signal to this thread, is ended and joined
// (no burst is running: this hook runs on the loop's thread) and its epoll
// and eventfd closed; fd watches are closed; and last the fds the
// environment got from the addon and did not close (/dev/kvm, VMs, vCPUs,
// eventfds, TAPs: the VM goes once the VcpuThreads' own kvm_run mappings
// go too, with the thread-safe functions' finalizers). The hook is
// asynchronous so that Node keeps running the loop until every handle it
// closed has called back (HandleClosed ends it).
void StopVcpuThreads(EnvState* state) {
  std::vector<VcpuThread*> threads;
  for (auto& entry : state->vcpus) {
    VcpuThread* v = entry.second;
    if (!v->onLoop && v->thread.joinable()) {
      Abandon(v);
      threads.push_back(v);
    }
  }
  for (VcpuThread* v : threads) v->thread.join();
}

void Teardown(napi_async_cleanup_hook_handle hook, void* arg) {
  auto* state = static_cast<EnvState*>(arg);
  StopVcpuThreads(state);
  for (auto& entry : state->vcpus) {
    VcpuThread* v = entry.second;
    if (v->onLoop && !v->finished) {
      v->jsGone = true;
      CloseLoopVcpu(v);
    }
  }
  if (state->watcher != nullptr) {
    StopWatcher(state->watcher);
    state->watcher = nullptr;
  }
  for (auto& entry : state->polls) ClosePoll(entry.second);
  state->polls.clear();
  CloseOwnedFds(state);
  if (state->closing == 0) {
    napi_remove_async_cleanup_hook(hook);
  } else {
    state->hookWaiting = hook;
  }
}

// Runs once per environment that loads the module (the main thread, each
// worker), not once per process.
Napi::Object Init(Napi::Env env, Napi::Object exports) {
  // Freed with the environment's napi_env, which the cleanup hook holds
  // until teardown is over and each thread-safe function until finalized:
  // after every VcpuThread and PollWatch of it.
  auto* state = new EnvState();
  env.SetInstanceData<EnvState>(state);
  napi_async_cleanup_hook_handle hook;
  if (napi_add_async_cleanup_hook(env, Teardown, state, &hook) != napi_ok) ThrowType(env, "napi_add_async_cleanup_hook failed");
  exports.Set("layout", Layout(env));
  Napi::Object constants = Constants(env);
  exports.Set("constants", constants);
  tsvmm::RegisterSandbox(env, exports, constants);
#define F(name, fn) exports.Set(name, Napi::Function::New(env, fn, name));
  F("open", Open)
  F("close", Close)
  F("getApiVersion", GetApiVersion)
  F("checkExtension", CheckExtension)
  F("getTscKhz", GetTscKhz)
  F("createVm", CreateVm)
  F("getVcpuMmapSize", GetVcpuMmapSize)
  F("getSupportedCpuid", GetSupportedCpuid)
  F("setTssAddr", SetTssAddr)
  F("setIdentityMapAddr", SetIdentityMapAddr)
  F("createIrqchip", CreateIrqchip)
  F("createPit2", CreatePit2)
  F("irqLine", IrqLine)
  F("setUserMemoryRegion", SetUserMemoryRegion)
  F("ioeventfd", IoEventFd)
  F("irqfd", IrqFd)
  F("registerCoalesced", RegisterCoalesced)
  F("createVcpu", CreateVcpu)
  F("setGsiRouting", SetGsiRouting)
  F("signalMsi", SignalMsi)
  F("enableCap", EnableCap)
  F("unmap", Unmap)
  F("allocGuestMemory", AllocGuestMemory)
  F("allocShared", AllocShared)
  F("mapVcpuRun", MapVcpuRun)
  F("getRegs", GetRegs)
  F("setRegs", SetRegs)
  F("getSregs", GetSregs)
  F("setSregs", SetSregs)
  F("getFpu", GetFpu)
  F("setFpu", SetFpu)
  F("setMsrs", SetMsrs)
  F("getMsrs", GetMsrs)
  F("setCpuid2", SetCpuid2)
  F("getLapic", GetLapic)
  F("setLapic", SetLapic)
  F("getVcpuEvents", GetVcpuEvents)
  F("setVcpuEvents", SetVcpuEvents)
  F("getMpState", GetMpState)
  F("setMpState", SetMpState)
  F("translate", Translate)
  F("runOnce", RunOnce)
  F("loopStep", LoopStep)
  F("startVcpu", StartVcpu)
  F("startVcpuOnLoop", StartVcpuOnLoop)
  F("sampleVcpu", SampleVcpu)
  F("stopVcpu", StopVcpu)
  F("pauseVcpu", PauseVcpu)
  F("resumeVcpu", ResumeVcpu)
  F("getClock", GetClock)
  F("setClock", SetClock)
  F("setSampleBuffer", SetSampleBuffer)
  F("setFastReads", SetFastReads)
  F("eventfd", EventFd)
  F("eventfdWrite", EventFdWrite)
  F("eventfdRead", EventFdRead)
  F("tapOpen", TapOpen)
  F("tapSetOffload", TapSetOffload)
  F("tapSetVnetHdrSize", TapSetVnetHdrSize)
  F("read", Read)
  F("writev", Writev)
  F("lockFile", LockFile)
  F("peerUid", PeerUid)
  F("pollStart", PollStart)
  F("pollResume", PollResume)
  F("pollStop", PollStop)
  F("pollClose", PollClose)
#undef F
  return exports;
}

}  // namespace

NODE_API_MODULE(tsvmm, Init)
