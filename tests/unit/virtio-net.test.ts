import { describe, expect, it, vi } from 'vitest';
import {
  EAGAIN,
  EBADF,
  MAX_FRAME_SIZE,
  NET_CONFIG_MAX_VIRTQUEUE_PAIRS,
  NET_CONFIG_SIZE,
  NET_CONFIG_STATUS,
  NetDevice,
  NetError,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
  Tap,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_F_STATUS,
  VIRTIO_NET_S_LINK_UP,
  VNET_HDR_SIZE,
  createNetDevice,
  formatMac,
  macFromSeed,
  parseMac,
  parseNetOption,
  type TapBackend,
  type TapNative,
} from '../../src/virtio/net/index.js';
import {
  STATUS_DEVICE_NEEDS_RESET,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_VERSION_1,
  featureMask,
  hasFeature,
} from '../../src/virtio/features.js';
import { MMIO_QUEUE_READY, MMIO_QUEUE_SEL, MMIO_STATUS } from '../../src/virtio/mmio.js';
import { CHAINS_PER_TURN, VIRTQ_DESC_F_NEXT } from '../../src/virtio/queue.js';
import { FakeMmioDriver, startDevice, type FakeVirtqueue, type TestRig } from '../../src/testing/index.js';
import { FakeIrqLine } from '../../src/testing/index.js';
import { GuestMemory } from '../../src/base/memory.js';
import { MmioTransport } from '../../src/virtio/mmio.js';

/** A TAP whose kernel queue is an array. */
class FakeTap implements TapBackend {
  readonly name = 'tap-test';
  /** Frames (vnet header included) waiting to be read by the device. */
  readonly queued: Uint8Array[] = [];
  /** Frames the device wrote. */
  readonly written: Uint8Array[] = [];
  onReadable: (() => void) | undefined;
  startCount = 0;
  offload: number | undefined;
  hdrSize: number | undefined;
  writeResult: number | undefined;
  closed = false;

  read(buf: Uint8Array): number {
    const frame = this.queued.shift();
    if (!frame) return -EAGAIN;
    buf.set(frame);
    return frame.length;
  }
  writev(pieces: Uint8Array[]): number {
    if (this.writeResult !== undefined) return this.writeResult;
    const frame = new Uint8Array(pieces.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of pieces) {
      frame.set(p, at);
      at += p.length;
    }
    this.written.push(frame);
    return frame.length;
  }
  startReadable(cb: () => void): void {
    this.onReadable = cb;
    this.startCount++;
  }
  stopReadable(): void {
    this.onReadable = undefined;
  }
  setOffload(flags: number): void {
    this.offload = flags;
  }
  setVnetHdrSize(n: number): void {
    this.hdrSize = n;
  }
  close(): void {
    this.closed = true;
  }
  get watching(): boolean {
    return this.onReadable !== undefined;
  }
  /** What uv_poll does: call back while the fd is readable and watched. */
  pump(): void {
    for (let i = 0; i < 100 && this.onReadable && this.queued.length > 0; i++) this.onReadable();
  }
}

const MAC = Uint8Array.of(0x52, 0x54, 0x00, 0x12, 0x34, 0x56);
const BASE = featureMask(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS);
const RX = 0;
const TX = 1;

function setup(features = BASE, queueSize = 16) {
  const tap = new FakeTap();
  const device = new NetDevice({ tap, mac: MAC, queueSize });
  const rig = startDevice(device, { features, queueSize });
  return { tap, device, rig, rx: rig.queues[RX]!, tx: rig.queues[TX]! };
}

/** A frame as the TAP delivers it: a vnet header then `payload` bytes. */
function tapFrame(payloadLength: number, seed = 1, flags = 0): Uint8Array {
  const f = new Uint8Array(VNET_HDR_SIZE + payloadLength);
  f[0] = flags;
  for (let i = 0; i < payloadLength; i++) f[VNET_HDR_SIZE + i] = (seed + i) & 0xff;
  // The kernel leaves num_buffers untouched: make it garbage.
  f[10] = 0xaa;
  f[11] = 0xbb;
  return f;
}

function postRx(rx: FakeVirtqueue, sizes: number[]): Array<{ head: number; addrs: number[] }> {
  return sizes.map((len) => rx.addChain([{ len, writable: true }]));
}

