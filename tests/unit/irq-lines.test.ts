/**
 * The irqfd line: one eventfd write per edge, a level line's rises as
 * edges (the ISA pins are edge-triggered), and a level kept for a line
 * that has one.
 */
import { describe, expect, it } from 'vitest';
import { IrqfdLine } from '../../src/kvm/irq-lines.js';
import type { NativeAddon } from '../../src/kvm/native.js';
import { FakeIrqLine } from '../../src/testing/index.js';

function fakeAddon(): { addon: NativeAddon; writes: Array<[number, number]> } {
  const writes: Array<[number, number]> = [];
  const addon = { eventfdWrite: (fd: number, value: number) => writes.push([fd, value]) } as unknown as NativeAddon;
  return { addon, writes };
}

describe('IrqfdLine', () => {
  it('sends one eventfd write per trigger, counted', () => {
    const { addon, writes } = fakeAddon();
    const counter = { irqs: 0 };
    const line = new IrqfdLine(addon, 7, counter);
    line.trigger();
    line.trigger();
    expect(writes).toEqual([
      [7, 1],
      [7, 1],
    ]);
    expect(counter.irqs).toBe(2);
  });

  it('turns each rise of a level into one edge, and a fall or a held level into none', () => {
    const { addon, writes } = fakeAddon();
    const counter = { irqs: 0 };
    const line = new IrqfdLine(addon, 3, counter);
    line.setLevel(true);
    line.setLevel(true); // held: no new edge
    line.setLevel(false); // a fall: nothing to send
    expect(writes).toHaveLength(1);
    line.setLevel(true);
    expect(writes).toHaveLength(2);
    expect(counter.irqs).toBe(2);
  });

  it('leaves the level to the level line when it has one', () => {
    const { addon, writes } = fakeAddon();
    const level = new FakeIrqLine();
    const line = new IrqfdLine(addon, 3, { irqs: 0 }, level);
    line.setLevel(true);
    line.setLevel(false);
    expect(writes).toHaveLength(0);
    expect(level.level).toBe(false);
    expect(level.history).toEqual(['high', 'low']);
  });
});
