/**
 * Intel 8254 programmable interval timer (ports 0x40-0x43) and the PC's
 * "port B" system control register (port 0x61), which gates PIT channel 2
 * and reads its output.
 *
 * Reference: Intel 8254 datasheet, order no. 231164: "Control Word Format"
 * (figure 7), "Read-Back Command Format" (figure 9), "Status Byte" (figure
 * 10), "Mode Definitions" (modes 0-5) and "Gate Pin Operations Summary"
 * (table 3). Port 0x61 layout: IBM PC/AT Technical Reference, "System
 * Control Port B".
 *
 * The counters are never stepped: a channel records when it started
 * counting and computes its count and OUT from an injected nanosecond clock
 * at 1193182 Hz, so a guest that polls the counter (Linux calibrating the
 * TSC on channel 2, the PIT clocksource on channel 0) sees it count down in
 * real time. Channel 0's rising OUT edges become IRQ 0 triggers, timed by an
 * injected scheduler; a late host timer delivers one tick and counts the
 * rest as lost.
 *
 * Simplifications: a new count written in modes 2/3 restarts the period at
 * once (the chip waits for the end of the current period); in mode 3 an
 * odd count reads back approximately; the one-clock load delay is ignored;
 * BCD counting is logged and treated as binary.
 */
import type { BusDevice } from '../base/bus.js';
import type { IrqLine } from '../base/irq.js';
import { silentLogger, type Logger } from '../base/log.js';
import { monotonicClock, realScheduler, type NanoClock, type Scheduler } from '../base/clock.js';

// Port offsets from 0x40 (datasheet table 1, A1/A0).
/** Channel 0 counter: the system timer, IRQ 0. */
export const PIT_CHANNEL0 = 0;
/** Channel 1 counter: DRAM refresh on old PCs; counts, drives nothing. */
export const PIT_CHANNEL1 = 1;
/** Channel 2 counter: the speaker, gated and read through port 0x61. */
export const PIT_CHANNEL2 = 2;
/** Control word register (write only). */
export const PIT_MODE_COMMAND = 3;
/** Size of the register window: the length to map on the bus. */
export const PIT_REGISTER_COUNT = 4;

/** Input clock of the PC's PIT: 14.31818 MHz / 12. */
export const PIT_FREQUENCY_HZ = 1_193_182;
/** Shortest IRQ 0 period honoured; shorter ones are stretched to this. */
export const PIT_MIN_IRQ_PERIOD_NS = 100_000n;

/** Control word fields (datasheet figure 7). */
export const PIT_CONTROL = {
  SELECT_SHIFT: 6,
  /** SC = 11: read-back command instead of a channel select. */
  SELECT_READ_BACK: 3,
  ACCESS_SHIFT: 4,
  ACCESS_MASK: 0x30,
  /** RW = 00: counter latch command. */
  ACCESS_LATCH: 0,
  ACCESS_LOW: 1,
  ACCESS_HIGH: 2,
  ACCESS_LOW_HIGH: 3,
  MODE_SHIFT: 1,
  MODE_MASK: 0x0e,
  BCD: 0x01,
} as const;

/** Read-back command bits (datasheet figure 9); COUNT and STATUS are active low. */
export const PIT_READ_BACK = {
  NO_COUNT: 0x20,
  NO_STATUS: 0x10,
  CHANNEL0: 0x02,
  CHANNEL1: 0x04,
  CHANNEL2: 0x08,
} as const;

/** Status byte bits (datasheet figure 10); bits 0-5 repeat the control word. */
export const PIT_STATUS = {
  OUTPUT: 0x80,
  NULL_COUNT: 0x40,
} as const;

const FREQ = BigInt(PIT_FREQUENCY_HZ);
const NS_PER_S = 1_000_000_000n;

function ceilDiv(a: bigint, b: bigint): bigint {
  return (a + b - 1n) / b;
}

/** Whole PIT input clocks in `ns` nanoseconds. */
function nsToTicks(ns: bigint): bigint {
  return ns <= 0n ? 0n : (ns * FREQ) / NS_PER_S;
}

/** The first instant, in ns from a start, by which `ticks` clocks have elapsed. */
function ticksToNs(ticks: bigint): bigint {
  return ticks <= 0n ? 0n : ceilDiv(ticks * NS_PER_S, FREQ);
}

