import { describe, expect, it } from 'vitest';
import { FakeIrqLine } from '../../src/testing/index.js';
import { GuestMemory } from '../../src/base/memory.js';
import { readConfigBytes, type VirtioActivation, type VirtioDevice } from '../../src/virtio/device.js';
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_INDIRECT_DESC,
  VIRTIO_F_VERSION_1,
  featureMask,
  hasFeature,
} from '../../src/virtio/features.js';
import {
  INTERRUPT_CONFIG_CHANGE,
  INTERRUPT_USED_BUFFER,
  MMIO_CONFIG_GENERATION,
  MMIO_DEVICE_FEATURES,
  MMIO_DEVICE_FEATURES_SEL,
  MMIO_DEVICE_ID,
  MMIO_DRIVER_FEATURES,
  MMIO_DRIVER_FEATURES_SEL,
  MMIO_INTERRUPT_STATUS,
  MMIO_MAGIC_VALUE,
  MMIO_QUEUE_DESC_HIGH,
  MMIO_QUEUE_DESC_LOW,
  MMIO_QUEUE_NOTIFY,
  MMIO_QUEUE_NUM,
  MMIO_QUEUE_NUM_MAX,
  MMIO_QUEUE_READY,
  MMIO_QUEUE_SEL,
  MMIO_SHM_BASE_HIGH,
  MMIO_SHM_BASE_LOW,
  MMIO_SHM_LEN_HIGH,
  MMIO_SHM_LEN_LOW,
  MMIO_SHM_SEL,
  MMIO_STATUS,
  MMIO_VENDOR_ID,
  MMIO_VERSION,
  MmioTransport,
  mmioCmdlineFragment,
} from '../../src/virtio/mmio.js';
import { QueueError, VIRTQ_DESC_F_NEXT } from '../../src/virtio/queue.js';
import { FakeMmioDriver, FakeVirtqueue, GuestAllocator } from '../../src/testing/index.js';

const ECHO_FEATURE = 3;
const ECHO_NEEDS_EVENT_IDX = 4;

/** A test device: copies each chain's readable bytes into its writable ones. */
class EchoDevice implements VirtioDevice {
  readonly deviceType = 42;
  readonly name = 'echo';
  readonly offeredFeatures = featureMask(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, ECHO_FEATURE, ECHO_NEEDS_EVENT_IDX);
  readonly queueMaxSizes = [8, 16];
  readonly config = Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  activations: VirtioActivation[] = [];
  notified: number[] = [];
  resets = 0;
  refuseActivation = false;

  validateFeatures(features: bigint): string | undefined {
    return hasFeature(features, ECHO_NEEDS_EVENT_IDX) && !hasFeature(features, VIRTIO_F_EVENT_IDX) ? 'feature 4 requires EVENT_IDX' : undefined;
  }
  readConfig(offset: number, data: Uint8Array): void {
    readConfigBytes(this.config, offset, data);
  }
  writeConfig(offset: number, data: Uint8Array): void {
    this.config.set(data, offset);
  }
  activate(activation: VirtioActivation): void {
    if (this.refuseActivation) throw new Error('backend unavailable');
    this.activations.push(activation);
  }
  queueNotify(index: number): void {
    this.notified.push(index);
    const a = this.activations[this.activations.length - 1]!;
    const q = a.queues[index]!;
    try {
      for (let chain = q.pop(a.memory); chain; chain = q.pop(a.memory)) {
        const data = chain.reader(a.memory).readExact(chain.readableLength);
        const n = chain.writer(a.memory).write(data);
        q.addUsed(a.memory, chain.head, n);
      }
      if (q.needsNotification(a.memory)) a.interrupt.signalUsedBuffer(index);
    } catch (err) {
      if (err instanceof QueueError) a.interrupt.needsReset(err.message);
      else throw err;
    }
  }
  reset(): void {
    this.resets++;
  }
}

const BASIC = featureMask(VIRTIO_F_VERSION_1);

function rig() {
  const bytes = new Uint8Array(1 << 20);
  const mem = GuestMemory.fromBuffer(bytes);
  const irq = new FakeIrqLine();
  const device = new EchoDevice();
  const transport = new MmioTransport(device, { memory: mem, irq });
  const driver = new FakeMmioDriver(transport);
  const allocator = new GuestAllocator(0x1000, bytes.length);
  const queues = [FakeVirtqueue.create(mem, allocator, 8), FakeVirtqueue.create(mem, allocator, 16)];
  const start = (features = BASIC) => {
    expect(driver.negotiate(features)).toBe(true);
    queues.forEach((q, i) => {
      driver.setupQueue(i, q.layout);
    });
    driver.driverOk();
  };
  return { mem, irq, device, transport, driver, queues, start };
}

