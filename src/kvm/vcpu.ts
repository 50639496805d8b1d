/**
 * A virtual CPU: its fd, its kvm_run mapping, typed register access, the
 * boot-time state (CPUID, MSRs, FPU, LAPIC), and its thread. The thread
 * loops on KVM_RUN in native code and hands each exit to `onExit` on the
 * main thread.
 */
import type { NativeAddon } from './native.js';
import { LoopStep, VcpuAction, VcpuReport } from './native.js';
import {
  decodeRegs,
  decodeSregs,
  encodeMsrs,
  encodeRegs,
  encodeSregs,
  MISC_ENABLE_FAST_STRING,
  MSR,
  MTRR_ENABLE_WRITEBACK,
  type RegName,
  type Regs,
  type Sregs,
  type SregsUpdate,
} from './cpu.js';
import { ExitDecoder, type ExitAction, type VcpuExit } from './exits.js';
import type { VmFd } from './kvm.js';
import type { FastReadTable } from './fast-reads.js';
import { TsvmmError } from '../base/errors.js';

/** A vCPU ioctl failed: `vcpu` says which; `cause` is the addon's errno error. */
export class VcpuError extends TsvmmError {
  constructor(
    readonly vcpu: number,
    message: string,
    options?: { cause?: unknown },
  ) {
    super('ERR_TSVMM_VCPU', `vcpu ${vcpu}: ${message}`, options);
  }
}

/** What the machine answers to each exit. */

/** LAPIC register offsets (Intel SDM vol. 3, table 11-1). */
const APIC_LVT_LINT0 = 0x350;
const APIC_LVT_LINT1 = 0x360;
const APIC_MODE_EXTINT = 0x7;
const APIC_MODE_NMI = 0x4;

/** x87 control word and MXCSR after FNINIT / reset (SDM vol. 1, 8.1.5 and 10.2.3). */
const FPU_FCW_DEFAULT = 0x37f;
const MXCSR_DEFAULT = 0x1f80;

export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

export class Vcpu {
  readonly fd: number;
  readonly run: ArrayBuffer;
  readonly runBytes: Uint8Array;
  private handle: number | undefined;
  private readonly addon: NativeAddon;
  private readonly regsBuf: Uint8Array;
  private readonly sregsBuf: Uint8Array;
  private readonly decoder: ExitDecoder;
  /** Set once the thread has reported Stopped. */
  private stoppedResolve!: () => void;
  readonly stopped: Promise<void>;
  running = false;

  constructor(
    readonly vm: VmFd,
    readonly id: number,
  ) {
    this.addon = vm.addon;
    this.fd = this.addon.createVcpu(vm.fd, id);
    this.run = this.addon.mapVcpuRun(this.fd, vm.kvm.vcpuMmapSize);
    this.runBytes = new Uint8Array(this.run);
    this.regsBuf = new Uint8Array(this.addon.layout.regsSize);
    this.sregsBuf = new Uint8Array(this.addon.layout.sregs.size);
    this.decoder = new ExitDecoder(this.runBytes, this.addon.layout.run);
    this.stopped = new Promise((resolve) => {
      this.stoppedResolve = resolve;
    });
  }

  getRegs(): Regs {
    this.addon.getRegs(this.fd, this.regsBuf);
    return decodeRegs(this.regsBuf);
  }

  /** Sets the given registers; the rest keep their current values. */
  setRegs(regs: Partial<Record<RegName, bigint | number>>): void {
    this.addon.getRegs(this.fd, this.regsBuf);
    encodeRegs(this.regsBuf, regs);
    this.addon.setRegs(this.fd, this.regsBuf);
  }

  getSregs(): Sregs {
    this.addon.getSregs(this.fd, this.sregsBuf);
    return decodeSregs(this.sregsBuf, this.addon.layout);
  }

  setSregs(update: SregsUpdate): void {
    this.addon.getSregs(this.fd, this.sregsBuf);
    encodeSregs(this.sregsBuf, this.addon.layout, update);
    this.addon.setSregs(this.fd, this.sregsBuf);
  }

  setCpuid(entries: readonly CpuidEntry[]): void {
    const l = this.addon.layout;
    const buf = new Uint8Array(l.cpuid2HeaderSize + entries.length * l.cpuidEntry.size);
    const view = new DataView(buf.buffer);
    view.setUint32(0, entries.length, true);
    entries.forEach((e, i) => {
      const at = l.cpuid2HeaderSize + i * l.cpuidEntry.size;
      view.setUint32(at + l.cpuidEntry.function, e.function, true);
      view.setUint32(at + l.cpuidEntry.index, e.index, true);
      view.setUint32(at + l.cpuidEntry.flags, e.flags, true);
      view.setUint32(at + l.cpuidEntry.eax, e.eax >>> 0, true);
      view.setUint32(at + l.cpuidEntry.ebx, e.ebx >>> 0, true);
      view.setUint32(at + l.cpuidEntry.ecx, e.ecx >>> 0, true);
      view.setUint32(at + l.cpuidEntry.edx, e.edx >>> 0, true);
    });
    this.addon.setCpuid2(this.fd, buf);
  }

