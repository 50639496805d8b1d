// tsvmm native addon: the system calls of the sandbox.
//
// Two mechanisms, both decided in TypeScript (src/kvm/sandbox.ts), which
// computes the Landlock access masks for the kernel's ABI and assembles the
// seccomp program; this file only makes the calls:
//
// - Landlock for the whole process. landlock_restrict_self() confines the
//   calling thread only (the kernels here have no LANDLOCK_RESTRICT_SELF_TSYNC),
//   and a Node process already has threads (V8's platform workers, libuv's
//   thread pool) when a VM starts. So every other thread is asked, with a
//   real-time signal, to confine itself from the signal handler (two system
//   calls, async-signal-safe), the way libcap's psx and glibc's setxid
//   broadcast reach every thread. Threads created afterwards inherit the
//   domain of the thread that creates them.
// - seccomp on each vCPU thread: the thread installs its own filter (no
//   TSYNC: it applies to that thread alone) before its first KVM_RUN. A
//   forbidden call traps (SECCOMP_RET_TRAP); the SIGSYS handler names the
//   call on stderr and ends the process.

#include "sandbox.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/landlock.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <linux/audit.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <algorithm>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace tsvmm {
namespace {

int ConfineSignal() { return SIGRTMIN + 1; }

// The ruleset the signal handler applies; -1 outside a broadcast (a late
// signal then does nothing: the handler stays installed for good).
std::atomic<int> g_ruleset{-1};
// Which threads answered in this round (their tids), and how many failed.
constexpr int kMaxAnswers = 4096;
std::atomic<pid_t> g_answers[kMaxAnswers];
std::atomic<int> g_answered{0};
std::atomic<int> g_failed{0};
std::atomic<int> g_firstError{0};

int RestrictSelf(int ruleset) {
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
  if (syscall(SYS_landlock_restrict_self, ruleset, 0) != 0) return errno;
  return 0;
}

void ConfineHandler(int) {
  int saved = errno;
  int fd = g_ruleset.load();
  if (fd >= 0) {
    int err = RestrictSelf(fd);
    if (err != 0) {
      g_failed.fetch_add(1);
      int zero = 0;
      g_firstError.compare_exchange_strong(zero, err);
    }
    int slot = g_answered.fetch_add(1);
    if (slot < kMaxAnswers) g_answers[slot].store(static_cast<pid_t>(syscall(SYS_gettid)));
  }
  errno = saved;
}

// The text of /proc/self/task/<tid>/<file> (one read, as /proc serves
// these small files), or "" when the thread is gone.
std::string TaskFile(pid_t tid, const char* file) {
  std::string path = "/proc/self/task/" + std::to_string(tid) + "/" + file;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  char buf[4096];
  ssize_t n = read(fd, buf, sizeof buf);
  close(fd);
  return std::string(buf, n > 0 ? static_cast<size_t>(n) : 0);
}

// True while the thread exists and has not exited (state X or Z).
bool ThreadAlive(pid_t tid) {
  std::string stat = TaskFile(tid, "stat");
  size_t paren = stat.rfind(')');
  if (stat.empty()) return false;
  if (paren == std::string::npos || paren + 2 >= stat.size()) return true;
  char state = stat[paren + 2];
  return state != 'X' && state != 'Z';
}

void InstallConfineHandler() {
  static std::atomic<bool> installed{false};
  if (installed.exchange(true)) return;
  struct sigaction sa = {};
  sa.sa_handler = ConfineHandler;
  sigfillset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(ConfineSignal(), &sa, nullptr);
}

std::vector<pid_t> Threads() {
  std::vector<pid_t> tids;
  DIR* d = opendir("/proc/self/task");
  if (!d) return tids;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    tids.push_back(static_cast<pid_t>(atoi(e->d_name)));
  }
  closedir(d);
  return tids;
}

std::string ThreadName(pid_t tid) {
  std::string name = TaskFile(tid, "comm");
  while (!name.empty() && name.back() == '\n') name.pop_back();
  return name.empty() ? "?" : name;
}

// True when the thread blocks `sig` (its SigBlk mask in /proc).
bool BlocksSignal(pid_t tid, int sig) {
  std::string status = TaskFile(tid, "status");
  size_t at = status.find("SigBlk:");
  if (at == std::string::npos) return false;
  unsigned long long mask = strtoull(status.c_str() + at + 7, nullptr, 16);
  return (mask >> (sig - 1)) & 1;
}

