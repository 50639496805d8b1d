/**
 * pvpanic: one I/O port through which a guest tells the VMM it panicked
 * (QEMU docs/specs/pvpanic.rst). A read returns the events the device
 * supports; the guest writes the event that happened. Linux finds it as the
 * ACPI device QEMU0001 (drivers/misc/pvpanic/pvpanic-mmio.c, which takes an
 * I/O resource as well) and writes on its panic notifier, only the events
 * the read advertised.
 *
 * Mapping: one port, `bus.insert(pvpanic, PVPANIC_PORT, 1, 'pvpanic')`.
 */
import type { BusDevice } from '../base/bus.js';
import { silentLogger, type Logger } from '../base/log.js';

/** Event bits (pvpanic.rst; Linux include/uapi/misc/pvpanic.h). */
export const PVPANIC_EVENT = {
  /** The guest panicked. */
  PANICKED: 1 << 0,
  /** The guest panicked and a crash kernel (kdump) is loaded and will run. */
  CRASH_LOADED: 1 << 1,
} as const;

/** The events this device offers: a read of the port returns them. */
export const PVPANIC_SUPPORTED_EVENTS = PVPANIC_EVENT.PANICKED | PVPANIC_EVENT.CRASH_LOADED;

export interface PvPanicOptions {
  /** Called when the guest reports a panic. */
  onPanic: () => void;
  /** Called when the guest reports a panic that a loaded crash kernel will handle. */
  onCrashLoaded?: () => void;
  /**
   * Called on the first read of the port: Linux's pvpanic driver reads the
   * supported events when it binds, so from then on a panic will be
   * reported here (and the VMM need not read the console to learn of it).
   */
  onProbe?: () => void;
  logger?: Logger;
}

/** Counters; read them, do not write them. */
export interface PvPanicStats {
  /** Reads of the supported events (a driver binding). */
  probes: number;
  panics: number;
  crashLoaded: number;
  /** Writes carrying bits this device does not define (the bits are ignored). */
  unknownEvents: number;
  oddAccesses: number;
}

/** The pvpanic port. Guest accesses never throw. */
export class PvPanic implements BusDevice {
  readonly stats: PvPanicStats = { probes: 0, panics: 0, crashLoaded: 0, unknownEvents: 0, oddAccesses: 0 };
  private readonly onPanic: () => void;
  private readonly onProbe: () => void;
  private readonly onCrashLoaded: () => void;
  private readonly log: Logger;

  constructor(options: PvPanicOptions) {
    this.onPanic = options.onPanic;
    this.onCrashLoaded = options.onCrashLoaded ?? (() => {});
    this.onProbe = options.onProbe ?? (() => {});
    this.log = (options.logger ?? silentLogger).child({ device: 'pvpanic' });
  }

  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (data.length === 0) return;
    if (offset !== 0 || data.length !== 1) this.oddAccess('read', offset, data.length);
    if (offset !== 0) return;
    data[0] = PVPANIC_SUPPORTED_EVENTS;
    if (this.stats.probes++ === 0) this.onProbe();
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (offset !== 0) {
      this.oddAccess('write', offset, data.length);
      return;
    }
    if (data.length !== 1) this.oddAccess('write', offset, data.length);
    const events = data[0]!;
    if (events & ~PVPANIC_SUPPORTED_EVENTS) {
      this.stats.unknownEvents++;
      this.log.debug({ events }, 'unknown pvpanic event bits ignored');
    }
    if (events & PVPANIC_EVENT.PANICKED) {
      this.stats.panics++;
      this.log.warn('guest reported a panic (pvpanic)');
      this.onPanic();
    }
    if (events & PVPANIC_EVENT.CRASH_LOADED) {
      this.stats.crashLoaded++;
      this.log.warn('guest panicked; its crash kernel is loaded (pvpanic)');
      this.onCrashLoaded();
    }
  }

  private oddAccess(kind: 'read' | 'write', offset: number, size: number): void {
    this.stats.oddAccesses++;
    this.log.debug({ kind, offset, size }, 'pvpanic access other than one byte at offset 0');
  }
}
