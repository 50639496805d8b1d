import { describe, expect, it } from 'vitest';
import type { BusDevice } from '../../src/base/bus.js';
import {
  MSIX_CAP_MESSAGE_CONTROL,
  MSIX_CONTROL_ENABLE,
  MSIX_CONTROL_FUNCTION_MASK,
  MSIX_ENTRY_DATA,
  MSIX_ENTRY_SIZE,
  MSIX_ENTRY_VECTOR_CONTROL,
  Msix,
  PCI_BAR0,
  PCI_CAPABILITY_LIST,
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VENDOR,
  PCI_CLASS_DEVICE,
  PCI_COMMAND,
  PCI_COMMAND_IO,
  PCI_COMMAND_MEMORY,
  PCI_DEVICE_ID,
  PCI_HEADER_TYPE,
  PCI_INTERRUPT_LINE,
  PCI_STATUS,
  PCI_STATUS_CAP_LIST,
  PCI_VENDOR_ID,
  PciAllocator,
  PciBarRouter,
  PciBus,
  PciConfigIo,
  PciConfigSpace,
  PciEcam,
  PciError,
  type MsiMessage,
  type MsiSink,
  type PciBar,
  type PciDevice,
} from '../../src/devices/pci/index.js';
import { PciPortIo } from '../helpers/pci.js';

/** A BAR's contents: remembers the last write, reads back its offset. */
class ScratchBar implements BusDevice {
  readonly writes: Array<{ offset: number; bytes: number[] }> = [];
  read(offset: number, data: Uint8Array): void {
    data.fill(offset & 0xff);
  }
  write(offset: number, data: Uint8Array): void {
    this.writes.push({ offset, bytes: Array.from(data) });
  }
}

/** A function with a 4 KiB 32-bit BAR 0, a 16 KiB prefetchable 64-bit BAR 2 and a 256-port I/O BAR 4. */
class TestFunction implements PciDevice {
  readonly config = new PciConfigSpace({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0xff0000 });
  readonly bars: PciBar[];
  readonly remaps: Array<[number, number | undefined]> = [];

  constructor(readonly name = 'test') {
    const defs = [
      { index: 0, kind: 'mem32', size: 0x1000 },
      { index: 2, kind: 'mem64', size: 0x4000, prefetchable: true },
      { index: 4, kind: 'io', size: 0x100 },
    ] as const;
    this.bars = defs.map((d) => {
      this.config.defineBar(d.index, d);
      return { index: d.index, kind: d.kind, size: d.size, device: new ScratchBar() };
    });
    this.config.onBarRemap((index, address) => this.remaps.push([index, address]));
  }
}

function rig() {
  const bus = new PciBus();
  const fn = new TestFunction();
  const slot = bus.add(fn);
  return { bus, fn, slot, port: new PciPortIo(new PciConfigIo(bus)) };
}

/** What Linux's __pci_read_base does to every BAR, with decoding off around it. */
function linuxSizeBars(config: PciConfigSpace): number[] {
  const command = config.readU32(PCI_COMMAND) & 0xffff;
  const b = new Uint8Array(2);
  new DataView(b.buffer).setUint16(0, command & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY), true);
  config.write(PCI_COMMAND, b);
  const sizes: number[] = [];
  for (let i = 0; i < 6; i++) {
    const offset = PCI_BAR0 + 4 * i;
    const original = config.readU32(offset);
    config.writeU32(offset, 0xffff_ffff);
    sizes.push(config.readU32(offset));
    config.writeU32(offset, original);
  }
  new DataView(b.buffer).setUint16(0, command, true);
  config.write(PCI_COMMAND, b);
  return sizes;
}

