/**
 * Tiny real-mode guests: the host probe that decides whether the
 * emulation-failure fallback is needed, and the guest the exit benchmark
 * runs. No irqchip, one vCPU, 64 KiB of RAM, code at 0x1000.
 */
import { readFileSync } from 'node:fs';
import type { Logger } from '../base/log.js';
import { ExitReason, KVM_INTERNAL_ERROR_EMULATION, type decodeExit } from './exits.js';
import type { Kvm, VmFd } from './kvm.js';
import { Kvm as KvmClass, VmFd as VmFdClass } from './kvm.js';
import { GuestMemory } from '../base/memory.js';
import { Vcpu, type CpuidEntry } from './vcpu.js';

const TINY_RAM = 0x10000;
const CODE_ADDR = 0x1000;

export class TinyGuest {
  private constructor(
    readonly vm: VmFd,
    readonly vcpu: Vcpu,
    readonly mem: GuestMemory,
  ) {}

  /** A VM whose vCPU starts in real mode at 0x1000 running `code`. */
  static create(kvm: Kvm, code: Uint8Array, cpuid?: CpuidEntry[]): TinyGuest {
    const vm = kvm.createVm();
    const mem = new GuestMemory(VmFdClass.allocateRam(vm, [{ guestAddr: 0, size: TINY_RAM }]));
    mem.write(CODE_ADDR, code);
    const vcpu = new Vcpu(vm, 0);
    if (cpuid) vcpu.setCpuid(cpuid);
    const sregs = vcpu.getSregs();
    vcpu.setSregs({ cs: { ...sregs.cs, base: 0, selector: 0 } });
    vcpu.setRegs({ rip: CODE_ADDR, rflags: 2 });
    return new TinyGuest(vm, vcpu, mem);
  }

  /** One synchronous KVM_RUN on this thread; returns the exit. */
  runOnce(): ReturnType<typeof decodeExit> {
    const r = this.vm.addon.runOnce(this.vcpu.fd);
    if (r < 0) throw new Error(`KVM_RUN failed: errno ${-r}`);
    return this.vcpu.currentExit();
  }

  close(): void {
    this.vcpu.close();
    this.vm.close();
  }
}

/**
 * Instructions the Linux boot path executes in kernel mode that a
 * pagetable-based KVM (one that emulates guest CPL0 code) cannot emulate.
 * On hardware virtualization they run natively.
 */
const GAP_PROBES: ReadonlyArray<{ name: string; code: number[] }> = [
  // int3 fails the same way, but its emulation failure costs about 30 s of
  // host system time in real mode here; fwait answers at once.
  { name: 'fwait', code: [0x9b, 0xf4] },
];

export interface HostProbe {
  /**
   * Instructions that ended KVM_RUN with an emulation failure in a probe
   * guest. Empty on hosts with hardware virtualization.
   */
  emulationGaps: string[];
}

/**
 * The host processor's name, as its kernel read it from CPUID's brand
 * string ("model name" in /proc/cpuinfo), or undefined where there is none
 * to read. KVM leaves the guest's brand leaves zero for the VMM to fill.
 */
export function hostCpuModelName(cpuinfo = '/proc/cpuinfo'): string | undefined {
  let text: string;
  try {
    text = readFileSync(cpuinfo, 'latin1');
  } catch {
    return undefined;
  }
  const name = /^model name\s*:\s*(.*)$/m.exec(text)?.[1]?.trim();
  return name ? name : undefined;
}

/**
 * Finds out whether this host's KVM emulates guest kernel code with gaps,
 * by running each probe instruction in a tiny real-mode guest and looking
 * at the exit. (Probing CPUID does not work for this: KVM's emulator
 * answers an emulated CPUID from the table the VMM set.) Costs a few
 * milliseconds.
 */
export function probeHost(kvm: Kvm, log?: Logger): HostProbe {
  const emulationGaps: string[] = [];
  for (const probe of GAP_PROBES) {
    const guest = TinyGuest.create(kvm, Uint8Array.from(probe.code));
    try {
      const exit = guest.runOnce();
      log?.debug({ probe: probe.name, exit: exit.kind }, 'host probe');
      if (exit.kind === 'internal-error' && exit.suberror === KVM_INTERNAL_ERROR_EMULATION) {
        emulationGaps.push(probe.name);
      }
    } finally {
      guest.close();
    }
  }
  return { emulationGaps };
}

/** Opens KVM, probes the host as {@link probeHost} does, and closes KVM again. */
export function probeHostOnce(device?: string, log?: Logger): HostProbe {
  const kvm = KvmClass.open(device);
  try {
    return probeHost(kvm, log);
  } finally {
    kvm.close();
  }
}

/** Real-mode code that does `out 0x511, al` `n` times (n < 2^32) and then `hlt`. */
export function portWriteLoopCode(n: number): Uint8Array {
  return Uint8Array.from([
    0x66,
    0xb9,
    n & 0xff,
    (n >>> 8) & 0xff,
    (n >>> 16) & 0xff,
    (n >>> 24) & 0xff, // mov ecx, n
    0xba,
    0x11,
    0x05, // mov dx, 0x511
    0xee, // loop: out dx, al
    0x66,
    0x49, // dec ecx
    0x75,
    0xfb, // jnz loop
    0xf4, // hlt
  ]);
}

export { ExitReason };
