/**
 * Seeded fuzz targets for the virtio layer, driven by a hostile model
 * driver. Each case is a pure function of its seed: a failure names the
 * seed, and `npm run fuzz -- --target T --seed S` replays it.
 *
 * What every case checks:
 *  - no exception escapes a register access, a notification or a completion;
 *  - no access outside guest RAM: RAM sits between two guard areas filled
 *    with a canary, and every buffer handed to a backend must be a view
 *    inside RAM;
 *  - no used length larger than the writable bytes of the chain it reports;
 *  - no host I/O outside the image (blk) and no frame larger than the
 *    largest a TAP takes (net);
 *  - nothing left in flight once the driver resets the device and waits
 *    for status 0.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FakeIrqLine } from '../../src/testing/index.js';
import { BlkDevice } from '../../src/virtio/blk/device.js';
import type { BlockBackend, IoCallback } from '../../src/virtio/blk/backend.js';
import { openDiskImage } from '../../src/virtio/blk/image.js';
import type { VirtioDevice } from '../../src/virtio/device.js';
import { STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK } from '../../src/virtio/features.js';
import {
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
} from '../../src/virtio/mmio.js';
import { EAGAIN, type TapBackend } from '../../src/virtio/net/tap.js';
import { MAX_FRAME_SIZE, NetDevice, VNET_HDR_SIZE } from '../../src/virtio/net/device.js';
import { ConsoleDevice } from '../../src/virtio/console/device.js';
import { DESCRIPTOR_SIZE, Queue, QueueError, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../src/virtio/queue.js';
import { GuestMemory, GuestMemoryError } from '../../src/base/memory.js';
import { PCI_CAP_ID_MSIX, PCI_CAPABILITY_LIST, PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY } from '../../src/devices/pci/config-space.js';
import {
  MSIX_CAP_MESSAGE_CONTROL,
  MSIX_CONTROL_ENABLE,
  MSIX_CONTROL_FUNCTION_MASK,
  MSIX_ENTRY_SIZE,
  type MsiMessage,
  type MsiSink,
} from '../../src/devices/pci/msix.js';
import {
  VIRTIO_PCI_BAR_SIZE,
  VIRTIO_PCI_COMMON_DF,
  VIRTIO_PCI_COMMON_DFSELECT,
  VIRTIO_PCI_COMMON_GF,
  VIRTIO_PCI_COMMON_GFSELECT,
  VIRTIO_PCI_COMMON_MSIX,
  VIRTIO_PCI_COMMON_Q_AVAILLO,
  VIRTIO_PCI_COMMON_Q_DESCLO,
  VIRTIO_PCI_COMMON_Q_ENABLE,
  VIRTIO_PCI_COMMON_Q_MSIX,
  VIRTIO_PCI_COMMON_Q_SELECT,
  VIRTIO_PCI_COMMON_Q_SIZE,
  VIRTIO_PCI_COMMON_Q_USEDLO,
  VIRTIO_PCI_COMMON_STATUS,
  VIRTIO_PCI_ISR_OFFSET,
  VIRTIO_PCI_MSIX_TABLE_OFFSET,
  VirtioPciTransport,
} from '../../src/virtio/pci.js';
import type { VirtioTransport } from '../../src/virtio/transport.js';
import { VIRTIO_MMIO_SIZE } from '../../src/arch/layout.js';

/** A small, fast, seedable PRNG (mulberry32). */
export class Rng {
  private state: number;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  /** A uniform 32-bit unsigned integer. */
  u32(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** An integer in [0, n). */
  below(n: number): number {
    return n <= 0 ? 0 : this.u32() % n;
  }

  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)]!;
  }

  /** Mostly plausible values, sometimes the edges hostile drivers like. */
  interesting(plausible: number): number {
    switch (this.below(8)) {
      case 0:
        return 0;
      case 1:
        return 0xffff_ffff;
      case 2:
        return this.u32();
      case 3:
        return 1 << this.below(32);
      default:
        return plausible >>> 0;
    }
  }
}

export const RAM_SIZE = 256 * 1024;
const GUARD_SIZE = 4096;
const CANARY = 0x5a;

/** Guest RAM between two canary-filled guard areas. */
export class GuardedRam {
  readonly backing = new Uint8Array(GUARD_SIZE + RAM_SIZE + GUARD_SIZE).fill(CANARY);
  readonly ram = this.backing.subarray(GUARD_SIZE, GUARD_SIZE + RAM_SIZE);
  readonly mem: GuestMemory;

  constructor(rng: Rng) {
    for (let i = 0; i < this.ram.length; i += 4) this.ram[i] = rng.u32() & 0xff;
    this.mem = GuestMemory.fromBuffer(this.ram);
  }

  /** Throws when a guard byte changed. */
  checkGuards(): void {
    for (let i = 0; i < GUARD_SIZE; i++) {
      if (this.backing[i] !== CANARY || this.backing[GUARD_SIZE + RAM_SIZE + i] !== CANARY) {
        throw new Error(`a guard byte outside guest RAM changed (offset ${i})`);
      }
    }
  }

  /** Throws unless `view` lies inside guest RAM. */
  checkView(view: Uint8Array, what: string): void {
    const start = view.byteOffset - GUARD_SIZE;
    if (view.buffer !== this.backing.buffer || start < 0 || start + view.length > RAM_SIZE) {
      throw new Error(`${what}: a buffer outside guest RAM (offset ${start}, ${view.length} bytes)`);
    }
  }
}

/**
 * Wraps a queue so that every used element is checked against the chain
 * it answers: known head, length within the chain's writable bytes.
 */
