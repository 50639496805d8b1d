/**
 * The only module that loads the native addon, and the whole native surface
 * typed in one place. The addon makes system calls and returns numbers and
 * buffers; everything else (structs, validation, device logic) is TypeScript.
 *
 * Errors thrown by the addon are {@link NativeError}s: `code` is the errno
 * name (`ENOENT`, `EACCES`, ...), `syscall` the failing operation
 * (`open /dev/kvm`, `KVM_RUN`, ...).
 */
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

/** Byte offsets and sizes of kernel structs, taken from the C headers at build time. */
export interface NativeLayout {
  /** struct kvm_run */
  run: {
    requestInterruptWindow: number;
    immediateExit: number;
    exitReason: number;
    readyForInterruptInjection: number;
    ifFlag: number;
    /** io: direction (u8), size (u8), port (u16), count (u32), dataOffset (u64) */
    ioDirection: number;
    ioSize: number;
    ioPort: number;
    ioCount: number;
    ioDataOffset: number;
    /** mmio: physAddr (u64), data (u8[8]), len (u32), isWrite (u8) */
    mmioPhysAddr: number;
    mmioData: number;
    mmioLen: number;
    mmioIsWrite: number;
    /** internal: suberror (u32), ndata (u32), data (u64[16]) */
    internalSuberror: number;
    internalNdata: number;
    internalData: number;
    /** emulation_failure: flags (u64), insn_size (u8), insn_bytes (u8[15]) */
    emulationFlags: number;
    emulationInsnSize: number;
    emulationInsnBytes: number;
    /** fail_entry: hardware_entry_failure_reason (u64), cpu (u32) */
    failEntryReason: number;
    failEntryCpu: number;
    /** system_event: type (u32), ndata (u32), data (u64[16]) */
    systemEventType: number;
    /** s.regs.regs (KVM_CAP_SYNC_REGS): a struct kvm_regs */
    syncRegs: number;
    kvmValidRegs: number;
    kvmDirtyRegs: number;
  };
  /** struct kvm_sregs: segment and table offsets; cr and efer fields */
  sregs: {
    size: number;
    cs: number;
    ds: number;
    es: number;
    fs: number;
    gs: number;
    ss: number;
    tr: number;
    ldt: number;
    gdt: number;
    idt: number;
    cr0: number;
    cr2: number;
    cr3: number;
    cr4: number;
    cr8: number;
    efer: number;
    apicBase: number;
  };
  /** struct kvm_segment: base u64, limit u32, selector u16, then u8 type, present, dpl, db, s, l, g, avl, unusable */
  segment: {
    size: number;
    base: number;
    limit: number;
    selector: number;
    type: number;
    present: number;
    dpl: number;
    db: number;
    s: number;
    l: number;
    g: number;
    avl: number;
    unusable: number;
  };
  /** struct kvm_dtable: base u64, limit u16 */
  dtable: { size: number; base: number; limit: number };
  /** struct kvm_regs: 18 u64 in the order rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags */
  regsSize: number;
  /** struct kvm_fpu */
  fpu: { size: number; fcw: number; mxcsr: number };
  /** struct kvm_lapic_state */
  lapicSize: number;
  /** struct kvm_vcpu_events */
  vcpuEvents: {
    size: number;
    exceptionInjected: number;
    exceptionNr: number;
    exceptionHasErrorCode: number;
    exceptionPending: number;
    exceptionErrorCode: number;
    flags: number;
  };
  /** struct kvm_translation: linear_address u64, physical_address u64, valid u8, writeable u8, usermode u8 */
  translation: { size: number; linearAddress: number; physicalAddress: number; valid: number };
  /** struct kvm_cpuid2 header and struct kvm_cpuid_entry2 */
  cpuid2HeaderSize: number;
  cpuidEntry: {
    size: number;
    function: number;
    index: number;
    flags: number;
    eax: number;
    ebx: number;
    ecx: number;
    edx: number;
  };
  /** struct kvm_msrs header (nmsrs u32, pad u32) and struct kvm_msr_entry (index u32, reserved u32, data u64) */
  msrsHeaderSize: number;
  msrEntrySize: number;
  /** struct kvm_mp_state */
  mpStateSize: number;
  /** struct kvm_irq_routing (header nr u32, flags u32) and struct kvm_irq_routing_entry */
  irqRouting: {
    headerSize: number;
    entrySize: number;
    gsi: number;
    type: number;
    flags: number;
    irqchip: number;
    pin: number;
    msiAddressLo: number;
    msiAddressHi: number;
    msiData: number;
  };
}

