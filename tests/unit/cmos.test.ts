import { describe, expect, it } from 'vitest';
import { Cmos, CMOS_DATA, CMOS_INDEX, RTC_A, RTC_B, RTC_REG } from '../../src/devices/cmos.js';

function setup(iso = '2024-02-29T23:59:58.250Z') {
  let now = Date.parse(iso);
  const cmos = new Cmos({ now: () => now });
  const read = (index: number): number => {
    cmos.write(CMOS_INDEX, Uint8Array.of(index));
    const d = new Uint8Array(1);
    cmos.read(CMOS_DATA, d);
    return d[0]!;
  };
  const write = (index: number, value: number): void => {
    cmos.write(CMOS_INDEX, Uint8Array.of(index));
    cmos.write(CMOS_DATA, Uint8Array.of(value));
  };
  const advance = (ms: number) => {
    now += ms;
  };
  /** The clock as Linux's mc146818_get_time() reads it. */
  const time = () => ({
    sec: read(RTC_REG.SECONDS),
    min: read(RTC_REG.MINUTES),
    hour: read(RTC_REG.HOURS),
    wday: read(RTC_REG.DAY_OF_WEEK),
    mday: read(RTC_REG.DAY_OF_MONTH),
    mon: read(RTC_REG.MONTH),
    year: read(RTC_REG.YEAR),
    century: read(RTC_REG.CENTURY),
  });
  return { cmos, read, write, advance, time };
}

describe('Cmos: clock', () => {
  it('reads the host wall clock (UTC) in BCD, 24-hour, by default', () => {
    const { time, read } = setup();
    expect(read(RTC_REG.B)).toBe(RTC_B.HOURS_24);
    // 2024-02-29 was a Thursday: day 5 counting Sunday as 1.
    expect(time()).toEqual({ sec: 0x58, min: 0x59, hour: 0x23, wday: 0x05, mday: 0x29, mon: 0x02, year: 0x24, century: 0x20 });
  });

  it('follows the host clock across a day, month boundary', () => {
    const { time, advance } = setup();
    advance(2000);
    expect(time()).toEqual({ sec: 0x00, min: 0x00, hour: 0x00, wday: 0x06, mday: 0x01, mon: 0x03, year: 0x24, century: 0x20 });
  });

  it('reads binary when register B bit 2 is set', () => {
    const { time, write } = setup();
    write(RTC_REG.B, RTC_B.HOURS_24 | RTC_B.BINARY);
    expect(time()).toEqual({ sec: 58, min: 59, hour: 23, wday: 5, mday: 29, mon: 2, year: 24, century: 20 });
  });

  it('reads 12-hour time with bit 7 as PM when register B bit 1 is clear', () => {
    const { read, write, advance } = setup();
    write(RTC_REG.B, 0);
    expect(read(RTC_REG.HOURS)).toBe(0x80 | 0x11); // 11 PM
    advance(2000);
    expect(read(RTC_REG.HOURS)).toBe(0x12); // midnight is 12 AM
    advance(12 * 3600 * 1000);
    expect(read(RTC_REG.HOURS)).toBe(0x80 | 0x12); // noon is 12 PM
  });

  it('never shows an update in progress, and register D reports valid time', () => {
    const { read, write } = setup();
    expect(read(RTC_REG.A) & RTC_A.UIP).toBe(0);
    write(RTC_REG.A, 0xa6);
    expect(read(RTC_REG.A)).toBe(0x26);
    expect(read(RTC_REG.D)).toBe(0x80);
    expect(read(RTC_REG.C)).toBe(0);
  });

  it('ignores the NMI-disable bit of the index', () => {
    const { cmos, read } = setup();
    cmos.write(CMOS_INDEX, Uint8Array.of(0x80 | RTC_REG.SECONDS));
    const d = new Uint8Array(1);
    cmos.read(CMOS_DATA, d);
    expect(d[0]).toBe(read(RTC_REG.SECONDS));
    expect(d[0]).toBe(0x58);
  });

  it('lets the guest set the time with the SET bit, as mc146818_set_time() does', () => {
    const { read, write, advance, time } = setup();
    write(RTC_REG.B, read(RTC_REG.B) | RTC_B.SET);
    write(RTC_REG.SECONDS, 0x05);
    write(RTC_REG.MINUTES, 0x04);
    write(RTC_REG.HOURS, 0x03);
    write(RTC_REG.DAY_OF_MONTH, 0x02);
    write(RTC_REG.MONTH, 0x01);
    write(RTC_REG.YEAR, 0x30);
    write(RTC_REG.CENTURY, 0x20);
    // Frozen while SET is on, showing what was written.
    advance(5000);
    expect(read(RTC_REG.SECONDS)).toBe(0x05);
    write(RTC_REG.B, read(RTC_REG.B) & ~RTC_B.SET);
    expect(time()).toEqual({ sec: 0x05, min: 0x04, hour: 0x03, wday: 0x04, mday: 0x02, mon: 0x01, year: 0x30, century: 0x20 });
    advance(61_000);
    expect(read(RTC_REG.SECONDS)).toBe(0x06);
    expect(read(RTC_REG.MINUTES)).toBe(0x05);
  });

  it('applies a single field write at once when SET is off', () => {
    const { read, write } = setup();
    write(RTC_REG.MINUTES, 0x10);
    expect(read(RTC_REG.MINUTES)).toBe(0x10);
    expect(read(RTC_REG.HOURS)).toBe(0x23);
    expect(read(RTC_REG.SECONDS)).toBe(0x58);
  });
});