  /** The MSR values Linux expects at entry (as Firecracker sets them). Returns how many KVM took. */
  setBootMsrs(): number {
    const entries: Array<[number, bigint]> = [
      [MSR.IA32_SYSENTER_CS, 0n],
      [MSR.IA32_SYSENTER_ESP, 0n],
      [MSR.IA32_SYSENTER_EIP, 0n],
      [MSR.STAR, 0n],
      [MSR.CSTAR, 0n],
      [MSR.KERNEL_GS_BASE, 0n],
      [MSR.SYSCALL_MASK, 0n],
      [MSR.LSTAR, 0n],
      [MSR.IA32_TSC, 0n],
      [MSR.IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING],
      [MSR.MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK],
    ];
    // KVM_SET_MSRS stops at the first MSR it refuses; set them one by one so
    // one refusal (some hosts lack MTRRs) does not drop the rest.
    let taken = 0;
    for (const e of entries) taken += this.addon.setMsrs(this.fd, encodeMsrs(this.addon.layout, [e]));
    return taken;
  }

  setFpuDefaults(): void {
    const l = this.addon.layout.fpu;
    const buf = new Uint8Array(l.size);
    const view = new DataView(buf.buffer);
    view.setUint16(l.fcw, FPU_FCW_DEFAULT, true);
    view.setUint32(l.mxcsr, MXCSR_DEFAULT, true);
    this.addon.setFpu(this.fd, buf);
  }

  /** LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a PC's BIOS leaves them. */
  setLapicLint(): void {
    const buf = new Uint8Array(this.addon.layout.lapicSize);
    this.addon.getLapic(this.fd, buf);
    const view = new DataView(buf.buffer);
    const setMode = (reg: number, mode: number) => {
      const v = view.getUint32(reg, true);
      view.setUint32(reg, (v & ~0x700) | (mode << 8), true);
    };
    setMode(APIC_LVT_LINT0, APIC_MODE_EXTINT);
    setMode(APIC_LVT_LINT1, APIC_MODE_NMI);
    this.addon.setLapic(this.fd, buf);
  }

  /** Queues an exception (vector `nr`, no error code) for delivery at the next entry. */
  injectException(nr: number): void {
    const l = this.addon.layout.vcpuEvents;
    const buf = new Uint8Array(l.size);
    this.addon.getVcpuEvents(this.fd, buf);
    buf[l.exceptionInjected] = 1;
    buf[l.exceptionNr] = nr;
    buf[l.exceptionHasErrorCode] = 0;
    buf[l.exceptionPending] = 0;
    new DataView(buf.buffer).setUint32(l.exceptionErrorCode, 0, true);
    // Flags say which optional fields are valid; none of them are being set.
    new DataView(buf.buffer).setUint32(l.flags, 0, true);
    this.addon.setVcpuEvents(this.fd, buf);
  }

  /** Guest-virtual to guest-physical through the vCPU's page tables; undefined when unmapped. */
  translate(linear: bigint): number | undefined {
    const l = this.addon.layout.translation;
    const buf = new Uint8Array(l.size);
    const view = new DataView(buf.buffer);
    view.setBigUint64(l.linearAddress, linear, true);
    this.addon.translate(this.fd, buf);
    if (!buf[l.valid]) return undefined;
    return Number(view.getBigUint64(l.physicalAddress, true));
  }

  /** The exit currently held in kvm_run (its `data` is valid until the next exit). */
  currentExit(): VcpuExit {
    return this.decoder.decode();
  }

  /**
   * Starts the vCPU. `onExit` runs on the main thread for every exit and
   * must not throw; `onError` when KVM_RUN fails.
   *
   * `on: 'loop'` (the default) runs KVM_RUN on the main thread itself, in
   * bursts between turns of the event loop: an exit costs KVM_RUN and one
   * call into JavaScript. `on: 'thread'` gives the vCPU a native thread of
   * its own, which hands each exit to the main thread and waits: it runs
   * in parallel with the main thread and with the other vCPUs, and an exit
   * costs two thread wake-ups unless both threads have a CPU to poll on
   * (see the README's exit path design). One vCPU per process is best on the
   * loop; the machine puts the others of an SMP guest on threads.
   */
  start(handlers: {
    onExit: (exit: VcpuExit) => ExitAction;
    onError: (err: VcpuError) => void;
    on?: 'loop' | 'thread';
    /** On a thread of its own: the seccomp filter the thread installs before its first KVM_RUN. */
    filter?: Buffer;
  }): void {
    if (this.handle !== undefined) throw new VcpuError(this.id, 'already started');
    this.running = true;
    const onLoop = (handlers.on ?? 'loop') === 'loop';
    if (onLoop && handlers.filter) throw new VcpuError(this.id, 'a seccomp filter needs a vCPU thread of its own');
    const onReport = (report: VcpuReport, errno: number): VcpuAction => {
      try {
        switch (report) {
          case VcpuReport.Exit:
            return handlers.onExit(this.currentExit()).kind === 'stop' ? VcpuAction.Stop : VcpuAction.Continue;
          case VcpuReport.Error:
            handlers.onError(new VcpuError(this.id, `KVM_RUN failed with errno ${errno}`));
            return VcpuAction.Stop;
          case VcpuReport.FilterError:
            handlers.onError(new VcpuError(this.id, `its thread could not install the sandbox's seccomp filter (errno ${errno}); run with the sandbox off`));
            return VcpuAction.Stop;
          case VcpuReport.Burst:
            this.runBurst(handlers);
            return VcpuAction.Continue;
          case VcpuReport.Paused:
            // The thread is parked: every pause waiting for it is over.
            for (const r of this.pausedResolves.splice(0)) r();
            return VcpuAction.Continue;
          case VcpuReport.Stopped:
            this.running = false;
            this.stoppedResolve();
            // Pauses still waiting for this thread are over too.
            for (const r of this.pausedResolves.splice(0)) r();
            return VcpuAction.Stop;
        }
      } catch (err) {
        handlers.onError(new VcpuError(this.id, `exit handler failed: ${(err as Error).message}`, { cause: err }));
        return VcpuAction.Stop;
      }
      return VcpuAction.Stop;
    };
    this.handle = onLoop
      ? this.addon.startVcpuOnLoop(this.fd, this.run, onReport)
      : this.addon.startVcpu(this.fd, this.run, onReport, handlers.filter, `tsvmm-vcpu${this.id}`);
  }