function instrumentQueue(queue: Queue, where: string): void {
  const writable = new Map<number, number>();
  const pop = queue.pop.bind(queue);
  const addUsedMany = queue.addUsedMany.bind(queue);
  queue.pop = (mem) => {
    const chain = pop(mem);
    if (chain) writable.set(chain.head, chain.writableLength);
    return chain;
  };
  queue.addUsedMany = (mem, elements) => {
    for (const e of elements) {
      const max = writable.get(e.head);
      if (max === undefined) throw new Error(`${where}: used element for head ${e.head}, which was not popped`);
      if (e.len > max) throw new Error(`${where}: used length ${e.len} > ${max} writable bytes (head ${e.head})`);
      writable.delete(e.head);
    }
    addUsedMany(mem, elements);
    const counted = queue as Queue & { fuzzUsed?: number };
    counted.fuzzUsed = (counted.fuzzUsed ?? 0) + elements.length;
  };
  const reset = queue.reset.bind(queue);
  queue.reset = () => {
    writable.clear();
    reset();
  };
}

/** The hostile driver's half of a ring: areas it may fill with anything. */
interface RingArea {
  size: number;
  desc: number;
  avail: number;
  used: number;
  availIdx: number;
}

/** Random bytes at a random (mostly aligned) place in RAM, or in a ring area. */
function scribble(rng: Rng, mem: GuestMemory, area?: RingArea): void {
  const len = 1 + rng.below(64);
  let at: number;
  if (area && rng.chance(0.7)) {
    at = rng.pick([area.desc, area.avail, area.used]) + rng.below(16 * area.size);
  } else {
    at = rng.below(RAM_SIZE);
  }
  at = Math.min(at, RAM_SIZE - len);
  for (let i = 0; i < len; i++) mem.writeU8(at + i, rng.u32() & 0xff);
}

/** A descriptor with a plausible or a hostile address, length, flags and next. */
function writeDescriptor(rng: Rng, mem: GuestMemory, table: number, index: number, size: number): void {
  const at = table + DESCRIPTOR_SIZE * index;
  if (at + DESCRIPTOR_SIZE > RAM_SIZE) return;
  const addr = rng.chance(0.9) ? BigInt(rng.below(RAM_SIZE)) : (BigInt(rng.u32()) << 32n) | BigInt(rng.u32());
  const len = rng.chance(0.8) ? rng.below(4096) : rng.interesting(rng.below(RAM_SIZE));
  let flags = 0;
  if (rng.chance(0.5)) flags |= VIRTQ_DESC_F_NEXT;
  if (rng.chance(0.5)) flags |= VIRTQ_DESC_F_WRITE;
  if (rng.chance(0.1)) flags |= VIRTQ_DESC_F_INDIRECT;
  if (rng.chance(0.02)) flags = rng.u32() & 0xffff;
  const next = rng.chance(0.9) ? rng.below(size) : rng.u32() & 0xffff;
  mem.writeU64(at, addr);
  mem.writeU32(at + 8, len >>> 0);
  mem.writeU16(at + 12, flags);
  mem.writeU16(at + 14, next);
}

/** Publishes a random head (or moves avail.idx in a hostile way). */
function publish(rng: Rng, mem: GuestMemory, area: RingArea): void {
  const head = rng.chance(0.95) ? rng.below(area.size) : rng.u32() & 0xffff;
  if (area.avail + 4 + 2 * area.size + 2 > RAM_SIZE) return;
  mem.writeU16(area.avail + 4 + 2 * (area.availIdx % area.size), head);
  area.availIdx = rng.chance(0.97) ? (area.availIdx + 1) & 0xffff : rng.u32() & 0xffff;
  mem.writeU16(area.avail + 2, area.availIdx);
}

/** A well-formed chain of `buffers` at random places (for blk and net to get past the ring checks). */
function plausibleChain(rng: Rng, mem: GuestMemory, area: RingArea, buffers: Array<{ len: number; writable: boolean; data?: Uint8Array }>): void {
  const n = buffers.length;
  if (n === 0 || n > area.size) return;
  const indirect = rng.chance(0.3);
  const first = rng.below(area.size);
  const table = indirect ? (BUFFER_BASE + rng.below(RAM_SIZE - BUFFER_BASE - DESCRIPTOR_SIZE * n)) & ~15 : area.desc;
  buffers.forEach((b, i) => {
    const len = Math.min(b.len, RAM_SIZE - BUFFER_BASE);
    const addr = BUFFER_BASE + rng.below(RAM_SIZE - BUFFER_BASE - len + 1);
    if (b.data) mem.write(addr, b.data.subarray(0, len));
    const index = indirect ? i : (first + i) % area.size;
    const next = indirect ? i + 1 : (first + i + 1) % area.size;
    const at = table + DESCRIPTOR_SIZE * index;
    mem.writeU64(at, BigInt(addr));
    mem.writeU32(at + 8, len);
    mem.writeU16(at + 12, (b.writable ? VIRTQ_DESC_F_WRITE : 0) | (i < n - 1 ? VIRTQ_DESC_F_NEXT : 0));
    mem.writeU16(at + 14, next);
  });
  if (indirect) {
    const at = area.desc + DESCRIPTOR_SIZE * first;
    mem.writeU64(at, BigInt(table));
    mem.writeU32(at + 8, DESCRIPTOR_SIZE * n);
    mem.writeU16(at + 12, VIRTQ_DESC_F_INDIRECT);
    mem.writeU16(at + 14, 0);
  }
  mem.writeU16(area.avail + 4 + 2 * (area.availIdx % area.size), first);
  area.availIdx = (area.availIdx + 1) & 0xffff;
  mem.writeU16(area.avail + 2, area.availIdx);
}

/** Ring areas at random but mostly valid places. */
/**
 * Ring areas: usually in their own slot of the ring region (queue `slot`),
 * the way a driver allocates them; sometimes anywhere, overlapping or
 * outside RAM.
 */