/** The bytes a used RX buffer holds. */
function readBack(rig: TestRig, addr: number, len: number): Uint8Array {
  return Uint8Array.from(rig.mem.slice(addr, len));
}

describe('virtio-net: configuration and negotiation', () => {
  it('presents the MAC, link up and one queue pair', () => {
    const { rig, device } = setup();
    const config = rig.driver.readConfig(0, NET_CONFIG_SIZE);
    expect(config.subarray(0, 6)).toEqual(MAC);
    const v = new DataView(config.buffer);
    expect(v.getUint16(NET_CONFIG_STATUS, true)).toBe(VIRTIO_NET_S_LINK_UP);
    expect(v.getUint16(NET_CONFIG_MAX_VIRTQUEUE_PAIRS, true)).toBe(1);
    for (const bit of [0, 1, 5, 7, 8, 9, 11, 12, 13, 15, 16, 28, 29, 32]) {
      expect(hasFeature(device.offeredFeatures, bit)).toBe(true);
    }
  });

  it('sets the vnet header size and the TAP offloads from the GUEST_* features accepted', () => {
    const all = setup(BASE | featureMask(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN));
    expect(all.tap.hdrSize).toBe(12);
    expect(all.tap.offload).toBe(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN);
    const csumOnly = setup(BASE | featureMask(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4));
    expect(csumOnly.tap.offload).toBe(TUN_F_CSUM);
    expect(setup().tap.offload).toBe(0);
  });

  it('refuses feature sets that break the dependencies of 5.1.3.1', () => {
    const tap = new FakeTap();
    const device = new NetDevice({ tap, mac: MAC });
    const transport = new MmioTransport(device, { memory: GuestMemory.fromBuffer(new Uint8Array(4096)), irq: new FakeIrqLine() });
    const driver = new FakeMmioDriver(transport);
    expect(driver.negotiate(BASE | featureMask(VIRTIO_NET_F_GUEST_TSO4))).toBe(false);
    expect(driver.negotiate(BASE | featureMask(VIRTIO_NET_F_HOST_TSO4))).toBe(false);
    expect(driver.negotiate(BASE | featureMask(VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_CSUM))).toBe(false);
    expect(driver.negotiate(BASE | featureMask(VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6))).toBe(true);
  });
});

describe('virtio-net: transmit', () => {
  it('writes each chain (header and frame) to the TAP and returns the buffers', () => {
    const { tap, device, rig, tx } = setup();
    const hdr = new Uint8Array(VNET_HDR_SIZE).fill(0);
    hdr[0] = 1; // NEEDS_CSUM passes through untouched
    const payload = Uint8Array.from({ length: 100 }, (_, i) => i);
    const a = tx.addChain([
      { len: 12, data: hdr },
      { len: 60, data: payload.subarray(0, 60) },
      { len: 40, data: payload.subarray(60) },
    ]);
    const b = tx.addChain([{ len: 12 + 100, data: new Uint8Array([...hdr, ...payload]) }], { indirect: true });
    rig.driver.notify(TX);
    expect(tap.written).toHaveLength(2);
    expect(tap.written[0]).toEqual(new Uint8Array([...hdr, ...payload]));
    expect(tap.written[1]).toEqual(tap.written[0]);
    expect(tx.takeUsed()).toEqual([
      { id: a.head, len: 0 },
      { id: b.head, len: 0 },
    ]);
    expect(device.stats).toMatchObject({ txPackets: 2, txBytes: 200, txErrors: 0 });
    expect(rig.irq.edges).toBe(1);
  });

  it('drops runt chains and counts TAP refusals, still returning every buffer', () => {
    const { tap, device, rig, tx } = setup();
    tx.addChain([{ len: 8, data: new Uint8Array(8) }]);
    rig.driver.notify(TX);
    expect(tap.written).toHaveLength(0);
    expect(device.stats.txErrors).toBe(1);
    tap.writeResult = -EAGAIN;
    tx.addChain([{ len: 80, data: new Uint8Array(80) }]);
    rig.driver.notify(TX);
    expect(device.stats.txDropped).toBe(1);
    expect(tx.takeUsed()).toHaveLength(2);
    expect(device.stats.txPackets).toBe(0);
  });
});

