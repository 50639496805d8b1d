import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  BLK_CONFIG_BLK_SIZE,
  BLK_CONFIG_CAPACITY,
  BLK_CONFIG_MAX_DISCARD_SECTORS,
  BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS,
  BLK_CONFIG_MAX_WRITE_ZEROES_SEG,
  BLK_CONFIG_SEG_MAX,
  BLK_CONFIG_SIZE,
  BlkDevice,
  BlkError,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
  createBlkDevice,
  openDiskImage,
  parseDiskOption,
  type BlockBackend,
  type FileLocker,
  type IoCallback,
} from '../../src/virtio/blk/index.js';
import { pino } from 'pino';
import { GUEST_EVENT_LOG_LIMIT } from '../../src/base/log.js';
import { STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, VIRTIO_F_EVENT_IDX, featureBit, hasFeature } from '../../src/virtio/features.js';
import { INTERRUPT_CONFIG_CHANGE, MMIO_QUEUE_READY, MMIO_QUEUE_SEL, MMIO_STATUS } from '../../src/virtio/mmio.js';
import { CHAINS_PER_TURN, VIRTQ_DESC_F_NEXT } from '../../src/virtio/queue.js';
import { startDevice, type FakeBuffer, type FakeVirtqueue, type TestRig } from '../../src/testing/index.js';

const SECTOR = 512;
const DISK_SECTORS = 64;

let dir: string;
let imagePath: string;
const opened: BlkDevice[] = [];

const noLock: FileLocker = () => {};

/** Sector n is filled with the byte (n + 1) & 0xff. */
function pattern(sectors: number): Uint8Array {
  const b = new Uint8Array(sectors * SECTOR);
  for (let s = 0; s < sectors; s++) b.fill((s + 1) & 0xff, s * SECTOR, (s + 1) * SECTOR);
  return b;
}

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tsvmm-blk-'));
  imagePath = path.join(dir, 'disk.img');
  fs.writeFileSync(imagePath, pattern(DISK_SECTORS));
});

