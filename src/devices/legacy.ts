/**
 * Stubs for legacy ports that a guest touches but that need no behaviour:
 * the POST diagnostic port and ranges Linux probes for hardware we do not
 * emulate. Mapping them keeps those accesses out of the bus's "unhandled"
 * counts and answers them the way absent or trivial hardware would.
 */
import type { BusDevice } from '../base/bus.js';
import { silentLogger, type Logger } from '../base/log.js';

export interface DebugPortOptions {
  logger?: Logger;
}

/**
 * Port 0x80, where firmware writes POST progress codes and Linux writes
 * for a short delay. Reads give 0; writes are counted and the last value kept.
 */
export class DebugPort implements BusDevice {
  /** Writes seen. */
  writes = 0;
  /** The last byte written, or null before any write. */
  lastValue: number | null = null;
  private readonly log: Logger;

  constructor(options: DebugPortOptions = {}) {
    this.log = (options.logger ?? silentLogger).child({ device: 'post' });
  }

  read(_offset: number, data: Uint8Array): void {
    data.fill(0);
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    this.writes++;
    this.lastValue = data[0]!;
    // Trace, not debug: Linux writes here on every slow I/O access.
    this.log.trace({ offset, value: this.lastValue }, 'POST code');
  }
}

export interface IgnoredPortsOptions {
  /**
   * The byte every read returns: 0xff (default) is an open bus, what a probe
   * of absent ISA hardware sees; 0x00 for ports that must read as idle.
   */
  readValue?: number;
  /** For log messages. */
  name?: string;
  logger?: Logger;
}

/**
 * A range of ports answered with a fixed byte and writes dropped, all
 * counted. Use it for hardware Linux probes that this machine does not
 * have (COM2-COM4, the floppy or parallel port controllers...).
 */
export class IgnoredPorts implements BusDevice {
  /** Reads and writes seen. */
  readonly stats = { reads: 0, writes: 0 };
  private readonly readValue: number;
  private readonly log: Logger;

  constructor(options: IgnoredPortsOptions = {}) {
    this.readValue = (options.readValue ?? 0xff) & 0xff;
    this.log = (options.logger ?? silentLogger).child({ device: options.name ?? 'ignored-ports' });
  }

  read(offset: number, data: Uint8Array): void {
    this.stats.reads++;
    data.fill(this.readValue);
    this.log.debug({ offset, size: data.length }, 'read of an ignored port');
  }

  write(offset: number, data: Uint8Array): void {
    this.stats.writes++;
    this.log.debug({ offset, size: data.length, value: data[0] }, 'write to an ignored port dropped');
  }
}