describe('virtio-net: receive', () => {
  it('places one frame per buffer without MRG_RXBUF, num_buffers = 1', () => {
    const { tap, device, rig, rx } = setup();
    const bufs = postRx(rx, [1526, 1526]);
    rig.driver.notify(RX);
    expect(tap.watching).toBe(true);
    tap.queued.push(tapFrame(60, 1, 2 /* DATA_VALID */), tapFrame(1514, 7));
    tap.pump();
    const used = rx.takeUsed();
    expect(used).toEqual([
      { id: bufs[0]!.head, len: 72 },
      { id: bufs[1]!.head, len: 1526 },
    ]);
    const first = readBack(rig, bufs[0]!.addrs[0]!, 72);
    const expected = tapFrame(60, 1);
    expected[0] = 0; // GUEST_CSUM not negotiated: flags cleared
    expected[10] = 1; // num_buffers
    expected[11] = 0;
    expect(first).toEqual(expected);
    expect(readBack(rig, bufs[1]!.addrs[0]!, 1526).subarray(12)).toEqual(tapFrame(1514, 7).subarray(12));
    expect(device.stats).toMatchObject({ rxPackets: 2, rxBytes: 60 + 1514 });
    expect(rig.irq.edges).toBeGreaterThanOrEqual(1);
    // Out of buffers: the device stopped watching the TAP.
    expect(tap.watching).toBe(false);
  });

  it('keeps the header flags when GUEST_CSUM is negotiated', () => {
    const { tap, rig, rx } = setup(BASE | featureMask(VIRTIO_NET_F_GUEST_CSUM));
    const [buf] = postRx(rx, [200]);
    rig.driver.notify(RX);
    tap.queued.push(tapFrame(60, 1, 2));
    tap.pump();
    expect(rig.mem.readU8(buf!.addrs[0]!)).toBe(2);
  });

  it('spreads a frame over several buffers with MRG_RXBUF and publishes them together', () => {
    const { tap, device, rig, rx } = setup(BASE | featureMask(VIRTIO_NET_F_MRG_RXBUF));
    const bufs = postRx(rx, [100, 100, 100, 100]);
    rig.driver.notify(RX);
    tap.queued.push(tapFrame(238, 3)); // 250 bytes with the header
    tap.pump();
    const used = rx.takeUsed();
    expect(used).toEqual([
      { id: bufs[0]!.head, len: 100 },
      { id: bufs[1]!.head, len: 100 },
      { id: bufs[2]!.head, len: 50 },
    ]);
    const got = new Uint8Array([
      ...readBack(rig, bufs[0]!.addrs[0]!, 100),
      ...readBack(rig, bufs[1]!.addrs[0]!, 100),
      ...readBack(rig, bufs[2]!.addrs[0]!, 50),
    ]);
    const expected = tapFrame(238, 3);
    expected[10] = 3; // num_buffers
    expected[11] = 0;
    expect(got).toEqual(expected);
    expect(device.stats.rxPackets).toBe(1);
    // The fourth buffer is still there; the TAP is empty, so the device watches it.
    expect(rx.availIndex - rx.usedIdx()).toBe(1);
    expect(tap.watching).toBe(true);
  });

  it('stops reading the TAP when the guest has no buffers, and resumes on notification', () => {
    const { tap, device, rig, rx } = setup();
    expect(tap.watching).toBe(true); // watching from activation
    tap.queued.push(tapFrame(60, 1), tapFrame(61, 2));
    tap.pump();
    // No buffers: nothing was read, the frames stay in the kernel.
    expect(tap.watching).toBe(false);
    expect(tap.queued).toHaveLength(2);
    expect(rx.availEvent()).toBe(0); // notify me at the next buffer
    const [buf] = postRx(rx, [1526]);
    rig.driver.notify(RX);
    expect(rx.takeUsed()).toEqual([{ id: buf!.head, len: 72 }]);
    expect(tap.queued).toHaveLength(1);
    expect(tap.watching).toBe(false);
    expect(rx.availEvent()).toBe(1);
    postRx(rx, [1526]);
    rig.driver.notify(RX);
    expect(tap.queued).toHaveLength(0);
    // Both buffers used: still nothing to read into.
    expect(tap.watching).toBe(false);
    // A spare buffer and an empty TAP: now it waits for the fd.
    postRx(rx, [1526]);
    rig.driver.notify(RX);
    expect(tap.watching).toBe(true);
    expect(tap.startCount).toBe(2);
    expect(device.stats).toMatchObject({ rxPackets: 2, rxDropped: 0 });
  });

  it('drops a frame larger than a buffer without MRG_RXBUF and keeps the buffer', () => {
    const { tap, device, rig, rx } = setup();
    const [buf] = postRx(rx, [1526]);
    rig.driver.notify(RX);
    tap.queued.push(tapFrame(4000, 1), tapFrame(100, 2));
    tap.pump();
    expect(device.stats.rxDropped).toBe(1);
    expect(rx.takeUsed()).toEqual([{ id: buf!.head, len: 112 }]);
    expect(readBack(rig, buf!.addrs[0]!, 112).subarray(12)).toEqual(tapFrame(100, 2).subarray(12));
  });

  it('with MRG_RXBUF, waits for more buffers when those posted are too few', () => {
    const { tap, device, rig, rx } = setup(BASE | featureMask(VIRTIO_NET_F_MRG_RXBUF));
    postRx(rx, [100]);
    rig.driver.notify(RX);
    tap.queued.push(tapFrame(238, 3));
    tap.pump();
    expect(rx.usedIdx()).toBe(0);
    expect(tap.watching).toBe(false);
    expect(device.stats.rxDropped).toBe(0);
    // Notify when avail.idx passes 1, the index already seen.
    expect(rx.availEvent()).toBe(1);
    postRx(rx, [100, 100]);
    rig.driver.notify(RX);
    expect(rx.takeUsed().map((u) => u.len)).toEqual([100, 100, 50]);
    expect(device.stats.rxPackets).toBe(1);
  });

  it('with MRG_RXBUF, drops a frame that the whole ring cannot hold', () => {
    const { tap, device, rig, rx } = setup(BASE | featureMask(VIRTIO_NET_F_MRG_RXBUF), 4);
    postRx(rx, [20, 20, 20, 20]);
    rig.driver.notify(RX);
    tap.queued.push(tapFrame(200, 1), tapFrame(30, 2));
    tap.pump();
    expect(device.stats.rxDropped).toBe(1);
    expect(rx.takeUsed().map((u) => u.len)).toEqual([20, 20, 2]);
  });

  it('with MRG_RXBUF and a ring of zero-length buffers, walks each chain once however many frames it drops', () => {
    const { tap, device, rig, rx } = setup(BASE | featureMask(VIRTIO_NET_F_MRG_RXBUF), 64);
    postRx(rx, Array(64).fill(0));
    const pops = vi.spyOn(rig.transport.queues[RX]!, 'pop');
    rig.driver.notify(RX);
    for (let i = 0; i < 50; i++) tap.queued.push(tapFrame(60, i));
    tap.pump();
    expect(device.stats.rxDropped).toBe(50);
    expect(pops.mock.calls.length).toBeLessThanOrEqual(64);
    expect(rx.usedIdx()).toBe(0);
  });

  it('moves at most one turn of frames per event-loop turn; the rest follows', async () => {
    const { tap, device, rig, rx } = setup(BASE, 128);
    postRx(rx, Array(100).fill(1526));
    rig.driver.notify(RX);
    for (let i = 0; i < 100; i++) tap.queued.push(tapFrame(60, i));
    tap.onReadable!();
    expect(device.stats.rxPackets).toBe(CHAINS_PER_TURN);
    expect(tap.watching).toBe(false);
    await new Promise((r) => setImmediate(r));
    tap.pump();
    expect(device.stats.rxPackets).toBe(100);
  });

  it('writes nothing more into held RX buffers once the driver stops the queue', () => {
    // A ring of two: a frame too big for both is dropped, and the device keeps both buffers.
    const { tap, device, rig, rx } = setup(BASE | featureMask(VIRTIO_NET_F_MRG_RXBUF), 2);
    const bufs = postRx(rx, [20, 20]);
    rig.driver.notify(RX);
    tap.queued.push(tapFrame(200, 1));
    tap.pump();
    expect(device.stats.rxDropped).toBe(1);
    for (const b of bufs) rig.mem.slice(b.addrs[0]!, 20).fill(0xa5);
    rig.driver.write32(MMIO_QUEUE_SEL, RX);
    rig.driver.write32(MMIO_QUEUE_READY, 0);
    expect(rig.driver.read32(MMIO_QUEUE_READY)).toBe(0);
    // A frame that would fit the held buffers arrives.
    tap.queued.push(tapFrame(10, 2));
    tap.startReadable(() => device.processRx());
    tap.pump();
    for (const b of bufs) expect(rig.mem.slice(b.addrs[0]!, 20).every((x) => x === 0xa5)).toBe(true);
    expect(device.stats.rxPackets).toBe(0);
  });

  it('touches no TAP once closed, even with transmit work left for a later turn', async () => {
    const { tap, device, rig, tx } = setup(BASE, 128);
    for (let i = 0; i < 100; i++) tx.addChain([{ len: 60, data: new Uint8Array(60) }]);
    rig.driver.notify(TX);
    expect(tap.written).toHaveLength(CHAINS_PER_TURN);
    device.close();
    await new Promise((r) => setImmediate(r));
    expect(tap.written).toHaveLength(CHAINS_PER_TURN);
  });

  it('treats an RX head posted again while the device holds it as a driver error', () => {
    const { tap, rig, rx } = setup(BASE | featureMask(VIRTIO_NET_F_MRG_RXBUF));
    const [buf] = postRx(rx, [100]);
    rig.driver.notify(RX);
    tap.queued.push(tapFrame(500, 1));
    tap.pump(); // the frame needs more buffers: the device holds the one posted
    rx.publish(buf!.head);
    rig.driver.notify(RX);
    expect(rig.driver.status() & STATUS_DEVICE_NEEDS_RESET).toBe(STATUS_DEVICE_NEEDS_RESET);
    expect(rig.transport.lastResetReason).toMatch(/^head-in-use/);
  });

  it('accepts the largest frame a TAP delivers', () => {
    const { tap, device, rig, rx } = setup(BASE | featureMask(VIRTIO_NET_F_MRG_RXBUF), 64);
    postRx(rx, Array(40).fill(4096));
    rig.driver.notify(RX);
    tap.queued.push(tapFrame(MAX_FRAME_SIZE, 5));
    tap.pump();
    expect(device.stats.rxPackets).toBe(1);
    expect(rx.takeUsed().reduce((n, u) => n + u.len, 0)).toBe(VNET_HDR_SIZE + MAX_FRAME_SIZE);
  });

  it('turns a hostile RX ring into DEVICE_NEEDS_RESET and stops reading', () => {
    const { tap, rig, rx } = setup();
    rx.writeDescriptor(0, { addr: 0x3000, len: 100, flags: VIRTQ_DESC_F_NEXT | 2, next: 0 });
    rx.publish(0);
    tap.queued.push(tapFrame(60));
    expect(() => rig.driver.notify(RX)).not.toThrow();
    expect(rig.driver.status() & STATUS_DEVICE_NEEDS_RESET).toBe(STATUS_DEVICE_NEEDS_RESET);
    expect(tap.watching).toBe(false);
  });

  it('stops watching on reset and closes the TAP on close', () => {
    const { tap, device, rig } = setup();
    expect(tap.watching).toBe(true);
    rig.driver.write32(MMIO_STATUS, 0);
    expect(tap.watching).toBe(false);
    device.close();
    expect(tap.closed).toBe(true);
  });
});