[[noreturn]] void ThrowSandbox(Napi::Env env, const std::string& what, int err) {
  Napi::Error e = Napi::Error::New(env, what + ": " + strerror(err));
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("syscall", Napi::String::New(env, what));
  e.Set("code", Napi::String::New(env, err == ENOENT ? "ENOENT" : err == EACCES ? "EACCES" : err == EINVAL ? "EINVAL" : err == EPERM ? "EPERM" : err == ETIMEDOUT ? "ETIMEDOUT" : err == EOPNOTSUPP ? "EOPNOTSUPP" : "EUNKNOWN"));
  throw e;
}

// landlockAbi(): the kernel's Landlock ABI version, or -errno (-ENOSYS: not
// built in; -EOPNOTSUPP: built in but not enabled at boot).
Napi::Value LandlockAbi(const Napi::CallbackInfo& info) {
  long v = syscall(SYS_landlock_create_ruleset, nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
  return Napi::Number::New(info.Env(), v < 0 ? -errno : v);
}

// landlockRestrictProcess(handledFs, handledNet, scoped, rules: [path, access][])
// Builds one ruleset and confines every thread of the process with it.
// Returns { confined: number of threads, skipped: ["tid (name)", ...] }.
Napi::Value LandlockRestrictProcess(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsArray()) {
    throw Napi::TypeError::New(env, "landlockRestrictProcess(handledFs, handledNet, scoped, rules)");
  }
  // struct landlock_ruleset_attr grew with the ABI (fs, then net, then
  // scoped); a kernel accepts a longer struct when the fields it does not
  // know are zero, which the caller ensures for its ABI.
  struct {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
  } attr = {
      static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value()),
      static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value()),
      static_cast<uint64_t>(info[2].As<Napi::Number>().Int64Value()),
  };
  size_t attrSize = attr.scoped ? sizeof attr : attr.handled_access_net ? 2 * sizeof(uint64_t) : sizeof(uint64_t);
  int ruleset = static_cast<int>(syscall(SYS_landlock_create_ruleset, &attr, attrSize, 0));
  if (ruleset < 0) ThrowSandbox(env, "landlock_create_ruleset", errno);
  // Closed on every path but a timed-out broadcast, where a thread may
  // still take the signal late: the fd is then left open rather than
  // handed to a reused number.
  struct RulesetGuard {
    int fd;
    bool keep = false;
    ~RulesetGuard() {
      if (!keep) close(fd);
    }
  } guard{ruleset};

  Napi::Array rules = info[3].As<Napi::Array>();
  for (uint32_t i = 0; i < rules.Length(); i++) {
    Napi::Value r = rules.Get(i);
    if (!r.IsArray()) throw Napi::TypeError::New(env, "each rule is [path, access]");
    Napi::Array pair = r.As<Napi::Array>();
    std::string path = pair.Get(0u).As<Napi::String>().Utf8Value();
    uint64_t access = static_cast<uint64_t>(pair.Get(1u).As<Napi::Number>().Int64Value());
    int fd = open(path.c_str(), O_PATH | O_CLOEXEC);
    if (fd < 0) ThrowSandbox(env, "open " + path + " for a Landlock rule", errno);
    struct landlock_path_beneath_attr pb = {};
    pb.allowed_access = access;
    pb.parent_fd = fd;
    long rc = syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &pb, 0);
    int err = errno;
    close(fd);
    if (rc != 0) ThrowSandbox(env, "landlock_add_rule " + path, err);
  }

  InstallConfineHandler();

  // Every other thread first, then this one: a thread that cannot be
  // reached is reported while this thread can still open /proc.
  pid_t self = static_cast<pid_t>(syscall(SYS_gettid));
  std::set<pid_t> done{self};
  g_failed.store(0);
  g_firstError.store(0);
  g_ruleset.store(ruleset);
  std::set<pid_t> blocked;
  std::string failure;
  int failureErr = 0;
  int confined = 0;
  int quietRounds = 0;
  for (int round = 0; round < 32 && failure.empty(); round++) {
    // A thread that blocks every signal cannot be reached: Node's
    // inspector thread, which sleeps until SIGUSR1 asks for a debugger.
    // A thread being created blocks them for a moment too, so a blocked
    // thread is looked at again in later rounds; those still blocked at
    // the end are left out and reported.
    std::vector<pid_t> todo;
    blocked.clear();
    for (pid_t t : Threads()) {
      if (done.count(t)) continue;
      if (BlocksSignal(t, ConfineSignal())) {
        blocked.insert(t);
        continue;
      }
      todo.push_back(t);
    }
    if (todo.empty()) {
      if (blocked.empty() || ++quietRounds > 3) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    quietRounds = 0;
    g_answered.store(0);
    std::vector<pid_t> sent;
    for (pid_t t : todo) {
      done.insert(t);
      // A thread may end between the listing and the signal (ESRCH).
      if (syscall(SYS_tgkill, getpid(), t, ConfineSignal()) == 0) sent.push_back(t);
    }
    if (sent.empty()) continue;
    // Wait for every thread signalled to answer, or to have ended (a
    // thread that exits blocks signals first and never answers).
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    std::vector<pid_t> waiting = sent;
    for (int spin = 0;; spin++) {
      if (g_answered.load() >= static_cast<int>(sent.size())) {
        waiting.clear();
        break;
      }
      if (spin % 50 == 49) {
        int n = std::min(g_answered.load(), kMaxAnswers);
        std::set<pid_t> answered;
        for (int i = 0; i < n; i++) answered.insert(g_answers[i].load());
        std::vector<pid_t> still;
        for (pid_t t : waiting) {
          if (!answered.count(t) && ThreadAlive(t)) still.push_back(t);
        }
        waiting.swap(still);
        if (waiting.empty()) break;
        if (std::chrono::steady_clock::now() >= deadline) break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (!waiting.empty()) {
      std::string names;
      for (pid_t t : waiting) names += (names.empty() ? "" : ", ") + std::to_string(t) + " (" + ThreadName(t) + ")";
      failure = "the threads " + names + " did not take the confinement signal within 5 s";
      failureErr = ETIMEDOUT;
      guard.keep = true;
    } else if (g_failed.load() > 0) {
      failure = std::to_string(g_failed.load()) + " thread(s) could not confine themselves";
      failureErr = g_firstError.load();
    }
    confined += g_answered.load() - g_failed.load();
    if (round == 31 && failure.empty()) {
      failure = "threads kept appearing during the confinement";
      failureErr = EAGAIN;
    }
  }
  std::vector<std::string> skipped;
  for (pid_t t : blocked) skipped.push_back(std::to_string(t) + " (" + ThreadName(t) + ")");
  g_ruleset.store(-1);
  if (failure.empty()) {
    int err = RestrictSelf(ruleset);
    if (err != 0) {
      failure = "landlock_restrict_self";
      failureErr = err;
    }
  }
  if (!failure.empty()) ThrowSandbox(env, failure, failureErr);
  Napi::Object result = Napi::Object::New(env);
  result.Set("confined", Napi::Number::New(env, confined + 1));
  Napi::Array left = Napi::Array::New(env, skipped.size());
  for (size_t i = 0; i < skipped.size(); i++) left.Set(static_cast<uint32_t>(i), Napi::String::New(env, skipped[i]));
  result.Set("skipped", left);
  return result;
}

// ---------------------------------------------------------------------------
// seccomp

void SigsysHandler(int, siginfo_t* si, void*) {
  // Async-signal-safe: format the number by hand, write, and leave.
  char msg[160];
  const char head[] = "tsvmm: a vCPU thread made a system call its seccomp filter forbids (number ";
  size_t n = 0;
  for (size_t i = 0; i < sizeof head - 1; i++) msg[n++] = head[i];
  char digits[16];
  int nd = 0;
  unsigned v = static_cast<unsigned>(si->si_syscall);
  do {
    digits[nd++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v && nd < 15);
  while (nd > 0) msg[n++] = digits[--nd];
  const char tail[] = "): stopping\n";
  for (size_t i = 0; i < sizeof tail - 1; i++) msg[n++] = tail[i];
  ssize_t w = write(2, msg, n);
  (void)w;
  _exit(128 + SIGSYS);
}

}  // namespace

void InstallSigsysHandler() {
  static std::atomic<bool> installed{false};
  if (installed.exchange(true)) return;
  struct sigaction sa = {};
  sa.sa_sigaction = SigsysHandler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSYS, &sa, nullptr);
}

int InstallSeccompFilter(const std::vector<uint8_t>& program) {
  if (program.empty() || program.size() % sizeof(sock_filter) != 0) return EINVAL;
  // Allocate once before the filter: glibc sets up this thread's malloc
  // arena on its first allocation, which may read /sys (openat).
  // (volatile: a compiler may drop a malloc/free pair.)
  void* volatile first = malloc(64);
  free(first);
  sock_fprog prog = {};
  prog.len = static_cast<unsigned short>(program.size() / sizeof(sock_filter));
  prog.filter = reinterpret_cast<sock_filter*>(const_cast<uint8_t*>(program.data()));
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
  if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) return errno;
  return 0;
}

