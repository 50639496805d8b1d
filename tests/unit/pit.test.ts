import { describe, expect, it } from 'vitest';
import { FakeIrqLine } from '../../src/testing/index.js';
import { PIT_CHANNEL0, PIT_CHANNEL1, PIT_CHANNEL2, PIT_FREQUENCY_HZ, PIT_MODE_COMMAND, PIT_STATUS, Pit8254, PORTB, PortB } from '../../src/devices/pit.js';
import { realScheduler } from '../../src/base/clock.js';
import { FakeClock, FakeScheduler } from '../../src/testing/index.js';

const F = BigInt(PIT_FREQUENCY_HZ);

/** Nanoseconds after which exactly `ticks` PIT clocks have elapsed. */
function ns(ticks: number): bigint {
  const t = BigInt(ticks);
  return (t * 1_000_000_000n + F - 1n) / F;
}

function setup() {
  const clock = new FakeClock(5_000_000_000n);
  const scheduler = new FakeScheduler(clock);
  const irq = new FakeIrqLine();
  const pit = new Pit8254({ irq, clock: clock.now, scheduler });
  const portB = new PortB(pit);
  const rd = (offset: number): number => {
    const d = new Uint8Array(1);
    pit.read(offset, d);
    return d[0]!;
  };
  const wr = (offset: number, value: number): void => pit.write(offset, Uint8Array.of(value));
  const rd61 = (): number => {
    const d = new Uint8Array(1);
    portB.read(0, d);
    return d[0]!;
  };
  const wr61 = (value: number): void => portB.write(0, Uint8Array.of(value));
  /** Programs a channel with a low-then-high count. */
  const program = (channel: number, mode: number, count: number): void => {
    wr(PIT_MODE_COMMAND, (channel << 6) | 0x30 | (mode << 1));
    wr(channel, count & 0xff);
    wr(channel, (count >> 8) & 0xff);
  };
  /** Latches and reads a channel's count (low-then-high access). */
  const latched = (channel: number): number => {
    wr(PIT_MODE_COMMAND, channel << 6);
    const lo = rd(channel);
    return lo | (rd(channel) << 8);
  };
  /** Read-back status byte of one channel. */
  const status = (channel: number): number => {
    wr(PIT_MODE_COMMAND, 0xc0 | 0x20 | (2 << channel));
    return rd(channel);
  };
  const out = (channel: number): boolean => (status(channel) & PIT_STATUS.OUTPUT) !== 0;
  /** Sets the clock to `ticks` PIT clocks after `origin`. */
  const at = (origin: bigint, ticks: number): void => {
    clock.nowNs = origin + ns(ticks);
  };
  return { clock, scheduler, irq, pit, portB, rd, wr, rd61, wr61, program, latched, status, out, at };
}