class Channel {
  /** Mode bits as written (6 and 7 kept for the status byte). */
  rawMode = 0;
  /** Effective mode 0-5. */
  mode = 0;
  access: number = PIT_CONTROL.ACCESS_LOW_HIGH;
  bcd = false;
  /** Initial count as written; 0 means 65536. */
  initial = 0x10000;
  /** Initial count of the run in progress. */
  runInitial = 0x10000;
  /** A full initial count has been written since the control word. */
  armed = false;
  /** Modes 1 and 5: a gate rising edge has started a run. */
  triggered = false;
  /** Clocks counted before `runStart` (a gate pause in modes 0/4). */
  base = 0n;
  /** When counting (re)started, or null while not counting. */
  runStart: bigint | null = null;
  /** What the counter reads while it has no run. */
  held = 0;
  /** Low byte of a low-then-high count write, waiting for its high byte. */
  writeLow: number | null = null;
  /** The read flip-flop: next byte of a low-then-high read is the high one. */
  readHigh = false;
  latchedCount: number | null = null;
  latchedStatus: number | null = null;
  nullCount = true;

  constructor(public gate: boolean) {}

  /** The counter has a run (possibly paused by its gate). */
  get started(): boolean {
    if (!this.armed) return false;
    return this.mode === 1 || this.mode === 5 ? this.triggered : true;
  }

  elapsed(now: bigint): bigint {
    return this.base + (this.runStart === null ? 0n : nsToTicks(now - this.runStart));
  }

  /** Modes 2 and 3 cannot divide by one (datasheet: a count of 1 is illegal there). */
  get period(): number {
    return Math.max(this.runInitial, 2);
  }

  count(now: bigint): number {
    if (!this.started) return this.held & 0xffff;
    const d = this.elapsed(now);
    const n = BigInt(this.runInitial);
    switch (this.mode) {
      case 2: {
        const p = BigInt(this.period);
        return Number(p - (d % p)) & 0xffff;
      }
      case 3: {
        // Counts down by two through each half period.
        const p = BigInt(this.period);
        const phase = d % p;
        const half = (p + 1n) / 2n;
        const v = phase < half ? p - 2n * phase : p - 2n * (phase - half);
        return Number(v) & 0xffff;
      }
      default: {
        // Modes 0, 1, 4, 5 keep counting past zero, wrapping at 16 bits.
        const v = (n - d) % 0x10000n;
        return Number(v < 0n ? v + 0x10000n : v);
      }
    }
  }

  output(now: bigint): boolean {
    // After a control word, before counting: low in mode 0, high otherwise.
    if (!this.started) return this.mode !== 0;
    if ((this.mode === 2 || this.mode === 3) && !this.gate) return true;
    const d = this.elapsed(now);
    const n = BigInt(this.runInitial);
    switch (this.mode) {
      case 0:
      case 1:
        return d >= n;
      case 2: {
        const p = BigInt(this.period);
        return d % p !== p - 1n;
      }
      case 3: {
        const p = BigInt(this.period);
        return d % p < (p + 1n) / 2n;
      }
      default:
        // Modes 4 and 5: one clock low when the count expires.
        return d !== n;
    }
  }

  status(now: bigint): number {
    return (
      (this.output(now) ? PIT_STATUS.OUTPUT : 0) |
      (this.nullCount ? PIT_STATUS.NULL_COUNT : 0) |
      (this.access << PIT_CONTROL.ACCESS_SHIFT) |
      (this.rawMode << PIT_CONTROL.MODE_SHIFT) |
      (this.bcd ? PIT_CONTROL.BCD : 0)
    );
  }

  startRun(now: bigint): void {
    this.runInitial = this.initial;
    this.base = 0n;
    this.runStart = now;
    this.nullCount = false;
  }

  pause(now: bigint): void {
    if (this.runStart === null) return;
    this.base = this.elapsed(now);
    this.runStart = null;
  }

  resume(now: bigint): void {
    if (this.runStart === null) this.runStart = now;
  }
}

/** One shot or periodic plan for channel 0's next IRQ. */
interface IrqPlan {
  /** ns origin of the edge series. */
  start: bigint;
  /** Edge k is at start + ceil(k * num / den) ns. */
  num: bigint;
  den: bigint;
  /** Edges already accounted for (delivered or lost). */
  delivered: bigint;
  /** Index of the last edge, or null for a periodic series. */
  last: bigint | null;
}

export interface Pit8254Options {
  /** IRQ 0: one `trigger()` per rising edge of channel 0's output. */
  irq: IrqLine;
  /** Nanosecond clock; default `process.hrtime.bigint`. */
  clock?: NanoClock;
  /** Timers for IRQ 0; default the real ones, unref()'d. */
  scheduler?: Scheduler;
  logger?: Logger;
}