namespace {

// seccompSelfTest(program, vcpuFd, forbidden): on a new thread, installs
// `program` as a vCPU thread would, makes the calls a vCPU thread makes
// (KVM_GET_REGS on vcpuFd, a write, futexes) and then the forbidden one
// ('openat' or 'ioctl': KVM_SET_REGS on vcpuFd). The filter ends the
// process with status 159 and a message: run it in a child process.
// Returns only when the filter let the forbidden call through (its errno).
Napi::Value SeccompSelfTest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsBuffer() || !info[1].IsNumber() || !info[2].IsString()) {
    throw Napi::TypeError::New(env, "seccompSelfTest(program, vcpuFd, 'openat' | 'ioctl')");
  }
  Napi::Buffer<uint8_t> buf = info[0].As<Napi::Buffer<uint8_t>>();
  std::vector<uint8_t> program(buf.Data(), buf.Data() + buf.Length());
  int vcpuFd = info[1].As<Napi::Number>().Int32Value();
  std::string forbidden = info[2].As<Napi::String>().Utf8Value();
  InstallSigsysHandler();
  int result = 0;
  std::thread t([&] {
    int err = InstallSeccompFilter(program);
    if (err != 0) {
      result = -err;
      return;
    }
    char regs[1024];
    (void)!ioctl(vcpuFd, KVM_GET_REGS, regs);
    (void)!write(2, "", 0);
    long r = forbidden == "openat" ? syscall(SYS_openat, AT_FDCWD, "/etc/hostname", O_RDONLY) : ioctl(vcpuFd, KVM_SET_REGS, regs);
    result = r < 0 ? errno : 0;
  });
  t.join();
  if (result < 0) ThrowSandbox(env, "install the seccomp filter", -result);
  return Napi::Number::New(env, result);
}

}  // namespace