/** What a vCPU thread reports to its exit callback. */
export const VcpuReport = {
  /** KVM_RUN returned with an exit to handle; read kvm_run. */
  Exit: 0,
  /** The thread has left its loop; no more reports follow. */
  Stopped: 2,
  /** KVM_RUN failed; the second argument is the errno. */
  Error: 3,
  /** The thread could not install its seccomp filter (errno); it runs nothing. */
  FilterError: 4,
  /** After pauseVcpu: the thread is out of KVM_RUN and waits for resumeVcpu. */
  Paused: 5,
  /** A vCPU on the event loop: run a burst now, calling loopStep(handle) until it returns Yield or Stop. */
  Burst: 6,
} as const;
export type VcpuReport = (typeof VcpuReport)[keyof typeof VcpuReport];

/** What the exit callback tells the vCPU thread. */
export const VcpuAction = {
  Continue: 0,
  Stop: 1,
} as const;
export type VcpuAction = (typeof VcpuAction)[keyof typeof VcpuAction];

/** What loopStep answers; a negative number is -errno of a failed KVM_RUN. */
export const LoopStep = {
  /** KVM_RUN returned with an exit to handle; read kvm_run, then step again. */
  Exit: 0,
  /** The burst is over (the event loop has work, or it ran its time): return. */
  Yield: 1,
  /** stopVcpu was called: return; the vCPU reports Stopped. */
  Stop: 2,
} as const;

export interface NativeAddon {
  layout: NativeLayout;
  /** Constants from the C headers: KVM_CAP_*, KVM_EXIT_*, KVM_MEM_*, ioctl numbers for logging. */
  constants: Record<string, number>;

  /** open(2) with O_RDWR | O_CLOEXEC. */
  open(path: string): number;
  close(fd: number): void;

  /** KVM system ioctls (on the /dev/kvm fd). */
  getApiVersion(kvmFd: number): number;
  checkExtension(fd: number, cap: number): number;
  /** KVM_GET_TSC_KHZ on a VM fd (with KVM_CAP_VM_TSC_CONTROL) or a vCPU fd. */
  getTscKhz(fd: number): number;
  createVm(kvmFd: number): number;
  getVcpuMmapSize(kvmFd: number): number;
  /** KVM_GET_SUPPORTED_CPUID: a struct kvm_cpuid2 with its entries. */
  getSupportedCpuid(kvmFd: number): Buffer;

  /** VM ioctls. */
  setTssAddr(vmFd: number, addr: number): void;
  setIdentityMapAddr(vmFd: number, addr: number): void;
  createIrqchip(vmFd: number): void;
  /** KVM_CREATE_PIT2 with the given flags (KVM_PIT_SPEAKER_DUMMY = 1). */
  createPit2(vmFd: number, flags: number): void;
  /** KVM_IRQ_LINE. */
  irqLine(vmFd: number, irq: number, level: number): void;
  /**
   * KVM_SET_USER_MEMORY_REGION backed by `memory` (from allocGuestMemory,
   * still mapped: any other buffer is refused) at [offset, offset + size).
   */
  setUserMemoryRegion(vmFd: number, slot: number, flags: number, guestAddr: number, memory: ArrayBuffer, offset: number, size: number): void;
  /** KVM_IOEVENTFD: `flags` as in struct kvm_ioeventfd; datamatch used when KVM_IOEVENTFD_FLAG_DATAMATCH is set. */
  ioeventfd(vmFd: number, addr: number, len: number, eventFd: number, flags: number, datamatch: number): void;
  /** KVM_IRQFD: `flags` 0 to assign, KVM_IRQFD_FLAG_DEASSIGN to remove. */
  irqfd(vmFd: number, eventFd: number, gsi: number, flags: number): void;
  createVcpu(vmFd: number, id: number): number;

