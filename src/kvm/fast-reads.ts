/**
 * The fast-read table: port reads the addon answers itself, on the vCPU's
 * thread, without an exit to JavaScript (`ServeFastRead` in native/kvm.cc,
 * which documents the layout). A device keeps its entry's value current
 * through a {@link ReadMirror}; while an entry holds no value, reads of
 * its port reach the device as before. One table serves every vCPU of a VM.
 *
 * A read the addon answers does not drain the coalesced ring, as an exit
 * handled here does: writes queued there (a console's THR bytes) wait for
 * the owner's drain timer. So that a guest that starts printing after a
 * quiet spell is not kept waiting for a slow timer, the owner arms
 * {@link armNotify}: the next fast read made while the ring holds writes
 * exits after all (and disarms it), and the owner, seeing it disarmed,
 * drains on a short timer while output flows.
 */
import type { ReadMirror } from '../base/bus.js';
import type { NativeAddon } from './native.js';

/** Entries a table holds (kMaxFastReads). */
export const MAX_FAST_READS = 4;
const HEADER = 4;
const ENTRY = 4;
export const FAST_READ_SLOTS = HEADER + ENTRY * MAX_FAST_READS;

export class FastReadTable {
  private readonly ports: number[] = [];

  /**
   * A table over `slots`: for a vCPU, memory the addon allocated (see
   * {@link FastReadTable.shared}), which the addon requires; a plain
   * array serves device models' unit tests.
   */
  constructor(readonly slots: Int32Array = new Int32Array(FAST_READ_SLOTS)) {
    if (slots.length < FAST_READ_SLOTS) throw new RangeError(`a fast-read table needs ${FAST_READ_SLOTS} slots, not ${slots.length}`);
  }

  /** A table the addon's vCPUs can be given: its slots are in memory the addon allocated (allocShared), which JavaScript cannot transfer away. */
  static shared(addon: Pick<NativeAddon, 'allocShared'>): FastReadTable {
    return new FastReadTable(new Int32Array(addon.allocShared(FAST_READ_SLOTS * Int32Array.BYTES_PER_ELEMENT)));
  }

  /** The coalesced ring's page in the vCPU mapping, or 0 for none (the default). */
  set ringPage(page: number) {
    this.slots[1] = page;
  }

  /** Serves 1-byte reads of `port` from the value its mirror publishes (none yet). */
  add(port: number): ReadMirror {
    if (!Number.isInteger(port) || port < 0 || port > 0xffff) throw new RangeError(`fast-read port must be 0..0xffff, not ${port}`);
    if (this.ports.includes(port)) throw new RangeError(`port 0x${port.toString(16)} has a fast-read entry already`);
    const i = this.ports.length;
    if (i >= MAX_FAST_READS) throw new RangeError(`a fast-read table holds ${MAX_FAST_READS} ports`);
    const at = HEADER + ENTRY * i;
    this.slots[at] = port;
    this.slots[at + 1] = -1;
    this.ports.push(port);
    this.slots[2] = this.ports.length;
    const slots = this.slots;
    return {
      publish(value: number | undefined): void {
        slots[at + 1] = value === undefined ? -1 : value & 0xff;
      },
    };
  }

  /** Reads of `port` the addon answered, over every vCPU. */
  hits(port: number): number {
    const i = this.ports.indexOf(port);
    if (i < 0) return 0;
    const at = HEADER + ENTRY * i + 2;
    return (this.slots[at]! >>> 0) + (this.slots[at + 1]! >>> 0) * 2 ** 32;
  }

  /** Reads answered over every port and vCPU. */
  get totalHits(): number {
    return this.ports.reduce((n, p) => n + this.hits(p), 0);
  }

  /** Asks for the next fast read made while the coalesced ring holds writes to exit after all. */
  armNotify(): void {
    this.slots[0] = 1;
  }

  /** True until such a read came (or {@link disarmNotify}). */
  get notifyArmed(): boolean {
    return this.slots[0] !== 0;
  }

  disarmNotify(): void {
    this.slots[0] = 0;
  }
}