describe('Pit8254: counting', () => {
  it('mode 2 counts N..1 and reloads, OUT low for the last clock', () => {
    const { clock, program, latched, out, at } = setup();
    const t0 = clock.nowNs;
    program(PIT_CHANNEL0, 2, 1000);
    expect(latched(0)).toBe(1000);
    at(t0, 250);
    expect(latched(0)).toBe(750);
    expect(out(0)).toBe(true);
    at(t0, 999);
    expect(latched(0)).toBe(1);
    expect(out(0)).toBe(false);
    at(t0, 1000);
    expect(latched(0)).toBe(1000);
    expect(out(0)).toBe(true);
    at(t0, 2500);
    expect(latched(0)).toBe(500);
  });

  it('mode 3 counts down by two, OUT high for the first half and low for the second', () => {
    const { clock, program, latched, out, at } = setup();
    const t0 = clock.nowNs;
    program(PIT_CHANNEL1, 3, 100);
    expect(out(1)).toBe(true);
    at(t0, 10);
    expect(latched(1)).toBe(80);
    expect(out(1)).toBe(true);
    at(t0, 49);
    expect(out(1)).toBe(true);
    at(t0, 50);
    expect(out(1)).toBe(false);
    expect(latched(1)).toBe(100);
    at(t0, 60);
    expect(latched(1)).toBe(80);
    at(t0, 100);
    expect(out(1)).toBe(true);
  });

  it('mode 0 keeps OUT low until the count expires, then high; the counter wraps on', () => {
    const { clock, program, latched, out, at } = setup();
    const t0 = clock.nowNs;
    program(PIT_CHANNEL0, 0, 500);
    expect(out(0)).toBe(false);
    at(t0, 499);
    expect(latched(0)).toBe(1);
    expect(out(0)).toBe(false);
    at(t0, 500);
    expect(latched(0)).toBe(0);
    expect(out(0)).toBe(true);
    at(t0, 510);
    expect(latched(0)).toBe(0xffff - 9);
    expect(out(0)).toBe(true);
  });

  it('treats a count of 0 as 65536', () => {
    const { clock, program, latched, at } = setup();
    const t0 = clock.nowNs;
    program(PIT_CHANNEL0, 2, 0);
    expect(latched(0)).toBe(0);
    at(t0, 1);
    expect(latched(0)).toBe(0xffff);
    at(t0, 65535);
    expect(latched(0)).toBe(1);
    at(t0, 65536 + 6);
    expect(latched(0)).toBe(0xffff - 5);
  });

  it('aliases modes 6 and 7 to 2 and 3, and reports the written mode bits in the status', () => {
    const { clock, wr, latched, status, at } = setup();
    const t0 = clock.nowNs;
    wr(PIT_MODE_COMMAND, 0x3c); // channel 0, lo/hi, mode 6
    wr(0, 100);
    wr(0, 0);
    at(t0, 130);
    expect(latched(0)).toBe(70); // rate generator
    expect((status(0) >> 1) & 7).toBe(6);
  });

  it('counts in binary when BCD is requested', () => {
    const { clock, wr, latched, at } = setup();
    const t0 = clock.nowNs;
    wr(PIT_MODE_COMMAND, 0x35); // mode 2, BCD
    wr(0, 0x00);
    wr(0, 0x10); // 0x1000 taken as binary 4096
    at(t0, 96);
    expect(latched(0)).toBe(4000);
  });
});

