/**
 * Device managers: each owns the devices on one way into the guest. It
 * inserts a device into its bus at its range, gives it the interrupt line
 * for its GSI, and closes it at teardown. The machine's builder asks the
 * managers for devices; addresses and GSIs come from the layout module
 * (src/arch/layout.ts).
 *
 * - {@link LegacyDevices}: port I/O (the UART, PIT, i8042, CMOS, ACPI PM).
 * - {@link MmioDevices}: guest-physical MMIO (virtio-mmio slots, the PCI window).
 * - {@link PciDevices}: PCI bus 0, its configuration mechanism and BAR window.
 *
 * Teardown is total: {@link DeviceManager.close} closes every device, newest
 * first, even when one close throws; the failures are logged and returned.
 */
import type { Bus, BusDevice } from '../base/bus.js';
import type { IrqLine } from '../base/irq.js';
import { runLogged, silentLogger, type Logger } from '../base/log.js';
import * as layout from '../arch/layout.js';
import type { PciDevice } from '../devices/pci/device.js';
import { PciAllocator } from '../devices/pci/device.js';
import { PciBarRouter, PciBus, PciConfigIo } from '../devices/pci/pci-bus.js';

/** Where a managed device sits, as the manager reports it. */
export interface DevicePlacement {
  readonly name: string;
  readonly base: number;
  readonly size: number;
  /** The GSI its interrupt line drives, when it has one. */
  readonly gsi?: number;
}

/** How {@link BusDeviceManager.add} places a device. */
export interface DeviceSpec<T> extends DevicePlacement {
  /** Releases what the device holds (timers, fds); called once, at teardown. */
  close?: (device: T) => void;
}

/** Owns a set of things to close, and closes them all. */
export class DeviceManager {
  private readonly closers: Array<{ name: string; close: () => void }> = [];
  private closed = false;

  constructor(protected readonly log: Logger = silentLogger) {}

  /** Registers `close` to run at teardown, under `name` in the log. */
  onClose(name: string, close: () => void): void {
    if (this.closed) throw new Error(`${name}: the device manager is already closed`);
    this.closers.push({ name, close });
  }

  /**
   * Closes every device, newest first. A close that throws is logged and
   * the rest still close; the errors are returned. A second call does
   * nothing.
   */
  close(): Error[] {
    if (this.closed) return [];
    this.closed = true;
    const failures: Error[] = [];
    for (const { name, close } of this.closers.splice(0).reverse()) {
      const err = runLogged(this.log, 'device close failed', name, close);
      if (err) failures.push(err);
    }
    return failures;
  }
}

/** A device manager for one bus: port I/O or MMIO. */
export class BusDeviceManager extends DeviceManager {
  private readonly placed: DevicePlacement[] = [];

  constructor(
    readonly bus: Bus,
    private readonly irqFor: (gsi: number) => IrqLine,
    log?: Logger,
  ) {
    super(log);
  }

  /**
   * Builds a device with `make` (given the interrupt line for `spec.gsi`)
   * and maps it at `[spec.base, spec.base + spec.size)`. An overlap with a
   * device already there throws a BusError, after closing the new device.
   */
  add<T extends BusDevice>(spec: DeviceSpec<T>, make: (irq: IrqLine | undefined) => T): T {
    const device = make(spec.gsi === undefined ? undefined : this.irqFor(spec.gsi));
    try {
      this.bus.insert(device, spec.base, spec.size, spec.name);
    } catch (err) {
      spec.close?.(device);
      throw err;
    }
    const { close } = spec;
    if (close) this.onClose(spec.name, () => close(device));
    this.placed.push({ name: spec.name, base: spec.base, size: spec.size, ...(spec.gsi !== undefined ? { gsi: spec.gsi } : {}) });
    return device;
  }

  /** The devices placed so far, in the order they were added. */
  get devices(): readonly DevicePlacement[] {
    return this.placed;
  }
}

/** The port I/O devices: a {@link BusDeviceManager} on the PIO bus. */
export class LegacyDevices extends BusDeviceManager {}

/** The MMIO devices: a {@link BusDeviceManager} on the MMIO bus. */
export class MmioDevices extends BusDeviceManager {}

/**
 * PCI bus 0: configuration mechanism #1 on the legacy ports, one MMIO
 * window that routes each access to the BAR decoding there, and the
 * allocator that gives BARs their addresses in that window.
 */
export class PciDevices extends DeviceManager {
  readonly bus: PciBus;
  readonly allocator: PciAllocator;

  constructor(
    legacy: LegacyDevices,
    mmio: MmioDevices,
    private readonly irqFor: (gsi: number) => IrqLine,
    log: Logger = silentLogger,
  ) {
    super(log);
    this.bus = new PciBus({ logger: log.child({ dev: 'pci' }) });
    const window = { base: layout.PCI_MMIO_START, size: layout.PCI_MMIO_SIZE };
    this.allocator = new PciAllocator({ mmio32: window });
    legacy.add({ name: 'pci-config', base: layout.PCI_CONFIG_PORT, size: layout.PCI_CONFIG_PORT_SIZE }, () => new PciConfigIo(this.bus));
    mmio.add({ name: 'pci-mmio', base: window.base, size: window.size }, () => new PciBarRouter(this.bus, 'memory', window.base, window.size));
  }

  /** The INTA# line of the device in `slot`: its GSI (the layout's swizzle) and the line. */
  intx(slot: number): { gsi: number; line: IrqLine } {
    const gsi = layout.pciIntxGsi(slot, layout.PCI_INTERRUPT_PIN_INTA_INDEX);
    return { gsi, line: this.irqFor(gsi) };
  }

  /**
   * Puts `device` in the next free slot (or `slot`), calls `wire` (which
   * may listen for BAR moves: the first comes next), gives its BARs
   * addresses, and registers `close` for teardown. Returns the slot.
   */
  add(device: PciDevice, options: { slot?: number; wire?: (slot: number) => void; close?: () => void } = {}): number {
    const slot = this.bus.add(device, options.slot);
    if (options.close) this.onClose(device.name, options.close);
    options.wire?.(slot);
    this.allocator.assign(device);
    return slot;
  }

  /** The slot the next {@link add} without a slot will take. */
  get nextSlot(): number {
    return this.bus.devices.length;
  }
}