void RegisterSandbox(Napi::Env env, Napi::Object exports, Napi::Object c) {
#define C(x) c.Set(#x, Napi::Number::New(env, static_cast<double>(x)));
  C(AUDIT_ARCH_X86_64) C(SECCOMP_RET_ALLOW) C(SECCOMP_RET_TRAP) C(SECCOMP_RET_KILL_PROCESS)
  C(BPF_LD) C(BPF_W) C(BPF_ABS) C(BPF_JMP) C(BPF_JEQ) C(BPF_JGE) C(BPF_K) C(BPF_RET)
  C(KVM_RUN) C(KVM_GET_REGS)
#undef C
#define S(name) c.Set("__NR_" #name, Napi::Number::New(env, SYS_##name));
  S(ioctl) S(futex) S(write) S(mmap) S(munmap) S(mprotect) S(madvise) S(mremap) S(brk)
  S(rt_sigprocmask) S(rt_sigreturn) S(exit) S(exit_group) S(sched_yield) S(nanosleep)
  S(clock_nanosleep) S(clock_gettime) S(gettimeofday) S(getpid) S(gettid) S(tgkill)
  S(restart_syscall) S(openat)
#undef S
  exports.Set("landlockAbi", Napi::Function::New(env, LandlockAbi, "landlockAbi"));
  exports.Set("landlockRestrictProcess", Napi::Function::New(env, LandlockRestrictProcess, "landlockRestrictProcess"));
  exports.Set("seccompSelfTest", Napi::Function::New(env, SeccompSelfTest, "seccompSelfTest"));
}

}  // namespace tsvmm