describe('virtio-net: options and MAC addresses', () => {
  it('parses tap and mac', () => {
    expect(parseNetOption('tap=tap0')).toEqual({ tap: 'tap0' });
    expect(parseNetOption('tap=vm-net1,mac=52:54:00:AB:cd:01')).toEqual({ tap: 'vm-net1', mac: '52:54:00:ab:cd:01' });
    expect(parseNetOption('tap=tap1,transport=mmio')).toEqual({ tap: 'tap1', transport: 'mmio' });
    expect(() => parseNetOption('tap=tap1,transport=isa')).toThrow(/transport must be pci or mmio/);
  });

  it.each([
    ['', /unknown option ""/],
    ['mac=52:54:00:00:00:01', /'tap=<name>' is required/],
    ['tap=', /needs an interface name/],
    ['tap=averyveryverylongname', /longer than 15/],
    ['tap=a/b', /not a valid interface name/],
    ['tap=tap0,speed=10', /unknown option "speed=10"/],
    ['tap=tap0,mac=52:54:00:00:01', /not of the form/],
    ['tap=tap0,mac=01:00:5e:00:00:01', /multicast/],
    ['tap=tap0,mac=00:00:00:00:00:00', /all zeros/],
    ['tap=tap0,tap=tap1', /given twice/],
  ])('refuses %j', (spec, message) => {
    expect(() => parseNetOption(spec)).toThrow(message);
    try {
      parseNetOption(spec);
    } catch (err) {
      expect((err as NetError).kind).toBe('BAD_OPTION');
    }
  });

  it('derives a stable, locally administered unicast MAC from a seed', () => {
    const a = macFromSeed('vm-1');
    expect(macFromSeed('vm-1')).toEqual(a);
    expect(macFromSeed('vm-2')).not.toEqual(a);
    expect(a[0]! & 0x01).toBe(0);
    expect(a[0]! & 0x02).toBe(2);
    expect(parseMac(formatMac(a))).toEqual(a);
  });

  it('builds a device from options, with the seeded MAC when none is given', () => {
    const tap = new FakeTap();
    const opened: string[] = [];
    const openTap = (name: string) => (opened.push(name), tap);
    const device = createNetDevice(parseNetOption('tap=tap7'), { macSeed: 'vm-1', openTap });
    expect(opened).toEqual(['tap7']);
    expect(device.mac).toEqual(macFromSeed('vm-1'));
    const withMac = createNetDevice(parseNetOption('tap=tap7,mac=02:00:00:00:00:09'), { macSeed: 'x', openTap });
    expect(formatMac(withMac.mac)).toBe('02:00:00:00:00:09');
  });
});