describe('Pit8254: latch, read-back and the byte flip-flops', () => {
  it('holds a latched count until it is read, then reads live again', () => {
    const { clock, wr, rd, program, at } = setup();
    const t0 = clock.nowNs;
    program(PIT_CHANNEL0, 2, 10000);
    at(t0, 1000);
    wr(PIT_MODE_COMMAND, 0x00); // latch channel 0
    at(t0, 3000);
    wr(PIT_MODE_COMMAND, 0x00); // a second latch before reading is ignored
    expect(rd(0) | (rd(0) << 8)).toBe(9000);
    expect(rd(0) | (rd(0) << 8)).toBe(7000);
  });

  it('alternates low and high bytes on live reads, and a control word resets the flip-flop', () => {
    const { clock, wr, rd, program, at } = setup();
    const t0 = clock.nowNs;
    program(PIT_CHANNEL2, 2, 0x1234);
    // Channel 2's gate is low until port 0x61 raises it: the count holds.
    at(t0, 100);
    expect(rd(2)).toBe(0x34);
    expect(rd(2)).toBe(0x12);
    expect(rd(2)).toBe(0x34);
    wr(PIT_MODE_COMMAND, 0xb4); // channel 2, lo/hi, mode 2 again
    wr(2, 0x78);
    wr(2, 0x56);
    expect(rd(2)).toBe(0x78);
    expect(rd(2)).toBe(0x56);
  });

  it('reads and writes one byte in low-only and high-only access modes', () => {
    const { clock, wr, rd, at } = setup();
    const t0 = clock.nowNs;
    wr(PIT_MODE_COMMAND, 0x14); // channel 0, low byte only, mode 2
    wr(0, 200);
    expect(rd(0)).toBe(200);
    at(t0, 50);
    expect(rd(0)).toBe(150);
    expect(rd(0)).toBe(150);
    wr(PIT_MODE_COMMAND, 0x64); // channel 1, high byte only, mode 2
    const t1 = clock.nowNs;
    wr(1, 0x02); // count 0x0200
    expect(rd(1)).toBe(0x02);
    at(t1, 0x101);
    expect(rd(1)).toBe(0x00);
  });

  it('needs both bytes of a low-then-high write before the count starts', () => {
    const { clock, wr, latched, at } = setup();
    const t0 = clock.nowNs;
    wr(PIT_MODE_COMMAND, 0x34);
    wr(0, 0x00);
    at(t0, 100);
    wr(0, 0x01); // count 256 starts now
    const t1 = clock.nowNs;
    at(t1, 56);
    expect(latched(0)).toBe(200);
  });

  it('returns status then count after a read-back of both', () => {
    const { clock, wr, rd, program, at } = setup();
    const t0 = clock.nowNs;
    program(PIT_CHANNEL0, 2, 1000);
    at(t0, 10);
    wr(PIT_MODE_COMMAND, 0xc2); // read-back: count and status of channel 0
    at(t0, 500);
    // OUT high, count loaded, lo/hi access, mode 2, binary.
    expect(rd(0)).toBe(PIT_STATUS.OUTPUT | 0x30 | (2 << 1));
    expect(rd(0) | (rd(0) << 8)).toBe(990);
    expect(rd(0) | (rd(0) << 8)).toBe(500);
  });

  it('reports null count between a control word and the count', () => {
    const { wr, status } = setup();
    wr(PIT_MODE_COMMAND, 0x30); // channel 0, mode 0
    expect(status(0) & PIT_STATUS.NULL_COUNT).toBeTruthy();
    expect(status(0) & PIT_STATUS.OUTPUT).toBe(0); // mode 0 starts low
    wr(0, 10);
    wr(0, 0);
    expect(status(0) & PIT_STATUS.NULL_COUNT).toBe(0);
  });

  it('latches several channels with one read-back command', () => {
    const { clock, wr, rd, program, wr61, at } = setup();
    wr61(PORTB.TIMER2_GATE);
    const t0 = clock.nowNs;
    program(PIT_CHANNEL0, 2, 1000);
    program(PIT_CHANNEL2, 2, 2000);
    at(t0, 100);
    wr(PIT_MODE_COMMAND, 0xc0 | 0x10 | 0x08 | 0x02); // counts of channels 0 and 2, no status
    at(t0, 400);
    expect(rd(0) | (rd(0) << 8)).toBe(900);
    expect(rd(2) | (rd(2) << 8)).toBe(1900);
  });
});

