/**
 * What kind of KVM this host has, for boot tests that only a
 * hardware-virtualised host can run (stock and distribution kernels: see
 * ../shared/PLATFORM.md). On a PVM-style host `npm test` runs those tests
 * again inside the emulated AMD-V host (tests/hosts/amdv/), where they run.
 */
import { probeHostOnce } from '../../src/vmm/probe.js';
import { BOOT_TIMEOUT_MS, consolesSeen, kvmUnavailable } from './guest.js';

/** The timeout of a boot test wrapped in {@link retryPvmFault}: room for the retry. */
export const RETRY_TIMEOUT_MS = 2 * BOOT_TIMEOUT_MS + 60_000;

export type HostKind = 'hardware' | 'pvm' | 'none';

let cached: HostKind | undefined;

/** 'hardware' (VT-x/AMD-V, or the emulated AMD-V host), 'pvm' (guest kernel code emulated, with gaps), or 'none'. */
export function hostKind(): HostKind {
  if (cached === undefined) {
    cached = kvmUnavailable() !== undefined ? 'none' : probeHostOnce().emulationGaps.length > 0 ? 'pvm' : 'hardware';
  }
  return cached;
}

/** Why a test that needs hardware virtualization cannot run here, or undefined when it can. */
export function hardwareVirtUnavailable(): string | undefined {
  const kind = hostKind();
  if (kind === 'hardware') return undefined;
  if (kind === 'none') return kvmUnavailable();
  return 'this host KVM emulates guest kernel code, where a stock kernel cannot run user space; npm test runs this inside the emulated AMD-V host (tests/hosts/amdv)';
}

/**
 * A user process of the test kernel's busybox killed by SIGSEGV: on the
 * PVM host, guest user space now and then dies this way at its start,
 * most often on a second vCPU while other guests load the two cores
 * (init[1] at `mov rax,[rax]` after a TLS load read 0). The emulated AMD-V
 * host, running the same kernel and initramfs, has never shown it.
 */
export const PVM_USER_SEGFAULT = /segfault at [0-9a-f]+ ip [0-9a-f]+ sp [0-9a-f]+ error \d+ in busybox\[[^\n]*/;

/**
 * The same family, seen once (CI on the PVM host, 2026-12-01): busybox's
 * `ls` printed `ls: %s%s%s: No such file or directory`, that is, its
 * xasprintf("%s%s%s", dir, "/", name) returned the format unexpanded, so
 * the guest's printf found no '%' in it: user-space state gone wrong in
 * the guest. Undiagnosed, like the segfault; not seen in L1.
 */
export const PVM_USER_GARBLED = /\w+: %s%s%s: No such file or directory/;

/**
 * A boot test body, run once more on the PVM host when it failed and a
 * console it saw shows {@link PVM_USER_SEGFAULT} or {@link PVM_USER_GARBLED}: that fault is the
 * platform's, not tsvmm's. Any other failure, any failure elsewhere, and a
 * second failure fail the test. The retry is printed with the fault.
 */
export function retryPvmFault<A extends unknown[], T>(body: (...args: A) => Promise<T>): (...args: A) => Promise<T> {
  return async (...args: A) => {
    const from = consolesSeen.length;
    try {
      return await body(...args);
    } catch (err) {
      if (hostKind() !== 'pvm') throw err;
      const fault = consolesSeen
        .slice(from)
        .map((c) => (PVM_USER_SEGFAULT.exec(c()) ?? PVM_USER_GARBLED.exec(c()))?.[0])
        .find((m) => m !== undefined);
      if (fault === undefined) throw err;
      console.warn(
        `[pvm] running the test once more: the guest hit the PVM host's user-space fault (${fault}); ` +
          `the first attempt failed with: ${String((err as Error).message ?? err).split('\n')[0]}`,
      );
      return await body(...args);
    }
  };
}
