/**
 * The driver's side of virtio, in miniature, for device tests: builds
 * descriptor tables and rings in a {@link GuestMemory}, drives the
 * virtio-mmio registers, and reads back what the device used. Not used by
 * the VMM itself (like FakeIrqLine).
 */
import { FakeIrqLine } from './fakes.js';
import { GuestMemory } from '../base/memory.js';
import type { VirtioDevice } from '../virtio/device.js';
import { STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK } from '../virtio/features.js';
import {
  MMIO_CONFIG,
  MMIO_DEVICE_FEATURES,
  MMIO_DEVICE_FEATURES_SEL,
  MMIO_DRIVER_FEATURES,
  MMIO_DRIVER_FEATURES_SEL,
  MMIO_INTERRUPT_ACK,
  MMIO_INTERRUPT_STATUS,
  MMIO_QUEUE_DESC_HIGH,
  MMIO_QUEUE_DESC_LOW,
  MMIO_QUEUE_DEVICE_HIGH,
  MMIO_QUEUE_DEVICE_LOW,
  MMIO_QUEUE_DRIVER_HIGH,
  MMIO_QUEUE_DRIVER_LOW,
  MMIO_QUEUE_NOTIFY,
  MMIO_QUEUE_NUM,
  MMIO_QUEUE_READY,
  MMIO_QUEUE_SEL,
  MMIO_STATUS,
  MmioTransport,
} from '../virtio/mmio.js';
import { DESCRIPTOR_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, type Queue } from '../virtio/queue.js';
import type { Logger } from '../base/log.js';

/** A bump allocator over a range of guest memory. */
export class GuestAllocator {
  private next: number;

  constructor(
    start: number,
    private readonly end: number,
  ) {
    this.next = start;
  }

  alloc(len: number, align = 16): number {
    const addr = Math.ceil(this.next / align) * align;
    if (addr + len > this.end) throw new Error(`test allocator out of space (${len} bytes)`);
    this.next = addr + len;
    return addr;
  }
}

/** Where one queue's three areas live. */
export interface QueueLayout {
  readonly size: number;
  readonly descTable: number;
  readonly availRing: number;
  readonly usedRing: number;
}

/** One buffer the fake driver puts in a chain. */
export interface FakeBuffer {
  readonly len: number;
  readonly writable?: boolean;
  /** Initial contents (for device-readable buffers). */
  readonly data?: Uint8Array;
  /** Use this address instead of allocating one. */
  readonly addr?: number;
}

export interface RawDescriptor {
  addr: number | bigint;
  len: number;
  flags: number;
  next: number;
}

export interface UsedEntry {
  readonly id: number;
  readonly len: number;
}

/** The driver's view of one split virtqueue. */
export class FakeVirtqueue {
  private readonly free: number[];
  private readonly chains = new Map<number, number[]>();
  private availIdx = 0;
  private lastUsed = 0;

  constructor(
    readonly mem: GuestMemory,
    readonly layout: QueueLayout,
    readonly allocator: GuestAllocator,
  ) {
    this.free = Array.from({ length: layout.size }, (_, i) => i);
  }

  /** Lays out a queue of `size` entries with memory from `allocator`. */
  static create(mem: GuestMemory, allocator: GuestAllocator, size: number): FakeVirtqueue {
    const layout: QueueLayout = {
      size,
      descTable: allocator.alloc(DESCRIPTOR_SIZE * size, 16),
      availRing: allocator.alloc(6 + 2 * size, 2),
      usedRing: allocator.alloc(6 + 8 * size, 4),
    };
    return new FakeVirtqueue(mem, layout, allocator);
  }

  /** Configures a device-side Queue directly (tests of the queue alone). */
  configure(queue: Queue): void {
    queue.size = this.layout.size;
    queue.descTable = this.layout.descTable;
    queue.availRing = this.layout.availRing;
    queue.usedRing = this.layout.usedRing;
    queue.ready = true;
  }

  writeDescriptor(index: number, d: RawDescriptor, table = this.layout.descTable): void {
    const at = table + DESCRIPTOR_SIZE * index;
    this.mem.writeU64(at, BigInt(d.addr));
    this.mem.writeU32(at + 8, d.len);
    this.mem.writeU16(at + 12, d.flags);
    this.mem.writeU16(at + 14, d.next);
  }

