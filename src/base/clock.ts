/**
 * Time for device models: a nanosecond clock and a one-shot timer
 * scheduler, both injected so that timer-driven devices (the PIT) are pure
 * state machines that tests drive deterministically with the fake clock and scheduler of
 * `tsvmm/testing` (src/testing/fakes.ts).
 */

/** A monotonic clock in nanoseconds. */
export type NanoClock = () => bigint;

/** The host's monotonic clock: `process.hrtime.bigint()`. */
export const monotonicClock: NanoClock = () => process.hrtime.bigint();

/**
 * One-shot timers, shaped like the global `setTimeout`/`clearTimeout` so
 * the real ones fit. The handle is opaque to the caller.
 */
export interface Scheduler {
  /** Runs `fn` once, no earlier than `ms` milliseconds from now. */
  setTimeout(fn: () => void, ms: number): unknown;
  /** Cancels a timer; a handle that already fired or was cancelled is ignored. */
  clearTimeout(handle: unknown): void;
}

/**
 * The real timers, unref()'d: a device timer must never keep Node alive
 * after the VM and everything else have finished.
 */
export const realScheduler: Scheduler = {
  setTimeout(fn: () => void, ms: number): unknown {
    const t = setTimeout(fn, ms);
    t.unref();
    return t;
  },
  clearTimeout(handle: unknown): void {
    clearTimeout(handle as ReturnType<typeof setTimeout>);
  },
};