afterEach(() => {
  for (const d of opened.splice(0)) d.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

function openDevice(options: { readonly?: boolean; serial?: string } = {}): BlkDevice {
  const device = createBlkDevice(
    { path: imagePath, readonly: options.readonly ?? false, ...(options.serial ? { serial: options.serial } : {}) },
    { locker: noLock, queueSize: 16 },
  );
  opened.push(device);
  return device;
}

function header(type: number, sector: bigint | number): Uint8Array {
  const h = new Uint8Array(16);
  const v = new DataView(h.buffer);
  v.setUint32(0, type, true);
  v.setBigUint64(8, BigInt(sector), true);
  return h;
}

function segment(sector: number, count: number, flags = 0): Uint8Array {
  const s = new Uint8Array(16);
  const v = new DataView(s.buffer);
  v.setBigUint64(0, BigInt(sector), true);
  v.setUint32(8, count, true);
  v.setUint32(12, flags, true);
  return s;
}

interface Sent {
  head: number;
  /** Address of each buffer after the header, status last. */
  addrs: number[];
  statusAddr: number;
}

/** Queues header + middle buffers + 1-byte status, like Linux's virtblk_add_req. */
function send(q: FakeVirtqueue, hdr: Uint8Array, middle: FakeBuffer[], options: { indirect?: boolean } = {}): Sent {
  const { head, addrs } = q.addChain([{ len: 16, data: hdr }, ...middle, { len: 1, writable: true, data: Uint8Array.of(0xff) }], options);
  return { head, addrs: addrs.slice(1), statusAddr: addrs[addrs.length - 1]! };
}

async function run(rig: TestRig, device: BlkDevice): Promise<void> {
  rig.driver.notify(0);
  await device.drain();
}

function start(device: BlkDevice, features = device.offeredFeatures): TestRig {
  return startDevice(device, { features, queueSize: 16 });
}

describe('virtio-blk: configuration', () => {
  it('offers the features and config layout of a writable raw disk', () => {
    const device = openDevice();
    for (const bit of [VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, 2, 6, 28, 29, 32]) {
      expect(hasFeature(device.offeredFeatures, bit)).toBe(true);
    }
    expect(hasFeature(device.offeredFeatures, VIRTIO_BLK_F_RO)).toBe(false);
    const rig = start(device);
    const config = rig.driver.readConfig(0, BLK_CONFIG_SIZE);
    const v = new DataView(config.buffer);
    expect(v.getBigUint64(BLK_CONFIG_CAPACITY, true)).toBe(BigInt(DISK_SECTORS));
    expect(v.getUint32(BLK_CONFIG_SEG_MAX, true)).toBe(14);
    expect(v.getUint32(BLK_CONFIG_BLK_SIZE, true)).toBe(512);
    expect(v.getUint32(BLK_CONFIG_MAX_DISCARD_SECTORS, true)).toBeGreaterThan(0);
    expect(v.getUint32(BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS, true)).toBeGreaterThan(0);
    expect(v.getUint32(BLK_CONFIG_MAX_WRITE_ZEROES_SEG, true)).toBe(1);
    // Reads past the layout are zero.
    expect(Array.from(rig.driver.readConfig(BLK_CONFIG_SIZE, 4))).toEqual([0, 0, 0, 0]);
    // Reading capacity as two 32-bit halves, as Linux does.
    expect(new DataView(rig.driver.readConfig(0, 4).buffer).getUint32(0, true)).toBe(DISK_SECTORS);
  });

  it('offers VIRTIO_BLK_F_RO for a read-only disk', () => {
    expect(hasFeature(openDevice({ readonly: true }).offeredFeatures, VIRTIO_BLK_F_RO)).toBe(true);
  });
});

describe('virtio-blk: requests', () => {
  it('reads sectors into guest buffers split across descriptors', async () => {
    const device = openDevice();
    const rig = start(device);
    const q = rig.queues[0]!;
    const sent = send(q, header(VIRTIO_BLK_T_IN, 3), [
      { len: 256, writable: true },
      { len: 512, writable: true },
      { len: 256, writable: true },
    ]);
    await run(rig, device);
    expect(rig.mem.readU8(sent.statusAddr)).toBe(VIRTIO_BLK_S_OK);
    const got = new Uint8Array(1024);
    got.set(rig.mem.slice(sent.addrs[0]!, 256), 0);
    got.set(rig.mem.slice(sent.addrs[1]!, 512), 256);
    got.set(rig.mem.slice(sent.addrs[2]!, 256), 768);
    expect(got).toEqual(pattern(DISK_SECTORS).subarray(3 * SECTOR, 5 * SECTOR));
    expect(q.takeUsed()).toEqual([{ id: sent.head, len: 1025 }]);
    expect(device.stats).toMatchObject({ reads: 1, bytesRead: 1024, errors: 0, inFlight: 0 });
    expect(rig.irq.edges).toBe(1);
  });

  it('writes sectors to the image file, through an indirect table', async () => {
    const device = openDevice();
    const rig = start(device);
    const q = rig.queues[0]!;
    const data = new Uint8Array(1024).map((_, i) => (i * 7) & 0xff);
    const sent = send(
      q,
      header(VIRTIO_BLK_T_OUT, 10),
      [
        { len: 1000, data: data.subarray(0, 1000) },
        { len: 24, data: data.subarray(1000) },
      ],
      { indirect: true },
    );
    await run(rig, device);
    expect(rig.mem.readU8(sent.statusAddr)).toBe(VIRTIO_BLK_S_OK);
    expect(q.takeUsed()).toEqual([{ id: sent.head, len: 1 }]);
    const file = fs.readFileSync(imagePath);
    expect(new Uint8Array(file.subarray(10 * SECTOR, 12 * SECTOR))).toEqual(data);
    expect(file[9 * SECTOR + 511]).toBe(10);
    expect(file[12 * SECTOR]).toBe(13);
    expect(device.stats).toMatchObject({ writes: 1, bytesWritten: 1024 });
  });

  it('flushes', async () => {
    const device = openDevice();
    const rig = start(device);
    const sent = send(rig.queues[0]!, header(VIRTIO_BLK_T_FLUSH, 0), []);
    await run(rig, device);
    expect(rig.mem.readU8(sent.statusAddr)).toBe(VIRTIO_BLK_S_OK);
    expect(device.stats.flushes).toBe(1);
  });

  it('answers GET_ID with the zero-padded serial', async () => {
    const device = openDevice({ serial: 'disk-0001' });
    const rig = start(device);
    const q = rig.queues[0]!;
    const sent = send(q, header(VIRTIO_BLK_T_GET_ID, 0), [{ len: 20, writable: true, data: new Uint8Array(20).fill(0xee) }]);
    await run(rig, device);
    expect(rig.mem.readU8(sent.statusAddr)).toBe(VIRTIO_BLK_S_OK);
    const expected = new Uint8Array(20);
    expected.set(Buffer.from('disk-0001'));
    expect(rig.mem.slice(sent.addrs[0]!, 20)).toEqual(expected);
    expect(q.takeUsed()).toEqual([{ id: sent.head, len: 21 }]);
  });

  it('zeroes sectors with WRITE_ZEROES and accepts DISCARD', async () => {
    const device = openDevice();
    const rig = start(device);
    const q = rig.queues[0]!;
    const wz = send(q, header(VIRTIO_BLK_T_WRITE_ZEROES, 0), [{ len: 16, data: segment(4, 3) }]);
    const dc = send(q, header(VIRTIO_BLK_T_DISCARD, 0), [{ len: 16, data: segment(20, 8) }]);
    const wzUnmap = send(q, header(VIRTIO_BLK_T_WRITE_ZEROES, 0), [{ len: 16, data: segment(30, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) }]);
    await run(rig, device);
    expect(rig.mem.readU8(wz.statusAddr)).toBe(VIRTIO_BLK_S_OK);
    expect(rig.mem.readU8(dc.statusAddr)).toBe(VIRTIO_BLK_S_OK);
    expect(rig.mem.readU8(wzUnmap.statusAddr)).toBe(VIRTIO_BLK_S_OK);
    const file = new Uint8Array(fs.readFileSync(imagePath));
    const expected = pattern(DISK_SECTORS);
    expected.fill(0, 4 * SECTOR, 7 * SECTOR);
    expected.fill(0, 30 * SECTOR, 31 * SECTOR);
    expect(file).toEqual(expected);
    expect(device.stats).toMatchObject({ writeZeroes: 2, discards: 1 });
  });

  it.each([
    ['DISCARD with the unmap flag', VIRTIO_BLK_T_DISCARD, segment(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), VIRTIO_BLK_S_UNSUPP],
    ['an unknown segment flag', VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 1, 0x4), VIRTIO_BLK_S_UNSUPP],
    ['a segment past the end', VIRTIO_BLK_T_WRITE_ZEROES, segment(DISK_SECTORS - 1, 2), VIRTIO_BLK_S_IOERR],
    ['two segments (max 1)', VIRTIO_BLK_T_DISCARD, new Uint8Array([...segment(0, 1), ...segment(2, 1)]), VIRTIO_BLK_S_IOERR],
    ['a partial segment', VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 1).subarray(0, 12), VIRTIO_BLK_S_IOERR],
  ])('answers %s with the right status', async (_name, type, payload, status) => {
    const device = openDevice();
    const rig = start(device);
    const sent = send(rig.queues[0]!, header(type, 0), [{ len: payload.length, data: payload }]);
    await run(rig, device);
    expect(rig.mem.readU8(sent.statusAddr)).toBe(status);
    expect(new Uint8Array(fs.readFileSync(imagePath))).toEqual(pattern(DISK_SECTORS));
  });

  it('answers DISCARD and WRITE_ZEROES with UNSUPP when not negotiated', async () => {
    const device = openDevice();
    const features = device.offeredFeatures & ~(featureBit(VIRTIO_BLK_F_DISCARD) | featureBit(VIRTIO_BLK_F_WRITE_ZEROES));
    const rig = start(device, features);
    const a = send(rig.queues[0]!, header(VIRTIO_BLK_T_WRITE_ZEROES, 0), [{ len: 16, data: segment(0, 1) }]);
    const b = send(rig.queues[0]!, header(VIRTIO_BLK_T_DISCARD, 0), [{ len: 16, data: segment(0, 1) }]);
    await run(rig, device);
    expect(rig.mem.readU8(a.statusAddr)).toBe(VIRTIO_BLK_S_UNSUPP);
    expect(rig.mem.readU8(b.statusAddr)).toBe(VIRTIO_BLK_S_UNSUPP);
    expect(device.stats.unsupported).toBe(2);
  });

  it.each([
    ['the sector after the last', DISK_SECTORS, 512],
    ['a read running past the end', DISK_SECTORS - 1, 1024],
    ['a sector near 2^64', 0xffff_ffff_ffff_fff0n, 512],
    ['a length not a multiple of 512', 0, 100],
  ])('answers a read at %s with IOERR', async (_name, sector, len) => {
    const device = openDevice();
    const rig = start(device);
    const q = rig.queues[0]!;
    const sent = send(q, header(VIRTIO_BLK_T_IN, sector), [{ len, writable: true }]);
    await run(rig, device);
    expect(rig.mem.readU8(sent.statusAddr)).toBe(VIRTIO_BLK_S_IOERR);
    expect(q.takeUsed()).toEqual([{ id: sent.head, len: 1 }]);
    expect(device.stats).toMatchObject({ errors: 1, reads: 0 });
  });

  it('refuses writes to a read-only disk and leaves the file alone', async () => {
    const device = openDevice({ readonly: true });
    const rig = start(device);
    const w = send(rig.queues[0]!, header(VIRTIO_BLK_T_OUT, 0), [{ len: 512, data: new Uint8Array(512).fill(9) }]);
    const z = send(rig.queues[0]!, header(VIRTIO_BLK_T_WRITE_ZEROES, 0), [{ len: 16, data: segment(0, 1) }]);
    const r = send(rig.queues[0]!, header(VIRTIO_BLK_T_IN, 1), [{ len: 512, writable: true }]);
    await run(rig, device);
    expect(rig.mem.readU8(w.statusAddr)).toBe(VIRTIO_BLK_S_IOERR);
    expect(rig.mem.readU8(z.statusAddr)).toBe(VIRTIO_BLK_S_IOERR);
    expect(rig.mem.readU8(r.statusAddr)).toBe(VIRTIO_BLK_S_OK);
    expect(rig.mem.readU8(r.addrs[0]!)).toBe(2);
    expect(new Uint8Array(fs.readFileSync(imagePath))).toEqual(pattern(DISK_SECTORS));
  });

  it('answers unknown request types with UNSUPP', async () => {
    const device = openDevice();
    const rig = start(device);
    const a = send(rig.queues[0]!, header(2, 0), []); // SCSI_CMD (legacy)
    const b = send(rig.queues[0]!, header(99, 0), [{ len: 8, writable: true }]);
    await run(rig, device);
    expect(rig.mem.readU8(a.statusAddr)).toBe(VIRTIO_BLK_S_UNSUPP);
    expect(rig.mem.readU8(b.statusAddr)).toBe(VIRTIO_BLK_S_UNSUPP);
  });

  it('answers malformed chains with IOERR, or nothing when there is no status byte', async () => {
    const device = openDevice();
    const rig = start(device);
    const q = rig.queues[0]!;
    // IN whose data buffer is device-readable.
    const wrongIn = send(q, header(VIRTIO_BLK_T_IN, 0), [{ len: 512 }]);
    // OUT whose data buffer is device-writable.
    const wrongOut = send(q, header(VIRTIO_BLK_T_OUT, 0), [{ len: 512, writable: true }]);
    // A header of 8 bytes.
    const short = q.addChain([
      { len: 8, data: header(VIRTIO_BLK_T_IN, 0).subarray(0, 8) },
      { len: 1, writable: true },
    ]);
    // GET_ID with a 10-byte buffer.
    const shortId = send(q, header(VIRTIO_BLK_T_GET_ID, 0), [{ len: 10, writable: true }]);
    // No writable status byte at the end.
    const noStatus = q.addChain([{ len: 16, data: header(VIRTIO_BLK_T_IN, 0) }, { len: 512, writable: true }, { len: 1 }]);
    // A device-readable buffer between the writable data and the status.
    const mixed = send(q, header(VIRTIO_BLK_T_IN, 0), [{ len: 512, writable: true }, { len: 512 }], { indirect: true });
    await run(rig, device);
    expect(rig.mem.readU8(mixed.statusAddr)).toBe(VIRTIO_BLK_S_IOERR);
    expect(rig.mem.readU8(wrongIn.statusAddr)).toBe(VIRTIO_BLK_S_IOERR);
    expect(rig.mem.readU8(wrongOut.statusAddr)).toBe(VIRTIO_BLK_S_IOERR);
    expect(rig.mem.readU8(short.addrs[1]!)).toBe(VIRTIO_BLK_S_IOERR);
    expect(rig.mem.readU8(shortId.statusAddr)).toBe(VIRTIO_BLK_S_IOERR);
    const used = new Map(q.takeUsed().map((u) => [u.id, u.len]));
    expect(used.get(noStatus.head)).toBe(0);
    expect(used.size).toBe(6);
    expect(device.stats.errors).toBe(6);
    expect(rig.driver.status() & STATUS_DEVICE_NEEDS_RESET).toBe(0);
    expect(new Uint8Array(fs.readFileSync(imagePath))).toEqual(pattern(DISK_SECTORS));
  });
});

