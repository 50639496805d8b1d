/**
 * The virtio-mmio transport, version 2 (virtio 1.2 section 4.2), as a bus
 * device: 0x100 bytes of control registers followed by the device's
 * configuration space. Device-agnostic: any {@link VirtioDevice} plugs in.
 *
 * Notifications: a QueueNotify write reaches {@link MmioTransport.notifyQueue}.
 * The VMM should instead register an ioeventfd on `base + MMIO_QUEUE_NOTIFY`
 * (4 bytes, datamatch = queue index) and call notifyQueue(index) when it
 * fires, so a notification does not cost the vCPU a userspace exit.
 *
 * Interrupts: InterruptStatus bit 0 (used buffer) or bit 1 (configuration
 * change) is set and the line is sent an edge with `irq.trigger()`.
 */
import type { BusDevice } from '../vmm/bus.js';
import type { GuestMemory } from '../vmm/memory.js';
import type { IrqLine } from '../devices/irq.js';
import { silentLogger, type Logger } from '../log.js';
import type { VirtioDevice, VirtioInterrupt } from './device.js';
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
  VIRTIO_F_VERSION_1,
  featureBit,
  hasFeature,
} from './features.js';
import { Queue } from './queue.js';

/** Register offsets (virtio 1.2 section 4.2.2, table 4.1). */
export const MMIO_MAGIC_VALUE = 0x000;
export const MMIO_VERSION = 0x004;
export const MMIO_DEVICE_ID = 0x008;
export const MMIO_VENDOR_ID = 0x00c;
export const MMIO_DEVICE_FEATURES = 0x010;
export const MMIO_DEVICE_FEATURES_SEL = 0x014;
export const MMIO_DRIVER_FEATURES = 0x020;
export const MMIO_DRIVER_FEATURES_SEL = 0x024;
export const MMIO_QUEUE_SEL = 0x030;
export const MMIO_QUEUE_NUM_MAX = 0x034;
export const MMIO_QUEUE_NUM = 0x038;
export const MMIO_QUEUE_READY = 0x044;
export const MMIO_QUEUE_NOTIFY = 0x050;
export const MMIO_INTERRUPT_STATUS = 0x060;
export const MMIO_INTERRUPT_ACK = 0x064;
export const MMIO_STATUS = 0x070;
export const MMIO_QUEUE_DESC_LOW = 0x080;
export const MMIO_QUEUE_DESC_HIGH = 0x084;
export const MMIO_QUEUE_DRIVER_LOW = 0x090;
export const MMIO_QUEUE_DRIVER_HIGH = 0x094;
export const MMIO_QUEUE_DEVICE_LOW = 0x0a0;
export const MMIO_QUEUE_DEVICE_HIGH = 0x0a4;
export const MMIO_SHM_SEL = 0x0ac;
export const MMIO_SHM_LEN_LOW = 0x0b0;
export const MMIO_SHM_LEN_HIGH = 0x0b4;
export const MMIO_SHM_BASE_LOW = 0x0b8;
export const MMIO_SHM_BASE_HIGH = 0x0bc;
export const MMIO_QUEUE_RESET = 0x0c0;
export const MMIO_CONFIG_GENERATION = 0x0fc;
/** Device configuration space starts here. */
export const MMIO_CONFIG = 0x100;
/** Size of one virtio-mmio device's window on the bus. */
export const MMIO_SIZE = 0x200;

/** "virt" in little-endian. */
export const MMIO_MAGIC = 0x74726976;
export const MMIO_VERSION_MODERN = 2;
/** VendorID: "TSVM" in little-endian; drivers do not interpret it. */
export const MMIO_VENDOR_TSVM = 0x4d565354;

/** InterruptStatus bits. */
export const INTERRUPT_USED_BUFFER = 0x1;
export const INTERRUPT_CONFIG_CHANGE = 0x2;

/** Status bits the driver may set; DEVICE_NEEDS_RESET belongs to the device. */
const DRIVER_STATUS_BITS =
  STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED;