  /** Anonymous private mapping for guest RAM; unmapped when the ArrayBuffer is collected. */
  /** `mergeable`: madvise(MADV_MERGEABLE), so the host's KSM may share identical pages. */
  allocGuestMemory(size: number, mergeable?: boolean): ArrayBuffer;
  /**
   * Zeroed memory the addon and JavaScript share (a fast-read table, a
   * sample ring), 64-byte aligned, 1 byte to 1 MiB. Node does not let it be
   * transferred (a transfer copies it), and it is freed only once the
   * ArrayBuffer is collected and every vCPU given a view of it has ended.
   */
  allocShared(size: number): ArrayBuffer;
  /** mmap of the vCPU's kvm_run area; unmapped when collected. */
  mapVcpuRun(vcpuFd: number, size: number): ArrayBuffer;
  /**
   * Unmaps a buffer from allocGuestMemory or mapVcpuRun now and detaches it
   * (its views become empty). A second call, or a buffer not from the
   * addon, does nothing.
   */
  unmap(buffer: ArrayBuffer): void;

  /** KVM_SET_GSI_ROUTING with a struct kvm_irq_routing laid out as {@link NativeLayout.irqRouting} says. */
  setGsiRouting(vmFd: number, routing: Uint8Array): void;
  /** KVM_SIGNAL_MSI: injects one message; returns >0 if delivered, 0 if the guest blocked it. */
  signalMsi(vmFd: number, address: bigint | number, data: number): number;
  /** KVM_ENABLE_CAP with args[0] = `arg0`, on a VM or vCPU fd. */
  enableCap(fd: number, cap: number, arg0: number): void;

  /**
   * vCPU struct ioctls. Each takes a buffer of exactly the struct's size
   * (variable-length ones: header plus the entries the header counts).
   * Getters fill the buffer.
   */
  getRegs(vcpuFd: number, buf: Uint8Array): void;
  setRegs(vcpuFd: number, buf: Uint8Array): void;
  getSregs(vcpuFd: number, buf: Uint8Array): void;
  setSregs(vcpuFd: number, buf: Uint8Array): void;
  getFpu(vcpuFd: number, buf: Uint8Array): void;
  setFpu(vcpuFd: number, buf: Uint8Array): void;
  /** KVM_SET_MSRS / KVM_GET_MSRS: returns the number of MSRs processed. */
  setMsrs(vcpuFd: number, buf: Uint8Array): number;
  getMsrs(vcpuFd: number, buf: Uint8Array): number;
  setCpuid2(vcpuFd: number, buf: Uint8Array): void;
  getLapic(vcpuFd: number, buf: Uint8Array): void;
  setLapic(vcpuFd: number, buf: Uint8Array): void;
  getVcpuEvents(vcpuFd: number, buf: Uint8Array): void;
  setVcpuEvents(vcpuFd: number, buf: Uint8Array): void;
  getMpState(vcpuFd: number, buf: Uint8Array): void;
  setMpState(vcpuFd: number, buf: Uint8Array): void;
  translate(vcpuFd: number, buf: Uint8Array): void;