describe('PCI configuration mechanism #1', () => {
  it('reads the host bridge at 00:00.0 only with the enable bit set', () => {
    const { port } = rig();
    port.out(0xcf8, 4, 0); // enable clear
    expect(port.in(0xcfc, 4)).toBe(0xffff_ffff);
    expect(port.read(0, PCI_VENDOR_ID, 4)).toBe((0x0008 << 16) | 0x1b36);
    expect(port.read(0, PCI_CLASS_DEVICE, 2)).toBe(0x0600);
    expect(port.read(0, PCI_HEADER_TYPE, 1)).toBe(0);
  });

  it('serves byte, word and dword accesses at each offset of CONFIG_DATA', () => {
    const { port, slot } = rig();
    expect(port.read(slot, PCI_VENDOR_ID, 4)).toBe(0x5678_1234);
    expect(port.read(slot, PCI_VENDOR_ID, 2)).toBe(0x1234);
    expect(port.read(slot, PCI_DEVICE_ID, 2)).toBe(0x5678);
    expect(port.read(slot, 1, 1)).toBe(0x12);
    expect(port.read(slot, 3, 1)).toBe(0x56);
    port.write(slot, PCI_INTERRUPT_LINE, 1, 10);
    expect(port.read(slot, PCI_INTERRUPT_LINE, 1)).toBe(10);
    // A word at 0xCFF would run past CONFIG_DATA: not a configuration access.
    port.select(slot, 0);
    expect(port.in(0xcff, 2)).toBe(0xffff);
  });

  it('reads absent devices, other functions and other buses as all-ones; drops writes to them', () => {
    const { port, bus } = rig();
    expect(port.read(7, PCI_VENDOR_ID, 4)).toBe(0xffff_ffff);
    port.select(1, 0, 0, 1);
    expect(port.in(0xcfc, 4)).toBe(0xffff_ffff);
    port.select(1, 0, 1, 0);
    expect(port.in(0xcfc, 2)).toBe(0xffff);
    port.write(7, PCI_INTERRUPT_LINE, 1, 3);
    expect(bus.deviceAt(7)).toBeUndefined();
  });

  it("passes Linux's pci_check_type1 probe (byte write to 0xCFB, then a dword read-back)", () => {
    const { port } = rig();
    port.out(0xcfb, 1, 0x01);
    const saved = port.in(0xcf8, 4);
    port.out(0xcf8, 4, 0x8000_0000);
    expect(port.in(0xcf8, 4)).toBe(0x8000_0000);
    port.out(0xcf8, 4, saved);
    expect(port.in(0xcf8, 4)).toBe(saved);
    // pci_sanity_check: a host bridge class somewhere on bus 0.
    expect(port.read(0, PCI_CLASS_DEVICE, 2)).toBe(0x0600);
  });

  it('keeps reserved CONFIG_ADDRESS bits at zero', () => {
    const { port } = rig();
    port.out(0xcf8, 4, 0xffff_ffff);
    expect(port.in(0xcf8, 4)).toBe(0x80ff_fffc);
  });
});

describe('PCI ECAM', () => {
  it('decodes bus, device, function and register from the offset', () => {
    const { bus, slot } = rig();
    const ecam = new PciEcam(bus);
    expect(ecam.size).toBe(1 << 20);
    const b = new Uint8Array(4);
    ecam.read((slot << 15) | PCI_VENDOR_ID, b);
    expect(new DataView(b.buffer).getUint32(0, true)).toBe(0x5678_1234);
    ecam.read((slot << 15) | (1 << 12), b);
    expect(Array.from(b)).toEqual([0xff, 0xff, 0xff, 0xff]);
    ecam.read((slot << 15) | 0x100, b); // extended space of a conventional function
    expect(Array.from(b)).toEqual([0, 0, 0, 0]);
    ecam.write((slot << 15) | PCI_INTERRUPT_LINE, Uint8Array.of(9));
    expect(bus.deviceAt(slot)!.config.getU8(PCI_INTERRUPT_LINE)).toBe(9);
  });
});