/** Wraps a backend and holds each completion until the test releases it. */
class HeldBackend implements BlockBackend {
  readonly held: Array<{ what: string; release: () => void }> = [];
  constructor(private readonly inner: BlockBackend) {}
  get size() {
    return this.inner.size;
  }
  get readonly() {
    return this.inner.readonly;
  }
  private hold(what: string, done: IoCallback): IoCallback {
    return (err) => this.held.push({ what, release: () => done(err) });
  }
  readv(b: readonly Uint8Array[], p: number, done: IoCallback) {
    this.inner.readv(b, p, this.hold(`read@${p / SECTOR}`, done));
  }
  writev(b: readonly Uint8Array[], p: number, done: IoCallback) {
    this.inner.writev(b, p, this.hold(`write@${p / SECTOR}`, done));
  }
  flush(done: IoCallback) {
    this.inner.flush(this.hold('flush', done));
  }
  writeZeroes(p: number, l: number, done: IoCallback) {
    this.inner.writeZeroes(p, l, this.hold('zero', done));
  }
  discard(p: number, l: number, done: IoCallback) {
    this.inner.discard(p, l, this.hold('discard', done));
  }
  close() {
    this.inner.close();
  }
}

async function until(condition: () => boolean): Promise<void> {
  for (let i = 0; i < 10_000 && !condition(); i++) await new Promise((r) => setTimeout(r, 1));
  expect(condition()).toBe(true);
}