describe('virtio-net: TAP over the native addon', () => {
  function fakeAddon(tapOpen: TapNative['tapOpen']) {
    const calls: string[] = [];
    const addon: TapNative = {
      tapOpen,
      tapSetOffload: (fd, flags) => void calls.push(`offload ${fd} ${flags}`),
      tapSetVnetHdrSize: (fd, n) => void calls.push(`hdr ${fd} ${n}`),
      read: () => -EAGAIN,
      writev: (_fd, pieces) => pieces.reduce((n, p) => n + p.length, 0),
      pollStart: (fd) => (calls.push(`pollStart ${fd}`), 77),
      pollClose: (w) => void calls.push(`pollClose ${w}`),
      close: (fd) => void calls.push(`close ${fd}`),
    };
    return { addon, calls };
  }

  it('wraps the native calls', () => {
    const { addon, calls } = fakeAddon(() => ({ fd: 9, name: 'tap0' }));
    const tap = Tap.open('tap0', addon);
    expect(tap.name).toBe('tap0');
    tap.setVnetHdrSize(12);
    tap.setOffload(TUN_F_CSUM);
    tap.startReadable(() => {});
    tap.startReadable(() => {}); // already watching: no second watch
    tap.stopReadable();
    tap.startReadable(() => {});
    tap.close();
    expect(calls).toEqual(['hdr 9 12', `offload 9 ${TUN_F_CSUM}`, 'pollStart 9', 'pollClose 77', 'pollStart 9', 'pollClose 77', 'close 9']);
    // Closed: the fd number may be someone else's now, so nothing reaches it.
    expect(tap.read(new Uint8Array(10))).toBe(-EBADF);
    expect(tap.writev([new Uint8Array(1)])).toBe(-EBADF);
  });

  it.each([
    ['ENOENT', 'TUNSETIFF', 'NO_TUN', /modprobe tun/],
    ['EPERM', 'TUNSETIFF', 'PERMISSION', /ip tuntap add dev tap0 mode tap user .* or run as root/],
    ['EACCES', 'open /dev/net/tun', 'PERMISSION', /no permission on \/dev\/net\/tun; give your user read-write access/],
    ['EBUSY', 'TUNSETIFF', 'BUSY', /in use by another process/],
    ['EINVAL', 'TUNSETIFF', 'NOT_TAP', /not a TAP device/],
    ['EMFILE', 'TUNSETIFF', 'TAP_FAILED', /cannot open TAP tap0/],
  ])('turns %s from tapOpen (%s) into a one-line %s error', (code, syscall, netCode, message) => {
    const { addon } = fakeAddon(() => {
      throw Object.assign(new Error(`${code}: tap open failed`), { code, syscall });
    });
    let caught: unknown;
    try {
      Tap.open('tap0', addon);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(NetError);
    expect((caught as NetError).kind).toBe(netCode);
    expect((caught as NetError).message).toMatch(message);
    expect((caught as NetError).message).not.toContain('\n');
  });
});