const U32 = 0x1_0000_0000;

export interface MmioTransportOptions {
  readonly memory: GuestMemory;
  readonly irq: IrqLine;
  readonly logger?: Logger;
}

/** Counters of what the transport saw; for metrics and tests. */
export interface MmioStats {
  notifications: number;
  /** Notifications dropped: device not live, or a bad queue index. */
  ignoredNotifications: number;
  usedBufferInterrupts: number;
  configInterrupts: number;
  needsReset: number;
  /** Register accesses that were not 32-bit aligned, writes to read-only registers, refused transitions. */
  badAccesses: number;
  resets: number;
  activations: number;
}

/**
 * One virtio device behind a virtio-mmio register window. Insert it into
 * the MMIO bus at `base` with length {@link MMIO_SIZE}.
 */
export class MmioTransport implements BusDevice, VirtioInterrupt {
  readonly queues: readonly Queue[];
  readonly stats: MmioStats = {
    notifications: 0,
    ignoredNotifications: 0,
    usedBufferInterrupts: 0,
    configInterrupts: 0,
    needsReset: 0,
    badAccesses: 0,
    resets: 0,
    activations: 0,
  };
  /** The last reason given to needsReset(), for diagnostics. */
  lastResetReason: string | undefined;

  private readonly memory: GuestMemory;
  private readonly irq: IrqLine;
  private readonly log: Logger;
  private deviceStatus = 0;
  private interruptStatusBits = 0;
  private configGeneration = 0;
  private deviceFeaturesSel = 0;
  private driverFeaturesSel = 0;
  private driverFeatures = 0n;
  private queueSel = 0;
  private active = false;

  constructor(
    readonly device: VirtioDevice,
    options: MmioTransportOptions,
  ) {
    this.memory = options.memory;
    this.irq = options.irq;
    this.log = (options.logger ?? silentLogger).child({ device: device.name, transport: 'mmio' });
    this.queues = device.queueMaxSizes.map((max) => new Queue(max));
  }

  /** The Status register. */
  get status(): number {
    return this.deviceStatus;
  }

  /** The InterruptStatus register. */
  get interruptStatus(): number {
    return this.interruptStatusBits;
  }

  /** The features the driver wrote (meaningful once FEATURES_OK is set). */
  get negotiatedFeatures(): bigint {
    return this.driverFeatures;
  }

  /** True between a successful DRIVER_OK and the next reset. */
  get isActive(): boolean {
    return this.active;
  }

  read(offset: number, data: Uint8Array): void {
    if (offset >= MMIO_CONFIG) {
      this.device.readConfig(offset - MMIO_CONFIG, data);
      return;
    }
    data.fill(0);
    if (data.length !== 4 || offset % 4 !== 0) {
      this.badAccess(`${data.length}-byte read at register 0x${offset.toString(16)}`);
      return;
    }
    new DataView(data.buffer, data.byteOffset, 4).setUint32(0, this.readRegister(offset) >>> 0, true);
  }