describe('virtio-blk: asynchronous completion', () => {
  it('completes requests out of order, batching the interrupt', async () => {
    const backend = new HeldBackend(openDiskImage(imagePath, { locker: noLock }));
    const device = new BlkDevice({ backend, queueSize: 16 });
    opened.push(device);
    const rig = start(device);
    const q = rig.queues[0]!;
    const first = send(q, header(VIRTIO_BLK_T_IN, 1), [{ len: 512, writable: true }]);
    const second = send(q, header(VIRTIO_BLK_T_IN, 2), [{ len: 512, writable: true }]);
    const third = send(q, header(VIRTIO_BLK_T_IN, 3), [{ len: 512, writable: true }]);
    rig.driver.notify(0);
    expect(device.stats.inFlight).toBe(3);
    await until(() => backend.held.length === 3);
    expect(q.usedIdx()).toBe(0);
    // The second completes first, alone.
    backend.held.find((h) => h.what === 'read@2')!.release();
    await until(() => rig.irq.edges === 1);
    expect(q.takeUsed()).toEqual([{ id: second.head, len: 513 }]);
    expect(rig.mem.readU8(second.addrs[0]!)).toBe(3);
    // Like virtqueue_enable_cb: ask for an interrupt at the next used element.
    q.setUsedEvent(q.usedIdx());
    // Then the other two in one event-loop turn: one interrupt for both.
    backend.held.find((h) => h.what === 'read@3')!.release();
    backend.held.find((h) => h.what === 'read@1')!.release();
    await device.drain();
    expect(q.takeUsed().map((u) => u.id)).toEqual([third.head, first.head]);
    expect(rig.irq.edges).toBe(2);
    expect(rig.mem.readU8(first.statusAddr)).toBe(VIRTIO_BLK_S_OK);
  });

  it('does not notify when EVENT_IDX says the driver is not waiting', async () => {
    const device = openDevice();
    const rig = start(device);
    const q = rig.queues[0]!;
    q.setUsedEvent(5);
    send(q, header(VIRTIO_BLK_T_IN, 0), [{ len: 512, writable: true }]);
    await run(rig, device);
    expect(q.takeUsed()).toHaveLength(1);
    expect(rig.irq.edges).toBe(0);
    expect(hasFeature(rig.transport.negotiatedFeatures, VIRTIO_F_EVENT_IDX)).toBe(true);
    // The device asked to hear about the next buffer.
    expect(q.availEvent()).toBe(1);
  });

  it('does not report completions that finish after a reset', async () => {
    const backend = new HeldBackend(openDiskImage(imagePath, { locker: noLock }));
    const device = new BlkDevice({ backend, queueSize: 16 });
    opened.push(device);
    const rig = start(device);
    const q = rig.queues[0]!;
    const sent = send(q, header(VIRTIO_BLK_T_FLUSH, 0), []);
    rig.driver.notify(0);
    await until(() => backend.held.length === 1);
    rig.driver.write32(MMIO_STATUS, 0);
    backend.held[0]!.release();
    await device.drain();
    expect(q.usedIdx()).toBe(0);
    expect(rig.mem.readU8(sent.statusAddr)).toBe(0xff);
    expect(rig.irq.edges).toBe(0);
  });
});