describe('PortB (port 0x61)', () => {
  it('gates channel 2 and shows its OUT in bit 5, as Linux TSC calibration uses them', () => {
    const { clock, wr, rd, rd61, wr61, at } = setup();
    // pit_calibrate_tsc(): gate high, speaker off; channel 2 mode 0; count.
    wr61((rd61() & ~PORTB.SPEAKER_DATA) | PORTB.TIMER2_GATE);
    wr(PIT_MODE_COMMAND, 0xb0);
    wr(PIT_CHANNEL2, 0xff);
    wr(PIT_CHANNEL2, 0xff);
    const t0 = clock.nowNs;
    expect(rd61() & PORTB.TIMER2_OUTPUT).toBe(0);
    // quick_pit_calibrate() polls the live MSB.
    at(t0, 0x100 * 3 + 5);
    rd(PIT_CHANNEL2);
    expect(rd(PIT_CHANNEL2)).toBe(0xff - 3);
    at(t0, 0xfffe);
    expect(rd61() & PORTB.TIMER2_OUTPUT).toBe(0);
    at(t0, 0xffff);
    expect(rd61() & PORTB.TIMER2_OUTPUT).toBe(PORTB.TIMER2_OUTPUT);
  });

  it('pauses a mode 0 count while the gate is low', () => {
    const { clock, program, latched, wr61, at } = setup();
    wr61(PORTB.TIMER2_GATE);
    const t0 = clock.nowNs;
    program(PIT_CHANNEL2, 0, 1000);
    at(t0, 100);
    wr61(0);
    const tPause = clock.nowNs;
    at(tPause, 5000);
    expect(latched(2)).toBe(900);
    wr61(PORTB.TIMER2_GATE);
    const tResume = clock.nowNs;
    at(tResume, 50);
    expect(latched(2)).toBe(850);
  });

  it('does not start channel 2 while its gate is low, and mode 2 reloads on the rising edge', () => {
    const { clock, program, latched, out, wr61, at } = setup();
    program(PIT_CHANNEL2, 2, 300);
    at(clock.nowNs, 1000);
    expect(latched(2)).toBe(300);
    expect(out(2)).toBe(true);
    wr61(PORTB.TIMER2_GATE);
    let t = clock.nowNs;
    at(t, 100);
    expect(latched(2)).toBe(200);
    wr61(0);
    expect(out(2)).toBe(true); // gate low forces OUT high in mode 2
    wr61(PORTB.TIMER2_GATE);
    t = clock.nowNs;
    at(t, 10);
    expect(latched(2)).toBe(290);
  });

  it('starts a mode 1 one-shot on the gate rising edge only', () => {
    const { clock, program, out, wr61, at } = setup();
    program(PIT_CHANNEL2, 1, 100);
    expect(out(2)).toBe(true);
    at(clock.nowNs, 1000);
    expect(out(2)).toBe(true);
    wr61(PORTB.TIMER2_GATE);
    const t = clock.nowNs;
    at(t, 50);
    expect(out(2)).toBe(false);
    at(t, 100);
    expect(out(2)).toBe(true);
  });

  it('keeps the writable bits, and flips the refresh bit on every read', () => {
    const { rd61, wr61 } = setup();
    wr61(0xff);
    const a = rd61();
    const b = rd61();
    expect(a & 0x0f).toBe(0x0f);
    expect((a ^ b) & PORTB.REFRESH_TOGGLE).toBe(PORTB.REFRESH_TOGGLE);
    expect(a & 0xc0).toBe(0); // no NMI reasons
  });
});

