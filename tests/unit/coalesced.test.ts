/**
 * The coalesced I/O ring as KVM lays it out (a page of the vCPU mmap):
 * replayed in order to the right bus, wrapping, and never past what KVM
 * could have written.
 */
import { describe, expect, it } from 'vitest';
import { Bus } from '../../src/base/bus.js';
import { CoalescedRing } from '../../src/kvm/coalesced.js';
import { FastReadTable } from '../../src/kvm/fast-reads.js';

const PAGE = 4096;
const OFFSET = 2;

/** Appends one entry as KVM does: the slot, then `last`. */
function kvmAppend(run: ArrayBuffer, addr: number, data: number[], pio: boolean): void {
  const v = new DataView(run, OFFSET * PAGE, PAGE);
  const capacity = Math.floor((PAGE - 8) / 24);
  const last = v.getUint32(4, true);
  const at = 8 + last * 24;
  v.setBigUint64(at, BigInt(addr), true);
  v.setUint32(at + 8, data.length, true);
  v.setUint32(at + 12, pio ? 1 : 0, true);
  data.forEach((b, i) => {
    v.setUint8(at + 16 + i, b);
  });
  v.setUint32(4, (last + 1) % capacity, true);
}

function buses() {
  const seen: string[] = [];
  const pio = new Bus('pio');
  const mmio = new Bus('mmio');
  pio.insert({ read: () => {}, write: (o, d) => seen.push(`pio ${o} ${[...d].join(',')}`) }, 0x3f8, 8, 'com1');
  mmio.insert({ read: () => {}, write: (o, d) => seen.push(`mmio ${o} ${[...d].join(',')}`) }, 0xd000_0000, 0x1000, 'dev');
  return { pio, mmio, seen };
}

describe('the coalesced I/O ring', () => {
  it('replays port and MMIO writes in order, each to its bus, and frees the slots', () => {
    const run = new ArrayBuffer(3 * PAGE);
    const ring = new CoalescedRing(run, OFFSET, PAGE);
    const { pio, mmio, seen } = buses();
    kvmAppend(run, 0x3f8, [0x68], true);
    kvmAppend(run, 0xd000_0010, [1, 2, 3, 4], false);
    kvmAppend(run, 0x3f8, [0x69], true);
    expect(ring.pending).toBe(true);
    expect(ring.drain(pio, mmio)).toBe(3);
    expect(seen).toEqual(['pio 0 104', 'mmio 16 1,2,3,4', 'pio 0 105']);
    expect(ring.pending).toBe(false);
    expect(ring.drain(pio, mmio)).toBe(0);
    expect(ring.replayed).toBe(3);
  });

  it('wraps around the end of the ring', () => {
    const run = new ArrayBuffer(3 * PAGE);
    const ring = new CoalescedRing(run, OFFSET, PAGE);
    const { pio, mmio, seen } = buses();
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < ring.capacity - 1; i++) kvmAppend(run, 0x3f8, [i & 0xff], true);
      expect(ring.drain(pio, mmio)).toBe(ring.capacity - 1);
    }
    expect(seen).toHaveLength(3 * (ring.capacity - 1));
    expect(seen[ring.capacity - 1]).toBe('pio 0 0');
  });

  it('stops at an entry or an index KVM would never write', () => {
    const run = new ArrayBuffer(3 * PAGE);
    const ring = new CoalescedRing(run, OFFSET, PAGE);
    const { pio, mmio, seen } = buses();
    const v = new DataView(run, OFFSET * PAGE, PAGE);
    v.setUint32(4, 100_000, true); // last beyond the ring
    expect(ring.drain(pio, mmio)).toBe(0);
    v.setUint32(4, 1, true);
    v.setUint32(8 + 8, 64, true); // a 64-byte "write"
    expect(ring.drain(pio, mmio)).toBe(0);
    expect(seen).toEqual([]);
  });

  it('refuses a mapping without the ring page', () => {
    expect(() => new CoalescedRing(new ArrayBuffer(2 * PAGE), OFFSET, PAGE)).toThrow(/no coalesced ring page/);
  });
});

describe('FastReadTable', () => {
  it('lays out entries as the addon reads them, and counts its hits', () => {
    const t = new FastReadTable();
    t.ringPage = 2;
    const m = t.add(0x3fd);
    expect([...t.slots.subarray(0, 8)]).toEqual([0, 2, 1, 0, 0x3fd, -1, 0, 0]);
    m.publish(0x61);
    expect(t.slots[5]).toBe(0x61);
    m.publish(undefined);
    expect(t.slots[5]).toBe(-1);
    // The addon's 64-bit count, low word first.
    t.slots[6] = -1;
    t.slots[7] = 1;
    expect(t.hits(0x3fd)).toBe(2 ** 33 - 1);
    expect(t.totalHits).toBe(2 ** 33 - 1);
    expect(t.hits(0x3f8)).toBe(0);
    t.armNotify();
    expect(t.notifyArmed).toBe(true);
    t.disarmNotify();
    expect(t.notifyArmed).toBe(false);
  });

  it('refuses a port twice, a port out of range and a fifth entry', () => {
    const t = new FastReadTable();
    t.add(1);
    expect(() => t.add(1)).toThrow(/already/);
    expect(() => t.add(0x10000)).toThrow(/0xffff/);
    t.add(2);
    t.add(3);
    t.add(4);
    expect(() => t.add(5)).toThrow(/holds 4 ports/);
  });
});