describe('virtio-blk: hostile rings', () => {
  const cases: Array<[string, (q: FakeVirtqueue) => void]> = [
    [
      'a descriptor loop',
      (q) => {
        q.writeDescriptor(0, { addr: 0x2000, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 1 });
        q.writeDescriptor(1, { addr: 0x2000, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 0 });
        q.publish(0);
      },
    ],
    [
      'a buffer outside guest memory',
      (q) => {
        q.writeDescriptor(0, { addr: 0x7fff_0000, len: 16, flags: 0, next: 0 });
        q.publish(0);
      },
    ],
    ['an avail index jump', (q) => q.setAvailIdx(1000)],
    ['a head index beyond the queue', (q) => q.publish(200)],
  ];

  it.each(cases)('%s sets DEVICE_NEEDS_RESET without throwing', async (_name, arrange) => {
    const device = openDevice();
    const rig = start(device);
    arrange(rig.queues[0]!);
    expect(() => rig.driver.notify(0)).not.toThrow();
    await device.drain();
    expect(rig.driver.status() & STATUS_DEVICE_NEEDS_RESET).toBe(STATUS_DEVICE_NEEDS_RESET);
    expect(rig.transport.interruptStatus & INTERRUPT_CONFIG_CHANGE).toBe(INTERRUPT_CONFIG_CHANGE);
    expect(rig.transport.stats.needsReset).toBe(1);
    // A good request afterwards is ignored until the driver resets.
    const later = send(rig.queues[0]!, header(VIRTIO_BLK_T_FLUSH, 0), []);
    rig.transport.notifyQueue(0);
    await device.drain();
    expect(rig.mem.readU8(later.statusAddr)).toBe(0xff);
  });
});