describe('PCI BARs', () => {
  it('answers the sizing sequence for 32-bit, 64-bit (both halves) and I/O BARs', () => {
    const { config } = new TestFunction();
    const sizes = linuxSizeBars(config);
    expect(sizes[0]).toBe(0xffff_f000);
    expect(sizes[2]).toBe(0xffff_c00c); // 64-bit, prefetchable
    expect(sizes[3]).toBe(0xffff_ffff); // upper half of a BAR smaller than 4 GiB
    expect(sizes[4]).toBe(0x0000_ff01); // I/O: 16-bit port space
    expect(sizes[1]).toBe(0);
    expect(sizes[5]).toBe(0);
    // The restores left the type bits and no address.
    expect(config.readU32(PCI_BAR0 + 8)).toBe(0xc);
    expect(config.readU32(PCI_BAR0 + 16)).toBe(0x1);
    expect(config.readU32(0x30)).toBe(0); // no expansion ROM
  });

  it('maps only when decoding is enabled, and re-sizing yields one unmap and one map', () => {
    const fn = new TestFunction();
    const allocator = new PciAllocator({ mmio32: { base: 0xc000_0000, size: 0x100_0000 }, io: { base: 0xc000, size: 0x1000 } });
    const addresses = allocator.assign(fn);
    expect(addresses.get(2)).toBe(0xc000_0000); // largest first
    expect(addresses.get(0)).toBe(0xc000_4000);
    expect(addresses.get(4)).toBe(0xc000);
    expect(fn.config.command & (PCI_COMMAND_IO | PCI_COMMAND_MEMORY)).toBe(PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
    expect(fn.remaps.sort()).toEqual([
      [0, 0xc000_4000],
      [2, 0xc000_0000],
      [4, 0xc000],
    ]);
    fn.remaps.length = 0;
    linuxSizeBars(fn.config);
    const bar0 = fn.remaps.filter(([i]) => i === 0);
    expect(bar0).toEqual([
      [0, undefined],
      [0, 0xc000_4000],
    ]);
    expect(fn.remaps.filter(([i]) => i === 2)).toEqual([
      [2, undefined],
      [2, 0xc000_0000],
    ]);
  });

  it('does not map a BAR at its sizing pattern when sized with decoding left on', () => {
    const fn = new TestFunction();
    new PciAllocator({ mmio32: { base: 0xc000_0000, size: 0x100_0000 }, io: { base: 0xc000, size: 0x1000 } }).assign(fn);
    fn.remaps.length = 0;
    fn.config.writeU32(PCI_BAR0, 0xffff_ffff);
    fn.config.writeU32(PCI_BAR0, 0xc000_4000);
    expect(fn.remaps).toEqual([
      [0, undefined],
      [0, 0xc000_4000],
    ]);
  });

  it('maps a 64-bit BAR above 4 GiB from both halves', () => {
    const fn = new TestFunction();
    new PciAllocator({
      mmio32: { base: 0xc000_0000, size: 0x100_0000 },
      mmio64: { base: 0x80_0000_0000, size: 0x1_0000_0000 },
      io: { base: 0xc000, size: 0x1000 },
    }).assign(fn);
    expect(fn.config.barAddress(2)).toBe(0x80_0000_0000);
    expect(fn.config.readU32(PCI_BAR0 + 12)).toBe(0x80);
    fn.config.writeU32(PCI_BAR0 + 8, 0xffff_c000); // legitimate once the high half is not zero
    expect(fn.config.barAddress(2)).toBe(0x80_ffff_c000);
  });

  it('refuses impossible BARs and full windows with a PciError code', () => {
    const config = new PciConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0 });
    expect(() => config.defineBar(5, { kind: 'mem64', size: 0x1000 })).toThrow(PciError);
    expect(() => config.defineBar(0, { kind: 'mem32', size: 0x1800 })).toThrow(/power of two/);
    config.defineBar(0, { kind: 'mem64', size: 0x1000 });
    expect(() => config.defineBar(1, { kind: 'mem32', size: 0x1000 })).toThrow(/already defined/);
    const allocator = new PciAllocator({ mmio32: { base: 0xc000_0000, size: 0x8000 } });
    try {
      allocator.assign(new TestFunction('big'));
      expect.unreachable();
    } catch (err) {
      // The 16 KiB BAR fits; the I/O BAR has no window.
      expect((err as PciError).kind).toBe('PCI_NO_WINDOW');
    }
    const tight = new PciAllocator({ mmio32: { base: 0xc000_0000, size: 0x4000 }, io: { base: 0xc000, size: 0x100 } });
    expect(() => tight.assign(new TestFunction('big'))).toThrow(/does not fit in the mmio32 window 0xc0000000\.\.0xc0004000/);
  });
});

describe('PCI bus and BAR router', () => {
  it('plugs devices by slot and refuses taken or out-of-range slots', () => {
    const bus = new PciBus();
    expect(bus.add(new TestFunction('a'))).toBe(1);
    expect(bus.add(new TestFunction('b'), 5)).toBe(5);
    expect(() => bus.add(new TestFunction('c'), 5)).toThrow(PciError);
    expect(() => bus.add(new TestFunction('d'), 32)).toThrow(/out of range/);
    expect(bus.devices.map((d) => d.slot)).toEqual([0, 1, 5]);
  });

  it('routes window accesses to whichever BAR decodes there, and follows moves', () => {
    const bus = new PciBus();
    const fn = new TestFunction();
    const slot = bus.add(fn);
    const remaps: Array<[number, number, number | undefined]> = [];
    bus.onBarRemap((r) => remaps.push([r.slot, r.bar.index, r.address]));
    const window = new PciBarRouter(bus, 'memory', 0xc000_0000, 0x100_0000);
    new PciAllocator({ mmio32: { base: 0xc000_0000, size: 0x100_0000 }, io: { base: 0xc000, size: 0x1000 } }).assign(fn);
    expect(remaps).toContainEqual([slot, 0, 0xc000_4000]);
    const b = new Uint8Array(4);
    window.read(0x4010, b);
    expect(Array.from(b)).toEqual([0x10, 0x10, 0x10, 0x10]);
    window.write(0x0020, Uint8Array.of(1, 2));
    expect((fn.bars[1]!.device as ScratchBar).writes).toEqual([{ offset: 0x20, bytes: [1, 2] }]);
    // The guest moves BAR 0.
    fn.config.writeU32(PCI_BAR0, 0xc010_0000);
    window.read(0x4010, b);
    expect(Array.from(b)).toEqual([0xff, 0xff, 0xff, 0xff]);
    window.read(0x10_0004, b);
    expect(b[0]).toBe(4);
  });
});

