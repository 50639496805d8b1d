/**
 * KVM's coalesced I/O ring (KVM_CAP_COALESCED_MMIO / _PIO): writes to a
 * registered range do not exit to the VMM; KVM appends them to a ring in a
 * page of every vCPU's mmap, and the VMM replays them later, in order.
 *
 * Only writes whose effect may wait are registered: the UART's THR (its
 * output appears a little later). Ordering with everything else is kept
 * by draining the ring before any exit is handled: a write the guest made
 * before an exit is in the ring by the time that exit reaches the VMM. What
 * may still wait is a write followed by no exit at all (the guest went on
 * computing, or halted): the owner drains on a short timer while such
 * writes are expected (see the machine).
 *
 * struct kvm_coalesced_mmio_ring { u32 first, last; struct kvm_coalesced_mmio
 * entries[]; }, each entry { u64 phys_addr; u32 len; u32 pio; u8 data[8]; }.
 * KVM writes `last` (after the entry), the VMM `first`.
 */
import type { Bus } from '../base/bus.js';

const ENTRY_SIZE = 24;
const HEADER_SIZE = 8;

export class CoalescedRing {
  private readonly view: DataView;
  private readonly bytes: Uint8Array;
  /** Entries the ring holds (KVM_COALESCED_MMIO_MAX). */
  readonly capacity: number;
  /** Writes replayed. */
  replayed = 0;
  /** The ring's page in the vCPU mapping. */
  readonly pageOffset: number;

  /**
   * `run` is one vCPU's whole mmap (any vCPU's: the ring page is the VM's);
   * the ring is at `pageOffset` pages into it.
   */
  constructor(run: ArrayBuffer, pageOffset: number, pageSize: number) {
    if (pageOffset < 1 || run.byteLength < (pageOffset + 1) * pageSize) {
      throw new RangeError(`the vCPU mapping (${run.byteLength} bytes) holds no coalesced ring page at offset ${pageOffset}`);
    }
    this.pageOffset = pageOffset;
    this.view = new DataView(run, pageOffset * pageSize, pageSize);
    this.bytes = new Uint8Array(run, pageOffset * pageSize, pageSize);
    this.capacity = Math.floor((pageSize - HEADER_SIZE) / ENTRY_SIZE);
  }

  /** True when writes wait in the ring. */
  get pending(): boolean {
    return this.view.getUint32(0, true) !== this.view.getUint32(4, true);
  }

  /**
   * Replays every waiting write to its bus, oldest first. Entries KVM
   * wrote are trusted only as far as KVM checks them: an index or a length
   * out of range (which KVM never writes) stops the drain.
   */
  drain(pio: Bus, mmio: Bus): number {
    let first = this.view.getUint32(0, true);
    const last = this.view.getUint32(4, true);
    let n = 0;
    while (first !== last && first < this.capacity && last < this.capacity) {
      const at = HEADER_SIZE + first * ENTRY_SIZE;
      const addr = Number(this.view.getBigUint64(at, true));
      const len = this.view.getUint32(at + 8, true);
      const isPio = this.view.getUint32(at + 12, true) !== 0;
      if (len < 1 || len > 8) break;
      // A copy: the slot is KVM's again once `first` moves past it.
      const data = this.bytes.slice(at + 16, at + 16 + len);
      first = (first + 1) % this.capacity;
      this.view.setUint32(0, first, true);
      (isPio ? pio : mmio).write(addr, data);
      n++;
    }
    this.replayed += n;
    return n;
  }
}