/** Starts each host I/O only when the test says so: a thread pool with a backlog. */
class DeferredBackend implements BlockBackend {
  readonly waiting: Array<() => void> = [];
  constructor(private readonly inner: BlockBackend) {}
  get size() {
    return this.inner.size;
  }
  get readonly() {
    return this.inner.readonly;
  }
  readv(b: readonly Uint8Array[], p: number, done: IoCallback) {
    this.waiting.push(() => this.inner.readv(b, p, done));
  }
  writev(b: readonly Uint8Array[], p: number, done: IoCallback) {
    this.waiting.push(() => this.inner.writev(b, p, done));
  }
  flush(done: IoCallback) {
    this.waiting.push(() => this.inner.flush(done));
  }
  writeZeroes(p: number, l: number, done: IoCallback) {
    this.waiting.push(() => this.inner.writeZeroes(p, l, done));
  }
  discard(p: number, l: number, done: IoCallback) {
    this.waiting.push(() => this.inner.discard(p, l, done));
  }
  startAll() {
    for (const start of this.waiting.splice(0)) start();
  }
  close() {
    this.inner.close();
  }
}

const MARK = 0xa5;

/** True when every byte of every range still holds MARK. */
function stillMarked(rig: TestRig, ranges: ReadonlyArray<readonly [number, number]>): boolean {
  return ranges.every(([addr, len]) => rig.mem.slice(addr, len).every((b) => b === MARK));
}

function mark(rig: TestRig, ranges: ReadonlyArray<readonly [number, number]>): void {
  for (const [addr, len] of ranges) rig.mem.slice(addr, len).fill(MARK);
}

