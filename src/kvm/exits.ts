/**
 * vCPU exits: decoding struct kvm_run into a typed exit, and the one
 * function that maps an exit to an action. Pure, so it is tested with
 * made-up exits and fake buses.
 */
import type { NativeLayout } from './native.js';
import type { Bus } from '../base/bus.js';

/** KVM_EXIT_* reasons (include/uapi/linux/kvm.h). */
export const ExitReason = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  HYPERCALL: 3,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24,
} as const;

export const KVM_EXIT_IO_OUT = 1;
export const KVM_INTERNAL_ERROR_EMULATION = 1;
const EMULATION_FLAG_INSTRUCTION_BYTES = 1n;
export const KVM_SYSTEM_EVENT_SHUTDOWN = 1;
export const KVM_SYSTEM_EVENT_RESET = 2;
export const KVM_SYSTEM_EVENT_CRASH = 3;

export type VcpuExit =
  | { kind: 'io'; write: boolean; port: number; size: number; count: number; data: Uint8Array }
  | { kind: 'mmio'; write: boolean; addr: number; data: Uint8Array }
  | { kind: 'hlt' }
  | { kind: 'shutdown' }
  | { kind: 'fail-entry'; hardwareReason: bigint; cpu: number }
  | { kind: 'internal-error'; suberror: number; insn?: Uint8Array; data: bigint[] }
  | { kind: 'system-event'; type: number }
  | { kind: 'intr' }
  | { kind: 'other'; reason: number };

/**
 * Decodes the exit held in a vCPU's kvm_run mapping. `data` in I/O and MMIO
 * exits is a view into kvm_run itself: what a read handler writes there is
 * what the guest receives when it resumes.
 */
export function decodeExit(run: Uint8Array, layout: NativeLayout['run']): VcpuExit {
  return new ExitDecoder(run, layout).decode();
}

/**
 * decodeExit for one vCPU's kvm_run, exit after exit, with what it can
 * reuse kept: the DataView, and the view of the I/O data, which KVM keeps
 * at the same offset exit after exit. `data` is valid until the next decode.
 */
export class ExitDecoder {
  private readonly view: DataView;
  private ioData: Uint8Array;
  private ioDataOffset = -1;
  /** MMIO data views by access length (0 to 8), made on first use. */
  private readonly mmioData: Array<Uint8Array | undefined> = [];

  constructor(
    private readonly run: Uint8Array,
    private readonly layout: NativeLayout['run'],
  ) {
    this.view = new DataView(run.buffer, run.byteOffset, run.byteLength);
    this.ioData = run.subarray(0, 0);
  }

  decode(): VcpuExit {
    const { view, layout, run } = this;
    const reason = view.getUint32(layout.exitReason, true);
    switch (reason) {
      case ExitReason.IO: {
        const size = view.getUint8(layout.ioSize);
        const count = view.getUint32(layout.ioCount, true);
        // A u64 offset: the high half is 0 for any offset inside kvm_run.
        const high = view.getUint32(layout.ioDataOffset + 4, true);
        const offset = view.getUint32(layout.ioDataOffset, true);
        const length = size * count;
        if (high !== 0 || offset + length > run.byteLength || length === 0) return { kind: 'other', reason };
        if (offset !== this.ioDataOffset || this.ioData.length !== length) {
          this.ioData = run.subarray(offset, offset + length);
          this.ioDataOffset = offset;
        }
        return {
          kind: 'io',
          write: view.getUint8(layout.ioDirection) === KVM_EXIT_IO_OUT,
          port: view.getUint16(layout.ioPort, true),
          size,
          count,
          data: this.ioData,
        };
      }
      case ExitReason.MMIO: {
        const len = Math.min(view.getUint32(layout.mmioLen, true), 8);
        // One view per access size, made once: kvm_run's data field, read and written in place.
        this.mmioData[len] ??= run.subarray(layout.mmioData, layout.mmioData + len);
        return {
          kind: 'mmio',
          write: view.getUint8(layout.mmioIsWrite) !== 0,
          addr: view.getUint32(layout.mmioPhysAddr, true) + view.getUint32(layout.mmioPhysAddr + 4, true) * 2 ** 32,
          data: this.mmioData[len],
        };
      }
      case ExitReason.HLT:
        return { kind: 'hlt' };
      case ExitReason.SHUTDOWN:
        return { kind: 'shutdown' };
      case ExitReason.FAIL_ENTRY:
        return {
          kind: 'fail-entry',
          hardwareReason: view.getBigUint64(layout.failEntryReason, true),
          cpu: view.getUint32(layout.failEntryCpu, true),
        };
      case ExitReason.INTERNAL_ERROR: {
        const suberror = view.getUint32(layout.internalSuberror, true);
        const ndata = Math.min(view.getUint32(layout.internalNdata, true), 16);
        const data: bigint[] = [];
        for (let i = 0; i < ndata; i++) data.push(view.getBigUint64(layout.internalData + i * 8, true));
        let insn: Uint8Array | undefined;
        if (suberror === KVM_INTERNAL_ERROR_EMULATION && ndata >= 2) {
          const flags = view.getBigUint64(layout.emulationFlags, true);
          if (flags & EMULATION_FLAG_INSTRUCTION_BYTES) {
            const n = Math.min(view.getUint8(layout.emulationInsnSize), 15);
            if (n > 0) insn = run.slice(layout.emulationInsnBytes, layout.emulationInsnBytes + n);
          }
        }
        return { kind: 'internal-error', suberror, data, ...(insn ? { insn } : {}) };
      }
      case ExitReason.SYSTEM_EVENT:
        return { kind: 'system-event', type: view.getUint32(layout.systemEventType, true) };
      case ExitReason.INTR:
        return { kind: 'intr' };
      default:
        return { kind: 'other', reason };
    }
  }
}