  write(offset: number, data: Uint8Array): void {
    if (offset >= MMIO_CONFIG) {
      this.device.writeConfig(offset - MMIO_CONFIG, data);
      return;
    }
    if (data.length !== 4 || offset % 4 !== 0) {
      this.badAccess(`${data.length}-byte write at register 0x${offset.toString(16)}`);
      return;
    }
    this.writeRegister(offset, new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true));
  }

  /**
   * The driver notified queue `index`: from a QueueNotify write, or from
   * the VMM when the ioeventfd on QueueNotify fires.
   */
  notifyQueue(index: number): void {
    if (!this.active || this.deviceStatus & STATUS_DEVICE_NEEDS_RESET || !(index >= 0 && index < this.queues.length)) {
      this.stats.ignoredNotifications++;
      this.log.debug({ queue: index, status: this.deviceStatus }, 'notification ignored');
      return;
    }
    this.stats.notifications++;
    this.device.queueNotify(index);
  }

  // VirtioInterrupt, handed to the device at activation.

  signalUsedBuffer(queueIndex: number): void {
    if (!this.active) return;
    this.stats.usedBufferInterrupts++;
    this.log.trace({ queue: queueIndex }, 'used buffer interrupt');
    this.raise(INTERRUPT_USED_BUFFER);
  }

  signalConfigChange(): void {
    this.configGeneration = (this.configGeneration + 1) >>> 0;
    if (!(this.deviceStatus & STATUS_DRIVER_OK)) return;
    this.stats.configInterrupts++;
    this.raise(INTERRUPT_CONFIG_CHANGE);
  }

  /**
   * Sets DEVICE_NEEDS_RESET and, if the driver is running the device,
   * sends a configuration change interrupt (2.1.2). Logged and counted;
   * notifications are ignored until the driver resets the device.
   */
  needsReset(reason: string): void {
    this.stats.needsReset++;
    this.lastResetReason = reason;
    if (this.deviceStatus & STATUS_DEVICE_NEEDS_RESET) {
      this.log.debug({ reason }, 'device already needs reset');
      return;
    }
    this.log.warn({ reason }, 'device needs reset');
    this.deviceStatus |= STATUS_DEVICE_NEEDS_RESET;
    if (this.deviceStatus & STATUS_DRIVER_OK) {
      this.stats.configInterrupts++;
      this.raise(INTERRUPT_CONFIG_CHANGE);
    }
  }

  private raise(bit: number): void {
    this.interruptStatusBits |= bit;
    // Always send the edge, as Firecracker does: a spurious interrupt
    // costs the guest one ISR read, a lost one stalls the queue forever.
    this.irq.trigger();
  }

  private readRegister(offset: number): number {
    switch (offset) {
      case MMIO_MAGIC_VALUE:
        return MMIO_MAGIC;
      case MMIO_VERSION:
        return MMIO_VERSION_MODERN;
      case MMIO_DEVICE_ID:
        return this.device.deviceType;
      case MMIO_VENDOR_ID:
        return MMIO_VENDOR_TSVM;
      case MMIO_DEVICE_FEATURES:
        return this.deviceFeaturesSel > 1
          ? 0
          : Number((this.device.offeredFeatures >> BigInt(32 * this.deviceFeaturesSel)) & 0xffff_ffffn);
      case MMIO_QUEUE_NUM_MAX:
        return this.selectedQueue()?.maxSize ?? 0;
      case MMIO_QUEUE_READY:
        return this.selectedQueue()?.ready ? 1 : 0;
      case MMIO_INTERRUPT_STATUS:
        return this.interruptStatusBits;
      case MMIO_STATUS:
        return this.deviceStatus;
      case MMIO_SHM_LEN_LOW:
      case MMIO_SHM_LEN_HIGH:
      case MMIO_SHM_BASE_LOW:
      case MMIO_SHM_BASE_HIGH:
        // No shared memory regions: length and base read as -1 (4.2.2).
        return 0xffff_ffff;
      case MMIO_QUEUE_RESET:
        return 0;
      case MMIO_CONFIG_GENERATION:
        return this.configGeneration;
      default:
        // Write-only and reserved registers read as zero.
        return 0;
    }
  }

  private writeRegister(offset: number, value: number): void {
    switch (offset) {
      case MMIO_DEVICE_FEATURES_SEL:
        this.deviceFeaturesSel = value;
        return;
      case MMIO_DRIVER_FEATURES_SEL:
        this.driverFeaturesSel = value;
        return;
      case MMIO_DRIVER_FEATURES:
        this.writeDriverFeatures(value);
        return;
      case MMIO_QUEUE_SEL:
        this.queueSel = value;
        return;
      case MMIO_QUEUE_NUM:
        this.writeQueueConfig((q) => (q.size = value));
        return;
      case MMIO_QUEUE_DESC_LOW:
        this.writeQueueConfig((q) => (q.descTable = setLow(q.descTable, value)));
        return;
      case MMIO_QUEUE_DESC_HIGH:
        this.writeQueueConfig((q) => (q.descTable = setHigh(q.descTable, value)));
        return;
      case MMIO_QUEUE_DRIVER_LOW:
        this.writeQueueConfig((q) => (q.availRing = setLow(q.availRing, value)));
        return;
      case MMIO_QUEUE_DRIVER_HIGH:
        this.writeQueueConfig((q) => (q.availRing = setHigh(q.availRing, value)));
        return;
      case MMIO_QUEUE_DEVICE_LOW:
        this.writeQueueConfig((q) => (q.usedRing = setLow(q.usedRing, value)));
        return;
      case MMIO_QUEUE_DEVICE_HIGH:
        this.writeQueueConfig((q) => (q.usedRing = setHigh(q.usedRing, value)));
        return;
      case MMIO_QUEUE_READY:
        this.writeQueueReady(value);
        return;
      case MMIO_QUEUE_NOTIFY:
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
        this.notifyQueue(value);
        return;
      case MMIO_INTERRUPT_ACK:
        this.interruptStatusBits &= ~value;
        return;
      case MMIO_STATUS:
        this.writeStatus(value);
        return;
      case MMIO_SHM_SEL:
      case MMIO_QUEUE_RESET:
        // No shared memory regions; VIRTIO_F_RING_RESET is not offered.
        return;
      default:
        this.badAccess(`write of 0x${value.toString(16)} to read-only or reserved register 0x${offset.toString(16)}`);
    }
  }

  private selectedQueue(): Queue | undefined {
    return this.queues[this.queueSel];
  }

  private writeDriverFeatures(value: number): void {
    if (!(this.deviceStatus & STATUS_DRIVER) || this.deviceStatus & STATUS_FEATURES_OK) {
      this.badAccess('DriverFeatures written outside feature negotiation');
      return;
    }
    if (this.driverFeaturesSel > 1) {
      // Bits 64 and up are never offered; asking for one fails FEATURES_OK.
      if (value !== 0) this.driverFeatures |= 1n << 64n;
      return;
    }
    const shift = BigInt(32 * this.driverFeaturesSel);
    this.driverFeatures = (this.driverFeatures & ~(0xffff_ffffn << shift)) | (BigInt(value >>> 0) << shift);
  }

  private writeQueueConfig(apply: (q: Queue) => void): void {
    const q = this.selectedQueue();
    // 4.2.2: the driver must not touch a queue's configuration while it is ready.
    if (!q || q.ready || this.deviceStatus & STATUS_DRIVER_OK) {
      this.badAccess(`queue ${this.queueSel} configuration written while ready, live or nonexistent`);
      return;
    }
    apply(q);
  }

  private writeQueueReady(value: number): void {
    const q = this.selectedQueue();
    if (!q) {
      this.badAccess(`QueueReady written for nonexistent queue ${this.queueSel}`);
      return;
    }
    if (value === 0) {
      // The driver stops using the queue: the device must not touch it any more.
      q.ready = false;
      return;
    }
    if (this.deviceStatus & STATUS_DRIVER_OK) {
      this.badAccess(`queue ${this.queueSel} enabled after DRIVER_OK (queue reset is not offered)`);
      return;
    }
    q.ready = true;
  }

  private writeStatus(value: number): void {
    if (value === 0) {
      this.reset();
      return;
    }
    const current = this.deviceStatus & DRIVER_STATUS_BITS;
    const requested = value & DRIVER_STATUS_BITS;
    if (current & ~requested) {
      this.badAccess(`status 0x${value.toString(16)} clears bits of 0x${this.deviceStatus.toString(16)}; only a write of 0 resets`);
      return;
    }
    let next = this.deviceStatus;
    const newBits = requested & ~current;
    // In the order of the initialization sequence (3.1.1).
    for (const bit of [STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK, STATUS_DRIVER_OK, STATUS_FAILED]) {
      if (!(newBits & bit)) continue;
      const refusal = this.checkTransition(bit, next);
      if (refusal) {
        this.stats.badAccesses++;
        this.log.warn({ status: value }, refusal);
        continue;
      }
      next |= bit;
    }
    const activating = (next & STATUS_DRIVER_OK) !== 0 && (this.deviceStatus & STATUS_DRIVER_OK) === 0;
    this.deviceStatus = next;
    if (next & STATUS_FAILED) this.log.warn('driver set FAILED');
    if (activating) this.activate();
  }

  /** Why `bit` may not be set on top of `status`, or undefined when it may. */
  private checkTransition(bit: number, status: number): string | undefined {
    switch (bit) {
      case STATUS_DRIVER:
        return status & STATUS_ACKNOWLEDGE ? undefined : 'DRIVER set before ACKNOWLEDGE';
      case STATUS_FEATURES_OK:
        if (!(status & STATUS_DRIVER)) return 'FEATURES_OK set before DRIVER';
        return this.checkFeatures();
      case STATUS_DRIVER_OK:
        return status & STATUS_FEATURES_OK ? undefined : 'DRIVER_OK set before FEATURES_OK';
      default:
        return undefined;
    }
  }

  private checkFeatures(): string | undefined {
    const offered = this.device.offeredFeatures;
    const unoffered = this.driverFeatures & ~offered;
    if (unoffered !== 0n) {
      return `FEATURES_OK refused: driver accepted features 0x${unoffered.toString(16)} that were not offered`;
    }
    if (!hasFeature(this.driverFeatures, VIRTIO_F_VERSION_1)) {
      return 'FEATURES_OK refused: VIRTIO_F_VERSION_1 is required by virtio-mmio version 2';
    }
    const deviceRefusal = this.device.validateFeatures?.(this.driverFeatures);
    return deviceRefusal ? `FEATURES_OK refused: ${deviceRefusal}` : undefined;
  }

  private activate(): void {
    for (const [i, q] of this.queues.entries()) {
      if (!q.ready) continue;
      const problem = q.validate(this.memory);
      if (problem) {
        this.needsReset(`queue ${i}: ${problem}`);
        return;
      }
      q.setNegotiatedFeatures(this.driverFeatures);
    }
    try {
      this.device.activate({
        memory: this.memory,
        queues: this.queues,
        interrupt: this,
        features: this.driverFeatures,
      });
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      this.log.error({ err }, 'device activation failed');
      this.needsReset(`activation failed: ${message}`);
      return;
    }
    this.active = true;
    this.stats.activations++;
    this.log.info({ features: `0x${this.driverFeatures.toString(16)}` }, 'device activated');
  }

  private reset(): void {
    this.device.reset();
    for (const q of this.queues) q.reset();
    this.active = false;
    this.deviceStatus = 0;
    this.interruptStatusBits = 0;
    this.deviceFeaturesSel = 0;
    this.driverFeaturesSel = 0;
    this.driverFeatures = 0n;
    this.queueSel = 0;
    this.stats.resets++;
    this.log.debug('device reset');
  }

  private badAccess(what: string): void {
    this.stats.badAccesses++;
    this.log.debug(what);
  }
}

function setLow(addr: number, low: number): number {
  return Math.floor(addr / U32) * U32 + (low >>> 0);
}

function setHigh(addr: number, high: number): number {
  // Above 2^53 the sum is inexact, but also far outside any guest memory,
  // so Queue.validate() refuses it either way.
  return (high >>> 0) * U32 + (addr % U32);
}

/**
 * The Linux kernel command-line fragment that declares one virtio-mmio
 * device (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES):
 * `virtio_mmio.device=<size>@0x<base>:<irq>`.
 */
export function mmioCmdlineFragment(base: number, irq: number, size = MMIO_SIZE): string {
  const sizeText = size % 1024 === 0 ? `${size / 1024}K` : `${size}`;
  return `virtio_mmio.device=${sizeText}@0x${base.toString(16)}:${irq}`;
}

/** The feature mask every device must offer on this transport. */
export const MMIO_REQUIRED_FEATURES = featureBit(VIRTIO_F_VERSION_1);