describe('virtio-blk: a hostile driver', () => {
  it('on a real image, completes a reset (status reads 0) only when no read can still write guest memory', async () => {
    // The finding: 80 x 256 KiB reads in flight, a reset, the guest reuses
    // the buffers, and disk data still lands in them afterwards.
    const big = path.join(dir, 'big.img');
    fs.writeFileSync(big, Buffer.alloc(4 << 20, 0x3c));
    const device = new BlkDevice({ backend: openDiskImage(big, { locker: noLock }), queueSize: 128 });
    opened.push(device);
    const rig = startDevice(device, { features: device.offeredFeatures, queueSize: 128, memSize: 32 << 20 });
    const q = rig.queues[0]!;
    const buffers: Array<[number, number]> = [];
    for (let i = 0; i < 80; i++) {
      const sent = send(q, header(VIRTIO_BLK_T_IN, (i % 8) * 512), [{ len: 256 << 10, writable: true }], { indirect: true });
      buffers.push([sent.addrs[0]!, 256 << 10], [sent.statusAddr, 1]);
    }
    rig.driver.notify(0);
    rig.driver.write32(MMIO_STATUS, 0);
    // What Linux's vp_reset does: wait for status 0, then reuse the memory.
    await until(() => rig.driver.status() === 0);
    mark(rig, buffers);
    await device.drain();
    await new Promise((r) => setTimeout(r, 20));
    expect(stillMarked(rig, buffers)).toBe(true);
    expect(q.usedIdx()).toBe(0);
    expect(rig.irq.edges).toBe(0);
  });

  it('refuses register writes while a reset waits for in-flight I/O, and then accepts a new initialization', async () => {
    const backend = new DeferredBackend(openDiskImage(imagePath, { locker: noLock }));
    const device = new BlkDevice({ backend, queueSize: 16 });
    opened.push(device);
    const rig = start(device);
    const q = rig.queues[0]!;
    const sent = send(q, header(VIRTIO_BLK_T_IN, 0), [{ len: 4096, writable: true }]);
    rig.driver.notify(0);
    const before = rig.driver.status();
    rig.driver.write32(MMIO_STATUS, 0);
    expect(rig.driver.status()).toBe(before);
    rig.driver.write32(MMIO_STATUS, STATUS_ACKNOWLEDGE);
    expect(rig.driver.status()).toBe(before);
    expect(rig.transport.stats.writesDuringReset).toBe(1);
    backend.startAll();
    await until(() => rig.driver.status() === 0);
    expect(rig.mem.readU8(sent.statusAddr)).toBe(0xff);
    expect(rig.transport.stats.resetsDrained).toBe(1);
    expect(rig.driver.negotiate(device.offeredFeatures)).toBe(true);
  });

  it('after QueueReady = 0, reads 1 there until no request can touch the queue, then nothing lands', async () => {
    const backend = new DeferredBackend(openDiskImage(imagePath, { locker: noLock }));
    const device = new BlkDevice({ backend, queueSize: 16 });
    opened.push(device);
    const rig = start(device);
    const q = rig.queues[0]!;
    const ranges: Array<[number, number]> = [];
    for (let i = 0; i < 4; i++) {
      const sent = send(q, header(VIRTIO_BLK_T_IN, i * 8), [{ len: 4096, writable: true }]);
      ranges.push([sent.addrs[0]!, 4096], [sent.statusAddr, 1]);
    }
    rig.driver.notify(0);
    rig.driver.write32(MMIO_QUEUE_SEL, 0);
    rig.driver.write32(MMIO_QUEUE_READY, 0);
    expect(rig.driver.read32(MMIO_QUEUE_READY)).toBe(1);
    backend.startAll();
    await until(() => rig.driver.read32(MMIO_QUEUE_READY) === 0);
    mark(rig, ranges);
    await device.drain();
    await new Promise((r) => setTimeout(r, 10));
    expect(stillMarked(rig, ranges)).toBe(true);
    expect(q.usedIdx()).toBe(0);
  });

  it('treats a head posted again while in use as a driver error: requests in flight stay within the queue size', async () => {
    const backend = new HeldBackend(openDiskImage(imagePath, { locker: noLock }));
    const device = new BlkDevice({ backend, queueSize: 16 });
    opened.push(device);
    const rig = start(device);
    const q = rig.queues[0]!;
    const heads: number[] = [];
    for (let i = 0; i < 5; i++) heads.push(send(q, header(VIRTIO_BLK_T_IN, i), [{ len: 512, writable: true }]).head);
    rig.driver.notify(0);
    expect(device.stats.inFlight).toBe(5);
    // Post the same heads again without waiting for them to be used.
    for (let round = 0; round < 3; round++) for (const h of heads) q.publish(h);
    rig.driver.notify(0);
    expect(device.stats.inFlight).toBe(5);
    expect(rig.driver.status() & STATUS_DEVICE_NEEDS_RESET).toBe(STATUS_DEVICE_NEEDS_RESET);
    expect(rig.transport.lastResetReason).toMatch(/^head-in-use/);
    await until(() => backend.held.length === 5);
    for (const h of backend.held.splice(0)) h.release();
    await device.drain();
  });

  it('submits at most one turn of chains per event-loop turn; the rest follows', async () => {
    const backend = new HeldBackend(openDiskImage(imagePath, { locker: noLock }));
    const device = new BlkDevice({ backend, queueSize: 256 });
    opened.push(device);
    const rig = startDevice(device, { features: device.offeredFeatures, queueSize: 256, memSize: 8 << 20 });
    const q = rig.queues[0]!;
    for (let i = 0; i < 200; i++) send(q, header(VIRTIO_BLK_T_FLUSH, 0), [], { indirect: true });
    rig.driver.notify(0);
    expect(device.stats.inFlight).toBe(CHAINS_PER_TURN);
    await new Promise((r) => setImmediate(r));
    expect(device.stats.inFlight).toBe(2 * CHAINS_PER_TURN);
    await until(() => backend.held.length === 200);
    for (const h of backend.held.splice(0)) h.release();
    await device.drain();
    expect(q.takeUsed()).toHaveLength(200);
  });

  it('drains chains left for a later turn before it counts as idle, and touches no image once closed', async () => {
    const backend = new HeldBackend(openDiskImage(imagePath, { locker: noLock }));
    const device = new BlkDevice({ backend, queueSize: 256 });
    const rig = startDevice(device, { features: device.offeredFeatures, queueSize: 256, memSize: 8 << 20 });
    const q = rig.queues[0]!;
    for (let i = 0; i < 100; i++) send(q, header(VIRTIO_BLK_T_GET_ID, 0), [{ len: 20, writable: true }], { indirect: true });
    rig.driver.notify(0);
    // 64 answered at once; drain also waits for the 36 of the next turn.
    await device.drain();
    expect(q.takeUsed()).toHaveLength(100);
    // Chains left for a later turn when the device is closed are never submitted.
    for (let i = 0; i < 100; i++) send(q, header(VIRTIO_BLK_T_FLUSH, 0), [], { indirect: true });
    rig.driver.notify(0);
    const submitted = device.stats.flushes;
    device.close();
    await new Promise((r) => setImmediate(r));
    expect(device.stats.flushes).toBe(submitted);
    expect(submitted).toBe(CHAINS_PER_TURN);
  });

  it('logs a refused status write a few times, then only counts it', () => {
    const lines: string[] = [];
    const logger = pino({ level: 'info' }, { write: (line: string) => void lines.push(line) });
    const device = openDevice();
    const rig = startDevice(device, { features: device.offeredFeatures, queueSize: 16, logger });
    rig.driver.write32(MMIO_STATUS, 0);
    lines.length = 0;
    for (let i = 0; i < 10_000; i++) rig.driver.write32(MMIO_STATUS, STATUS_DRIVER); // DRIVER before ACKNOWLEDGE
    expect(lines.length).toBe(GUEST_EVENT_LOG_LIMIT + 1);
    expect(lines.at(-1)).toMatch(/further ones are only counted/);
    expect(rig.transport.stats.badAccesses).toBe(10_000);
    expect(rig.transport.stats.unloggedEvents).toBe(10_000 - GUEST_EVENT_LOG_LIMIT);
  });
});