describe('PCI capabilities', () => {
  it('chains capabilities from 0x34, dword aligned, ending in 0, with writable ranges and a write hook', () => {
    const config = new PciConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0 });
    expect(config.getU16(PCI_STATUS) & PCI_STATUS_CAP_LIST).toBe(0);
    const written: Array<[number, number]> = [];
    const first = config.addCapability(PCI_CAP_ID_VENDOR, Uint8Array.of(5, 0xaa, 0xbb), {
      writable: [[3, 5]],
      onWrite: (offset, length) => written.push([offset, length]),
    });
    const second = config.addCapability(0x05, Uint8Array.of(0, 0));
    expect(first).toBe(0x40);
    expect(second).toBe(0x48);
    expect(config.getU16(PCI_STATUS) & PCI_STATUS_CAP_LIST).toBe(PCI_STATUS_CAP_LIST);
    expect(config.readU32(PCI_CAPABILITY_LIST) & 0xff).toBe(0x40);
    expect(config.readU32(first) & 0xffff).toBe(0x4809);
    expect(config.readU32(second) & 0xff00).toBe(0);
    config.writeU32(first, 0xffff_ffff);
    // ID, next and cap_len stay; byte 3, writable, takes the write; byte 4 was not written.
    expect(config.readU32(first)).toBe(0xff05_4809);
    expect(config.getU8(first + 4)).toBe(0xbb);
    expect(written).toEqual([[0, 4]]);
    expect(() => config.addCapability(0x09, new Uint8Array(250))).toThrow(/does not fit/);
  });
});

/** Records what the MSI-X model asks of the VMM. */
class RecordingSink implements MsiSink {
  readonly updates: Array<[number, MsiMessage | undefined]> = [];
  readonly fired: Array<[number, MsiMessage]> = [];
  update(vector: number, message: MsiMessage | undefined): void {
    this.updates.push([vector, message]);
  }
  fire(vector: number, message: MsiMessage): void {
    this.fired.push([vector, message]);
  }
}

function msixRig(vectors = 4) {
  const config = new PciConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0 });
  config.defineBar(0, { kind: 'mem32', size: 0x2000 });
  const sink = new RecordingSink();
  const msix = new Msix(config, { vectors, tableBar: 0, tableOffset: 0, pbaBar: 0, pbaOffset: 0x1000, sink });
  const control = (value: number) => {
    const b = new Uint8Array(2);
    new DataView(b.buffer).setUint16(0, value, true);
    config.write(msix.capabilityOffset + MSIX_CAP_MESSAGE_CONTROL, b);
  };
  const entry = (vector: number, address: bigint, data: number, masked: boolean) => {
    const b = new Uint8Array(8);
    const v = new DataView(b.buffer);
    v.setBigUint64(0, address, true);
    msix.writeTable(vector * MSIX_ENTRY_SIZE, b);
    v.setUint32(0, data, true);
    v.setUint32(4, masked ? 1 : 0, true);
    msix.writeTable(vector * MSIX_ENTRY_SIZE + MSIX_ENTRY_DATA, b);
  };
  const dword = (read: (o: number, d: Uint8Array) => void, offset: number) => {
    const b = new Uint8Array(4);
    read(offset, b);
    return new DataView(b.buffer).getUint32(0, true);
  };
  return { config, sink, msix, control, entry, dword };
}