/** Why a vCPU stopped the VM. */
export type GuestStop =
  | { kind: 'reboot' }
  | { kind: 'poweroff' }
  | { kind: 'halt' }
  | { kind: 'triple-fault' }
  | { kind: 'crash' }
  | { kind: 'error'; message: string };

/**
 * What to do after an exit (or a kick): the one vocabulary of the exit path,
 * from the handler to the vCPU loop. `stop` says why when the guest asked
 * for the end; a stop the host asked for has none.
 */
export type ExitAction = { kind: 'continue' } | { kind: 'stop'; stop?: GuestStop };

export const CONTINUE = { kind: 'continue' } as const satisfies ExitAction;
/** Stop the vCPU, for a reason of the host's (the VM is ending). */
export const STOP: ExitAction = { kind: 'stop' };

/** What {@link handleExit} answers: an ExitAction whose stops always say why. */
export type HandledExit = { kind: 'continue' } | { kind: 'stop'; stop: GuestStop };

/** What the exit handler needs from the machine. */
export interface ExitContext {
  pio: Bus;
  mmio: Bus;
  /**
   * Tries to get past an instruction KVM could not emulate. Returns true
   * when the vCPU may resume. Absent where the fallback is off.
   */
  emulationFallback?: (exit: Extract<VcpuExit, { kind: 'internal-error' }>) => boolean;
  /** Per-reason exit counters. */
  counts: Map<string, number>;
}

function count(ctx: ExitContext, key: string): void {
  ctx.counts.set(key, (ctx.counts.get(key) ?? 0) + 1);
}

/** Maps one exit to what the vCPU does next. Never throws for guest behaviour. */
export function handleExit(exit: VcpuExit, ctx: ExitContext): HandledExit {
  count(ctx, exit.kind);
  switch (exit.kind) {
    case 'io': {
      // String I/O (rep ins/outs) arrives as `count` back-to-back elements.
      if (exit.count === 1) {
        if (exit.write) ctx.pio.write(exit.port, exit.data);
        else ctx.pio.read(exit.port, exit.data);
        return CONTINUE;
      }
      for (let i = 0; i < exit.count; i++) {
        const el = exit.data.subarray(i * exit.size, (i + 1) * exit.size);
        if (exit.write) ctx.pio.write(exit.port, el);
        else ctx.pio.read(exit.port, el);
      }
      return CONTINUE;
    }
    case 'mmio':
      if (exit.write) ctx.mmio.write(exit.addr, exit.data);
      else ctx.mmio.read(exit.addr, exit.data);
      return CONTINUE;
    case 'intr':
      return CONTINUE;
    case 'hlt':
      // Only seen without an in-kernel irqchip: nothing can wake the vCPU.
      return { kind: 'stop', stop: { kind: 'halt' } };
    case 'shutdown':
      return { kind: 'stop', stop: { kind: 'triple-fault' } };
    case 'system-event':
      if (exit.type === KVM_SYSTEM_EVENT_RESET) return { kind: 'stop', stop: { kind: 'reboot' } };
      if (exit.type === KVM_SYSTEM_EVENT_SHUTDOWN) return { kind: 'stop', stop: { kind: 'poweroff' } };
      if (exit.type === KVM_SYSTEM_EVENT_CRASH) return { kind: 'stop', stop: { kind: 'crash' } };
      return { kind: 'stop', stop: { kind: 'error', message: `unknown system event ${exit.type}` } };
    case 'fail-entry':
      return {
        kind: 'stop',
        stop: {
          kind: 'error',
          message: `KVM could not enter the guest on cpu ${exit.cpu} (hardware reason 0x${exit.hardwareReason.toString(16)})`,
        },
      };
    case 'internal-error': {
      if (exit.suberror === KVM_INTERNAL_ERROR_EMULATION && ctx.emulationFallback?.(exit)) return CONTINUE;
      const insn = exit.insn ? ` (instruction bytes ${Buffer.from(exit.insn).toString('hex')})` : '';
      const what =
        exit.suberror === KVM_INTERNAL_ERROR_EMULATION ? `KVM could not emulate a guest instruction${insn}` : `KVM internal error, suberror ${exit.suberror}`;
      return { kind: 'stop', stop: { kind: 'error', message: what } };
    }
    case 'other':
      return { kind: 'stop', stop: { kind: 'error', message: `unexpected KVM exit reason ${exit.reason}` } };
  }
}