  /**
   * One synchronous KVM_RUN on the calling thread, to the guest's next
   * exit: returns 0, or -errno. A signal that interrupts it (a profiler's
   * SIGPROF) runs it again, so it must not be used with immediate_exit set
   * (it would return EINTR for ever). For probes and benchmarks; a running VM
   * uses startVcpu.
   */
  runOnce(vcpuFd: number): number;
  /**
   * One step of a loop vCPU's burst (during its Burst report): KVM_RUN
   * until an exit, the loop's turn or a stop (a LoopStep), or -errno.
   * Outside the burst it answers Yield.
   */
  loopStep(handle: number): number;

  /**
   * Starts a native thread that loops on KVM_RUN for this vCPU. After each
   * return it calls `onReport(report, errno)` on the main thread and waits
   * for it; the callback's return value (a VcpuAction) says whether to go
   * on. `run` is the vCPU's mapped kvm_run (its immediate_exit is used for
   * kicks). With `filter` (a struct sock_filter program), the thread
   * installs it as its seccomp filter before the first KVM_RUN, and a call
   * the filter traps ends the process with a message (status 159).
   * The thread is named `name` (what ps and top -H show; cut at 15
   * characters), "tsvmm-vcpu" without one.
   * Returns a handle for sampleVcpu, pauseVcpu, stopVcpu.
   */
  startVcpu(vcpuFd: number, run: ArrayBuffer, onReport: (report: VcpuReport, errno: number) => VcpuAction, filter?: Buffer, name?: string): number;
  /**
   * Runs the vCPU on the calling JavaScript thread instead of a thread of
   * its own: a libuv idle handle starts a burst of KVM_RUN there once per
   * turn of the event loop, reporting Burst to `onReport` (through
   * MakeCallback), which runs it with loopStep, until the event loop has
   * work (a watcher thread polls the loop's backend fd with its timeout,
   * then kicks the vCPU out with immediate_exit and a signal that is
   * blocked on this thread outside KVM_RUN) or 20 ms have passed. Reports
   * Burst and Stopped; stop it with stopVcpu. Same handle as startVcpu.
   */
  startVcpuOnLoop(vcpuFd: number, run: ArrayBuffer, onReport: (report: VcpuReport, errno: number) => VcpuAction): number;
  /**
   * Makes the vCPU thread leave KVM_RUN soon (immediate_exit plus a
   * signal), record the guest RIP into the sample buffer, and re-enter
   * without reporting.
   */
  sampleVcpu(handle: number): void;
  /** Asks the thread to stop: it kicks the vCPU and reports Stopped. */
  stopVcpu(handle: number): void;
  /** Takes a vCPU thread out of KVM_RUN until resumeVcpu; it reports Paused once out. Threads only. */
  pauseVcpu(handle: number): void;
  resumeVcpu(handle: number): void;
  /** SO_PEERCRED: the uid of the process at the other end of a Unix socket. */
  peerUid(socketFd: number): number;
  /** KVM_GET_CLOCK: the VM's kvmclock, in ns. */
  getClock(vmFd: number): bigint;
  /** KVM_SET_CLOCK. */
  setClock(vmFd: number, ns: bigint): void;
  /**
   * Gives the vCPU thread a buffer for RIP samples: a BigUint64Array view
   * of allocShared memory (any other is refused) where index 0 counts
   * samples written and samples follow at 1.. (a ring when full).
   */
  setSampleBuffer(handle: number, buf: BigUint64Array): void;
  /**
   * Gives the vCPU the fast-read table (FastReadTable's slots, a view of
   * allocShared memory: any other is refused): 1-byte port reads it
   * answers without a report. Once per vCPU, while it runs or before.
   */
  setFastReads(handle: number, table: Int32Array): void;

  /** eventfd(2) with EFD_CLOEXEC | EFD_NONBLOCK. */
  eventfd(initval: number): number;
  /** Writes an 8-byte counter value to an eventfd. */
  eventfdWrite(fd: number, value: number): void;
  /** Reads an eventfd counter; 0 when it would block. */
  eventfdRead(fd: number): number;