describe('MSI-X', () => {
  it('describes its table and PBA in the capability; only Enable and Function Mask are writable', () => {
    const { config, msix, control } = msixRig(4);
    const cap = msix.capabilityOffset;
    expect(config.getU8(cap)).toBe(PCI_CAP_ID_MSIX);
    expect(config.getU16(cap + 2)).toBe(3); // table size N - 1
    expect(config.getU32(cap + 4)).toBe(0x0000); // BIR 0, offset 0
    expect(config.getU32(cap + 8)).toBe(0x1000);
    control(0xffff);
    expect(config.getU16(cap + 2)).toBe(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK | 3);
    expect(msix.enabled && msix.functionMasked).toBe(true);
  });

  it('starts with every vector masked and drops signals while disabled', () => {
    const { msix, sink, dword } = msixRig();
    expect(dword((o, d) => msix.readTable(o, d), MSIX_ENTRY_VECTOR_CONTROL)).toBe(1);
    expect(msix.signal(0)).toBe(false);
    expect(sink.fired).toEqual([]);
    expect(msix.stats.dropped).toBe(1);
  });

  it('sets the pending bit for a masked vector and delivers it on unmask', () => {
    const { msix, sink, control, entry, dword } = msixRig();
    control(MSIX_CONTROL_ENABLE);
    entry(1, 0xfee0_0000n, 0x4021, true);
    expect(msix.signal(1)).toBe(true);
    expect(sink.fired).toEqual([]);
    expect(dword((o, d) => msix.readPba(o, d), 0)).toBe(0b10);
    entry(1, 0xfee0_0000n, 0x4021, false);
    const message = { address: 0xfee0_0000n, data: 0x4021 };
    expect(sink.updates).toEqual([[1, message]]);
    expect(sink.fired).toEqual([[1, message]]);
    expect(msix.isPending(1)).toBe(false);
    msix.signal(1);
    expect(sink.fired).toHaveLength(2);
  });

  it('holds every vector under Function Mask and tells the sink on each routable change', () => {
    const { msix, sink, control, entry } = msixRig();
    // Linux: enable with everything masked, program the entries, then unmask the function.
    control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    entry(0, 0xfee0_0000n, 0x30, false);
    entry(2, 0xfee0_1000n, 0x31, false);
    expect(sink.updates).toEqual([]);
    msix.signal(2);
    expect(sink.fired).toEqual([]);
    control(MSIX_CONTROL_ENABLE);
    expect(sink.updates).toEqual([
      [0, { address: 0xfee0_0000n, data: 0x30 }],
      [2, { address: 0xfee0_1000n, data: 0x31 }],
    ]);
    expect(sink.fired).toEqual([[2, { address: 0xfee0_1000n, data: 0x31 }]]);
    // New data while unmasked: the route changes.
    entry(0, 0xfee0_0000n, 0x32, false);
    expect(sink.updates.at(-1)).toEqual([0, { address: 0xfee0_0000n, data: 0x32 }]);
    // Disabling takes every route away.
    sink.updates.length = 0;
    control(0);
    expect(sink.updates).toEqual([
      [0, undefined],
      [2, undefined],
    ]);
  });

  it('takes aligned DWORD and QWORD table accesses only; the PBA is read-only', () => {
    const { msix, dword } = msixRig();
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, 0x1_fee0_0003n, true);
    msix.writeTable(MSIX_ENTRY_SIZE, b);
    expect(dword((o, d) => msix.readTable(o, d), MSIX_ENTRY_SIZE)).toBe(0xfee0_0000); // bits 1:0 read-only
    expect(dword((o, d) => msix.readTable(o, d), MSIX_ENTRY_SIZE + 4)).toBe(1);
    const q = new Uint8Array(8);
    msix.readTable(MSIX_ENTRY_SIZE, q);
    expect(new DataView(q.buffer).getBigUint64(0, true)).toBe(0x1_fee0_0000n);
    msix.writeTable(MSIX_ENTRY_SIZE + 8, Uint8Array.of(0xff, 0xff)); // a word
    msix.writeTable(MSIX_ENTRY_SIZE + 2, new Uint8Array(4)); // unaligned
    msix.writeTable(4 * MSIX_ENTRY_SIZE, new Uint8Array(4)); // past the table
    expect(dword((o, d) => msix.readTable(o, d), MSIX_ENTRY_SIZE + 8)).toBe(0);
    msix.writePba(0, new Uint8Array(8).fill(0xff));
    expect(dword((o, d) => msix.readPba(o, d), 0)).toBe(0);
    expect(msix.stats.badAccesses).toBe(4);
    // Reserved vector control bits read as zero.
    msix.writeTable(MSIX_ENTRY_VECTOR_CONTROL, Uint8Array.of(0xff, 0xff, 0xff, 0xff));
    expect(dword((o, d) => msix.readTable(o, d), MSIX_ENTRY_VECTOR_CONTROL)).toBe(1);
  });
});
