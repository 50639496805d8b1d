/**
 * The split virtqueue (virtio 1.2 section 2.7), device side.
 *
 * The queue holds no memory: the guest memory is passed to every call, as
 * in rust-vmm's virtio-queue. Everything in the rings is written by the
 * guest, which may be hostile: each index, address and length is checked,
 * and a malformed ring is a {@link QueueError} (the device answers it with
 * DEVICE_NEEDS_RESET), never an exception escaping the VMM or an access
 * outside guest RAM.
 *
 * Layout (all little-endian):
 *   descriptor table: size x { addr u64, len u32, flags u16, next u16 }
 *   available ring:   flags u16, idx u16, ring[size] u16, used_event u16
 *   used ring:        flags u16, idx u16, ring[size] { id u32, len u32 }, avail_event u16
 *
 * Memory ordering. The driver runs on vCPU threads while the device code
 * runs on the Node main thread, both on the same guest RAM. On x86-64 (TSO)
 * the hardware keeps stores in program order and loads in program order;
 * the only reordering it does is a later load passing an earlier store
 * (the store buffer). V8 emits typed-array and DataView accesses in program
 * order (they are all on one effect chain; it may drop a store that is
 * overwritten before any load, which is harmless here). So:
 *  - publishing a used element (write the element, then `used.idx`) and
 *    reading a chain after `avail.idx` need no barrier: store->store and
 *    load->load are ordered on x86;
 *  - the two store->load pairs of notification suppression do need a full
 *    barrier: "write used.idx, then read used_event/avail.flags" (else we
 *    may skip an interrupt the driver waits for) and "write avail_event /
 *    clear NO_NOTIFY, then re-read avail.idx" (else we may sleep on a
 *    buffer the driver already posted without notifying). JavaScript has no
 *    fence, but an Atomics read-modify-write compiles to a LOCK-prefixed
 *    instruction, which on x86 is a full barrier for all memory, shared or
 *    not: {@link fullFence} is one on a private cell.
 * This reasoning is x86-specific; an arm64 port would need barriers for
 * the first two cases as well.
 */
import { GuestMemoryError, type GuestMemory } from '../base/memory.js';
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, hasFeature } from './features.js';
import { TsvmmKindError } from '../base/errors.js';

/** Descriptor flags (virtio 1.2 section 2.7.5). */
export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
/** avail.flags: the driver does not want used buffer notifications (without EVENT_IDX). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** used.flags: the device does not want available buffer notifications (without EVENT_IDX). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;

export const DESCRIPTOR_SIZE = 16;
/**
 * How much of a ring a device takes in one event-loop turn: after this
 * many chains, or chains of this many descriptors in all, it continues in
 * a later turn, so one guest cannot starve the console, the timers or
 * other devices (a full 256-entry ring of 256-descriptor chains is 65,536
 * descriptors).
 */
export const CHAINS_PER_TURN = 64;
export const DESCRIPTORS_PER_TURN = 2048;

/**
 * A device's work continued in a later event-loop turn (setImmediate),
 * once: scheduling it again before it ran does nothing.
 */
export class LaterTurn {
  private pending = false;

  constructor(private readonly run: () => void) {}

  /** True between schedule() and the run. */
  get scheduled(): boolean {
    return this.pending;
  }

  schedule(): void {
    if (this.pending) return;
    this.pending = true;
    setImmediate(() => {
      this.pending = false;
      this.run();
    });
  }
}
/**
 * Serves a device-readable queue (transmit-like: the device only reads):
 * pops every available chain and hands it to `take`, which returns the
 * length the device wrote into it (0 for output), with notifications
 * suppressed meanwhile and re-checked at the end (no lost kick). Stops
 * after {@link CHAINS_PER_TURN} chains or {@link DESCRIPTORS_PER_TURN}
 * descriptors and schedules `later` for the rest. Returns true when a
 * chain was used (the caller decides on the interrupt). Queue errors
 * propagate.
 */
