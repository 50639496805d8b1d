/**
 * PCI bus 0: up to 32 single-function devices by slot, a host bridge in
 * slot 0, and the ways the guest reaches their configuration space:
 * configuration mechanism #1 (ports 0xCF8..0xCFF, PCI 3.0 section 3.2.2.3.2)
 * and ECAM (PCI Express memory-mapped configuration). A
 * {@link PciBarRouter} serves a window of guest addresses from whatever
 * BARs decode there now, so BAR moves need no change to the VMM's buses.
 */
import type { BusDevice } from '../../base/bus.js';
import { GuestEventLog, silentLogger, type Logger } from '../../base/log.js';
import { PciConfigSpace } from './config-space.js';
import type { PciBar, PciDevice } from './device.js';
import { PciError } from './errors.js';

export const PCI_SLOT_COUNT = 32;
export const PCI_HOST_BRIDGE_SLOT = 0;

/** Red Hat, Inc.'s PCI vendor ID and its "QEMU PCIe host bridge" device ID. */
export const PCI_VENDOR_ID_REDHAT = 0x1b36;
export const PCI_DEVICE_ID_REDHAT_HOST_BRIDGE = 0x0008;
/** Bridge device, host bridge (the class Linux's pci_sanity_check looks for). */
export const PCI_CLASS_BRIDGE_HOST = 0x060000;

/** Configuration mechanism #1: CONFIG_DATA 4 ports above CONFIG_ADDRESS (their ports: layout.ts). */
const CONFIG_DATA_OFFSET = 4;
/** CONFIG_ADDRESS: enable, bus 23:16, device 15:11, function 10:8, register 7:2; 30:24 and 1:0 read as 0. */
export const PCI_CONFIG_ADDRESS_ENABLE = 0x8000_0000;
const CONFIG_ADDRESS_WRITABLE = 0x80ff_fffc;

/** ECAM: 4 KiB of configuration space per function, 1 MiB per bus. */
export const PCI_ECAM_BUS_SIZE = 1 << 20;

/** The host bridge at 00:00.0: no BARs, it only makes the bus recognisable. */
export class PciHostBridge implements PciDevice {
  readonly name = 'host-bridge';
  readonly bars: readonly PciBar[] = [];
  readonly config = new PciConfigSpace({
    vendorId: PCI_VENDOR_ID_REDHAT,
    deviceId: PCI_DEVICE_ID_REDHAT_HOST_BRIDGE,
    classCode: PCI_CLASS_BRIDGE_HOST,
  });
}

/** A BAR of a device on the bus moved (address) or stopped decoding (undefined). */
export interface PciBarRemap {
  readonly slot: number;
  readonly device: PciDevice;
  readonly bar: PciBar;
  readonly address: number | undefined;
}

/** Where a configuration access goes: bus, device (slot), function, register. */
export interface PciConfigAddress {
  readonly bus: number;
  readonly slot: number;
  readonly fn: number;
  readonly register: number;
}

export class PciBus {
  private readonly slots: Array<PciDevice | undefined> = new Array<PciDevice | undefined>(PCI_SLOT_COUNT).fill(undefined);
  private readonly remapListeners: Array<(remap: PciBarRemap) => void> = [];
  private readonly log: Logger;

  constructor(options: { logger?: Logger } = {}) {
    this.log = (options.logger ?? silentLogger).child({ device: 'pci' });
    this.add(new PciHostBridge(), PCI_HOST_BRIDGE_SLOT);
  }

  /** Plugs `device` into `slot`, or into the lowest free slot. Returns the slot. */
  add(device: PciDevice, slot?: number): number {
    const at = slot ?? this.slots.indexOf(undefined);
    if (at === -1) throw new PciError('PCI_BUS_FULL', `no free PCI slot for ${device.name}`);
    if (!(Number.isInteger(at) && at >= 0 && at < PCI_SLOT_COUNT) || this.slots[at]) {
      throw new PciError('PCI_BAD_SLOT', `PCI slot ${at} for ${device.name} is out of range or taken`);
    }
    this.slots[at] = device;
    device.config.onBarRemap((index, address) => {
      const bar = device.bars.find((b) => b.index === index);
      if (!bar) return;
      this.log.debug({ slot: at, device: device.name, bar: index, address }, 'BAR remapped');
      for (const listener of this.remapListeners) listener({ slot: at, device, bar, address });
    });
    return at;
  }

  /** The device in `slot`, if any. */
  deviceAt(slot: number): PciDevice | undefined {
    return this.slots[slot];
  }

  /** Every device with its slot, host bridge included. */
  get devices(): Array<{ slot: number; device: PciDevice }> {
    return this.slots.flatMap((device, slot) => (device ? [{ slot, device }] : []));
  }

  /** Calls `listener` whenever a BAR of any device moves or stops decoding. */
  onBarRemap(listener: (remap: PciBarRemap) => void): void {
    this.remapListeners.push(listener);
  }

  /** A configuration read; a function that does not exist reads as all-ones. */
  readConfig(at: PciConfigAddress, data: Uint8Array): void {
    const device = this.function(at);
    if (!device) {
      data.fill(0xff);
      return;
    }
    // Extended configuration space (ECAM, 0x100 and up) of a conventional function reads as zero.
    device.config.read(at.register, data);
  }

  /** A configuration write; to a function that does not exist it is dropped. */
  writeConfig(at: PciConfigAddress, data: Uint8Array): void {
    this.function(at)?.config.write(at.register, data);
  }

  private function(at: PciConfigAddress): PciDevice | undefined {
    return at.bus === 0 && at.fn === 0 ? this.slots[at.slot] : undefined;
  }
}

/**
 * A bus device whose accesses are configuration accesses: the subclass
 * decodes each into a {@link PciConfigAddress}, or refuses it (reads
 * all-ones, write dropped).
 */
