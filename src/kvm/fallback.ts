/**
 * The emulation-failure fallback. On hosts whose KVM runs guest kernel code
 * in its instruction emulator (pagetable-based KVM, see PLATFORM.md), a few
 * instructions end KVM_RUN with KVM_INTERNAL_ERROR_EMULATION. The two the
 * Linux boot path cannot avoid by kernel parameters are handled here:
 *
 * - `int3` (0xcc): the kernel's int3_selftest(). Advance RIP past it and
 *   inject #BP, which is what the hardware would have done (a trap: the
 *   saved RIP points after the instruction).
 * - `fwait` (0x9b): a no-op unless an x87 exception is pending, which a
 *   kernel that masks x87 exceptions never has. Advance RIP.
 *
 * The others (xrstor, popcnt, clac/stac...) are avoided with kernel
 * parameters; see {@link EMULATED_HOST_CMDLINE}.
 *
 * On hosts with VT-x/AMD-V none of these exits happen and the fallback is
 * never called.
 */
import type { Logger } from '../base/log.js';
import type { GuestMemory } from '../base/memory.js';
import type { Vcpu } from './vcpu.js';

/** #BP, the breakpoint exception vector. */
const VECTOR_BP = 3;
const OPCODE_INT3 = 0xcc;
const OPCODE_FWAIT = 0x9b;

/**
 * Kernel parameters for hosts with emulation gaps: no XSAVE (xrstor cannot
 * be emulated) and no instructions that alternatives would pick from the
 * host's CPUID, which the guest sees unfiltered there.
 */
// The kernel copies clearcpuid= into a 128-byte buffer: keep the list short.
// Clearing xsave also clears everything that depends on it (avx*, xsaveopt...).
export const EMULATED_HOST_CMDLINE = 'noxsave clearcpuid=popcnt,smap,smep,fsgsbase,rdpid,rdrand,rdseed,bmi1,bmi2,movbe';

/**
 * Added with more than one vCPU on such hosts. The guest sees the host's
 * KVM paravirtual feature leaf (CPUID is not virtualised) and sends IPIs
 * and spinlock kicks by hypercall, which these hosts never complete: the
 * sending CPU spins in kvm_hypercall4() and the boot hangs while bringing
 * up the second CPU. `nopv` makes the guest use the APIC instead.
 */
export const EMULATED_HOST_SMP_CMDLINE = 'nopv';

export class EmulationFallback {
  /** How often each instruction was handled. */
  readonly counts = new Map<string, number>();

  constructor(
    private readonly vcpu: Vcpu,
    private readonly mem: GuestMemory,
    private readonly log: Logger,
  ) {}

  /** The instruction bytes at the guest's RIP, read through its page tables. */
  private instructionBytes(): { rip: bigint; bytes: Uint8Array } | undefined {
    const rip = this.vcpu.getRegs().rip;
    const cs = this.vcpu.getSregs().cs;
    const linear = BigInt.asUintN(64, BigInt(cs.base) + rip);
    const phys = this.vcpu.translate(linear);
    if (phys === undefined) return undefined;
    // Stay inside the page: the next page may map elsewhere.
    const len = Math.min(15, 0x1000 - (phys & 0xfff));
    if (!this.mem.checkRange(phys, len)) return undefined;
    return { rip, bytes: this.mem.slice(phys, len) };
  }

  /** Returns true when the vCPU can resume past the failed instruction. */
  handle(reportedInsn?: Uint8Array): boolean {
    const at = this.instructionBytes();
    const bytes = at?.bytes ?? reportedInsn;
    if (!at || !bytes || bytes.length === 0) {
      this.log.error('emulation failure at an unreadable RIP');
      return false;
    }
    const opcode = bytes[0];
    if (opcode === OPCODE_INT3) {
      this.vcpu.setRegs({ rip: at.rip + 1n });
      this.vcpu.injectException(VECTOR_BP);
      this.bump('int3');
      return true;
    }
    if (opcode === OPCODE_FWAIT) {
      this.vcpu.setRegs({ rip: at.rip + 1n });
      this.bump('fwait');
      return true;
    }
    this.log.error(
      { rip: `0x${at.rip.toString(16)}`, bytes: Buffer.from(bytes).toString('hex') },
      'KVM could not emulate this guest instruction and tsvmm has no fallback for it',
    );
    return false;
  }

  private bump(name: string): void {
    this.counts.set(name, (this.counts.get(name) ?? 0) + 1);
    this.log.debug({ insn: name }, 'emulation fallback');
  }
}
