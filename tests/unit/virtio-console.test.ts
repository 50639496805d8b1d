/**
 * virtio-console (one port, no MULTIPORT) behind virtio-mmio, driven by the
 * fake driver: output in order, input into posted buffers only, bounded
 * work per turn, hostile chains refused, resets.
 */
import { describe, expect, it } from 'vitest';
import { CHAINS_PER_TURN } from '../../src/virtio/queue.js';
import { CONSOLE_RX_QUEUE as RX, CONSOLE_TX_QUEUE as TX, ConsoleDevice, MAX_TX_CHAIN_BYTES, TX_BYTES_PER_TURN } from '../../src/virtio/console/device.js';
import { VIRTIO_F_VERSION_1, featureMask } from '../../src/virtio/features.js';
import { startDevice } from '../../src/testing/index.js';

const text = (s: string) => new TextEncoder().encode(s);

function rig(queueSize = 16) {
  const out: Uint8Array[] = [];
  let taken = 0;
  const device = new ConsoleDevice({ output: (b) => out.push(b), onInputTaken: () => taken++ });
  const r = startDevice(device, { features: featureMask(VIRTIO_F_VERSION_1), queueSize });
  const printed = () => Buffer.concat(out).toString('latin1');
  return { device, ...r, rx: r.queues[RX]!, tx: r.queues[TX]!, printed, taken: () => taken };
}

describe('virtio-console', () => {
  it('is device type 3 with one port and two queues', () => {
    const { device, driver } = rig();
    expect(device.deviceType).toBe(3);
    expect(device.queueMaxSizes).toHaveLength(2);
    expect(new DataView(driver.readConfig(4, 4).buffer).getUint32(0, true)).toBe(1); // max_nr_ports
  });

  it('prints what the guest transmits, in order, and returns the buffers used with length 0', () => {
    const { tx, driver, printed, irq } = rig();
    tx.addChain([{ len: 6, data: text('hello ') }]);
    tx.addChain([
      { len: 3, data: text('wor') },
      { len: 3, data: text('ld\n') },
    ]);
    driver.notify(TX);
    expect(printed()).toBe('hello world\n');
    expect(tx.takeUsed().map((u) => u.len)).toEqual([0, 0]);
    expect(irq.edges).toBeGreaterThan(0);
  });

  it('holds input until the guest posts receive buffers, then fills them and says so', () => {
    const { device, rx, driver, mem, taken } = rig();
    device.enqueueInput(text('ls -l\n'));
    expect(device.pendingInput).toBe(6);
    const a = rx.addChain([{ len: 4, writable: true }]);
    const b = rx.addChain([{ len: 64, writable: true }]);
    driver.notify(RX);
    const used = rx.takeUsed();
    expect(used).toEqual([
      { id: a.head, len: 4 },
      { id: b.head, len: 2 },
    ]);
    expect(Buffer.from(mem.slice(a.addrs[0]!, 4)).toString()).toBe('ls -');
    expect(Buffer.from(mem.slice(b.addrs[0]!, 2)).toString()).toBe('l\n');
    expect(device.pendingInput).toBe(0);
    expect(taken()).toBe(1);
  });

  it('writes input only into writable buffers', () => {
    const { device, rx, driver, mem } = rig();
    const chain = rx.addChain([
      { len: 8, data: text('readonly') },
      { len: 8, writable: true },
    ]);
    device.enqueueInput(text('abc'));
    driver.notify(RX);
    expect(Buffer.from(mem.slice(chain.addrs[0]!, 8)).toString()).toBe('readonly');
    expect(Buffer.from(mem.slice(chain.addrs[1]!, 3)).toString()).toBe('abc');
    expect(rx.takeUsed()).toEqual([{ id: chain.head, len: 3 }]);
  });

  it('takes at most CHAINS_PER_TURN output chains per notification, the rest in a later turn', async () => {
    const { tx, driver, printed } = rig(256);
    for (let i = 0; i < CHAINS_PER_TURN + 10; i++) tx.addChain([{ len: 1, data: text('x') }]);
    driver.notify(TX);
    expect(printed().length).toBe(CHAINS_PER_TURN);
    await new Promise((r) => setImmediate(r));
    expect(printed().length).toBe(CHAINS_PER_TURN + 10);
  });

  it('copies at most TX_BYTES_PER_TURN of output per turn, the rest in a later turn', async () => {
    const { tx, driver, printed } = rig(64);
    for (let i = 0; i < 8; i++) tx.addChain([{ len: 64 * 1024, data: new Uint8Array(64 * 1024).fill(0x41 + i) }]);
    driver.notify(TX);
    expect(printed().length).toBe(TX_BYTES_PER_TURN);
    await new Promise((r) => setImmediate(r));
    expect(printed().length).toBe(8 * 64 * 1024);
  });

  it('refuses an output chain longer than a console write may be, without copying it', () => {
    const { device, tx, driver, printed } = rig();
    tx.addChain([{ len: MAX_TX_CHAIN_BYTES, data: new Uint8Array(16) }, { len: 16 }]);
    tx.addChain([{ len: 2, data: text('ok') }]);
    driver.notify(TX);
    expect(printed()).toBe('ok');
    expect(device.stats.txErrors).toBe(1);
    expect(tx.takeUsed()).toHaveLength(2);
  });

  it('keeps queued input across a reset, for the next driver', () => {
    const { device, driver } = rig();
    device.enqueueInput(text('early'));
    driver.addStatus(0);
    device.reset();
    expect(device.pendingInput).toBe(5);
    const again = startDevice(device, { features: featureMask(VIRTIO_F_VERSION_1) });
    const chain = again.queues[RX]!.addChain([{ len: 16, writable: true }]);
    again.driver.notify(RX);
    expect(Buffer.from(again.mem.slice(chain.addrs[0]!, 5)).toString()).toBe('early');
  });

  it('needs a reset after a malformed ring, and prints nothing from it', () => {
    const { tx, driver, printed, transport } = rig();
    tx.writeDescriptor(0, { addr: 0xffff_ffff_f000n, len: 16, flags: 0, next: 0 });
    tx.publish(0);
    driver.notify(TX);
    expect(printed()).toBe('');
    expect(transport.status & 0x40).toBe(0x40); // DEVICE_NEEDS_RESET
  });
});
