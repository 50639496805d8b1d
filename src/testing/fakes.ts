/**
 * Fakes of the ground types for device unit tests: an IRQ line that
 * records its history, and a clock and timer scheduler that move only when
 * the test says so.
 */
import type { IrqLine } from '../base/irq.js';
import type { NanoClock, Scheduler } from '../base/clock.js';

/** An IrqLine that records its history: for device unit tests. */
export class FakeIrqLine implements IrqLine {
  level = false;
  /** Rising edges seen, whether by setLevel or trigger. */
  edges = 0;
  readonly history: Array<'high' | 'low' | 'trigger'> = [];

  setLevel(high: boolean): void {
    if (high && !this.level) this.edges++;
    this.level = high;
    this.history.push(high ? 'high' : 'low');
  }

  trigger(): void {
    this.edges++;
    this.history.push('trigger');
  }
}

/** A clock that moves only when told to: for tests. */
export class FakeClock {
  constructor(public nowNs = 0n) {}

  /** The clock function to inject into a device. */
  readonly now: NanoClock = () => this.nowNs;

  /** Moves the clock forward without running any timer (a host that is late). */
  advance(ns: bigint | number): void {
    this.nowNs += BigInt(ns);
  }
}

interface FakeTimer {
  due: bigint;
  seq: number;
  fn: () => void;
}

/**
 * Timers on a {@link FakeClock}: nothing runs until the test calls
 * {@link FakeScheduler.advance} (the host on time) or moves the clock and
 * calls {@link FakeScheduler.runDue} (the host late).
 */
export class FakeScheduler implements Scheduler {
  private readonly timers = new Map<number, FakeTimer>();
  private nextId = 1;

  constructor(readonly clock: FakeClock) {}

  setTimeout(fn: () => void, ms: number): unknown {
    const id = this.nextId++;
    // Like Node: at least 1 ms, whole milliseconds, so a fake timer is never
    // more punctual than a real one.
    const wait = Number.isFinite(ms) && ms >= 1 ? Math.ceil(ms) : 1;
    this.timers.set(id, { due: this.clock.nowNs + BigInt(wait) * 1_000_000n, seq: id, fn });
    return id;
  }

  clearTimeout(handle: unknown): void {
    if (typeof handle === 'number') this.timers.delete(handle);
  }

  /** Timers waiting to run. */
  get pending(): number {
    return this.timers.size;
  }

  /** Due time of the earliest pending timer, if any. */
  get nextDue(): bigint | undefined {
    return this.earliest()?.[1].due;
  }

  /** Runs, in order, every timer due at the clock's current time (without moving it). */
  runDue(): number {
    let ran = 0;
    for (;;) {
      const next = this.earliest();
      if (!next || next[1].due > this.clock.nowNs) return ran;
      this.fire(next[0], next[1]);
      if (++ran > 1_000_000) throw new Error('FakeScheduler: timers keep rescheduling at the same instant');
    }
  }

  /**
   * Moves the clock forward by `ns`, stopping at each timer's due time to
   * run it exactly then: a host whose timers are punctual.
   */
  advance(ns: bigint | number): number {
    const target = this.clock.nowNs + BigInt(ns);
    let ran = 0;
    for (;;) {
      const next = this.earliest();
      if (!next || next[1].due > target) break;
      if (next[1].due > this.clock.nowNs) this.clock.nowNs = next[1].due;
      this.fire(next[0], next[1]);
      if (++ran > 1_000_000) throw new Error('FakeScheduler: too many timers in one advance');
    }
    this.clock.nowNs = target;
    return ran;
  }

  private fire(id: number, t: FakeTimer): void {
    this.timers.delete(id);
    t.fn();
  }

  private earliest(): [number, FakeTimer] | undefined {
    let best: [number, FakeTimer] | undefined;
    for (const entry of this.timers) {
      const t = entry[1];
      if (!best || t.due < best[1].due || (t.due === best[1].due && t.seq < best[1].seq)) best = entry;
    }
    return best;
  }
}