describe('Cmos: RAM', () => {
  it('stores the other bytes, shutdown status included', () => {
    const { read, write } = setup();
    write(RTC_REG.SHUTDOWN_STATUS, 0x0a);
    write(0x40, 0x12);
    write(0x7f, 0xfe);
    expect(read(RTC_REG.SHUTDOWN_STATUS)).toBe(0x0a);
    expect(read(0x40)).toBe(0x12);
    expect(read(0x7f)).toBe(0xfe);
    // The alarm registers are plain storage.
    write(RTC_REG.SECONDS_ALARM, 0x33);
    expect(read(RTC_REG.SECONDS_ALARM)).toBe(0x33);
  });

  it('describes the memory size in the PC/QEMU fields', () => {
    const { cmos, read } = setup();
    cmos.setMemorySize(512 * 1024 * 1024, 1024 * 1024 * 1024);
    expect(read(RTC_REG.BASE_MEMORY_LOW) | (read(RTC_REG.BASE_MEMORY_HIGH) << 8)).toBe(640);
    expect(read(RTC_REG.EXTENDED_MEMORY_LOW) | (read(RTC_REG.EXTENDED_MEMORY_HIGH) << 8)).toBe(0xffff);
    expect(read(RTC_REG.MEMORY_ABOVE_16M_LOW) | (read(RTC_REG.MEMORY_ABOVE_16M_HIGH) << 8)).toBe((512 - 16) * 16);
    expect(read(RTC_REG.MEMORY_ABOVE_4G_LOW) | (read(RTC_REG.MEMORY_ABOVE_4G_MID) << 8) | (read(RTC_REG.MEMORY_ABOVE_4G_HIGH) << 16)).toBe(16384);
    let sum = 0;
    for (let i = 0x10; i <= 0x2d; i++) sum += read(i);
    expect((read(RTC_REG.CHECKSUM_HIGH) << 8) | read(RTC_REG.CHECKSUM_LOW)).toBe(sum);
  });

  it('reports small memories without underflow', () => {
    const { cmos, read } = setup();
    cmos.setMemorySize(8 * 1024 * 1024);
    expect(read(RTC_REG.EXTENDED_MEMORY_LOW) | (read(RTC_REG.EXTENDED_MEMORY_HIGH) << 8)).toBe(7 * 1024);
    expect(read(RTC_REG.MEMORY_ABOVE_16M_LOW) | (read(RTC_REG.MEMORY_ABOVE_16M_HIGH) << 8)).toBe(0);
  });

  it('never throws, whatever the guest does', () => {
    const { cmos } = setup();
    let seed = 11;
    const rand = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
    for (let i = 0; i < 20000; i++) {
      const offset = (rand() % 6) - 2;
      const data = Uint8Array.from({ length: [0, 1, 2, 4][rand() % 4]! }, () => rand() & 0xff);
      if (rand() & 1) cmos.read(offset, data);
      else cmos.write(offset, data);
    }
  });
});
