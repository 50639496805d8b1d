import { describe, expect, it } from 'vitest';
import { PVPANIC_EVENT, PVPANIC_SUPPORTED_EVENTS, PvPanic } from '../../src/devices/pvpanic.js';
import { Bus } from '../../src/base/bus.js';
import { PVPANIC_PORT } from '../../src/arch/layout.js';

function setup(withCrashLoaded = true) {
  const seen: string[] = [];
  const dev = new PvPanic({
    onPanic: () => seen.push('panic'),
    onProbe: () => seen.push('probe'),
    ...(withCrashLoaded ? { onCrashLoaded: () => seen.push('crash-loaded') } : {}),
  });
  const rd = (offset = 0): number => {
    const d = new Uint8Array(1);
    dev.read(offset, d);
    return d[0]!;
  };
  const wr = (value: number, offset = 0): void => dev.write(offset, Uint8Array.of(value));
  return { dev, rd, wr, seen };
}

describe('PvPanic', () => {
  it('reads the supported events: PANICKED and CRASH_LOADED', () => {
    const io = setup();
    expect(PVPANIC_EVENT.PANICKED).toBe(1);
    expect(PVPANIC_EVENT.CRASH_LOADED).toBe(2);
    expect(io.rd()).toBe(PVPANIC_SUPPORTED_EVENTS);
    expect(io.rd()).toBe(0x03);
  });

  it('tells the VMM once, on the first read, that a driver bound to it', () => {
    const io = setup();
    io.rd();
    io.rd();
    expect(io.seen).toEqual(['probe']);
    expect(io.dev.stats.probes).toBe(2);
  });

  it('calls onPanic for bit 0 and onCrashLoaded for bit 1', () => {
    const io = setup();
    io.wr(PVPANIC_EVENT.PANICKED);
    expect(io.seen).toEqual(['panic']);
    io.wr(PVPANIC_EVENT.CRASH_LOADED);
    expect(io.seen).toEqual(['panic', 'crash-loaded']);
    io.wr(PVPANIC_EVENT.PANICKED | PVPANIC_EVENT.CRASH_LOADED);
    expect(io.seen).toEqual(['panic', 'crash-loaded', 'panic', 'crash-loaded']);
    expect(io.dev.stats).toMatchObject({ panics: 2, crashLoaded: 2, unknownEvents: 0 });
  });

  it('ignores unknown bits and writes of 0, and works without onCrashLoaded', () => {
    const io = setup(false);
    io.wr(0);
    io.wr(0x80);
    expect(io.seen).toEqual([]);
    expect(io.dev.stats.unknownEvents).toBe(1);
    io.wr(0x84 | PVPANIC_EVENT.CRASH_LOADED);
    expect(io.seen).toEqual([]);
    expect(io.dev.stats.crashLoaded).toBe(1);
    io.wr(0x80 | PVPANIC_EVENT.PANICKED);
    expect(io.seen).toEqual(['panic']);
  });

  it('answers only at offset 0 and does not act on writes elsewhere', () => {
    const io = setup();
    expect(io.rd(1)).toBe(0);
    io.wr(PVPANIC_EVENT.PANICKED, 1);
    expect(io.seen).toEqual([]);
    expect(io.dev.stats.oddAccesses).toBe(2);
  });

  it('sits on the bus at the pvpanic port', () => {
    const io = setup();
    const bus = new Bus('pio');
    bus.insert(io.dev, PVPANIC_PORT, 1, 'pvpanic');
    const d = new Uint8Array(1);
    bus.read(0x505, d);
    expect(d[0]).toBe(PVPANIC_SUPPORTED_EVENTS);
    bus.write(0x505, Uint8Array.of(PVPANIC_EVENT.PANICKED));
    expect(io.seen).toEqual(['probe', 'panic']);
  });

  it('never throws, whatever the offset and size', () => {
    const io = setup();
    let seed = 11;
    const rand = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
    for (let i = 0; i < 5000; i++) {
      const data = Uint8Array.from({ length: [0, 1, 2, 4][rand() % 4]! }, () => rand() & 0xff);
      if (rand() & 1) io.dev.read((rand() % 4) - 1, data);
      else io.dev.write((rand() % 4) - 1, data);
    }
  });
});