/** Counters; read them, do not write them. */
export interface PitStats {
  /** IRQ 0 triggers delivered. */
  ticks: number;
  /** Channel 0 edges that passed while the host timer was late, coalesced away. */
  ticksLost: number;
  /** Times a channel 0 period under 100 us was stretched to 100 us. */
  periodsClamped: number;
  /** Accesses wider than one byte or beyond the register window. */
  oddAccesses: number;
}

/**
 * The 8254 PIT. Map it with length {@link PIT_REGISTER_COUNT}; call
 * {@link Pit8254.dispose} when the VM stops. Guest accesses never throw.
 */
export class Pit8254 implements BusDevice {
  readonly stats: PitStats = { ticks: 0, ticksLost: 0, periodsClamped: 0, oddAccesses: 0 };

  private readonly irq: IrqLine;
  private readonly clock: NanoClock;
  private readonly scheduler: Scheduler;
  private readonly log: Logger;
  // On a PC the gates of channels 0 and 1 are tied high; channel 2's comes
  // from port 0x61 bit 0, low at reset.
  private readonly channels = [new Channel(true), new Channel(true), new Channel(false)] as const;

  private plan: IrqPlan | null = null;
  private timer: unknown = null;
  /** Bumped whenever the plan changes, so a stale timer callback does nothing. */
  private generation = 0;
  private disposed = false;

  constructor(options: Pit8254Options) {
    this.irq = options.irq;
    this.clock = options.clock ?? monotonicClock;
    this.scheduler = options.scheduler ?? realScheduler;
    this.log = (options.logger ?? silentLogger).child({ device: 'pit8254' });
  }

  /** Level of a channel's OUT pin now (channel 2's is port 0x61 bit 5). */
  output(channel: number): boolean {
    const ch = this.channels[channel];
    return ch ? ch.output(this.clock()) : false;
  }

  /**
   * Drives a channel's GATE input: port 0x61 bit 0 for channel 2. Modes 0
   * and 4 pause while it is low; modes 1 and 5 start on its rising edge;
   * modes 2 and 3 stop (OUT high) while low and restart on the rising edge.
   */
  setGate(channel: number, high: boolean): void {
    const ch = this.channels[channel];
    if (!ch || ch.gate === high) return;
    ch.gate = high;
    const now = this.clock();
    switch (ch.mode) {
      case 0:
      case 4:
        if (!ch.started) break;
        if (high) ch.resume(now);
        else ch.pause(now);
        break;
      case 1:
      case 5:
        if (high && ch.armed) {
          ch.triggered = true;
          ch.startRun(now);
        }
        break;
      default:
        if (!ch.armed) break;
        if (high) ch.startRun(now);
        else ch.pause(now);
        break;
    }
    if (channel === 0) this.replanIrq(now);
  }

  /** Cancels the IRQ timer; the device answers reads afterwards but raises no more ticks. */
  dispose(): void {
    this.disposed = true;
    this.plan = null;
    this.cancelTimer();
  }

  read(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (!Number.isInteger(offset) || offset < 0 || offset >= PIT_REGISTER_COUNT) {
      this.oddAccess('read', offset, data.length);
      data.fill(0xff);
      return;
    }
    if (data.length !== 1) {
      this.oddAccess('read', offset, data.length);
      data.fill(0);
    }
    // The control register is write only; reading it floats.
    data[0] = offset === PIT_MODE_COMMAND ? 0xff : this.readCounter(this.channels[offset as 0 | 1 | 2]);
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (!Number.isInteger(offset) || offset < 0 || offset >= PIT_REGISTER_COUNT) {
      this.oddAccess('write', offset, data.length);
      return;
    }
    if (data.length !== 1) this.oddAccess('write', offset, data.length);
    const value = data[0]!;
    if (offset === PIT_MODE_COMMAND) this.writeControl(value);
    else this.writeCounter(offset, value);
  }

  private oddAccess(kind: 'read' | 'write', offset: number, size: number): void {
    this.stats.oddAccesses++;
    this.log.debug({ kind, offset, size }, 'access wider than a byte or outside the registers: first byte only');
  }

  private readCounter(ch: Channel): number {
    if (ch.latchedStatus !== null) {
      const s = ch.latchedStatus;
      ch.latchedStatus = null;
      return s;
    }
    const latched = ch.latchedCount !== null;
    const value = latched ? ch.latchedCount! : ch.count(this.clock());
    let byte: number;
    let done = true;
    switch (ch.access) {
      case PIT_CONTROL.ACCESS_LOW:
        byte = value & 0xff;
        break;
      case PIT_CONTROL.ACCESS_HIGH:
        byte = value >> 8;
        break;
      default:
        byte = ch.readHigh ? value >> 8 : value & 0xff;
        done = ch.readHigh;
        ch.readHigh = !ch.readHigh;
        break;
    }
    // A latched count is released once all of its bytes have been read.
    if (latched && done) ch.latchedCount = null;
    return byte;
  }

