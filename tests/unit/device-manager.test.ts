import { describe, expect, it } from 'vitest';
import { Bus, BusError, type BusDevice } from '../../src/base/bus.js';
import type { IrqLine } from '../../src/base/irq.js';
import { pino } from 'pino';
import type { Logger } from '../../src/base/log.js';
import * as layout from '../../src/arch/layout.js';
import { PciConfigSpace } from '../../src/devices/pci/config-space.js';
import type { PciBar, PciDevice } from '../../src/devices/pci/device.js';
import { LegacyDevices, MmioDevices, PciDevices } from '../../src/vmm/device-manager.js';
import { FakeIrqLine } from '../../src/testing/index.js';

/** A device that answers reads with its tag and records writes. */
class TagDevice implements BusDevice {
  readonly writes: number[] = [];
  constructor(
    readonly tag: number,
    readonly irq?: IrqLine,
  ) {}
  read(_offset: number, data: Uint8Array): void {
    data.fill(this.tag);
  }
  write(_offset: number, data: Uint8Array): void {
    this.writes.push(data[0]!);
  }
}

function lines(): { irqFor: (gsi: number) => IrqLine; made: Map<number, FakeIrqLine> } {
  const made = new Map<number, FakeIrqLine>();
  return {
    made,
    irqFor: (gsi) => {
      const line = new FakeIrqLine();
      made.set(gsi, line);
      return line;
    },
  };
}

function read(bus: Bus, addr: number): number {
  const data = new Uint8Array(1);
  bus.read(addr, data);
  return data[0]!;
}

describe.each([
  ['LegacyDevices', (bus: Bus, irqFor: (gsi: number) => IrqLine, log?: Logger) => new LegacyDevices(bus, irqFor, log)],
  ['MmioDevices', (bus: Bus, irqFor: (gsi: number) => IrqLine, log?: Logger) => new MmioDevices(bus, irqFor, log)],
])('%s', (_name, make) => {
  it('inserts each device at its range, reachable through the bus', () => {
    const bus = new Bus('test');
    const mgr = make(bus, lines().irqFor);
    mgr.add({ name: 'a', base: 0x100, size: 8 }, () => new TagDevice(0xa1));
    mgr.add({ name: 'b', base: 0x108, size: 2 }, () => new TagDevice(0xb2));
    expect(read(bus, 0x107)).toBe(0xa1);
    expect(read(bus, 0x109)).toBe(0xb2);
    expect(read(bus, 0x10a)).toBe(0xff); // nothing there: an open bus
    expect(mgr.devices.map((d) => d.name)).toEqual(['a', 'b']);
  });

  it('refuses an overlap and closes the device it could not place', () => {
    const bus = new Bus('test');
    const mgr = make(bus, lines().irqFor);
    mgr.add({ name: 'a', base: 0x100, size: 8 }, () => new TagDevice(1));
    let closed = 0;
    expect(() => mgr.add({ name: 'b', base: 0x104, size: 8, close: () => closed++ }, () => new TagDevice(2))).toThrow(BusError);
    expect(closed).toBe(1);
    expect(read(bus, 0x104)).toBe(1);
    expect(mgr.devices.map((d) => d.name)).toEqual(['a']);
  });

  it('wires the IRQ line of the GSI asked for, and none without one', () => {
    const bus = new Bus('test');
    const { irqFor, made } = lines();
    const mgr = make(bus, irqFor);
    const withIrq = mgr.add({ name: 'uart', base: 0x3f8, size: 8, gsi: 4 }, (irq) => new TagDevice(1, irq));
    const without = mgr.add({ name: 'cmos', base: 0x70, size: 2 }, (irq) => new TagDevice(2, irq));
    expect(withIrq.irq).toBe(made.get(4));
    withIrq.irq!.trigger();
    expect(made.get(4)!.edges).toBe(1);
    expect(without.irq).toBeUndefined();
    expect(mgr.devices.find((d) => d.name === 'uart')?.gsi).toBe(4);
  });

  it('closes every device, newest first, even when one close throws', () => {
    const bus = new Bus('test');
    const logged: unknown[] = [];
    const log = pino({ level: 'error' }, { write: (line: string) => logged.push(JSON.parse(line)) });
    const mgr = make(bus, lines().irqFor, log);
    const order: string[] = [];
    mgr.add({ name: 'a', base: 0, size: 1, close: () => order.push('a') }, () => new TagDevice(1));
    mgr.add(
      {
        name: 'b',
        base: 1,
        size: 1,
        close: () => {
          order.push('b');
          throw new Error('b will not close');
        },
      },
      () => new TagDevice(2),
    );
    mgr.add({ name: 'c', base: 2, size: 1, close: () => order.push('c') }, () => new TagDevice(3));
    const failures = mgr.close();
    expect(order).toEqual(['c', 'b', 'a']);
    expect(failures.map((e) => e.message)).toEqual(['b will not close']);
    expect(logged).toHaveLength(1);
    expect(mgr.close()).toEqual([]); // once only
    expect(order).toHaveLength(3);
  });
});