export function serveChains(
  queue: Queue,
  mem: GuestMemory,
  later: LaterTurn,
  take: (chain: DescriptorChain) => number,
  /** A device's own budget for the turn (bytes, say): true ends the turn early, as the counts do. */
  spent?: () => boolean,
): boolean {
  let used = false;
  let chains = 0;
  let descriptors = 0;
  do {
    queue.disableNotification(mem);
    for (let chain = queue.pop(mem); chain; chain = queue.pop(mem)) {
      queue.addUsed(mem, chain.head, take(chain));
      used = true;
      descriptors += chain.descriptors.length;
      if (++chains >= CHAINS_PER_TURN || descriptors >= DESCRIPTORS_PER_TURN || spent?.()) {
        later.schedule();
        return used;
      }
    }
  } while (queue.enableNotification(mem));
  return used;
}

/** The largest split queue (virtio 1.2 section 2.7). */
export const MAX_QUEUE_SIZE = 32768;

export type QueueErrorKind =
  /** A ring or descriptor table access fell outside guest RAM. */
  | 'ring-out-of-range'
  /** avail.idx moved more than the queue size past the device's position. */
  | 'avail-index-jump'
  /** A head or `next` index beyond the (indirect) table. */
  | 'descriptor-index-out-of-range'
  /** More hops than the table has entries: a loop or an over-long chain. */
  | 'chain-too-long'
  /** A buffer (addr, len) not inside guest RAM. */
  | 'buffer-out-of-range'
  /** A head made available again while the device still uses it (not yet in the used ring). */
  | 'head-in-use'
  /** INDIRECT used although VIRTIO_F_INDIRECT_DESC was not negotiated. */
  | 'indirect-not-negotiated'
  /** INDIRECT together with NEXT (forbidden by 2.7.5.3.1). */
  | 'indirect-with-next'
  /** An indirect table of length 0 or not a multiple of 16. */
  | 'indirect-table-bad-length'
  /** An INDIRECT descriptor inside an indirect table. */
  | 'nested-indirect'
  /**
   * A device asked a chain reader/writer for more bytes than the chain has
   * in that direction. A malformed request, not a malformed ring: devices
   * answer it per request (error status), not with a reset.
   */
  | 'chain-too-short';

/** A malformed ring or chain. `fatal` ones mean the device needs a reset. */
export class QueueError extends TsvmmKindError<QueueErrorKind> {
  constructor(kind: QueueErrorKind, message: string, options?: { cause?: unknown }) {
    super('QUEUE_', kind, message, options);
  }

  /** True when the ring itself is broken (everything but 'chain-too-short'). */
  get fatal(): boolean {
    return this.kind !== 'chain-too-short';
  }
}

/** One buffer of a chain, in guest physical memory. */
export interface Descriptor {
  readonly addr: number;
  readonly len: number;
  /** Device-writable (VIRTQ_DESC_F_WRITE); otherwise device-readable. */
  readonly writable: boolean;
}

/** A used element to publish. */
export interface UsedElement {
  readonly head: number;
  readonly len: number;
}

// One cell for Atomics: see the memory ordering note at the top.
const fenceCell = new Int32Array(new SharedArrayBuffer(4));

/** A full memory barrier (a LOCK-prefixed read-modify-write on x86). */
export function fullFence(): void {
  Atomics.add(fenceCell, 0, 0);
}