describe('virtio-blk: opening images', () => {
  it('opens read-write with an exclusive lock, read-only with a shared one', () => {
    const calls: boolean[] = [];
    const locker: FileLocker = (_fd, exclusive) => void calls.push(exclusive);
    const rw = openDiskImage(imagePath, { locker });
    const ro = openDiskImage(imagePath, { readonly: true, locker });
    try {
      expect(calls).toEqual([true, false]);
      expect(rw.size).toBe(DISK_SECTORS * SECTOR);
      // O_ACCMODE of each fd, from /proc: 0 = O_RDONLY, 2 = O_RDWR.
      const accmode = (fd: number) => parseInt(/flags:\s*([0-7]+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8) & 3;
      expect(accmode(rw.fd)).toBe(2);
      expect(accmode(ro.fd)).toBe(0);
    } finally {
      rw.close();
      ro.close();
    }
  });

  it('reports a locked image as in use by another process', () => {
    const locker: FileLocker = () => {
      throw Object.assign(new Error('Resource temporarily unavailable'), { code: 'EAGAIN', syscall: 'fcntl' });
    };
    expect(() => openDiskImage(imagePath, { locker })).toThrow(`disk image ${imagePath} is in use by another process (locked)`);
    try {
      openDiskImage(imagePath, { locker });
    } catch (err) {
      expect((err as BlkError).kind).toBe('LOCKED');
    }
  });

  it.each([
    ['a missing file', () => path.join(dir, 'nope.img'), 'NOT_FOUND', /does not exist/],
    ['a directory', () => dir, 'NOT_A_FILE', /is a directory/],
    ['an empty file', () => (fs.writeFileSync(path.join(dir, 'e.img'), ''), path.join(dir, 'e.img')), 'BAD_SIZE', /is empty/],
    [
      'a size not a multiple of 512',
      () => (fs.writeFileSync(path.join(dir, 'o.img'), new Uint8Array(1000)), path.join(dir, 'o.img')),
      'BAD_SIZE',
      /1000 bytes, not a multiple of 512; pad it with `truncate -s %512/,
    ],
  ])('refuses %s with a one-line error', (_name, makePath, code, message) => {
    const p = makePath();
    let caught: unknown;
    try {
      openDiskImage(p, { locker: noLock });
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(BlkError);
    expect((caught as BlkError).kind).toBe(code);
    expect((caught as BlkError).message).toMatch(message);
    expect((caught as BlkError).message).not.toContain('\n');
  });

  it('refuses a directory also when read-only', () => {
    expect(() => openDiskImage(dir, { readonly: true, locker: noLock })).toThrow(/is a directory/);
  });
});

describe('virtio-blk: --disk option', () => {
  it('parses a path with readonly and serial', () => {
    expect(parseDiskOption('/images/root.img')).toEqual({ path: '/images/root.img', readonly: false });
    expect(parseDiskOption('a.img,readonly,serial=vol-1')).toEqual({ path: 'a.img', readonly: true, serial: 'vol-1' });
    expect(parseDiskOption('b.img,transport=mmio')).toEqual({ path: 'b.img', readonly: false, transport: 'mmio' });
    expect(() => parseDiskOption('b.img,transport=usb')).toThrow(/transport must be pci or mmio/);
  });

  it.each([
    ['', /path is missing/],
    [',readonly', /path is missing/],
    ['a.img,ro', /unknown option "ro"/],
    ['a.img,readonly=yes', /takes no value/],
    ['a.img,serial=', /needs a value/],
    ['a.img,serial=123456789012345678901', /21 bytes; at most 20/],
    ['a.img,serial=caf\u00e9', /printable ASCII/],
  ])('refuses %j', (spec, message) => {
    expect(() => parseDiskOption(spec)).toThrow(message);
  });

  it('accepts a 20-byte serial', () => {
    expect(parseDiskOption('a.img,serial=12345678901234567890').serial).toHaveLength(20);
  });
});