describe('virtio-mmio: identification and plain registers', () => {
  it('identifies itself as a version 2 device', () => {
    const { driver } = rig();
    expect(driver.read32(MMIO_MAGIC_VALUE)).toBe(0x74726976);
    expect(driver.read32(MMIO_VERSION)).toBe(2);
    expect(driver.read32(MMIO_DEVICE_ID)).toBe(42);
    expect(driver.read32(MMIO_VENDOR_ID)).not.toBe(0xffff_ffff);
  });

  it('presents device features 32 bits at a time', () => {
    const { driver, device } = rig();
    expect(driver.deviceFeatures()).toBe(device.offeredFeatures);
    driver.write32(MMIO_DEVICE_FEATURES_SEL, 2);
    expect(driver.read32(MMIO_DEVICE_FEATURES)).toBe(0);
  });

  it('reports each queue maximum, and 0 for queues that do not exist', () => {
    const { driver } = rig();
    driver.write32(MMIO_QUEUE_SEL, 1);
    expect(driver.read32(MMIO_QUEUE_NUM_MAX)).toBe(16);
    driver.write32(MMIO_QUEUE_SEL, 0);
    expect(driver.read32(MMIO_QUEUE_NUM_MAX)).toBe(8);
    driver.write32(MMIO_QUEUE_SEL, 2);
    expect(driver.read32(MMIO_QUEUE_NUM_MAX)).toBe(0);
    expect(driver.read32(MMIO_QUEUE_READY)).toBe(0);
  });

  it('reads absent shared memory regions as length and base -1', () => {
    const { driver } = rig();
    driver.write32(MMIO_SHM_SEL, 0);
    for (const reg of [MMIO_SHM_LEN_LOW, MMIO_SHM_LEN_HIGH, MMIO_SHM_BASE_LOW, MMIO_SHM_BASE_HIGH]) {
      expect(driver.read32(reg)).toBe(0xffff_ffff);
    }
  });

  it('passes config space accesses of any size to the device, offset from 0x100', () => {
    const { driver, transport, device } = rig();
    expect(Array.from(driver.readConfig(2, 4))).toEqual([3, 4, 5, 6]);
    expect(Array.from(driver.readConfig(8, 4))).toEqual([9, 10, 0, 0]);
    transport.write(0x100 + 1, Uint8Array.from([0xaa]));
    expect(device.config[1]).toBe(0xaa);
  });

  it('answers narrow or unaligned register accesses with zeros and counts them', () => {
    const { transport } = rig();
    const data = new Uint8Array(2).fill(0x55);
    transport.read(MMIO_MAGIC_VALUE, data);
    expect(Array.from(data)).toEqual([0, 0]);
    transport.write(MMIO_STATUS + 1, new Uint8Array(4).fill(1));
    expect(transport.status).toBe(0);
    expect(transport.stats.badAccesses).toBe(2);
  });
});