  /**
   * One burst of a vCPU on the event loop: KVM_RUN through loopStep and each
   * exit to `onExit`, until the addon says the loop's turn has come (promise
   * jobs and nextTick callbacks run then, at most 20 ms later).
   */
  private runBurst(handlers: { onExit: (exit: VcpuExit) => ExitAction; onError: (err: VcpuError) => void }): void {
    const handle = this.handle;
    if (handle === undefined) return;
    const addon = this.addon;
    try {
      for (;;) {
        const step = addon.loopStep(handle);
        if (step === LoopStep.Exit) {
          if (handlers.onExit(this.currentExit()).kind === 'stop') break;
          continue;
        }
        if (step === LoopStep.Yield || step === LoopStep.Stop) return;
        handlers.onError(new VcpuError(this.id, `KVM_RUN failed with errno ${-step}`));
        break;
      }
    } catch (err) {
      handlers.onError(new VcpuError(this.id, `exit handler failed: ${(err as Error).message}`, { cause: err }));
    }
    addon.stopVcpu(handle);
  }

  private readonly pausedResolves: Array<() => void> = [];

  /**
   * Takes the vCPU out of guest mode until {@link resume}: resolves once
   * its thread has left KVM_RUN (or stopped). A vCPU on its own thread only.
   */
  pause(): Promise<void> {
    if (this.handle === undefined || !this.running) return Promise.resolve();
    const out = new Promise<void>((resolve) => this.pausedResolves.push(resolve));
    this.addon.pauseVcpu(this.handle);
    return out;
  }

  /** Lets a paused vCPU run again. */
  resume(): void {
    if (this.handle !== undefined && this.running) this.addon.resumeVcpu(this.handle);
  }

  /** Interrupts KVM_RUN to record the guest's RIP into the sample buffer; the guest runs on. */
  sample(): void {
    if (this.handle !== undefined && this.running) this.addon.sampleVcpu(this.handle);
  }

  /**
   * Gives the thread a ring for `slots` RIP samples, in memory the addon
   * allocated, and returns it: index 0 counts the samples written (see
   * {@link sample}), 1..slots hold them. A new ring replaces the last.
   */
  sampleRing(slots: number): BigUint64Array {
    if (this.handle === undefined) throw new VcpuError(this.id, 'not started');
    if (!Number.isInteger(slots) || slots < 1) throw new RangeError(`a sample ring needs at least 1 slot, not ${slots}`);
    const ring = new BigUint64Array(this.addon.allocShared((slots + 1) * BigUint64Array.BYTES_PER_ELEMENT));
    this.addon.setSampleBuffer(this.handle, ring);
    return ring;
  }

  /** Lets the addon answer the table's port reads itself (see FastReadTable). Once, after start. */
  setFastReads(table: FastReadTable): void {
    if (this.handle === undefined) throw new VcpuError(this.id, 'not started');
    this.addon.setFastReads(this.handle, table.slots);
  }

  /** Asks the thread to leave; `stopped` resolves when it has. */
  stop(): Promise<void> {
    if (this.handle === undefined) {
      this.stoppedResolve();
    } else if (this.running) {
      this.addon.stopVcpu(this.handle);
    }
    return this.stopped;
  }

  /**
   * Closes the vCPU and unmaps its kvm_run at once: the mapping holds a
   * reference on the VM, which would otherwise live on (with its debugfs
   * directory) until the garbage collector freed the buffer. Call only when
   * the vCPU thread has stopped (or never started).
   */
  close(): void {
    this.addon.close(this.fd);
    this.addon.unmap(this.run);
  }
}
