/**
 * What a PCI function implements, and the firmware step that gives its
 * BARs addresses before the guest runs.
 */
import type { BusDevice } from '../../base/bus.js';
import { PCI_BAR0, PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MEMORY, type PciBarKind, type PciConfigSpace } from './config-space.js';
import { PciError } from './errors.js';

/** One implemented BAR: its registers are in `config`, its contents are `device`. */
export interface PciBar {
  readonly index: number;
  readonly size: number;
  readonly kind: PciBarKind;
  /** Serves accesses to the BAR; offsets are from the BAR's base. */
  readonly device: BusDevice;
}

/** A PCI function (function 0 of a slot on bus 0). */
export interface PciDevice {
  readonly name: string;
  readonly config: PciConfigSpace;
  /** A BusDevice per implemented BAR, matching the BARs defined in `config`. */
  readonly bars: ReadonlyArray<PciBar>;
}

/** A range of guest physical addresses (or ports) set aside for BARs. */
export interface PciWindow {
  readonly base: number;
  readonly size: number;
}

export interface PciAllocatorWindows {
  /** Below 4 GiB: 32-bit memory BARs, and 64-bit ones when there is no `mmio64`. */
  readonly mmio32: PciWindow;
  /** 64-bit memory BARs. */
  readonly mmio64?: PciWindow;
  /** I/O BARs (ports). */
  readonly io?: PciWindow;
}

type WindowName = keyof PciAllocatorWindows;

/**
 * Assigns BAR addresses as firmware does before handing over to the OS:
 * each BAR naturally aligned in its window, then decoding enabled in the
 * Command register. The guest may move BARs later; the BAR remap
 * callbacks tell the VMM.
 */
export class PciAllocator {
  private readonly next = new Map<WindowName, number>();

  constructor(private readonly windows: PciAllocatorWindows) {
    for (const [name, window] of Object.entries(windows) as Array<[WindowName, PciWindow | undefined]>) {
      if (window) this.next.set(name, window.base);
    }
  }

  /**
   * Programs every BAR of `device` (largest first, which wastes least to
   * alignment) and enables I/O and memory decoding as needed. Returns the
   * address of each BAR by index. Throws a {@link PciError} when a BAR
   * does not fit; nothing is enabled then.
   */
  assign(device: PciDevice): Map<number, number> {
    const addresses = new Map<number, number>();
    let command = device.config.command;
    for (const bar of [...device.bars].sort((a, b) => b.size - a.size)) {
      const address = this.take(device.name, bar);
      const offset = PCI_BAR0 + 4 * bar.index;
      device.config.writeU32(offset, address % 0x1_0000_0000);
      if (bar.kind === 'mem64') device.config.writeU32(offset + 4, Math.floor(address / 0x1_0000_0000));
      addresses.set(bar.index, address);
      command |= bar.kind === 'io' ? PCI_COMMAND_IO : PCI_COMMAND_MEMORY;
    }
    const b = new Uint8Array(2);
    new DataView(b.buffer).setUint16(0, command, true);
    device.config.write(PCI_COMMAND, b);
    return addresses;
  }

  private take(deviceName: string, bar: PciBar): number {
    const name: WindowName = bar.kind === 'io' ? 'io' : bar.kind === 'mem64' && this.windows.mmio64 ? 'mmio64' : 'mmio32';
    const window = this.windows[name];
    const next = this.next.get(name);
    if (!window || next === undefined) {
      throw new PciError('PCI_NO_WINDOW', `${deviceName} BAR ${bar.index} (${bar.kind}): no ${name} window to put it in`);
    }
    const address = Math.ceil(next / bar.size) * bar.size;
    const end = window.base + window.size;
    if (address + bar.size > end) {
      throw new PciError(
        'PCI_WINDOW_FULL',
        `${deviceName} BAR ${bar.index} (${bar.kind}, 0x${bar.size.toString(16)} bytes) does not fit in the ${name} window ` +
          `0x${window.base.toString(16)}..0x${end.toString(16)} (next free 0x${next.toString(16)})`,
      );
    }
    this.next.set(name, address + bar.size);
    return address;
  }
}