  private writeCounter(index: number, value: number): void {
    const ch = this.channels[index as 0 | 1 | 2];
    const now = this.clock();
    let count: number;
    switch (ch.access) {
      case PIT_CONTROL.ACCESS_LOW:
        count = value;
        break;
      case PIT_CONTROL.ACCESS_HIGH:
        count = value << 8;
        break;
      default:
        if (ch.writeLow === null) {
          ch.writeLow = value;
          // Mode 0: writing the first byte stops the count and drops OUT.
          if (ch.mode === 0 && ch.armed) {
            ch.held = ch.count(now);
            ch.armed = false;
            ch.runStart = null;
            if (index === 0) this.replanIrq(now);
          }
          return;
        }
        count = ch.writeLow | (value << 8);
        ch.writeLow = null;
        break;
    }
    this.loadCount(index, ch, count, now);
  }

  private loadCount(index: number, ch: Channel, count: number, now: bigint): void {
    ch.initial = count === 0 ? 0x10000 : count;
    ch.armed = true;
    ch.nullCount = true;
    switch (ch.mode) {
      case 1:
      case 5:
        // Armed; counting waits for a gate rising edge. Channel 0's gate is
        // tied high, so on a PC these modes never fire IRQ 0.
        break;
      default:
        ch.startRun(now);
        // A low gate holds the counter: paused in 0/4, not yet started in 2/3.
        if (!ch.gate) ch.runStart = null;
        break;
    }
    if (index === 0) this.replanIrq(now);
  }

  private writeControl(value: number): void {
    const select = value >> PIT_CONTROL.SELECT_SHIFT;
    if (select === PIT_CONTROL.SELECT_READ_BACK) {
      this.readBack(value);
      return;
    }
    const ch = this.channels[select as 0 | 1 | 2];
    const access = (value & PIT_CONTROL.ACCESS_MASK) >> PIT_CONTROL.ACCESS_SHIFT;
    const now = this.clock();
    if (access === PIT_CONTROL.ACCESS_LATCH) {
      // A second latch before the first is read is ignored (datasheet, "Counter Latch Command").
      if (ch.latchedCount === null) ch.latchedCount = ch.count(now);
      return;
    }
    const rawMode = (value & PIT_CONTROL.MODE_MASK) >> PIT_CONTROL.MODE_SHIFT;
    if (value & PIT_CONTROL.BCD) this.log.debug({ channel: select }, 'BCD counting requested; counting in binary');
    ch.held = ch.count(now);
    ch.rawMode = rawMode;
    // Modes 6 and 7 are "don't care" aliases of 2 and 3.
    ch.mode = rawMode > 5 ? rawMode - 4 : rawMode;
    ch.access = access;
    ch.bcd = (value & PIT_CONTROL.BCD) !== 0;
    ch.armed = false;
    ch.triggered = false;
    ch.base = 0n;
    ch.runStart = null;
    ch.writeLow = null;
    ch.readHigh = false;
    ch.latchedCount = null;
    ch.latchedStatus = null;
    ch.nullCount = true;
    if (select === 0) this.replanIrq(now);
  }

  private readBack(value: number): void {
    const now = this.clock();
    const selected = [PIT_READ_BACK.CHANNEL0, PIT_READ_BACK.CHANNEL1, PIT_READ_BACK.CHANNEL2];
    selected.forEach((bit, i) => {
      if (!(value & bit)) return;
      const ch = this.channels[i as 0 | 1 | 2];
      // Like the latch command, a latch already waiting to be read is kept.
      if (!(value & PIT_READ_BACK.NO_COUNT) && ch.latchedCount === null) ch.latchedCount = ch.count(now);
      if (!(value & PIT_READ_BACK.NO_STATUS) && ch.latchedStatus === null) ch.latchedStatus = ch.status(now);
    });
  }

  // ---- IRQ 0 ----