abstract class PciConfigAccess implements BusDevice {
  constructor(protected readonly bus: PciBus) {}

  read(offset: number, data: Uint8Array): void {
    const at = this.target(offset, data.length);
    if (!at) {
      data.fill(0xff);
      return;
    }
    this.bus.readConfig(at, data);
  }

  write(offset: number, data: Uint8Array): void {
    const at = this.target(offset, data.length);
    if (at) this.bus.writeConfig(at, data);
  }

  protected abstract target(offset: number, length: number): PciConfigAddress | undefined;
}

/**
 * Configuration mechanism #1 as a port-I/O device: insert it at 0xCF8
 * with length `PCI_CONFIG_PORT_SIZE` (layout.ts). CONFIG_ADDRESS takes only DWORD
 * accesses (a byte write to 0xCFB, as Linux's pci_check_type1 does, is
 * not one and leaves it alone); CONFIG_DATA takes bytes, words and dwords
 * at any of its four byte offsets.
 */
export class PciConfigIo extends PciConfigAccess {
  private address = 0;

  override read(offset: number, data: Uint8Array): void {
    if (offset >= CONFIG_DATA_OFFSET) {
      super.read(offset, data);
      return;
    }
    // Narrow reads see the bytes of the register; harmless, and what a DWORD latch gives.
    const value = new Uint8Array(4);
    new DataView(value.buffer).setUint32(0, this.address, true);
    data.fill(0xff);
    data.set(value.subarray(offset, Math.min(4, offset + data.length)));
  }

  override write(offset: number, data: Uint8Array): void {
    if (offset >= CONFIG_DATA_OFFSET) {
      super.write(offset, data);
      return;
    }
    if (offset === 0 && data.length === 4) {
      this.address = (new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true) & CONFIG_ADDRESS_WRITABLE) >>> 0;
    }
  }

  /** Where a CONFIG_DATA access at `offset` goes, or undefined (disabled, or past 0xCFF). */
  protected target(offset: number, length: number): PciConfigAddress | undefined {
    const byte = offset - CONFIG_DATA_OFFSET;
    if (!(this.address & PCI_CONFIG_ADDRESS_ENABLE) || byte + length > 4) return undefined;
    return {
      bus: (this.address >>> 16) & 0xff,
      slot: (this.address >>> 11) & 0x1f,
      fn: (this.address >>> 8) & 0x7,
      register: (this.address & 0xfc) + byte,
    };
  }
}

/**
 * ECAM as an MMIO device: offset = bus << 20 | device << 15 | function << 12
 * | register. Insert it with length {@link PciEcam.size} and announce it in
 * the ACPI MCFG table.
 */
export class PciEcam extends PciConfigAccess {
  constructor(
    bus: PciBus,
    readonly buses = 1,
  ) {
    super(bus);
  }

  get size(): number {
    return this.buses * PCI_ECAM_BUS_SIZE;
  }

  protected target(offset: number, length: number): PciConfigAddress | undefined {
    const register = offset & 0xfff;
    // An access must stay inside one function's 4 KiB and be at most a DWORD.
    if (length > 4 || register + length > 0x1000 || offset >= this.size) return undefined;
    return { bus: offset >>> 20, slot: (offset >>> 15) & 0x1f, fn: (offset >>> 12) & 0x7, register };
  }
}

/**
 * A window of guest physical memory (or ports) for BARs, as one device on
 * the VMM's bus: an access reaches the BAR that decodes there now, or
 * reads all-ones (nothing decodes, like an open bus). Insert it at `base`
 * with length `size`.
 */
export class PciBarRouter implements BusDevice {
  private routes: Array<{ start: number; end: number; bar: PciBar }> = [];
  private readonly log: Logger;
  /** The guest programs the BARs: what it gets wrong is logged a few times, then counted. */
  private readonly events: GuestEventLog;

  constructor(
    private readonly bus: PciBus,
    readonly space: 'memory' | 'io',
    readonly base: number,
    readonly size: number,
    options: { logger?: Logger } = {},
  ) {
    this.log = (options.logger ?? silentLogger).child({ device: `pci-${space}-window` });
    this.events = new GuestEventLog(this.log);
    bus.onBarRemap(() => this.rebuild());
    this.rebuild();
  }

  read(offset: number, data: Uint8Array): void {
    const hit = this.route(offset, data.length);
    if (!hit) {
      data.fill(0xff);
      return;
    }
    hit.bar.device.read(this.base + offset - hit.start, data);
  }

  write(offset: number, data: Uint8Array): void {
    const hit = this.route(offset, data.length);
    hit?.bar.device.write(this.base + offset - hit.start, data);
  }

  private route(offset: number, length: number): { start: number; bar: PciBar } | undefined {
    const addr = this.base + offset;
    return this.routes.find((r) => addr >= r.start && addr + length <= r.end);
  }

  private rebuild(): void {
    const routes: Array<{ start: number; end: number; bar: PciBar }> = [];
    for (const { device } of this.bus.devices) {
      for (const bar of device.bars) {
        const start = device.config.barAddress(bar.index);
        if (start === undefined || (bar.kind === 'io') !== (this.space === 'io')) continue;
        const end = start + bar.size;
        if (start < this.base || end > this.base + this.size) {
          this.events.warn('bar-outside', { device: device.name, bar: bar.index, address: start }, 'BAR outside the PCI window: not reachable');
          continue;
        }
        if (routes.some((r) => start < r.end && r.start < end)) {
          this.events.warn('bar-overlap', { device: device.name, bar: bar.index, address: start }, 'BAR overlaps another: not reachable');
          continue;
        }
        routes.push({ start, end, bar });
      }
    }
    this.routes = routes;
  }
}