  /**
   * Opens /dev/net/tun as a TAP device with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
   * (non-blocking). Returns the fd and the kernel's interface name.
   */
  tapOpen(name: string): { fd: number; name: string };
  /** TUNSETOFFLOAD with TUN_F_* flags. */
  tapSetOffload(fd: number, flags: number): void;
  /** TUNSETVNETHDRSZ. */
  tapSetVnetHdrSize(fd: number, size: number): void;

  /** Non-blocking read: bytes read, or -EAGAIN. */
  read(fd: number, buf: Uint8Array): number;
  /** writev(2) of the given pieces: bytes written, or -EAGAIN. */
  writev(fd: number, pieces: Uint8Array[]): number;

  /**
   * Watches an fd for readability on the main event loop (uv_poll). The
   * callback runs on the main thread while the fd is readable and the
   * watch is started. Returns a watch handle.
   */
  pollStart(fd: number, onReadable: () => void): number;
  /** Pauses a watch (back-pressure); pollResume starts it again. */
  pollStop(watch: number): void;
  pollResume(watch: number): void;
  /** Stops and frees a watch. */
  pollClose(watch: number): void;

  /**
   * Takes an OFD lock on the whole file (F_OFD_SETLK): exclusive for a
   * writable disk, shared for a read-only one. Throws EAGAIN/EACCES when
   * another process holds a conflicting lock.
   */
  lockFile(fd: number, exclusive: boolean): void;

  /**
   * KVM_REGISTER_COALESCED_MMIO: guest writes to [addr, addr + size) (ports
   * with `pio` 1) no longer exit but are appended to the coalesced ring.
   */
  registerCoalesced(vmFd: number, addr: number, size: number, pio: number): void;

  /** The kernel's Landlock ABI version, or -errno (-ENOSYS, -EOPNOTSUPP) when it has none. */
  landlockAbi(): number;
  /**
   * Confines every thread of the process with one Landlock ruleset that
   * handles these access masks and allows `rules` ([path, access mask]).
   * Irreversible. A thread that blocks every signal cannot be reached and
   * is left out (`skipped`, "tid (name)"). Returns how many were confined.
   */
  landlockRestrictProcess(handledFs: number, handledNet: number, scoped: number, rules: [string, number][]): { confined: number; skipped: string[] };
  /**
   * For tests: on a new thread, installs `filter` as a vCPU thread would,
   * makes a vCPU thread's calls, then a forbidden one. A working filter
   * ends the process (status 159); returns the call's errno otherwise.
   */
  seccompSelfTest(filter: Buffer, vcpuFd: number, forbidden: 'openat' | 'ioctl'): number;
}

/** The package root: dist/kvm/native.js and src/kvm/native.ts both sit two levels below it. */
const PACKAGE_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/**
 * Loads the addon with node-gyp-build: a source build (build/Release, what
 * a clone's `npm install` makes) if there is one, else the prebuild for
 * this platform that the package ships (prebuilds/linux-x64).
 */
function loadAddon(): NativeAddon {
  const require = createRequire(import.meta.url);
  const nodeGypBuild = require('node-gyp-build') as (dir: string) => unknown;
  try {
    return nodeGypBuild(PACKAGE_ROOT) as NativeAddon;
  } catch (err) {
    throw new Error(
      `tsvmm native addon did not load (${(err as Error).message.split('\n')[0]}): a source build goes in ${join(PACKAGE_ROOT, 'build/Release')}, a prebuild for ${process.platform}-${process.arch} in prebuilds/; run \`npm install\` in ${PACKAGE_ROOT} to build it`,
      { cause: err },
    );
  }
}

let addon: NativeAddon | undefined;

/** The addon, loaded on first use so that importing tsvmm never fails. */
export function native(): NativeAddon {
  addon ??= loadAddon();
  return addon;
}

/** True when the error came from the addon with the given errno name. */
export function isNativeError(err: unknown, code?: string): err is NativeError {
  return err instanceof Error && typeof (err as NativeError).syscall === 'string' && (code === undefined || (err as NativeError).code === code);
}