  /** Works out channel 0's next rising edges after any change to it, and arms the timer. */
  private replanIrq(now: bigint): void {
    this.generation++;
    this.cancelTimer();
    this.plan = null;
    if (this.disposed) return;
    const ch = this.channels[0];
    if (!ch.started || ch.runStart === null) return;
    const n = BigInt(ch.runInitial);
    switch (ch.mode) {
      case 2:
      case 3: {
        // Rising edge at the end of every period.
        let num = BigInt(ch.period) * NS_PER_S;
        let den = FREQ;
        if (num < PIT_MIN_IRQ_PERIOD_NS * den) {
          this.stats.periodsClamped++;
          this.log.debug({ count: ch.period }, 'IRQ 0 period under 100 us, stretched to 100 us');
          num = PIT_MIN_IRQ_PERIOD_NS;
          den = 1n;
        }
        this.plan = { start: ch.runStart, num, den, delivered: 0n, last: null };
        break;
      }
      default: {
        // One rising edge: end of count in modes 0/1, end of the strobe in 4/5.
        const edge = ch.mode === 0 || ch.mode === 1 ? n : n + 1n;
        const d = ch.elapsed(now);
        if (d >= edge) return;
        // The run counts `base` clocks already, the rest from runStart.
        this.plan = { start: ch.runStart, num: ticksToNs(edge - ch.base), den: 1n, delivered: 0n, last: 1n };
        break;
      }
    }
    this.armTimer(now);
  }

  private edgeTime(plan: IrqPlan, k: bigint): bigint {
    return plan.start + ceilDiv(k * plan.num, plan.den);
  }

  private armTimer(now: bigint): void {
    const plan = this.plan;
    if (!plan) return;
    const when = this.edgeTime(plan, plan.delivered + 1n);
    const ms = when > now ? Math.ceil(Number(when - now) / 1e6) : 0;
    const generation = this.generation;
    this.timer = this.scheduler.setTimeout(() => this.onTimer(generation), ms);
  }

  private onTimer(generation: number): void {
    this.timer = null;
    const plan = this.plan;
    if (!plan || generation !== this.generation || this.disposed) return;
    const now = this.clock();
    let due = now < plan.start ? 0n : ((now - plan.start) * plan.den) / plan.num;
    if (plan.last !== null && due > plan.last) due = plan.last;
    if (due > plan.delivered) {
      // However late the host timer is, the guest gets one tick: a burst of
      // catch-up ticks would only make a slow guest slower.
      this.stats.ticks++;
      this.stats.ticksLost += Number(due - plan.delivered - 1n);
      plan.delivered = due;
      this.irq.trigger();
    }
    if (plan.last !== null && plan.delivered >= plan.last) {
      this.plan = null;
      return;
    }
    this.armTimer(now);
  }

  private cancelTimer(): void {
    if (this.timer !== null) {
      this.scheduler.clearTimeout(this.timer);
      this.timer = null;
    }
  }
}

/** Port 0x61 bits (IBM PC/AT Technical Reference, "System Control Port B"). */
export const PORTB = {
  /** Gate of PIT channel 2 (read/write). */
  TIMER2_GATE: 0x01,
  /** Speaker data enable (read/write). */
  SPEAKER_DATA: 0x02,
  /** Parity check disable (read/write, stored only). */
  PARITY_CHECK_DISABLE: 0x04,
  /** I/O channel check disable (read/write, stored only). */
  CHANNEL_CHECK_DISABLE: 0x08,
  /** Writable bits. */
  WRITABLE: 0x0f,
  /** Refresh request toggle (read only). */
  REFRESH_TOGGLE: 0x10,
  /** Output of PIT channel 2 (read only). */
  TIMER2_OUTPUT: 0x20,
} as const;

export interface PortBOptions {
  logger?: Logger;
}

/**
 * Port 0x61 ("port B"): map it with length 1. It drives the gate of `pit`'s
 * channel 2 and reads that channel's output. Bits 6-7 (I/O check and
 * parity/SERR NMI reasons) always read 0: this machine never raises those NMIs.
 */
export class PortB implements BusDevice {
  private readonly log: Logger;
  private control = 0;
  private refresh = false;

  constructor(
    private readonly pit: Pit8254,
    options: PortBOptions = {},
  ) {
    this.log = (options.logger ?? silentLogger).child({ device: 'portb' });
  }

  read(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (offset !== 0 || data.length !== 1) {
      this.log.debug({ offset, size: data.length }, 'odd access: first byte only');
      data.fill(0);
      if (offset !== 0) return;
    }
    // Real hardware toggles this every 15 us; flipping on each read keeps any
    // guest loop that waits for a toggle short, whatever the timing.
    this.refresh = !this.refresh;
    data[0] = this.control | (this.refresh ? PORTB.REFRESH_TOGGLE : 0) | (this.pit.output(PIT_CHANNEL2) ? PORTB.TIMER2_OUTPUT : 0);
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (offset !== 0 || data.length !== 1) {
      this.log.debug({ offset, size: data.length }, 'odd access: first byte only');
      if (offset !== 0) return;
    }
    this.control = data[0]! & PORTB.WRITABLE;
    this.pit.setGate(PIT_CHANNEL2, (this.control & PORTB.TIMER2_GATE) !== 0);
  }
}
