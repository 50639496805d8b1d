/**
 * CPUID for each vCPU: what KVM supports, with the per-CPU and topology
 * fields a guest reads to find its APIC ID and its siblings (as Firecracker
 * and kvmtool set them).
 */
import type { NativeLayout } from '../kvm/native.js';
import type { CpuidEntry } from '../kvm/vcpu.js';

export function parseCpuid(buf: Uint8Array, layout: NativeLayout): CpuidEntry[] {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const n = view.getUint32(0, true);
  const e = layout.cpuidEntry;
  const out: CpuidEntry[] = [];
  for (let i = 0; i < n; i++) {
    const at = layout.cpuid2HeaderSize + i * e.size;
    if (at + e.size > buf.byteLength) break;
    out.push({
      function: view.getUint32(at + e.function, true),
      index: view.getUint32(at + e.index, true),
      flags: view.getUint32(at + e.flags, true),
      eax: view.getUint32(at + e.eax, true),
      ebx: view.getUint32(at + e.ebx, true),
      ecx: view.getUint32(at + e.ecx, true),
      edx: view.getUint32(at + e.edx, true),
    });
  }
  return out;
}

/** Bits this module sets (Intel SDM vol. 2A, CPUID). */
const LEAF1_ECX_TSC_DEADLINE = 1 << 24;
const LEAF1_ECX_HYPERVISOR = 1 << 31;
const LEAF1_EDX_HTT = 1 << 28;
/** Leaf 0xB level types. */
const LEVEL_TYPE_SMT = 1;
const LEVEL_TYPE_CORE = 2;

/** Bits needed to number `n` things: ceil(log2(n)). */
function bitsFor(n: number): number {
  let bits = 0;
  while (1 << bits < n) bits++;
  return bits;
}

export interface CpuidOptions {
  /**
   * The in-kernel LAPIC's TSC-deadline timer mode (KVM_CAP_TSC_DEADLINE_TIMER),
   * which KVM_GET_SUPPORTED_CPUID leaves out for the VMM to add, as QEMU and
   * Firecracker do. Without it the guest calibrates its LAPIC timer against
   * another clock for a tenth of a second at boot.
   */
  tscDeadline?: boolean;
  /**
   * The processor brand string of leaves 0x80000002..0x80000004, which
   * KVM_GET_SUPPORTED_CPUID returns zeroed (QEMU sets its model's, and
   * Firecracker the host's): the host's, so the guest names its CPU (in
   * /proc/cpuinfo and the boot log) instead of "AMD 17/01". At most
   * {@link BRAND_MAX} ASCII characters; a longer one is cut.
   */
  brand?: string;
}

/** The brand string's 48 bytes hold at most 47 characters and a NUL. */
export const BRAND_MAX = 47;

/** The brand leaves' twelve registers (EAX, EBX, ECX, EDX of each leaf in turn): the NUL-padded string, 4 bytes each, little-endian. */
function brandRegisters(brand: string): number[] {
  const bytes = new Uint8Array(48);
  const ascii = brand.replace(/[^\x20-\x7e]/g, '?').slice(0, BRAND_MAX);
  for (let i = 0; i < ascii.length; i++) bytes[i] = ascii.charCodeAt(i);
  const view = new DataView(bytes.buffer);
  return Array.from({ length: 12 }, (_, i) => view.getUint32(i * 4, true));
}

/**
 * The CPUID table for vCPU `apicId` of `cpuCount`: one package, one core
 * per vCPU, no SMT. Returns new entries; `supported` is not changed.
 */
export function cpuidForVcpu(supported: readonly CpuidEntry[], apicId: number, cpuCount: number, options: CpuidOptions = {}): CpuidEntry[] {
  const coreBits = bitsFor(cpuCount);
  const brand = options.brand !== undefined ? brandRegisters(options.brand) : undefined;
  return supported.map((src) => {
    const e = { ...src };
    switch (e.function) {
      case 0x1:
        // EBX[31:24] initial APIC ID, EBX[23:16] addressable logical processors.
        e.ebx = ((e.ebx & 0x0000ffff) | ((cpuCount & 0xff) << 16) | ((apicId & 0xff) << 24)) >>> 0;
        e.ecx = (e.ecx | LEAF1_ECX_HYPERVISOR | (options.tscDeadline ? LEAF1_ECX_TSC_DEADLINE : 0)) >>> 0;
        e.edx = cpuCount > 1 ? (e.edx | LEAF1_EDX_HTT) >>> 0 : (e.edx & ~LEAF1_EDX_HTT) >>> 0;
        break;
      case 0x4:
        // EAX[31:26] cores per package - 1; EAX[25:14] threads sharing this cache - 1 (one each).
        e.eax = ((e.eax & 0x3fff) | ((cpuCount - 1) << 26)) >>> 0;
        break;
      case 0xa:
        // No virtual PMU: a guest perf driver probing counters only costs exits.
        e.eax = e.ebx = e.ecx = e.edx = 0;
        break;
      case 0xb:
        e.edx = apicId;
        if (e.index === 0) {
          e.eax = 0;
          e.ebx = 1;
          e.ecx = (LEVEL_TYPE_SMT << 8) | 0;
        } else if (e.index === 1) {
          e.eax = coreBits;
          e.ebx = cpuCount;
          e.ecx = (LEVEL_TYPE_CORE << 8) | 1;
        } else {
          e.eax = e.ebx = 0;
          e.ecx = e.index & 0xff;
        }
        break;
      case 0x80000002:
      case 0x80000003:
      case 0x80000004:
        if (brand) {
          const at = (e.function - 0x80000002) * 4;
          [e.eax, e.ebx, e.ecx, e.edx] = [brand[at]!, brand[at + 1]!, brand[at + 2]!, brand[at + 3]!];
        }
        break;
      case 0x80000008:
        // ECX[7:0] cores per package - 1 (AMD).
        e.ecx = ((e.ecx & ~0xff) | ((cpuCount - 1) & 0xff)) >>> 0;
        break;
    }
    return e;
  });
}