function layoutRing(rng: Rng, maxSize: number, slot = 0): RingArea {
  const size = rng.chance(0.9) ? 1 << rng.below(Math.log2(maxSize) + 1) : rng.interesting(maxSize);
  if (rng.chance(0.9)) {
    // 64 entries at most: 1 KiB + 134 + 518 bytes, in a 4 KiB slot.
    const base = slot * 4096;
    return { size: size >>> 0, desc: base, avail: base + 1024, used: base + 2048, availIdx: 0 };
  }
  const s = Math.max(1, Math.min(size, maxSize));
  const align = (n: number, a: number) => n - (n % a);
  const place = (len: number, a: number) => (rng.chance(0.8) ? align(rng.below(Math.max(1, RAM_SIZE - len)), a) : rng.u32());
  return { size: size >>> 0, desc: place(16 * s, 16), avail: place(6 + 2 * s, 2), used: place(6 + 8 * s, 4), availIdx: 0 };
}

/** Buffers and indirect tables live above the ring region. */
const BUFFER_BASE = 64 * 1024;

/** What a case reached, summed over a run: shows the cases get past the first checks. */
export interface Coverage {
  /** Chains popped (queue) or devices that reached DRIVER_OK (blk, net). */
  reached: number;
  /** Used elements the device published. */
  used: number;
  /** Fatal ring errors: DEVICE_NEEDS_RESET (or a fatal QueueError for the queue target). */
  broken: number;
}

function emptyCoverage(): Coverage {
  return { reached: 0, used: 0, broken: 0 };
}

// ---------------------------------------------------------------- queue

/** The split queue alone: random tables and rings, pops and used elements. */
export function fuzzQueueCase(seed: number, cov: Coverage = emptyCoverage()): void {
  const rng = new Rng(seed);
  const ram = new GuardedRam(rng);
  const { mem } = ram;
  const queue = new Queue(64);
  const area = layoutRing(rng, 64);
  if (rng.chance(0.9)) area.size = 1 << rng.below(7);
  const size = area.size;
  queue.size = rng.chance(0.95) ? size : rng.u32() & 0xffff;
  queue.descTable = area.desc;
  queue.availRing = area.avail;
  queue.usedRing = area.used;
  if (queue.validate(mem) !== undefined) return; // the transport would refuse DRIVER_OK
  queue.ready = true;
  queue.setNegotiatedFeatures(BigInt(rng.u32()) | (BigInt(rng.u32()) << 32n));
  instrumentQueue(queue, 'queue');
  const popped: Array<{ head: number; writable: number }> = [];
  const hostility = rng.pick([0.02, 0.1, 0.3, 0.7]);
  for (let step = 0, steps = 20 + rng.below(60); step < steps; step++) {
    // Ordinary steps (post, pop, use) most of the time; hostile ones at the case's rate.
    const op = rng.chance(hostility) ? rng.below(10) : rng.pick([0, 6, 7, 8, 9]);
    try {
      if (op < 2 && rng.chance(0.8)) {
        const n = 1 + rng.below(4);
        driverWrites(() =>
          plausibleChain(
            rng,
            mem,
            area,
            Array.from({ length: n }, () => ({ len: rng.below(5000), writable: rng.chance(0.5) })),
          ),
        );
      } else if (op < 3) driverWrites(() => writeDescriptor(rng, mem, rng.chance(0.8) ? area.desc : rng.below(RAM_SIZE) & ~15, rng.below(size), size));
      else if (op < 5) driverWrites(() => publish(rng, mem, area));
      else if (op === 5) driverWrites(() => scribble(rng, mem, area));
      else if (op < 8) {
        const chain = queue.pop(mem);
        if (chain) {
          for (const d of chain.descriptors) {
            if (d.len > 0 && !mem.checkRange(d.addr, d.len)) throw new Error(`popped a buffer outside RAM at 0x${d.addr.toString(16)}`);
          }
          popped.push({ head: chain.head, writable: chain.writableLength });
          cov.reached++;
        }
      } else if (op === 8 && popped.length > 0) {
        const p = popped.splice(rng.below(popped.length), 1)[0]!;
        queue.addUsed(mem, p.head, rng.below(p.writable + 1));
        cov.used++;
      } else {
        if (rng.chance(0.5)) queue.enableNotification(mem);
        else queue.needsNotification(mem);
      }
    } catch (err) {
      if (!(err instanceof QueueError)) throw err;
      if (err.fatal) {
        cov.broken++;
        break; // the device would now set DEVICE_NEEDS_RESET
      }
    }
    if (queue.inFlight > size) throw new Error(`${queue.inFlight} chains in flight on a queue of ${size}`);
  }
  ram.checkGuards();
}

// ---------------------------------------------------------------- transport + devices

/** How long a reset may wait for the device's host I/O before the case fails. */
const RESET_GUARD_MS = 10_000;

/**
 * What a driver does after writing status 0: wait until the device reads 0.
 * A hang guard in time, not in loop turns: 10,000 turns pass in tens of
 * milliseconds, less than one disk read takes on a loaded host's thread pool.
 */
async function statusZero(readStatus: () => number): Promise<void> {
  const deadline = performance.now() + RESET_GUARD_MS;
  while (readStatus() !== 0) {
    if (performance.now() > deadline) throw new Error(`reset never completed: status stays non-zero after ${RESET_GUARD_MS} ms`);
    await new Promise((r) => setImmediate(r));
  }
}

/** The register sequence of a driver, with hostile detours. */
class ModelDriver {
  readonly rings: RingArea[] = [];
  /** How often a step is hostile rather than what a driver does: per case. */
  readonly hostility: number;