describe('virtio-mmio: device status and feature negotiation', () => {
  it('walks ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK and activates once', () => {
    const { driver, device, transport, start } = rig();
    start(featureMask(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX));
    expect(driver.status()).toBe(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    expect(device.activations).toHaveLength(1);
    const a = device.activations[0]!;
    expect(a.features).toBe(featureMask(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX));
    expect(a.queues).toHaveLength(2);
    expect(a.queues[0]!.eventIdxEnabled).toBe(true);
    expect(transport.isActive).toBe(true);
    // Writing DRIVER_OK again does not activate again.
    driver.addStatus(STATUS_DRIVER_OK);
    expect(device.activations).toHaveLength(1);
  });

  it('refuses FEATURES_OK when the driver accepts features that were not offered', () => {
    const { driver, transport } = rig();
    expect(driver.negotiate(featureMask(VIRTIO_F_VERSION_1, 7))).toBe(false);
    expect(driver.status() & STATUS_FEATURES_OK).toBe(0);
    expect(transport.stats.badAccesses).toBeGreaterThan(0);
    // DRIVER_OK cannot follow a refused FEATURES_OK.
    driver.addStatus(STATUS_DRIVER_OK);
    expect(driver.status() & STATUS_DRIVER_OK).toBe(0);
  });

  it('refuses FEATURES_OK for features above bit 63', () => {
    const { driver } = rig();
    driver.write32(MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    driver.writeDriverFeatures(BASIC);
    driver.write32(MMIO_DRIVER_FEATURES_SEL, 2);
    driver.write32(MMIO_DRIVER_FEATURES, 1);
    driver.addStatus(STATUS_FEATURES_OK);
    expect(driver.status() & STATUS_FEATURES_OK).toBe(0);
  });

  it('refuses FEATURES_OK without VIRTIO_F_VERSION_1', () => {
    const { driver } = rig();
    expect(driver.negotiate(featureMask(VIRTIO_F_EVENT_IDX))).toBe(false);
  });

  it('lets the device refuse an inconsistent feature set', () => {
    const { driver } = rig();
    expect(driver.negotiate(featureMask(VIRTIO_F_VERSION_1, ECHO_NEEDS_EVENT_IDX))).toBe(false);
    expect(driver.negotiate(featureMask(VIRTIO_F_VERSION_1, ECHO_NEEDS_EVENT_IDX, VIRTIO_F_EVENT_IDX))).toBe(true);
  });

  it('refuses steps out of order and writes that clear bits', () => {
    const { driver } = rig();
    driver.write32(MMIO_STATUS, STATUS_DRIVER);
    expect(driver.status()).toBe(0);
    driver.write32(MMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    expect(driver.status()).toBe(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    driver.write32(MMIO_STATUS, STATUS_ACKNOWLEDGE);
    expect(driver.status()).toBe(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    driver.addStatus(STATUS_FAILED);
    expect(driver.status() & STATUS_FAILED).toBe(STATUS_FAILED);
  });

  it('ignores DriverFeatures after FEATURES_OK', () => {
    const { driver, transport } = rig();
    expect(driver.negotiate(BASIC)).toBe(true);
    driver.writeDriverFeatures(featureMask(VIRTIO_F_VERSION_1, ECHO_FEATURE));
    expect(transport.negotiatedFeatures).toBe(BASIC);
  });

  it('resets everything when 0 is written to Status', () => {
    const { driver, device, transport, queues, start } = rig();
    start();
    const resetsBefore = device.resets;
    transport.signalUsedBuffer(0);
    driver.write32(MMIO_STATUS, 0);
    expect(device.resets).toBe(resetsBefore + 1);
    expect(driver.status()).toBe(0);
    expect(driver.read32(MMIO_INTERRUPT_STATUS)).toBe(0);
    expect(transport.isActive).toBe(false);
    expect(transport.queues.every((q) => !q.ready && q.descTable === 0)).toBe(true);
    driver.write32(MMIO_QUEUE_SEL, 0);
    expect(driver.read32(MMIO_QUEUE_READY)).toBe(0);
    // And the device can be brought up again.
    queues.forEach((q) => {
      q.takeUsed();
    });
    start();
    expect(device.activations).toHaveLength(2);
  });
});

describe('virtio-mmio: queue setup', () => {
  it('takes the queue size and 64-bit addresses of the selected queue', () => {
    const { driver, transport } = rig();
    driver.negotiate(BASIC);
    driver.write32(MMIO_QUEUE_SEL, 1);
    driver.write32(MMIO_QUEUE_NUM, 4);
    driver.write32(MMIO_QUEUE_DESC_LOW, 0x2000);
    driver.write32(MMIO_QUEUE_DESC_HIGH, 1);
    const q = transport.queues[1]!;
    expect(q.size).toBe(4);
    expect(q.descTable).toBe(0x1_0000_2000);
    expect(transport.queues[0]!.descTable).toBe(0);
    driver.write32(MMIO_QUEUE_READY, 1);
    expect(driver.read32(MMIO_QUEUE_READY)).toBe(1);
    // Configuration is frozen while the queue is ready.
    driver.write32(MMIO_QUEUE_NUM, 8);
    expect(q.size).toBe(4);
    driver.write32(MMIO_QUEUE_READY, 0);
    expect(q.ready).toBe(false);
  });

  it('sets DEVICE_NEEDS_RESET instead of activating with a broken queue', () => {
    const { driver, device, queues, transport } = rig();
    driver.negotiate(BASIC);
    driver.setupQueue(0, queues[0]!.layout);
    driver.write32(MMIO_QUEUE_SEL, 1);
    driver.write32(MMIO_QUEUE_NUM, 12); // not a power of two
    driver.write32(MMIO_QUEUE_READY, 1);
    driver.driverOk();
    expect(device.activations).toHaveLength(0);
    expect(driver.status() & STATUS_DEVICE_NEEDS_RESET).toBe(STATUS_DEVICE_NEEDS_RESET);
    expect(transport.lastResetReason).toMatch(/queue 1: size 12/);
  });

  it('sets DEVICE_NEEDS_RESET when the device refuses activation', () => {
    const { driver, device, irq, start } = rig();
    device.refuseActivation = true;
    start();
    expect(driver.status() & STATUS_DEVICE_NEEDS_RESET).toBe(STATUS_DEVICE_NEEDS_RESET);
    expect(driver.read32(MMIO_INTERRUPT_STATUS)).toBe(INTERRUPT_CONFIG_CHANGE);
    expect(irq.edges).toBe(1);
  });
});

describe('virtio-mmio: notifications and interrupts', () => {
  it('delivers QueueNotify writes and notifyQueue calls to the device', () => {
    const { driver, device, transport, start } = rig();
    driver.notify(0); // before DRIVER_OK: dropped
    expect(device.notified).toEqual([]);
    start();
    driver.notify(1);
    transport.notifyQueue(0);
    transport.notifyQueue(7); // no such queue
    expect(device.notified).toEqual([1, 0]);
    expect(transport.stats.notifications).toBe(2);
    expect(transport.stats.ignoredNotifications).toBe(2);
    expect(MMIO_QUEUE_NOTIFY).toBe(0x50);
  });

  it('raises the used-buffer interrupt and clears it on ACK', () => {
    const { driver, irq, queues, start } = rig();
    start();
    queues[0]!.addChain([
      { len: 3, data: Uint8Array.from([7, 8, 9]) },
      { len: 3, writable: true },
    ]);
    driver.notify(0);
    expect(irq.edges).toBe(1);
    expect(driver.read32(MMIO_INTERRUPT_STATUS)).toBe(INTERRUPT_USED_BUFFER);
    expect(queues[0]!.takeUsed()).toEqual([{ id: 0, len: 3 }]);
    expect(driver.ackInterrupt()).toBe(INTERRUPT_USED_BUFFER);
    expect(driver.read32(MMIO_INTERRUPT_STATUS)).toBe(0);
  });

  it('signals configuration changes with bit 1 and a new generation', () => {
    const { driver, transport, irq, start } = rig();
    start();
    const before = driver.read32(MMIO_CONFIG_GENERATION);
    transport.signalConfigChange();
    expect(driver.read32(MMIO_CONFIG_GENERATION)).not.toBe(before);
    expect(driver.read32(MMIO_INTERRUPT_STATUS)).toBe(INTERRUPT_CONFIG_CHANGE);
    expect(irq.edges).toBe(1);
  });

  it('turns a hostile ring into DEVICE_NEEDS_RESET without throwing', () => {
    const { driver, transport, irq, queues, device, start } = rig();
    start();
    queues[0]!.writeDescriptor(0, { addr: 0x9000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 0 });
    queues[0]!.publish(0);
    expect(() => driver.notify(0)).not.toThrow();
    expect(driver.status() & STATUS_DEVICE_NEEDS_RESET).toBe(STATUS_DEVICE_NEEDS_RESET);
    expect(driver.read32(MMIO_INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE).toBe(INTERRUPT_CONFIG_CHANGE);
    expect(irq.edges).toBe(1);
    expect(transport.stats.needsReset).toBe(1);
    // Further notifications are ignored until the driver resets the device.
    driver.notify(0);
    expect(device.notified).toEqual([0]);
    driver.write32(MMIO_STATUS, 0);
    expect(driver.status()).toBe(0);
  });
});

describe('virtio-mmio: kernel command line', () => {
  it('renders virtio_mmio.device=<size>@<base>:<irq>', () => {
    expect(mmioCmdlineFragment(0xd000_0000, 5, 0x200)).toBe('virtio_mmio.device=512@0xd0000000:5');
    expect(mmioCmdlineFragment(0xd000_1000, 6, 0x1000)).toBe('virtio_mmio.device=4K@0xd0001000:6');
  });
});
