/**
 * What kind of KVM this host has, for boot tests that only a
 * hardware-virtualised host can run (stock and distribution kernels: see
 * ../shared/PLATFORM.md). On a PVM-style host `npm test` runs those tests
 * again inside the emulated AMD-V host (tests/hosts/amdv/), where they run.
 */
import { probeHostOnce } from '../../src/kvm/probe.js';
import { BOOT_TIMEOUT_MS, CRASH_SIGNALS, consolesSeen, endingsSeen, kvmUnavailable } from './guest.js';

/** How many times a boot test runs at most while each failure shows the emulator's fault. */
export const EMULATOR_FAULT_ATTEMPTS = 3;

/** The timeout of a boot test wrapped in {@link retryEmulatorFault}: room for its attempts. */
export const RETRY_TIMEOUT_MS = EMULATOR_FAULT_ATTEMPTS * BOOT_TIMEOUT_MS + 60_000;

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
 * A guest triple fault in the emulated AMD-V host (L1), where the boot
 * tests' kernel never triple-faults on its own: there, with two SMP guests
 * at once, 2 of 20 tsvmm boots of the test kernel triple-faulted at
 * different points of the boot (none in 12 boots one at a time), and in
 * the same runs L1's own kernel died (`stack guard page was hit` in
 * `error_entry`), also with QEMU as its VMM instead of tsvmm: the
 * emulator's SVM leaves state behind (tests/hosts/amdv/README.md).
 */
export const L1_GUEST_TRIPLE_FAULT = /guest triple fault \(the CPU reset itself\)/;

/**
 * A tsvmm CLI process that died of a crash signal in the emulated AMD-V
 * host (L1), as `runCli` records it. Node processes there crash now and
 * then in V8's generated code whatever they run (a tsx process, vitest's
 * own main process, the net test's TCP sink: tests/hosts/amdv/README.md),
 * which L1's emulated CPUs most likely run stale after another CPU
 * rewrote it. On any other host a crash of tsvmm fails the test at once,
 * so a crash of tsvmm's own code still shows: every boot test runs on the
 * PVM host too.
 */
export const L1_PROCESS_CRASH = new RegExp(`\\[the tsvmm process died of (${[...CRASH_SIGNALS].join('|')})\\]`);

/** True inside the emulated AMD-V host (tests/hosts/amdv/run.sh sets it). */
export const inEmulatedAmdvHost = process.env.TSVMM_AMDV_L1 === '1';

/** The emulator's fault this failed attempt shows, if any: what {@link retryEmulatorFault} retries on. */
function emulatorFault(fromConsole: number, fromEnding: number): string | undefined {
  if (hostKind() === 'pvm') {
    return consolesSeen
      .slice(fromConsole)
      .map((c) => (PVM_USER_SEGFAULT.exec(c()) ?? PVM_USER_GARBLED.exec(c()))?.[0])
      .find((m) => m !== undefined);
  }
  if (inEmulatedAmdvHost) {
    return endingsSeen
      .slice(fromEnding)
      .map((e) => (L1_GUEST_TRIPLE_FAULT.exec(e()) ?? L1_PROCESS_CRASH.exec(e()))?.[0])
      .find((m) => m !== undefined);
  }
  return undefined;
}

/**
 * A boot test body, run again when it failed and what that attempt saw
 * shows a fault of the emulated platforms, not of tsvmm: on the PVM host a
 * console with {@link PVM_USER_SEGFAULT} or {@link PVM_USER_GARBLED}, in the
 * emulated AMD-V host a guest that ended in {@link L1_GUEST_TRIPLE_FAULT}
 * or a CLI process that died as {@link L1_PROCESS_CRASH} says.
 * At most {@link EMULATOR_FAULT_ATTEMPTS} attempts. A failure without the
 * fault, any failure on a real host, and the last attempt's failure fail
 * the test; each retry is printed with its fault, and a final failure says
 * whether it showed the fault too.
 */
export function retryEmulatorFault<A extends unknown[], T>(body: (...args: A) => Promise<T>): (...args: A) => Promise<T> {
  return async (...args: A) => {
    const host = hostKind() === 'pvm' ? 'pvm' : 'amdv';
    const where = host === 'pvm' ? "the guest hit the PVM host's user-space fault" : "the guest hit the emulated AMD-V host's fault";
    for (let attempt = 1; ; attempt++) {
      const fromConsole = consolesSeen.length;
      const fromEnding = endingsSeen.length;
      try {
        return await body(...args);
      } catch (err) {
        const fault = emulatorFault(fromConsole, fromEnding);
        if (fault === undefined) throw err;
        const first = String((err as Error).message ?? err).split('\n')[0];
        if (attempt >= EMULATOR_FAULT_ATTEMPTS) {
          console.warn(`[${host}] attempt ${attempt} of ${EMULATOR_FAULT_ATTEMPTS} failed too, and ${where} again (${fault}): failing the test`);
          throw err;
        }
        console.warn(
          `[${host}] running the test again (attempt ${attempt + 1} of ${EMULATOR_FAULT_ATTEMPTS}): ${where} (${fault}); attempt ${attempt} failed with: ${first}`,
        );
      }
    }
  };
}