class FakePciDevice implements PciDevice {
  readonly config = new PciConfigSpace({ vendorId: 0x1af4, deviceId: 0x1041, classCode: 0x020000 });
  readonly bars: readonly PciBar[] = [{ index: 0, kind: 'mem32', size: 0x4000, device: new TagDevice(0x42) }];
  constructor(readonly name: string) {
    this.config.defineBar(0, { kind: 'mem32', size: 0x4000 });
  }
}

describe('PciDevices', () => {
  function setup() {
    const pio = new Bus('pio');
    const mmio = new Bus('mmio');
    const { irqFor, made } = lines();
    const legacy = new LegacyDevices(pio, irqFor);
    const mmioDevices = new MmioDevices(mmio, irqFor);
    const pci = new PciDevices(legacy, mmioDevices, irqFor);
    return { pio, mmio, pci, legacy, mmioDevices, made };
  }

  it('puts configuration mechanism #1 and the BAR window at the layout addresses', () => {
    const { legacy, mmioDevices } = setup();
    expect(legacy.devices).toEqual([{ name: 'pci-config', base: layout.PCI_CONFIG_PORT, size: layout.PCI_CONFIG_PORT_SIZE }]);
    expect(mmioDevices.devices).toEqual([{ name: 'pci-mmio', base: layout.PCI_MMIO_START, size: layout.PCI_MMIO_SIZE }]);
  });

  it('gives a device the next slot, its INTA# GSI from the layout, and BARs in the window', () => {
    const { pci, made } = setup();
    const slot = pci.nextSlot;
    const intx = pci.intx(slot);
    expect(intx.gsi).toBe(layout.pciIntxGsi(slot, layout.PCI_INTERRUPT_PIN_INTA_INDEX));
    expect(intx.line).toBe(made.get(intx.gsi));
    const dev = new FakePciDevice('net0');
    const wired: number[] = [];
    expect(pci.add(dev, { wire: (s) => wired.push(s) })).toBe(slot);
    expect(wired).toEqual([slot]);
    const bar0 = (dev.config.readU32(0x10) & ~0xf) >>> 0;
    expect(bar0).toBeGreaterThanOrEqual(layout.PCI_MMIO_START);
    expect(bar0 + 0x4000).toBeLessThanOrEqual(layout.PCI_MMIO_START + layout.PCI_MMIO_SIZE);
    expect(pci.nextSlot).toBe(slot + 1);
  });

  it('refuses a taken slot', () => {
    const { pci } = setup();
    const slot = pci.add(new FakePciDevice('a'));
    expect(() => pci.add(new FakePciDevice('b'), { slot })).toThrow(/taken/);
  });

  it('closes every device even when one close throws', () => {
    const { pci } = setup();
    const closed: string[] = [];
    pci.add(new FakePciDevice('a'), { close: () => closed.push('a') });
    pci.add(new FakePciDevice('b'), {
      close: () => {
        throw new Error('b stuck');
      },
    });
    pci.add(new FakePciDevice('c'), { close: () => closed.push('c') });
    expect(pci.close().map((e) => e.message)).toEqual(['b stuck']);
    expect(closed).toEqual(['c', 'a']);
  });
});
