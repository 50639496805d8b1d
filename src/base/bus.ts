/**
 * Port-I/O and MMIO buses: address ranges mapped to devices. The vCPU loop
 * hands every I/O exit to a bus; the bus finds the device by range and
 * passes it the offset within its range.
 */
import { TsvmmError } from './errors.js';

/**
 * What a device on a bus implements. `data.length` is the access size
 * (1, 2, 4 or 8). A read fills `data`; a write consumes it. Both are
 * synchronous: the vCPU waits for them.
 */
export interface BusDevice {
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

export class BusError extends TsvmmError {
  constructor(message: string) {
    super('ERR_TSVMM_BUS_OVERLAP', message);
  }
}

export interface BusRange {
  readonly base: number;
  readonly length: number;
  readonly name: string;
  readonly device: BusDevice;
}

export class Bus {
  private ranges: BusRange[] = [];
  /** Accesses that hit no device, by address. */
  readonly unhandled = new Map<number, number>();
  /** Accesses each device range served, by range name. */
  readonly accesses = new Map<string, number>();

  constructor(readonly name: string) {}

  /** Maps `device` at `[base, base + length)`. Refuses overlaps. */
  insert(device: BusDevice, base: number, length: number, name: string): void {
    if (!(length > 0)) throw new BusError(`${this.name}: ${name} has an empty range`);
    for (const r of this.ranges) {
      if (base < r.base + r.length && r.base < base + length) {
        throw new BusError(
          `${this.name}: ${name} at 0x${base.toString(16)}+0x${length.toString(16)} overlaps ${r.name} at 0x${r.base.toString(16)}+0x${r.length.toString(16)}`,
        );
      }
    }
    this.ranges.push({ base, length, name, device });
    this.ranges.sort((a, b) => a.base - b.base);
  }

  /**
   * Unmaps the range named `name` (a PCI BAR the guest moves or stops
   * decoding). Returns false when no range has that name.
   */
  remove(name: string): boolean {
    const i = this.ranges.findIndex((r) => r.name === name);
    if (i < 0) return false;
    this.ranges.splice(i, 1);
    return true;
  }

  /** The range holding `addr`, if any. */
  find(addr: number): BusRange | undefined {
    // Few ranges (tens): a linear scan beats anything cleverer here.
    for (const r of this.ranges) {
      if (addr >= r.base && addr < r.base + r.length) return r;
    }
    return undefined;
  }

  get entries(): readonly BusRange[] {
    return this.ranges;
  }

  /**
   * Reads from the device at `addr`. With no device there, `data` is filled
   * with all-ones (an open bus) and false is returned.
   */
  read(addr: number, data: Uint8Array): boolean {
    const r = this.find(addr);
    if (!r) {
      data.fill(0xff);
      this.countUnhandled(addr);
      return false;
    }
    this.accesses.set(r.name, (this.accesses.get(r.name) ?? 0) + 1);
    r.device.read(addr - r.base, data);
    return true;
  }

  /** Writes to the device at `addr`; with no device there the write is dropped. */
  write(addr: number, data: Uint8Array): boolean {
    const r = this.find(addr);
    if (!r) {
      this.countUnhandled(addr);
      return false;
    }
    this.accesses.set(r.name, (this.accesses.get(r.name) ?? 0) + 1);
    r.device.write(addr - r.base, data);
    return true;
  }

  private countUnhandled(addr: number): void {
    this.unhandled.set(addr, (this.unhandled.get(addr) ?? 0) + 1);
  }
}

/**
 * Where a device publishes the value a read of one of its registers would
 * return, for the VMM to answer that read without calling the device (a
 * UART's line status, read before every byte a console prints): `publish`
 * with the byte, after every change of what the read would return, or with
 * `undefined` while the read has side effects or depends on more than the
 * device's state, so that it reaches the device as usual.
 */
export interface ReadMirror {
  publish(value: number | undefined): void;
}