  /**
   * Builds a chain (allocating buffers unless given addresses), publishes
   * it unless `publish` is false, and returns its head and buffer
   * addresses. With `indirect`, the buffers go into an indirect table
   * referenced by a single ring descriptor.
   */
  addChain(buffers: readonly FakeBuffer[], options: { indirect?: boolean; publish?: boolean } = {}): { head: number; addrs: number[] } {
    const addrs = buffers.map((b) => {
      const addr = b.addr ?? this.allocator.alloc(Math.max(b.len, 1), 8);
      if (b.data) this.mem.write(addr, b.data);
      return addr;
    });
    const flagsOf = (b: FakeBuffer, last: boolean): number => (b.writable ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT);
    let head: number;
    if (options.indirect) {
      const table = this.allocator.alloc(DESCRIPTOR_SIZE * buffers.length, 16);
      buffers.forEach((b, i) => {
        this.writeDescriptor(i, { addr: addrs[i]!, len: b.len, flags: flagsOf(b, i === buffers.length - 1), next: i + 1 }, table);
      });
      const slots = this.take(1);
      head = slots[0]!;
      this.writeDescriptor(head, { addr: table, len: DESCRIPTOR_SIZE * buffers.length, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
      this.chains.set(head, slots);
    } else {
      const slots = this.take(buffers.length);
      head = slots[0]!;
      buffers.forEach((b, i) => {
        this.writeDescriptor(slots[i]!, {
          addr: addrs[i]!,
          len: b.len,
          flags: flagsOf(b, i === buffers.length - 1),
          next: slots[i + 1] ?? 0,
        });
      });
      this.chains.set(head, slots);
    }
    if (options.publish !== false) this.publish(head);
    return { head, addrs };
  }

  /** Puts `head` in the next avail ring slot and advances avail.idx. */
  publish(head: number): void {
    this.mem.writeU16(this.layout.availRing + 4 + 2 * (this.availIdx % this.layout.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.mem.writeU16(this.layout.availRing + 2, this.availIdx);
  }

  /** Writes avail.idx directly (for hostile-driver tests). */
  setAvailIdx(idx: number): void {
    this.availIdx = idx & 0xffff;
    this.mem.writeU16(this.layout.availRing + 2, this.availIdx);
  }

  get availIndex(): number {
    return this.availIdx;
  }

  /** used.idx as the device last wrote it. */
  usedIdx(): number {
    return this.mem.readU16(this.layout.usedRing + 2);
  }

  usedFlags(): number {
    return this.mem.readU16(this.layout.usedRing);
  }

  /** avail_event, written by the device when EVENT_IDX is negotiated. */
  availEvent(): number {
    return this.mem.readU16(this.layout.usedRing + 4 + 8 * this.layout.size);
  }

  setUsedEvent(idx: number): void {
    this.mem.writeU16(this.layout.availRing + 4 + 2 * this.layout.size, idx & 0xffff);
  }

  setAvailFlags(flags: number): void {
    this.mem.writeU16(this.layout.availRing, flags);
  }

  /** The used elements added since the last call; their descriptors become free again. */
  takeUsed(): UsedEntry[] {
    const out: UsedEntry[] = [];
    const idx = this.usedIdx();
    while (this.lastUsed !== idx) {
      const at = this.layout.usedRing + 4 + 8 * (this.lastUsed % this.layout.size);
      const entry = { id: this.mem.readU32(at), len: this.mem.readU32(at + 4) };
      out.push(entry);
      const slots = this.chains.get(entry.id);
      if (slots) {
        this.free.push(...slots);
        this.chains.delete(entry.id);
      }
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  private take(n: number): number[] {
    if (n > this.free.length) throw new Error(`fake driver: ${n} descriptors wanted, ${this.free.length} free`);
    return this.free.splice(0, n);
  }
}

/** The driver's side of a virtio-mmio register window. */
export class FakeMmioDriver {
  constructor(readonly transport: MmioTransport) {}

  read32(offset: number): number {
    const b = new Uint8Array(4);
    this.transport.read(offset, b);
    return new DataView(b.buffer).getUint32(0, true);
  }

  write32(offset: number, value: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, value >>> 0, true);
    this.transport.write(offset, b);
  }

  readConfig(offset: number, len: number): Uint8Array {
    const b = new Uint8Array(len);
    this.transport.read(MMIO_CONFIG + offset, b);
    return b;
  }

  deviceFeatures(): bigint {
    this.write32(MMIO_DEVICE_FEATURES_SEL, 0);
    const low = this.read32(MMIO_DEVICE_FEATURES);
    this.write32(MMIO_DEVICE_FEATURES_SEL, 1);
    const high = this.read32(MMIO_DEVICE_FEATURES);
    return (BigInt(high) << 32n) | BigInt(low);
  }

  writeDriverFeatures(features: bigint): void {
    this.write32(MMIO_DRIVER_FEATURES_SEL, 0);
    this.write32(MMIO_DRIVER_FEATURES, Number(features & 0xffff_ffffn));
    this.write32(MMIO_DRIVER_FEATURES_SEL, 1);
    this.write32(MMIO_DRIVER_FEATURES, Number((features >> 32n) & 0xffff_ffffn));
  }

  status(): number {
    return this.read32(MMIO_STATUS);
  }

  addStatus(bits: number): void {
    this.write32(MMIO_STATUS, this.status() | bits);
  }

  /** ACKNOWLEDGE, DRIVER, features, FEATURES_OK; true when the device kept FEATURES_OK. */
  negotiate(features: bigint): boolean {
    this.write32(MMIO_STATUS, 0);
    this.addStatus(STATUS_ACKNOWLEDGE);
    this.addStatus(STATUS_DRIVER);
    this.writeDriverFeatures(features);
    this.addStatus(STATUS_FEATURES_OK);
    return (this.status() & STATUS_FEATURES_OK) !== 0;
  }

  setupQueue(index: number, layout: QueueLayout): void {
    this.write32(MMIO_QUEUE_SEL, index);
    this.write32(MMIO_QUEUE_NUM, layout.size);
    const split = (a: number): [number, number] => [a % 0x1_0000_0000, Math.floor(a / 0x1_0000_0000)];
    const [dl, dh] = split(layout.descTable);
    const [al, ah] = split(layout.availRing);
    const [ul, uh] = split(layout.usedRing);
    this.write32(MMIO_QUEUE_DESC_LOW, dl);
    this.write32(MMIO_QUEUE_DESC_HIGH, dh);
    this.write32(MMIO_QUEUE_DRIVER_LOW, al);
    this.write32(MMIO_QUEUE_DRIVER_HIGH, ah);
    this.write32(MMIO_QUEUE_DEVICE_LOW, ul);
    this.write32(MMIO_QUEUE_DEVICE_HIGH, uh);
    this.write32(MMIO_QUEUE_READY, 1);
  }

  driverOk(): void {
    this.addStatus(STATUS_DRIVER_OK);
  }

  notify(index: number): void {
    this.write32(MMIO_QUEUE_NOTIFY, index);
  }

  /** Reads and acknowledges InterruptStatus, like Linux's vm_interrupt. */
  ackInterrupt(): number {
    const status = this.read32(MMIO_INTERRUPT_STATUS);
    this.write32(MMIO_INTERRUPT_ACK, status);
    return status;
  }
}

/** A device behind a transport, with guest memory, an IRQ and driver-side queues. */
export interface TestRig {
  readonly mem: GuestMemory;
  readonly irq: FakeIrqLine;
  readonly transport: MmioTransport;
  readonly driver: FakeMmioDriver;
  readonly queues: FakeVirtqueue[];
  readonly allocator: GuestAllocator;
}

/**
 * Builds guest memory, an MmioTransport around `device`, and drives the
 * device to DRIVER_OK with `features` and one ring per device queue
 * (of `queueSize` entries). Throws if the device refuses the features.
 */
export function startDevice(device: VirtioDevice, options: { features: bigint; queueSize?: number; memSize?: number; logger?: Logger }): TestRig {
  const bytes = new Uint8Array(options.memSize ?? 4 << 20);
  const mem = GuestMemory.fromBuffer(bytes);
  const irq = new FakeIrqLine();
  const transport = new MmioTransport(device, { memory: mem, irq, ...(options.logger ? { logger: options.logger } : {}) });
  const driver = new FakeMmioDriver(transport);
  const allocator = new GuestAllocator(0x1000, bytes.length);
  if (!driver.negotiate(options.features)) throw new Error('device refused the features');
  const queues = device.queueMaxSizes.map((max, i) => {
    const q = FakeVirtqueue.create(mem, allocator, Math.min(options.queueSize ?? max, max));
    driver.setupQueue(i, q.layout);
    return q;
  });
  driver.driverOk();
  return { mem, irq, transport, driver, queues, allocator };
}