describe('Pit8254: IRQ 0', () => {
  const PERIOD = 11932; // HZ=100
  // Timers, fake or real, fire on whole milliseconds: up to 1 ms after the edge.
  const SLACK = 1_000_000n;

  it('triggers once per period in mode 2 when the host is punctual', () => {
    const { scheduler, irq, pit, program } = setup();
    program(PIT_CHANNEL0, 2, PERIOD);
    scheduler.advance(ns(PERIOD * 10) + SLACK);
    expect(irq.edges).toBe(10);
    expect(irq.history.every((h) => h === 'trigger')).toBe(true);
    expect(pit.stats.ticks).toBe(10);
    expect(pit.stats.ticksLost).toBe(0);
    expect(scheduler.pending).toBe(1);
  });

  it('triggers periodically in mode 3 too', () => {
    const { scheduler, irq, program } = setup();
    program(PIT_CHANNEL0, 3, PERIOD);
    scheduler.advance(ns(PERIOD * 4) + SLACK);
    expect(irq.edges).toBe(4);
  });

  it('coalesces the ticks a late host timer missed into one, counting the rest as lost', () => {
    const { clock, scheduler, irq, pit, program } = setup();
    const t0 = clock.nowNs;
    program(PIT_CHANNEL0, 2, PERIOD);
    clock.nowNs = t0 + ns(PERIOD * 5) + 1000n; // the host slept through five edges
    scheduler.runDue();
    expect(irq.edges).toBe(1);
    expect(pit.stats.ticks).toBe(1);
    expect(pit.stats.ticksLost).toBe(4);
    // Back on schedule: the next edge, and the phase is kept.
    scheduler.advance(ns(PERIOD) - 1000n + SLACK);
    expect(irq.edges).toBe(2);
    expect(pit.stats.ticksLost).toBe(4);
  });

  it('stretches periods under 100 us to 100 us', () => {
    const { scheduler, irq, pit, program } = setup();
    program(PIT_CHANNEL0, 2, 10); // 8.4 us
    expect(pit.stats.periodsClamped).toBe(1);
    scheduler.advance(10_000_000n); // 10 ms: 100 edges of 100 us
    // Fake timers, like Node's, have 1 ms granularity: 10 deliveries.
    expect(irq.edges).toBe(10);
    expect(pit.stats.ticks + pit.stats.ticksLost).toBe(100);
  });

  it('triggers once in mode 0, then stays quiet', () => {
    const { scheduler, irq, program } = setup();
    program(PIT_CHANNEL0, 0, 1193);
    scheduler.advance(ns(1192));
    expect(irq.edges).toBe(0);
    scheduler.advance(100_000_000n);
    expect(irq.edges).toBe(1);
    expect(scheduler.pending).toBe(0);
  });

  it('triggers once in mode 4', () => {
    const { scheduler, irq, program } = setup();
    program(PIT_CHANNEL0, 4, 1193);
    scheduler.advance(100_000_000n);
    expect(irq.edges).toBe(1);
  });

  it('never triggers in mode 1 on channel 0: its gate is tied high, there is no trigger edge', () => {
    const { scheduler, irq, program } = setup();
    program(PIT_CHANNEL0, 1, 1193);
    scheduler.advance(100_000_000n);
    expect(irq.edges).toBe(0);
    expect(scheduler.pending).toBe(0);
  });

  it('replaces the schedule when reprogrammed, and stops on a control word', () => {
    const { scheduler, irq, wr, program } = setup();
    program(PIT_CHANNEL0, 2, PERIOD);
    program(PIT_CHANNEL0, 2, PERIOD * 2);
    expect(scheduler.pending).toBe(1);
    scheduler.advance(ns(PERIOD * 4) + SLACK);
    expect(irq.edges).toBe(2);
    wr(PIT_MODE_COMMAND, 0x34); // waiting for a count: no ticks
    scheduler.advance(ns(PERIOD * 10));
    expect(irq.edges).toBe(2);
    expect(scheduler.pending).toBe(0);
  });

  it('stops ticking after dispose()', () => {
    const { scheduler, irq, pit, program } = setup();
    program(PIT_CHANNEL0, 2, PERIOD);
    scheduler.advance(ns(PERIOD) + SLACK);
    pit.dispose();
    expect(scheduler.pending).toBe(0);
    program(PIT_CHANNEL0, 2, PERIOD);
    scheduler.advance(ns(PERIOD * 10));
    expect(irq.edges).toBe(1);
  });

  it('does not raise IRQ 0 for channels 1 and 2', () => {
    const { scheduler, irq, program, wr61 } = setup();
    wr61(PORTB.TIMER2_GATE);
    program(PIT_CHANNEL1, 2, 100);
    program(PIT_CHANNEL2, 3, 100);
    scheduler.advance(10_000_000n);
    expect(irq.edges).toBe(0);
  });

  it('uses real timers that do not keep Node alive', () => {
    const handle = realScheduler.setTimeout(() => {}, 60_000) as ReturnType<typeof setTimeout>;
    expect(handle.hasRef()).toBe(false);
    realScheduler.clearTimeout(handle);
  });
});

describe('Pit8254: robustness', () => {
  it('never throws on any access, and wide accesses use the first byte', () => {
    const { pit, portB, scheduler, clock } = setup();
    let seed = 99;
    const rand = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
    for (let i = 0; i < 20000; i++) {
      const offset = (rand() % 8) - 2;
      const size = [0, 1, 2, 4][rand() % 4]!;
      const data = Uint8Array.from({ length: size }, () => rand() & 0xff);
      const dev = rand() % 5 === 0 ? portB : pit;
      if (rand() & 1) dev.read(offset, data);
      else dev.write(offset, data);
      if (rand() % 50 === 0) scheduler.advance(BigInt(rand() % 2_000_000));
      if (rand() % 500 === 0) clock.advance(BigInt(rand() % 100_000_000));
    }
    scheduler.advance(1_000_000_000n);
    const d = new Uint8Array(2);
    pit.write(PIT_MODE_COMMAND, Uint8Array.of(0x10, 0xff)); // channel 0, low byte only, mode 0
    pit.write(0, Uint8Array.of(0x42, 0x99));
    pit.read(0, d);
    expect(d[0]).toBe(0x42);
    expect(d[1]).toBe(0);
  });
});
