/**
 * How a VM ended, and the process exit code each outcome maps to. The CLI
 * and the README use this one table.
 */

export type OutcomeKind =
  /** The guest rebooted (reboot -f, or the i8042 reset line): a normal end for a microVM. */
  | 'reboot'
  /** The guest powered off or halted. */
  | 'poweroff'
  /** The guest kernel panicked. */
  | 'panic'
  /** The vCPU hit a triple fault (KVM_EXIT_SHUTDOWN). */
  | 'triple-fault'
  /** The VMM or the host failed, or the guest did something the VMM cannot handle. */
  | 'error'
  /** The host stopped the VM (Ctrl-A x, stop(), SIGINT, SIGTERM). */
  | 'stopped';

export interface VmOutcome {
  kind: OutcomeKind;
  /** The process exit code the CLI uses for this outcome. */
  exitCode: number;
  /** A one-line explanation. */
  message: string;
  /** For 'error': the error. */
  error?: Error;
}

/** Exit codes, as documented in the README. */
export const EXIT_CODES: Record<OutcomeKind, number> = {
  reboot: 0,
  poweroff: 0,
  error: 1,
  panic: 3,
  'triple-fault': 4,
  stopped: 130,
};

/** commander's code for a bad command line. */
export const EXIT_USAGE = 2;

/** `tsvmm run --expect`: the VM ended before its console printed a match. */
export const EXIT_EXPECT_UNMET = 5;

/** `tsvmm run --timeout`: the time ran out and tsvmm stopped the VM (the code timeout(1) uses). */
export const EXIT_TIMEOUT = 124;

export function outcome(kind: OutcomeKind, message: string, error?: Error): VmOutcome {
  return { kind, exitCode: EXIT_CODES[kind], message, ...(error ? { error } : {}) };
}