function toAddress(value: bigint): number | undefined {
  return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : undefined;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** A descriptor chain popped from the available ring. */
export class DescriptorChain {
  constructor(
    /** The head descriptor index: what {@link Queue.addUsed} reports back. */
    readonly head: number,
    /** The buffers in chain order, indirect tables expanded. */
    readonly descriptors: readonly Descriptor[],
  ) {}

  /** Total bytes of device-readable buffers. */
  get readableLength(): number {
    return this.descriptors.reduce((n, d) => (d.writable ? n : n + d.len), 0);
  }

  /** Total bytes of device-writable buffers. */
  get writableLength(): number {
    return this.descriptors.reduce((n, d) => (d.writable ? n + d.len : n), 0);
  }

  /** True when no readable descriptor follows a writable one (the order 2.7.4 requires). */
  get readablesFirst(): boolean {
    let seenWritable = false;
    for (const d of this.descriptors) {
      if (d.writable) seenWritable = true;
      else if (seenWritable && d.len > 0) return false;
    }
    return true;
  }

  /** A reader over the device-readable buffers only. */
  reader(mem: GuestMemory): ChainReader {
    return new ChainReader(
      mem,
      this.descriptors.filter((d) => !d.writable),
    );
  }

  /** A writer over the device-writable buffers only. */
  writer(mem: GuestMemory): ChainWriter {
    return new ChainWriter(
      mem,
      this.descriptors.filter((d) => d.writable),
    );
  }
}

/**
 * A cursor over a list of guest buffers seen as one byte stream. The
 * buffers were checked against guest memory when the chain was popped.
 */
abstract class ChainCursor {
  /** Total bytes in the stream. */
  readonly length: number;
  private consumed = 0;
  /** End of the usable stream: takeTail() moves it down. */
  private limit: number;

  constructor(
    protected readonly mem: GuestMemory,
    protected readonly segments: readonly Descriptor[],
    private readonly direction: 'readable' | 'writable',
  ) {
    this.length = segments.reduce((n, d) => n + d.len, 0);
    this.limit = this.length;
  }

  /** Bytes not yet consumed. */
  get remaining(): number {
    return this.limit - this.consumed;
  }

  /** Bytes consumed so far. */
  get position(): number {
    return this.consumed;
  }

  /** Skips `n` bytes; throws 'chain-too-short' if there are fewer. */
  skip(n: number): void {
    this.views(n);
  }

  /**
   * Views (not copies) of the next `n` bytes of guest memory, consuming
   * them. Throws 'chain-too-short' when fewer remain.
   */
  views(n: number): Uint8Array[] {
    this.need(n);
    const out = this.rangeViews(this.consumed, n);
    this.consumed += n;
    return out;
  }

  /**
   * Splits off the last `n` bytes (a trailing status byte, say) and
   * returns views of them; the stream then ends before them. Throws
   * 'chain-too-short' when fewer than `n` bytes remain.
   */
  takeTail(n: number): Uint8Array[] {
    this.need(n);
    this.limit -= n;
    return this.rangeViews(this.limit, n);
  }

  private need(n: number): void {
    if (!Number.isInteger(n) || n < 0 || n > this.remaining) {
      throw new QueueError('chain-too-short', `chain has ${this.remaining} device-${this.direction} bytes left, ${n} needed`);
    }
  }

  /** Views of stream bytes [start, start + n). */
  private rangeViews(start: number, n: number): Uint8Array[] {
    const out: Uint8Array[] = [];
    let skip = start;
    let left = n;
    for (const seg of this.segments) {
      if (left === 0) break;
      if (skip >= seg.len) {
        skip -= seg.len;
        continue;
      }
      const take = Math.min(left, seg.len - skip);
      out.push(this.slice(seg.addr + skip, take));
      skip = 0;
      left -= take;
    }
    return out;
  }

  private slice(addr: number, len: number): Uint8Array {
    try {
      return this.mem.slice(addr, len);
    } catch (err) {
      // Only if guest RAM changed since pop(); kept as a chain error.
      throw new QueueError('buffer-out-of-range', (err as Error).message, { cause: err });
    }
  }
}

/** Reads the device-readable part of a chain; it cannot touch writable buffers. */
export class ChainReader extends ChainCursor {
  constructor(mem: GuestMemory, readable: readonly Descriptor[]) {
    super(mem, readable, 'readable');
  }

  /** Copies up to `dst.length` bytes into `dst`; returns how many. */
  read(dst: Uint8Array): number {
    const n = Math.min(dst.length, this.remaining);
    let at = 0;
    for (const v of this.views(n)) {
      dst.set(v, at);
      at += v.length;
    }
    return n;
  }

  /** A copy of exactly `n` bytes; throws 'chain-too-short' if fewer remain. */
  readExact(n: number): Uint8Array {
    const out = new Uint8Array(n);
    let at = 0;
    for (const v of this.views(n)) {
      out.set(v, at);
      at += v.length;
    }
    return out;
  }
}

/** Writes the device-writable part of a chain; it cannot touch readable buffers. */
export class ChainWriter extends ChainCursor {
  constructor(mem: GuestMemory, writable: readonly Descriptor[]) {
    super(mem, writable, 'writable');
  }

  /** Copies as much of `src` as fits; returns how many bytes were written. */
  write(src: Uint8Array): number {
    const n = Math.min(src.length, this.remaining);
    let at = 0;
    for (const v of this.views(n)) {
      v.set(src.subarray(at, at + v.length));
      at += v.length;
    }
    return n;
  }

  /** Writes all of `src`; throws 'chain-too-short' (writing nothing) if it does not fit. */
  writeExact(src: Uint8Array): void {
    if (src.length > this.remaining) this.views(src.length);
    this.write(src);
  }

  /** Writes `n` zero bytes; throws 'chain-too-short' if fewer remain. */
  fill(n: number, value = 0): void {
    for (const v of this.views(n)) v.fill(value);
  }
}

/**
 * One split virtqueue. The transport sets `size`, `ready` and the three
 * addresses from the driver's register writes; the device pops chains and
 * adds used elements.
 */
export class Queue {
  /** Queue size in use (QueueNum); defaults to the maximum. */
  size: number;
  /** QueueReady: the device must not touch the rings while this is false. */
  ready = false;
  /** Guest physical addresses of the Descriptor, Driver (avail) and Device (used) areas. */
  descTable = 0;
  availRing = 0;
  usedRing = 0;

  private eventIdx = false;
  private indirect = false;
  private nextAvailIdx = 0;
  private nextUsedIdx = 0;
  /** used.idx at the last needsNotification() call (for EVENT_IDX). */
  private signalledUsed = 0;
  /**
   * 1 for each head popped and not yet added as used. A driver may post a
   * head again only after the device used it (2.7.13), so this also bounds
   * the chains in flight by the queue size.
   */
  private readonly inUse: Uint8Array;
  private inUseCount = 0;

  constructor(readonly maxSize: number) {
    if (!isPowerOfTwo(maxSize) || maxSize > MAX_QUEUE_SIZE) {
      throw new RangeError(`queue size ${maxSize} must be a power of two up to ${MAX_QUEUE_SIZE}`);
    }
    this.size = maxSize;
    this.inUse = new Uint8Array(maxSize);
  }

  /** Chains popped and not yet added as used: at most the queue size. */
  get inFlight(): number {
    return this.inUseCount;
  }

  /** The index of the next avail ring entry the device will read. */
  get nextAvail(): number {
    return this.nextAvailIdx;
  }

  /** The value used.idx has after the device's last used element. */
  get nextUsed(): number {
    return this.nextUsedIdx;
  }

  /** True when VIRTIO_F_EVENT_IDX was negotiated. */
  get eventIdxEnabled(): boolean {
    return this.eventIdx;
  }

  /** Back to the state after a device reset. */
  reset(): void {
    this.size = this.maxSize;
    this.ready = false;
    this.descTable = 0;
    this.availRing = 0;
    this.usedRing = 0;
    this.eventIdx = false;
    this.indirect = false;
    this.nextAvailIdx = 0;
    this.nextUsedIdx = 0;
    this.signalledUsed = 0;
    this.inUse.fill(0);
    this.inUseCount = 0;
  }

  /** Applies the negotiated ring features (called by the transport at DRIVER_OK). */
  setNegotiatedFeatures(features: bigint): void {
    this.eventIdx = hasFeature(features, VIRTIO_F_EVENT_IDX);
    this.indirect = hasFeature(features, VIRTIO_F_INDIRECT_DESC);
  }

  /**
   * Checks the driver's configuration of a ready queue: a power-of-two
   * size within the maximum, aligned areas inside guest RAM. Returns what
   * is wrong, or undefined.
   */
  validate(mem: GuestMemory): string | undefined {
    const size = this.size;
    if (!isPowerOfTwo(size) || size > this.maxSize) {
      return `size ${size} is not a power of two in 1..${this.maxSize}`;
    }
    const areas: Array<[string, number, number, number]> = [
      ['descriptor table', this.descTable, DESCRIPTOR_SIZE * size, 16],
      ['available ring', this.availRing, 6 + 2 * size, 2],
      ['used ring', this.usedRing, 6 + 8 * size, 4],
    ];
    for (const [name, addr, len, align] of areas) {
      if (addr % align !== 0) return `${name} at 0x${addr.toString(16)} is not ${align}-byte aligned`;
      if (!mem.checkRange(addr, len)) {
        return `${name} at 0x${addr.toString(16)} (${len} bytes) is outside guest memory`;
      }
    }
    return undefined;
  }

  /** How many chains the driver has made available and the device not yet popped. */
  availableCount(mem: GuestMemory): number {
    if (!this.ready) return 0;
    const availIdx = this.availIndex(mem);
    const pending = (availIdx - this.nextAvailIdx) & 0xffff;
    if (pending > this.size) {
      throw new QueueError('avail-index-jump', `avail.idx ${availIdx} is ${pending} entries past the device's ${this.nextAvailIdx} (queue size ${this.size})`);
    }
    return pending;
  }

  /** True when at least one chain is waiting. */
  hasAvailable(mem: GuestMemory): boolean {
    return this.availableCount(mem) > 0;
  }

  /**
   * Takes the next available chain, or undefined when there is none (or
   * the queue is not ready). Throws a fatal {@link QueueError} when the
   * ring or the chain is malformed, or when the head is still in use; the
   * entry is consumed either way. The head stays in use until addUsed().
   */
  pop(mem: GuestMemory): DescriptorChain | undefined {
    if (this.availableCount(mem) === 0) return undefined;
    const slot = this.nextAvailIdx & (this.size - 1);
    const head = this.ringRead(() => mem.readU16(this.availRing + 4 + 2 * slot));
    this.nextAvailIdx = (this.nextAvailIdx + 1) & 0xffff;
    if (head < this.size && this.inUse[head]) {
      throw new QueueError('head-in-use', `head descriptor ${head} made available again before the device used it (${this.inUseCount} chains in use)`);
    }
    const chain = new DescriptorChain(head, this.walk(mem, head));
    this.inUse[head] = 1;
    this.inUseCount++;
    return chain;
  }

  /** Publishes one used element: the element first, then used.idx. */
  addUsed(mem: GuestMemory, head: number, len: number): void {
    this.addUsedMany(mem, [{ head, len }]);
  }

  /**
   * Publishes several used elements with one used.idx update, so the
   * driver sees all of them or none (merged RX buffers need that).
   */
  addUsedMany(mem: GuestMemory, elements: readonly UsedElement[]): void {
    if (!this.ready || elements.length === 0) return;
    let idx = this.nextUsedIdx;
    for (const e of elements) {
      if (this.inUse[e.head]) {
        this.inUse[e.head] = 0;
        this.inUseCount--;
      }
    }
    this.ringWrite(() => {
      for (const e of elements) {
        const at = this.usedRing + 4 + 8 * (idx & (this.size - 1));
        mem.writeU32(at, e.head >>> 0);
        mem.writeU32(at + 4, e.len >>> 0);
        idx = (idx + 1) & 0xffff;
      }
      // x86 keeps these stores in order: the elements are visible before the index.
      mem.writeU16(this.usedRing + 2, idx);
    });
    this.nextUsedIdx = idx;
  }

  /**
   * After a batch of addUsed(): does the driver want a used buffer
   * notification? With EVENT_IDX, the vring_need_event rule on used_event
   * and the used.idx at the previous call; otherwise !NO_INTERRUPT.
   * Returns false when nothing was added since the previous call.
   */
  needsNotification(mem: GuestMemory): boolean {
    if (!this.ready) return false;
    const newIdx = this.nextUsedIdx;
    const oldIdx = this.signalledUsed;
    this.signalledUsed = newIdx;
    if (newIdx === oldIdx) return false;
    // Our used.idx store must be visible before we read the driver's
    // suppression field, or we could both decide the other one will act.
    fullFence();
    if (this.eventIdx) {
      const usedEvent = this.ringRead(() => mem.readU16(this.availRing + 4 + 2 * this.size));
      return vringNeedEvent(usedEvent, newIdx, oldIdx);
    }
    const flags = this.ringRead(() => mem.readU16(this.availRing));
    return (flags & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * Asks the driver to notify when avail.idx moves past `after` (writes
   * avail_event, or clears NO_NOTIFY), then re-reads avail.idx. Returns
   * true when it already has: the caller must look at the ring again
   * instead of sleeping. `after` defaults to the device's position; a
   * device waiting for more buffers than are posted passes the avail.idx
   * it saw.
   */
  enableNotification(mem: GuestMemory, after = this.nextAvailIdx): boolean {
    if (!this.ready) return false;
    this.ringWrite(() => {
      if (this.eventIdx) mem.writeU16(this.usedRing + 4 + 8 * this.size, after & 0xffff);
      else mem.writeU16(this.usedRing, 0);
    });
    // The driver checks our suppression field after updating avail.idx;
    // we check avail.idx after updating the field. Without the fence both
    // checks could see the old values and a buffer would sit unnoticed.
    fullFence();
    const pending = this.availableCount(mem); // also refuses a jumping avail.idx
    return ((this.nextAvailIdx + pending - after) & 0xffff) !== 0;
  }

  /** avail.idx as the driver last wrote it. */
  availIndex(mem: GuestMemory): number {
    return this.ringRead(() => mem.readU16(this.availRing + 2));
  }

  /**
   * Tells the driver notifications are not needed while the device is
   * busy with the ring. With EVENT_IDX nothing is written: a stale
   * avail_event already suppresses them.
   */
  disableNotification(mem: GuestMemory): void {
    if (!this.ready || this.eventIdx) return;
    this.ringWrite(() => mem.writeU16(this.usedRing, VIRTQ_USED_F_NO_NOTIFY));
  }

  private walk(mem: GuestMemory, head: number): Descriptor[] {
    const size = this.size;
    if (head >= size) {
      throw new QueueError('descriptor-index-out-of-range', `head descriptor ${head} >= queue size ${size}`);
    }
    const out: Descriptor[] = [];
    let index = head;
    for (let hops = 1; ; hops++) {
      if (hops > size) {
        throw new QueueError('chain-too-long', `chain from head ${head} is longer than the queue size ${size} (a loop?)`);
      }
      const d = this.readDescriptor(mem, this.descTable, index, 'descriptor table');
      if (d.flags & VIRTQ_DESC_F_INDIRECT) {
        // The direct descriptors before it count towards the chain's length.
        this.walkIndirect(mem, head, d.addr, d.len, d.flags, out, this.size - out.length);
        return out;
      }
      out.push(this.checkedBuffer(mem, d.addr, d.len, d.flags));
      if (!(d.flags & VIRTQ_DESC_F_NEXT)) return out;
      index = d.next;
      if (index >= size) {
        throw new QueueError('descriptor-index-out-of-range', `descriptor ${index} (chain from head ${head}) >= queue size ${size}`);
      }
    }
  }

  private walkIndirect(mem: GuestMemory, head: number, tableAddr: bigint, tableLen: number, flags: number, out: Descriptor[], room: number): void {
    if (!this.indirect) {
      throw new QueueError('indirect-not-negotiated', `chain from head ${head} uses an indirect table, VIRTIO_F_INDIRECT_DESC not negotiated`);
    }
    if (flags & VIRTQ_DESC_F_NEXT) {
      throw new QueueError('indirect-with-next', `indirect descriptor in chain from head ${head} also has NEXT`);
    }
    if (tableLen === 0 || tableLen % DESCRIPTOR_SIZE !== 0) {
      throw new QueueError('indirect-table-bad-length', `indirect table of ${tableLen} bytes (chain from head ${head}) is not a non-zero multiple of 16`);
    }
    const addr = toAddress(tableAddr);
    if (addr === undefined || !mem.checkRange(addr, tableLen)) {
      throw new QueueError('ring-out-of-range', `indirect table at 0x${tableAddr.toString(16)} (${tableLen} bytes) is outside guest memory`);
    }
    const count = tableLen / DESCRIPTOR_SIZE;
    // 2.7.5.3.1: no chain longer than the queue size, indirect or not. This
    // also bounds the work a hostile table can ask for.
    if (count > room) {
      throw new QueueError(
        'chain-too-long',
        `indirect table of ${count} entries after ${this.size - room} direct descriptors (chain from head ${head}) ` +
          `is longer than the queue size ${this.size}`,
      );
    }
    let index = 0;
    for (let hops = 1; ; hops++) {
      if (hops > count) {
        throw new QueueError('chain-too-long', `indirect chain from head ${head} is longer than its table (${count} entries; a loop?)`);
      }
      const d = this.readDescriptor(mem, addr, index, 'indirect table');
      if (d.flags & VIRTQ_DESC_F_INDIRECT) {
        throw new QueueError('nested-indirect', `indirect table of chain from head ${head} contains another indirect descriptor`);
      }
      out.push(this.checkedBuffer(mem, d.addr, d.len, d.flags));
      if (!(d.flags & VIRTQ_DESC_F_NEXT)) return;
      index = d.next;
      if (index >= count) {
        throw new QueueError('descriptor-index-out-of-range', `indirect descriptor ${index} >= table length ${count} (chain from head ${head})`);
      }
    }
  }

  private readDescriptor(mem: GuestMemory, table: number, index: number, what: string): { addr: bigint; len: number; flags: number; next: number } {
    const at = table + DESCRIPTOR_SIZE * index;
    try {
      return {
        addr: mem.readU64(at),
        len: mem.readU32(at + 8),
        flags: mem.readU16(at + 12),
        next: mem.readU16(at + 14),
      };
    } catch (err) {
      if (err instanceof GuestMemoryError) {
        throw new QueueError('ring-out-of-range', `${what} entry ${index} at 0x${at.toString(16)} is outside guest memory`, { cause: err });
      }
      throw err;
    }
  }

  private checkedBuffer(mem: GuestMemory, rawAddr: bigint, len: number, flags: number): Descriptor {
    const addr = toAddress(rawAddr);
    // A zero-length buffer is never accessed; only its address is junk.
    if (addr === undefined || (len > 0 && !mem.checkRange(addr, len))) {
      throw new QueueError('buffer-out-of-range', `buffer of ${len} bytes at 0x${rawAddr.toString(16)} is outside guest memory`);
    }
    return { addr, len, writable: (flags & VIRTQ_DESC_F_WRITE) !== 0 };
  }

  private ringRead<T>(fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      if (err instanceof GuestMemoryError) {
        throw new QueueError('ring-out-of-range', `queue ring access failed: ${err.message}`, { cause: err });
      }
      throw err;
    }
  }

  private ringWrite(fn: () => void): void {
    this.ringRead(fn);
  }
}

/**
 * The EVENT_IDX rule (virtio 1.2 section 2.7.10, Linux vring_need_event):
 * notify when `eventIdx` lies in the window of indices [oldIdx, newIdx)
 * that just became used, computed modulo 2^16.
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