  constructor(
    readonly rng: Rng,
    readonly ram: GuardedRam,
    readonly transport: MmioTransport,
    readonly device: VirtioDevice,
  ) {
    this.hostility = rng.pick([0.02, 0.1, 0.3, 0.7]);
  }

  w32(offset: number, value: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, value >>> 0, true);
    this.transport.write(offset, b);
  }

  r32(offset: number): number {
    const b = new Uint8Array(4);
    this.transport.read(offset, b);
    return new DataView(b.buffer).getUint32(0, true);
  }

  /** A full initialization with random (often valid) features and rings. */
  initialize(): void {
    const rng = this.rng;
    this.w32(MMIO_STATUS, 0);
    this.w32(MMIO_STATUS, STATUS_ACKNOWLEDGE);
    this.w32(MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    const offered = this.device.offeredFeatures;
    const pick = rng.chance(0.5)
      ? offered
      : rng.chance(0.8)
        ? offered & (BigInt(rng.u32()) | (BigInt(rng.u32()) << 32n) | (1n << 32n))
        : BigInt(rng.u32()) << BigInt(rng.below(40));
    this.w32(0x024, 0);
    this.w32(0x020, Number(pick & 0xffff_ffffn));
    this.w32(0x024, 1);
    this.w32(0x020, Number((pick >> 32n) & 0xffff_ffffn));
    this.w32(MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    this.rings.length = 0;
    this.device.queueMaxSizes.forEach((max, i) => {
      const ring = layoutRing(rng, Math.min(max, 64), i);
      this.rings.push(ring);
      const split = (a: number): [number, number] => [a % 0x1_0000_0000, Math.floor(a / 0x1_0000_0000)];
      this.w32(MMIO_QUEUE_SEL, i);
      this.w32(MMIO_QUEUE_NUM, ring.size);
      const [dl, dh] = split(ring.desc);
      const [al, ah] = split(ring.avail);
      const [ul, uh] = split(ring.used);
      this.w32(MMIO_QUEUE_DESC_LOW, dl);
      this.w32(MMIO_QUEUE_DESC_HIGH, dh);
      this.w32(MMIO_QUEUE_DRIVER_LOW, al);
      this.w32(MMIO_QUEUE_DRIVER_HIGH, ah);
      this.w32(MMIO_QUEUE_DEVICE_LOW, ul);
      this.w32(MMIO_QUEUE_DEVICE_HIGH, uh);
      if (rng.chance(0.95)) this.w32(MMIO_QUEUE_READY, 1);
    });
    this.w32(MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
  }

  /** One hostile or ordinary step. */
  step(plausible: (ring: RingArea, index: number) => void): void {
    const rng = this.rng;
    const { mem } = this.ram;
    const q = rng.below(Math.max(1, this.rings.length));
    const ring = this.rings[q];
    if (!rng.chance(this.hostility)) {
      // An ordinary driver step: post a request, or notify.
      if (ring && rng.chance(0.7)) driverWrites(() => plausible(ring, q));
      else this.w32(MMIO_QUEUE_NOTIFY, q);
      return;
    }
    const op = rng.below(20);
    if (op < 12) hostileMemoryWrite(rng, mem, ring, q, plausible);
    else if (op < 16) this.w32(MMIO_QUEUE_NOTIFY, rng.chance(0.95) ? q : rng.u32());
    else if (op === 16) this.transport.write(rng.below(VIRTIO_MMIO_SIZE), new Uint8Array(rng.pick([1, 2, 4, 8])).fill(rng.u32() & 0xff));
    else if (op === 17) this.w32(rng.below(0x80) & ~3, rng.interesting(rng.below(16)));
    else if (op === 18) this.transport.read(rng.below(VIRTIO_MMIO_SIZE), new Uint8Array(rng.pick([1, 2, 4, 8])));
    else if (rng.chance(0.3)) this.w32(MMIO_STATUS, 0);
    else if (rng.chance(0.2)) this.initialize();
    else this.w32(MMIO_QUEUE_SEL, q), this.w32(MMIO_QUEUE_READY, 0);
  }

  /** What Linux does at the end: status 0, then wait for status 0. */
  async resetAndWait(): Promise<void> {
    this.w32(MMIO_STATUS, 0);
    await statusZero(() => this.r32(MMIO_STATUS));
  }
}

/**
 * One of the driver's own memory writes, hostile or not: a plausible chain,
 * a random descriptor, a published head, or scribbles over its rings. Rings
 * it placed outside RAM simply miss.
 */
function hostileMemoryWrite(rng: Rng, mem: GuestMemory, ring: RingArea | undefined, q: number, plausible: (ring: RingArea, index: number) => void): void {
  const op = rng.below(12);
  driverWrites(() => {
    if (op < 6 && ring) plausible(ring, q);
    else if (op < 9 && ring) writeDescriptor(rng, mem, ring.desc, rng.below(ring.size), ring.size);
    else if (op < 11 && ring) publish(rng, mem, ring);
    else scribble(rng, mem, ring);
  });
}

/** Runs driver-side memory writes; one that falls outside RAM is the driver's problem, not a finding. */
function driverWrites(fn: () => void): void {
  try {
    fn();
  } catch (err) {
    if (!(err instanceof GuestMemoryError)) throw err;
  }
}

function addCoverage(cov: Coverage, transport: VirtioTransport): void {
  cov.reached += transport.stats.activations;
  cov.broken += transport.stats.needsReset;
  cov.used += transport.queues.reduce((n, q) => n + usedCount(q), 0);
}

/** Used elements a queue published over the case (counted by instrumentQueue). */
function usedCount(q: Queue): number {
  return (q as Queue & { fuzzUsed?: number }).fuzzUsed ?? 0;
}

function transportFor(device: VirtioDevice, ram: GuardedRam): MmioTransport {
  const transport = new MmioTransport(device, { memory: ram.mem, irq: new FakeIrqLine() });
  transport.queues.forEach((q, i) => {
    instrumentQueue(q, `${device.name} queue ${i}`);
  });
  return transport;
}

/** Checks each host I/O against the image and guest RAM before passing it on. */
class CheckedBackend implements BlockBackend {
  constructor(
    private readonly inner: BlockBackend,
    private readonly ram: GuardedRam,
  ) {}
  get size() {
    return this.inner.size;
  }
  get readonly() {
    return this.inner.readonly;
  }
  private range(position: number, length: number, what: string): void {
    if (!Number.isSafeInteger(position) || position < 0 || position + length > this.inner.size) {
      throw new Error(`${what} outside the image: ${length} bytes at ${position} (image ${this.inner.size})`);
    }
  }
  private views(buffers: readonly Uint8Array[], position: number, what: string): void {
    for (const b of buffers) this.ram.checkView(b, what);
    this.range(
      position,
      buffers.reduce((n, b) => n + b.length, 0),
      what,
    );
  }
  readv(b: readonly Uint8Array[], p: number, done: IoCallback) {
    this.views(b, p, 'read');
    this.inner.readv(b, p, done);
  }
  writev(b: readonly Uint8Array[], p: number, done: IoCallback) {
    this.views(b, p, 'write');
    if (this.inner.readonly) throw new Error('a write reached a read-only image');
    this.inner.writev(b, p, done);
  }
  flush(done: IoCallback) {
    this.inner.flush(done);
  }
  writeZeroes(p: number, l: number, done: IoCallback) {
    this.range(p, l, 'write zeroes');
    this.inner.writeZeroes(p, l, done);
  }
  discard(p: number, l: number, done: IoCallback) {
    this.range(p, l, 'discard');
    this.inner.discard(p, l, done);
  }
  close() {
    this.inner.close();
  }
}

/** A real raw image for the blk target, made once per process. */
export function fuzzImage(dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tsvmm-fuzz-'))): { path: string; remove: () => void } {
  const file = path.join(dir, 'fuzz.img');
  const bytes = Buffer.alloc(128 * 1024);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 31) & 0xff;
  fs.writeFileSync(file, bytes);
  return { path: file, remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

function blkHeader(rng: Rng): Uint8Array {
  const h = new Uint8Array(16);
  const v = new DataView(h.buffer);
  v.setUint32(0, rng.chance(0.9) ? rng.pick([0, 1, 4, 8, 11, 13]) : rng.u32(), true);
  const sector = rng.chance(0.9) ? rng.below(300) : rng.u32() * 0x1_0000 + rng.below(0x1_0000);
  v.setBigUint64(8, BigInt(sector), true);
  return h;
}

/** virtio-blk over virtio-mmio, on a real raw image. */
export async function fuzzBlkCase(seed: number, imagePath: string, cov: Coverage = emptyCoverage()): Promise<void> {
  const rng = new Rng(seed);
  const ram = new GuardedRam(rng);
  const readonly = rng.chance(0.2);
  const image = openDiskImage(imagePath, { readonly, locker: () => {} });
  const device = new BlkDevice({ backend: new CheckedBackend(image, ram), queueSize: rng.pick([4, 16, 64]) });
  try {
    const transport = transportFor(device, ram);
    const driver = new ModelDriver(rng, ram, transport, device);
    driver.initialize();
    for (let step = 0, steps = 10 + rng.below(40); step < steps; step++) {
      driver.step((ring) => {
        const middle = Array.from({ length: rng.below(4) }, () => ({
          len: rng.chance(0.8) ? 512 * rng.below(9) : rng.below(2000),
          writable: rng.chance(0.6),
        }));
        plausibleChain(rng, ram.mem, ring, [
          { len: rng.chance(0.9) ? 16 : rng.below(32), writable: false, data: blkHeader(rng) },
          ...middle,
          { len: rng.chance(0.9) ? 1 : rng.below(4), writable: rng.chance(0.95) },
        ]);
      });
      if (rng.chance(0.2)) await new Promise((r) => setImmediate(r));
    }
    await driver.resetAndWait();
    addCoverage(cov, transport);
    if (device.stats.inFlight !== 0) throw new Error(`${device.stats.inFlight} requests in flight after the reset completed`);
    await device.drain();
    ram.checkGuards();
  } finally {
    await device.drain();
    device.close();
  }
}

/** A TAP whose kernel queue is filled with random frames. */
class FuzzTap implements TapBackend {
  readonly name = 'tap-fuzz';
  readonly queued: Uint8Array[] = [];
  private onReadable: (() => void) | undefined;
  written = 0;

  constructor(
    private readonly rng: Rng,
    private readonly ram: GuardedRam,
  ) {}

  read(buf: Uint8Array): number {
    const frame = this.queued.shift();
    if (!frame) return -EAGAIN;
    buf.set(frame.subarray(0, buf.length));
    return Math.min(frame.length, buf.length);
  }
  writev(pieces: Uint8Array[]): number {
    let n = 0;
    for (const p of pieces) {
      this.ram.checkView(p, 'TAP write');
      n += p.length;
    }
    if (n > VNET_HDR_SIZE + MAX_FRAME_SIZE) throw new Error(`a ${n}-byte frame reached the TAP`);
    this.written++;
    return this.rng.chance(0.1) ? -EAGAIN : n;
  }
  startReadable(cb: () => void): void {
    this.onReadable = cb;
  }
  stopReadable(): void {
    this.onReadable = undefined;
  }
  setOffload(): void {}
  setVnetHdrSize(): void {}
  close(): void {}
  /** Frames arrive; the device reads while it watches. */
  arrive(): void {
    const n = 1 + this.rng.below(4);
    for (let i = 0; i < n; i++) {
      const len = this.rng.chance(0.9) ? VNET_HDR_SIZE + this.rng.below(1600) : this.rng.below(VNET_HDR_SIZE + MAX_FRAME_SIZE + 1);
      const f = new Uint8Array(len);
      for (let j = 0; j < Math.min(len, 64); j++) f[j] = this.rng.u32() & 0xff;
      this.queued.push(f);
    }
    for (let i = 0; i < 8 && this.onReadable && this.queued.length > 0; i++) this.onReadable();
  }
}

/** virtio-net over virtio-mmio, on a TAP fake that delivers random frames. */
export async function fuzzNetCase(seed: number, cov: Coverage = emptyCoverage()): Promise<void> {
  const rng = new Rng(seed);
  const ram = new GuardedRam(rng);
  const tap = new FuzzTap(rng, ram);
  const device = new NetDevice({ tap, mac: Uint8Array.of(0x52, 0x54, 0, 1, 2, 3), queueSize: rng.pick([4, 16, 64]) });
  const transport = transportFor(device, ram);
  const driver = new ModelDriver(rng, ram, transport, device);
  driver.initialize();
  for (let step = 0, steps = 10 + rng.below(40); step < steps; step++) {
    driver.step((ring, index) => {
      const buffers = Array.from({ length: 1 + rng.below(3) }, () => ({
        len: rng.chance(0.8) ? rng.pick([0, 12, 60, 1526, 4096]) : rng.below(70_000),
        writable: index === 0 ? rng.chance(0.95) : rng.chance(0.05),
      }));
      plausibleChain(rng, ram.mem, ring, buffers);
    });
    if (rng.chance(0.3)) tap.arrive();
    if (rng.chance(0.2)) await new Promise((r) => setImmediate(r));
  }
  await driver.resetAndWait();
  addCoverage(cov, transport);
  device.close();
  ram.checkGuards();
}

/** An MSI sink that holds the transport to the MSI-X contract: a message only for a deliverable vector, and the one last announced for it. */
class CheckedMsi implements MsiSink {
  private readonly live = new Map<number, MsiMessage>();
  fired = 0;
  update(vector: number, message: MsiMessage | undefined): void {
    if (message) this.live.set(vector, message);
    else this.live.delete(vector);
  }
  fire(vector: number, message: MsiMessage): void {
    const live = this.live.get(vector);
    if (!live) throw new Error(`MSI-X vector ${vector} fired while masked or disabled`);
    if (live.address !== message.address || live.data !== message.data) throw new Error(`MSI-X vector ${vector} fired a message other than the one announced`);
    this.fired++;
  }
}

/**
 * The driver of a virtio-pci function: configuration space (command,
 * capabilities, MSI-X control) and BAR 0 (common configuration, ISR,
 * device configuration, doorbells, MSI-X table and PBA), in Linux's order
 * with hostile detours: accesses of any size anywhere in the BAR and the
 * configuration space, MSI-X enabled, masked and reprogrammed under
 * traffic, queue vectors and doorbells out of range, resets mid-flight.
 */
class PciModelDriver {
  readonly rings: RingArea[] = [];
  readonly hostility: number;
  private msixCap = 0;

  constructor(
    readonly rng: Rng,
    readonly ram: GuardedRam,
    readonly transport: VirtioPciTransport,
    readonly device: VirtioDevice,
  ) {
    this.hostility = rng.pick([0.02, 0.1, 0.3, 0.7]);
    for (let cap = transport.config.getBytes(PCI_CAPABILITY_LIST, 1)[0]!, hops = 0; cap !== 0 && hops < 48; hops++) {
      const [id, next] = transport.config.getBytes(cap, 2);
      if (id === PCI_CAP_ID_MSIX) this.msixCap = cap;
      cap = next!;
    }
    if (this.msixCap === 0) throw new Error('virtio-pci function without an MSI-X capability');
  }

  private bar(offset: number, size: number, value?: number): number {
    const b = new Uint8Array(size);
    const dev = this.transport.bars[0]!.device;
    if (value === undefined) {
      dev.read(offset, b);
      return b.reduce((v, byte, i) => v + byte * 2 ** (8 * i), 0);
    }
    for (let i = 0; i < size; i++) b[i] = Math.floor(value / 2 ** (8 * i)) & 0xff;
    dev.write(offset, b);
    return 0;
  }

  private cfg(offset: number, size: number, value?: number): number {
    const b = new Uint8Array(size);
    if (value === undefined) {
      this.transport.config.read(offset, b);
      return b.reduce((v, byte, i) => v + byte * 2 ** (8 * i), 0);
    }
    for (let i = 0; i < size; i++) b[i] = (value >>> (8 * i)) & 0xff;
    this.transport.config.write(offset, b);
    return 0;
  }

  private setMsix(enable: boolean, functionMask: boolean): void {
    this.cfg(this.msixCap + MSIX_CAP_MESSAGE_CONTROL, 2, (enable ? MSIX_CONTROL_ENABLE : 0) | (functionMask ? MSIX_CONTROL_FUNCTION_MASK : 0));
  }

  private programVector(v: number): void {
    const rng = this.rng;
    const entry = VIRTIO_PCI_MSIX_TABLE_OFFSET + v * MSIX_ENTRY_SIZE;
    this.bar(entry, 4, rng.chance(0.9) ? 0xfee0_0000 : rng.u32());
    this.bar(entry + 4, 4, rng.chance(0.9) ? 0 : rng.u32());
    this.bar(entry + 8, 4, rng.chance(0.9) ? 0x4020 + v : rng.u32());
    this.bar(entry + 12, 4, rng.chance(0.85) ? 0 : 1);
  }

  /** What Linux's virtio_pci_modern probe and find_vqs do, with random features, rings and vectors. */
  initialize(): void {
    const rng = this.rng;
    const vectors = this.transport.msix.vectors;
    this.cfg(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | (rng.chance(0.95) ? PCI_COMMAND_MASTER : 0));
    const msix = rng.chance(0.8);
    if (msix) {
      this.setMsix(true, true);
      for (let v = 0; v < vectors; v++) this.programVector(v);
      this.setMsix(true, false);
    }
    this.bar(VIRTIO_PCI_COMMON_STATUS, 1, 0);
    this.bar(VIRTIO_PCI_COMMON_STATUS, 1, STATUS_ACKNOWLEDGE);
    this.bar(VIRTIO_PCI_COMMON_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    const offered = this.device.offeredFeatures;
    const pick = rng.chance(0.5)
      ? offered
      : rng.chance(0.8)
        ? offered & (BigInt(rng.u32()) | (BigInt(rng.u32()) << 32n) | (1n << 32n))
        : BigInt(rng.u32()) << BigInt(rng.below(40));
    this.bar(VIRTIO_PCI_COMMON_DFSELECT, 4, rng.below(3));
    this.bar(VIRTIO_PCI_COMMON_DF, 4);
    this.bar(VIRTIO_PCI_COMMON_GFSELECT, 4, 0);
    this.bar(VIRTIO_PCI_COMMON_GF, 4, Number(pick & 0xffff_ffffn));
    this.bar(VIRTIO_PCI_COMMON_GFSELECT, 4, 1);
    this.bar(VIRTIO_PCI_COMMON_GF, 4, Number((pick >> 32n) & 0xffff_ffffn));
    this.bar(VIRTIO_PCI_COMMON_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (msix) this.bar(VIRTIO_PCI_COMMON_MSIX, 2, rng.chance(0.9) ? 0 : rng.below(0x10000));
    this.rings.length = 0;
    this.device.queueMaxSizes.forEach((max, i) => {
      const ring = layoutRing(rng, Math.min(max, 64), i);
      this.rings.push(ring);
      this.bar(VIRTIO_PCI_COMMON_Q_SELECT, 2, i);
      this.bar(VIRTIO_PCI_COMMON_Q_SIZE, 2, ring.size);
      if (msix) this.bar(VIRTIO_PCI_COMMON_Q_MSIX, 2, rng.chance(0.9) ? (i + 1) % vectors : rng.below(0x10000));
      // The 64-bit addresses as Linux writes them: two 32-bit halves each, or one 8-byte access.
      for (const [reg, addr] of [
        [VIRTIO_PCI_COMMON_Q_DESCLO, ring.desc],
        [VIRTIO_PCI_COMMON_Q_AVAILLO, ring.avail],
        [VIRTIO_PCI_COMMON_Q_USEDLO, ring.used],
      ] as const) {
        if (rng.chance(0.8)) {
          this.bar(reg, 4, addr % 0x1_0000_0000);
          this.bar(reg + 4, 4, Math.floor(addr / 0x1_0000_0000));
        } else this.bar(reg, 8, addr);
      }
      if (rng.chance(0.95)) this.bar(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
    });
    this.bar(VIRTIO_PCI_COMMON_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
  }

  private notify(q: number): void {
    this.bar(this.transport.notifyOffset(q), this.rng.chance(0.9) ? 2 : 4, q);
  }

  step(plausible: (ring: RingArea, index: number) => void): void {
    const rng = this.rng;
    const { mem } = this.ram;
    const q = rng.below(Math.max(1, this.rings.length));
    const ring = this.rings[q];
    if (!rng.chance(this.hostility)) {
      if (ring && rng.chance(0.7)) driverWrites(() => plausible(ring, q));
      else if (rng.chance(0.9)) this.notify(q);
      else this.bar(VIRTIO_PCI_ISR_OFFSET, 1);
      return;
    }
    const op = rng.below(24);
    if (op < 10) hostileMemoryWrite(rng, mem, ring, q, plausible);
    else if (op < 13) this.notify(rng.chance(0.8) ? q : rng.below(0x10000));
    else if (op === 13) this.bar(rng.below(VIRTIO_PCI_BAR_SIZE), rng.pick([1, 2, 4, 8]), rng.u32());
    else if (op === 14) this.bar(rng.below(VIRTIO_PCI_BAR_SIZE), rng.pick([1, 2, 4, 8]));
    else if (op === 15) this.bar(rng.below(0x40) & ~1, rng.pick([1, 2, 4]), rng.interesting(rng.below(0x10000)));
    else if (op === 16) this.cfg(rng.below(0x100), rng.pick([1, 2, 4]), rng.u32());
    else if (op === 17) this.cfg(rng.below(0x100), rng.pick([1, 2, 4]));
    else if (op === 18) this.setMsix(rng.chance(0.7), rng.chance(0.5));
    else if (op === 19) this.programVector(rng.below(this.transport.msix.vectors + 1) % this.transport.msix.vectors);
    else if (op === 20) this.cfg(PCI_COMMAND, 2, rng.below(0x10000));
    else if (op === 21) this.bar(VIRTIO_PCI_COMMON_Q_SELECT, 2, q), this.bar(VIRTIO_PCI_COMMON_Q_MSIX, 2, rng.below(0x10000));
    else if (rng.chance(0.3)) this.bar(VIRTIO_PCI_COMMON_STATUS, 1, 0);
    // biome-ignore lint/suspicious/noDuplicateElseIf: each rng.chance() call draws a new number
    else if (rng.chance(0.3)) this.initialize();
    else this.bar(VIRTIO_PCI_COMMON_Q_SELECT, 2, q), this.bar(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 0);
  }

  async resetAndWait(): Promise<void> {
    this.bar(VIRTIO_PCI_COMMON_STATUS, 1, 0);
    await statusZero(() => this.bar(VIRTIO_PCI_COMMON_STATUS, 1));
  }
}

/**
 * The virtio-pci transport: virtio-blk on a real raw image, virtio-net on
 * the TAP fake or virtio-console, driven through configuration space and
 * BAR 0.
 */
export async function fuzzPciCase(seed: number, imagePath: string, cov: Coverage = emptyCoverage()): Promise<void> {
  const rng = new Rng(seed);
  const ram = new GuardedRam(rng);
  const kind = rng.pick(['blk', 'net', 'console'] as const);
  const blk = kind === 'blk';
  const tap = new FuzzTap(rng, ram);
  let printed = 0;
  const queueSize = rng.pick([4, 16, 64]);
  const device: BlkDevice | NetDevice | ConsoleDevice =
    kind === 'blk'
      ? new BlkDevice({ backend: new CheckedBackend(openDiskImage(imagePath, { readonly: rng.chance(0.2), locker: () => {} }), ram), queueSize })
      : kind === 'net'
        ? new NetDevice({ tap, mac: Uint8Array.of(0x52, 0x54, 0, 1, 2, 3), queueSize })
        : new ConsoleDevice({ output: (b) => (printed += b.length), queueSize });
  const msi = new CheckedMsi();
  try {
    const transport = new VirtioPciTransport(device, { memory: ram.mem, intx: new FakeIrqLine(), msi, interruptLine: 11 });
    transport.queues.forEach((q, i) => {
      instrumentQueue(q, `${device.name} (pci) queue ${i}`);
    });
    const driver = new PciModelDriver(rng, ram, transport, device);
    driver.initialize();
    for (let step = 0, steps = 10 + rng.below(40); step < steps; step++) {
      driver.step((ring, index) => {
        if (blk) {
          plausibleChain(rng, ram.mem, ring, [
            { len: rng.chance(0.9) ? 16 : rng.below(32), writable: false, data: blkHeader(rng) },
            ...Array.from({ length: rng.below(4) }, () => ({ len: rng.chance(0.8) ? 512 * rng.below(9) : rng.below(2000), writable: rng.chance(0.6) })),
            { len: rng.chance(0.9) ? 1 : rng.below(4), writable: rng.chance(0.95) },
          ]);
        } else {
          const buffers = Array.from({ length: 1 + rng.below(3) }, () => ({
            len: rng.chance(0.8) ? rng.pick([0, 12, 60, 1526, 4096]) : rng.below(70_000),
            writable: index === 0 ? rng.chance(0.95) : rng.chance(0.05),
          }));
          plausibleChain(rng, ram.mem, ring, buffers);
        }
      });
      if (kind === 'net' && rng.chance(0.3)) tap.arrive();
      if (device instanceof ConsoleDevice && rng.chance(0.3)) device.enqueueInput(new Uint8Array(1 + rng.below(300)).fill(0x61));
      if (rng.chance(0.2)) await new Promise((r) => setImmediate(r));
    }
    await driver.resetAndWait();
    addCoverage(cov, transport);
    if (blk && (device as BlkDevice).stats.inFlight !== 0)
      throw new Error(`${(device as BlkDevice).stats.inFlight} requests in flight after the reset completed`);
    ram.checkGuards();
    if (device instanceof ConsoleDevice && printed !== device.stats.txBytes)
      throw new Error(`console printed ${printed} bytes but counted ${device.stats.txBytes}`);
  } finally {
    if (device instanceof BlkDevice) await device.drain();
    device.close();
  }
}

export type FuzzTarget = 'queue' | 'blk' | 'net' | 'pci';
export const FUZZ_TARGETS: readonly FuzzTarget[] = ['queue', 'blk', 'net', 'pci'];

export interface FuzzReport {
  target: FuzzTarget;
  cases: number;
  firstSeed: number;
  ms: number;
  /** The slowest case and its time: a case that runs long is a finding too. */
  slowestSeed: number;
  slowestMs: number;
  coverage: Coverage;
}

/**
 * Runs `cases` cases of `target` from `firstSeed` on. Throws on the first
 * failure, naming the seed that replays it.
 */
export async function runFuzz(target: FuzzTarget, cases: number, firstSeed: number, imagePath?: string): Promise<FuzzReport> {
  const start = performance.now();
  let slowestSeed = firstSeed;
  let slowestMs = 0;
  const coverage = emptyCoverage();
  for (let i = 0; i < cases; i++) {
    const seed = (firstSeed + i) >>> 0;
    const t0 = performance.now();
    try {
      if (target === 'queue') fuzzQueueCase(seed, coverage);
      else if (target === 'blk') await fuzzBlkCase(seed, imagePath ?? missingImage(), coverage);
      else if (target === 'pci') await fuzzPciCase(seed, imagePath ?? missingImage(), coverage);
      else await fuzzNetCase(seed, coverage);
    } catch (err) {
      const e = err as Error;
      throw new Error(`fuzz ${target} failed at seed ${seed} (replay: npm run fuzz -- --target ${target} --seed ${seed} --cases 1): ${e.stack ?? e.message}`);
    }
    const ms = performance.now() - t0;
    if (ms > slowestMs) {
      slowestMs = ms;
      slowestSeed = seed;
    }
  }
  return { target, cases, firstSeed, ms: performance.now() - start, slowestSeed, slowestMs, coverage };
}

function missingImage(): never {
  throw new Error('the blk and pci targets need an image path (fuzzImage())');
}
