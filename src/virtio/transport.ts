/**
 * The device-agnostic half of a virtio transport: the device status and
 * the checks on its transitions (virtio 1.2 sections 2.1 and 3.1), feature
 * negotiation, queue configuration, activation at DRIVER_OK, reset, and
 * DEVICE_NEEDS_RESET. A transport (virtio-mmio, virtio-pci) decodes its
 * registers into calls on a {@link VirtioTransportCore} and tells it how
 * to deliver the two kinds of interrupt; it owns nothing else of the
 * state machine, so both transports behave the same way.
 */
import { GuestEventLog, type Logger } from '../base/log.js';
import type { GuestMemory } from '../base/memory.js';
import type { VirtioDevice, VirtioInterrupt } from './device.js';
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
  VIRTIO_F_VERSION_1,
  hasFeature,
} from './features.js';
import { Queue } from './queue.js';

/** Status bits the driver may set; DEVICE_NEEDS_RESET belongs to the device. */
const DRIVER_STATUS_BITS = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED;

const U32 = 0x1_0000_0000;

/** Counters of what a transport saw; for metrics and tests. */
export interface TransportStats {
  notifications: number;
  /** Notifications dropped: device not live, or a bad queue index. */
  ignoredNotifications: number;
  usedBufferInterrupts: number;
  configInterrupts: number;
  needsReset: number;
  /** Register accesses of the wrong width or alignment, writes to read-only registers, refused transitions. */
  badAccesses: number;
  resets: number;
  /** Resets (and queue stops) that waited for the device's in-flight I/O before completing. */
  resetsDrained: number;
  /** Register writes refused because a reset was still completing. */
  writesDuringReset: number;
  activations: number;
  /** Guest-triggered warnings counted but not logged (past the per-kind limit). */
  unloggedEvents: number;
}

/** How the transport that owns a core delivers what the core decides. */
export interface TransportInterrupts {
  /** Sends a used buffer notification for `queueIndex`; the device is live. */
  usedBuffer(queueIndex: number): void;
  /** Sends a configuration change notification; DRIVER_OK is set. */
  configChange(): void;
  /** The device was reset: forget transport-specific interrupt state. */
  reset(): void;
}

export interface VirtioTransportCoreOptions {
  readonly memory: GuestMemory;
  /** A logger already bound to the device and transport. */
  readonly logger: Logger;
  /** Names the transport when FEATURES_OK is refused for lack of VIRTIO_F_VERSION_1. */
  readonly transportName: string;
  readonly interrupts: TransportInterrupts;
}

/** The three areas of a split queue, as the driver programs their addresses. */
export type QueueArea = 'descriptor' | 'driver' | 'device';

const QUEUE_AREA_FIELD = {
  descriptor: 'descTable',
  driver: 'availRing',
  device: 'usedRing',
} as const satisfies Record<QueueArea, keyof Queue>;

/** Which half of a 64-bit queue address a 32-bit register holds. */
export type AddressHalf = 'low' | 'high';

/**
 * Decodes a 32-bit queue address register. Both transports put each
 * 64-bit address in a low register and, 4 bytes above it, a high one;
 * `lowOffsets` gives the low register of each area.
 */
export function queueAddressAt(offset: number, lowOffsets: Readonly<Record<QueueArea, number>>): { area: QueueArea; half: AddressHalf } | undefined {
  for (const area of Object.keys(lowOffsets) as QueueArea[]) {
    if (offset === lowOffsets[area]) return { area, half: 'low' };
    if (offset === lowOffsets[area] + 4) return { area, half: 'high' };
  }
  return undefined;
}

/**
 * The virtio state machine of one device, behind whichever registers a
 * transport decodes. It is the {@link VirtioInterrupt} the device gets at
 * activation: it filters and counts the device's signals and passes them
 * to the transport's {@link TransportInterrupts}.
 */
export class VirtioTransportCore implements VirtioInterrupt {
  readonly queues: readonly Queue[];
  readonly stats: TransportStats = {
    notifications: 0,
    ignoredNotifications: 0,
    usedBufferInterrupts: 0,
    configInterrupts: 0,
    needsReset: 0,
    badAccesses: 0,
    resets: 0,
    resetsDrained: 0,
    writesDuringReset: 0,
    activations: 0,
    unloggedEvents: 0,
  };
  /** The last reason given to needsReset(), for diagnostics. */
  lastResetReason: string | undefined;
  /** Which 32 bits of the offered features the device features register shows. */
  deviceFeaturesSel = 0;
  /** Which 32 bits of the driver's features the driver features register writes. */
  driverFeaturesSel = 0;
  /** The queue the queue registers refer to. */
  queueSel = 0;

  private readonly memory: GuestMemory;
  private readonly log: Logger;
  private readonly events: GuestEventLog;
  private readonly transportName: string;
  private readonly interrupts: TransportInterrupts;
  private deviceStatus = 0;
  private generation = 0;
  private driverFeatures = 0n;
  private active = false;
  /** A reset is waiting for the device's in-flight I/O: status still reads the old value. */
  private resetting = false;
  /** Queues the driver stopped whose in-flight I/O has not finished: they still read as ready. */
  private readonly stopping: boolean[];
  /** Counts resets, so a late queue-stop completion cannot touch a newer configuration. */
  private epoch = 0;

  constructor(
    readonly device: VirtioDevice,
    options: VirtioTransportCoreOptions,
  ) {
    this.memory = options.memory;
    this.log = options.logger;
    this.events = new GuestEventLog(options.logger, this.stats);
    this.transportName = options.transportName;
    this.interrupts = options.interrupts;
    this.queues = device.queueMaxSizes.map((max) => new Queue(max));
    this.stopping = this.queues.map(() => false);
  }

  /**
   * The device status. After the driver writes 0 it keeps its old value
   * until the reset is complete, that is until no request of the device
   * can still touch guest memory.
   */
  get status(): number {
    return this.deviceStatus;
  }

  /** QueueReady / queue_enable as the driver reads it: still 1 while a stop waits for in-flight I/O. */
  get selectedQueueReady(): boolean {
    const q = this.selectedQueue;
    return q !== undefined && (q.ready || this.stopping[this.queueSel] === true);
  }

  /** The features the driver wrote (meaningful once FEATURES_OK is set). */
  get negotiatedFeatures(): bigint {
    return this.driverFeatures;
  }

  /** True between a successful DRIVER_OK and the next reset. */
  get isActive(): boolean {
    return this.active;
  }

  /** Changes whenever the device configuration changes (32 bits; virtio-pci shows the low 8). */
  get configGeneration(): number {
    return this.generation;
  }

  /** The queue selected by queueSel, if it exists. */
  get selectedQueue(): Queue | undefined {
    return this.queues[this.queueSel];
  }

  /** The 32 bits of the offered features that deviceFeaturesSel selects; 0 above bit 63. */
  deviceFeaturesWord(): number {
    return this.featuresWord(this.device.offeredFeatures, this.deviceFeaturesSel);
  }

  /** The 32 bits of the driver's features that driverFeaturesSel selects. */
  driverFeaturesWord(): number {
    return this.featuresWord(this.driverFeatures, this.driverFeaturesSel);
  }

  /** The driver writes the 32 bits of its features that driverFeaturesSel selects. */
  writeDriverFeatures(value: number): void {
    if (this.refusedDuringReset('driver features')) return;
    if (!(this.deviceStatus & STATUS_DRIVER) || this.deviceStatus & STATUS_FEATURES_OK) {
      this.badAccess('driver features written outside feature negotiation');
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

  /** The driver sets the size of the selected queue (checked at DRIVER_OK). */
  writeQueueSize(value: number): void {
    if (this.refusedDuringReset('queue size')) return;
    this.writeQueueConfig((q) => (q.size = value));
  }

  /** The driver writes half of one of the selected queue's area addresses. */
  writeQueueAddress(area: QueueArea, half: AddressHalf, value: number): void {
    if (this.refusedDuringReset('queue address')) return;
    const field = QUEUE_AREA_FIELD[area];
    this.writeQueueConfig((q) => (q[field] = half === 'low' ? setLow(q[field], value) : setHigh(q[field], value)));
  }

  /** Half of one of the selected queue's area addresses, as last written; 0 without a queue. */
  queueAddressWord(area: QueueArea, half: AddressHalf): number {
    const q = this.selectedQueue;
    if (!q) return 0;
    const addr = q[QUEUE_AREA_FIELD[area]];
    return half === 'low' ? addr % U32 : Math.floor(addr / U32);
  }

  /** QueueReady / queue_enable: 1 enables the selected queue, 0 stops the device using it. */
  writeQueueReady(value: number): void {
    if (this.refusedDuringReset('queue ready')) return;
    const q = this.selectedQueue;
    if (!q) {
      this.badAccess(`queue ready written for nonexistent queue ${this.queueSel}`);
      return;
    }
    if (value === 0) {
      // The driver stops using the queue: the device must not touch it any
      // more, and the register reads 1 until nothing in flight can.
      const index = this.queueSel;
      if (!q.ready || this.stopping[index]) return;
      q.ready = false;
      const pending = this.active ? this.device.stopQueue?.(index) : undefined;
      if (pending) {
        this.stopping[index] = true;
        this.stats.resetsDrained++;
        const epoch = this.epoch;
        this.whenDrained(pending, `stopping queue ${index}`, () => this.queueStopped(epoch, index));
      }
      return;
    }
    if (this.deviceStatus & STATUS_DRIVER_OK) {
      this.badAccess(`queue ${this.queueSel} enabled after DRIVER_OK (queue reset is not offered)`);
      return;
    }
    q.ready = true;
  }

  /**
   * The driver writes the device status: 0 resets the device; otherwise
   * bits may only be added, in the order of the initialization sequence
   * (3.1.1), and each is checked. DRIVER_OK activates the device.
   */
  writeStatus(value: number): void {
    if (this.refusedDuringReset('status')) return;
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
    for (const bit of [STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK, STATUS_DRIVER_OK, STATUS_FAILED]) {
      if (!(newBits & bit)) continue;
      const refusal = this.checkTransition(bit, next);
      if (refusal) {
        this.stats.badAccesses++;
        this.guestEvent('status-refused', { status: value }, refusal);
        continue;
      }
      next |= bit;
    }
    const activating = (next & STATUS_DRIVER_OK) !== 0 && (this.deviceStatus & STATUS_DRIVER_OK) === 0;
    this.deviceStatus = next;
    if (next & STATUS_FAILED) this.guestEvent('driver-failed', {}, 'driver set FAILED');
    if (activating) this.activate();
  }

  /**
   * The driver notified queue `index`: from a register write, or from the
   * VMM when the ioeventfd on the notification address fires.
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

  signalUsedBuffer(queueIndex: number): void {
    if (!this.active) return;
    this.stats.usedBufferInterrupts++;
    this.log.trace({ queue: queueIndex }, 'used buffer interrupt');
    this.interrupts.usedBuffer(queueIndex);
  }

  signalConfigChange(): void {
    this.generation = (this.generation + 1) >>> 0;
    if (!(this.deviceStatus & STATUS_DRIVER_OK) || this.resetting) return;
    this.stats.configInterrupts++;
    this.interrupts.configChange();
  }

  /**
   * Sets DEVICE_NEEDS_RESET and, if the driver is running the device,
   * sends a configuration change interrupt (2.1.2). Logged and counted;
   * notifications are ignored until the driver resets the device.
   */
  needsReset(reason: string): void {
    if (this.resetting) return;
    this.stats.needsReset++;
    this.lastResetReason = reason;
    if (this.deviceStatus & STATUS_DEVICE_NEEDS_RESET) {
      this.log.debug({ reason }, 'device already needs reset');
      return;
    }
    this.guestEvent('needs-reset', { reason }, 'device needs reset');
    this.deviceStatus |= STATUS_DEVICE_NEEDS_RESET;
    if (this.deviceStatus & STATUS_DRIVER_OK) {
      this.stats.configInterrupts++;
      this.interrupts.configChange();
    }
  }

  /** Counts and logs (at debug) a guest access the transport refused. */
  badAccess(what: string): void {
    this.stats.badAccesses++;
    this.log.debug(what);
  }

  private featuresWord(features: bigint, select: number): number {
    return select > 1 ? 0 : Number((features >> BigInt(32 * select)) & 0xffff_ffffn);
  }

  private writeQueueConfig(apply: (q: Queue) => void): void {
    const q = this.selectedQueue;
    // The driver must not touch a queue's configuration while it is ready (4.1.4.3.2, 4.2.2).
    if (!q || q.ready || this.deviceStatus & STATUS_DRIVER_OK) {
      this.badAccess(`queue ${this.queueSel} configuration written while ready, live or nonexistent`);
      return;
    }
    apply(q);
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
    const unoffered = this.driverFeatures & ~this.device.offeredFeatures;
    if (unoffered !== 0n) {
      return `FEATURES_OK refused: driver accepted features 0x${unoffered.toString(16)} that were not offered`;
    }
    if (!hasFeature(this.driverFeatures, VIRTIO_F_VERSION_1)) {
      return `FEATURES_OK refused: VIRTIO_F_VERSION_1 is required by ${this.transportName}`;
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
      this.guestEvent('activation-failed', { err }, 'device activation failed', 'error');
      this.needsReset(`activation failed: ${message}`);
      return;
    }
    this.active = true;
    this.stats.activations++;
    this.guestEvent('activated', { features: `0x${this.driverFeatures.toString(16)}` }, 'device activated', 'info');
  }

  /**
   * A guest-triggered event worth a log line, rate-limited per kind (a
   * guest may repeat any of them without end).
   */
  private guestEvent(kind: string, obj: object, msg: string, level: 'error' | 'warn' | 'info' = 'warn'): void {
    this.events[level](kind, obj, msg);
  }

  /** True (and counted) when a reset is still completing: the driver must wait for status 0 first. */
  private refusedDuringReset(what: string): boolean {
    if (!this.resetting) return false;
    this.stats.writesDuringReset++;
    this.stats.badAccesses++;
    this.log.debug(`${what} written before the reset completed (status still reads non-zero)`);
    return true;
  }

  /**
   * Runs `done` once the device's drain settles, also when it fails (the
   * failure is logged): the driver must not wait for ever. An exception in
   * `done` is logged, never left as an unhandled rejection.
   */
  private whenDrained(pending: Promise<void>, what: string, done: () => void): void {
    void pending
      .then(done, (err: unknown) => {
        this.log.error({ err }, `device failed to drain for ${what}`);
        done();
      })
      .catch((err: unknown) => this.log.error({ err }, `completing ${what} failed`));
  }

  private queueStopped(epoch: number, index: number): void {
    if (epoch === this.epoch) this.stopping[index] = false;
  }

  /**
   * Status 0: the device stops at once (no notification reaches it, no
   * interrupt leaves it), and the reset completes, showing status 0,
   * when the device says nothing in flight can still touch guest memory.
   */
  private reset(): void {
    this.active = false;
    let pending: Promise<void> | void;
    try {
      pending = this.device.reset();
    } catch (err) {
      this.log.error({ err }, 'device reset failed');
      pending = undefined;
    }
    if (!pending) {
      this.completeReset();
      return;
    }
    this.resetting = true;
    this.stats.resetsDrained++;
    this.log.debug('reset waits for in-flight requests');
    this.whenDrained(pending, 'reset', () => this.completeReset());
  }

  private completeReset(): void {
    this.resetting = false;
    this.epoch++;
    this.stopping.fill(false);
    for (const q of this.queues) q.reset();
    this.active = false;
    this.deviceStatus = 0;
    this.deviceFeaturesSel = 0;
    this.driverFeaturesSel = 0;
    this.driverFeatures = 0n;
    this.queueSel = 0;
    this.interrupts.reset();
    this.stats.resets++;
    this.log.debug('device reset');
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
 * What every transport shares on top of its {@link VirtioTransportCore}:
 * the device's view of it (the {@link VirtioInterrupt} it is activated
 * with is the core), notifications, and the state getters. A subclass
 * decodes its registers into calls on `core` and delivers interrupts.
 */
export abstract class VirtioTransport implements VirtioInterrupt {
  readonly queues: readonly Queue[];
  readonly stats: TransportStats;
  protected readonly core: VirtioTransportCore;

  protected constructor(
    readonly device: VirtioDevice,
    options: Omit<VirtioTransportCoreOptions, 'interrupts'>,
  ) {
    this.core = new VirtioTransportCore(device, {
      ...options,
      interrupts: {
        usedBuffer: (queue) => this.deliverUsedBuffer(queue),
        configChange: () => this.deliverConfigChange(),
        reset: () => this.resetInterrupts(),
      },
    });
    this.queues = this.core.queues;
    this.stats = this.core.stats;
  }

  /** The device status. */
  get status(): number {
    return this.core.status;
  }

  /** The features the driver wrote (meaningful once FEATURES_OK is set). */
  get negotiatedFeatures(): bigint {
    return this.core.negotiatedFeatures;
  }

  /** True between a successful DRIVER_OK and the next reset. */
  get isActive(): boolean {
    return this.core.isActive;
  }

  /** The last reason given to needsReset(), for diagnostics. */
  get lastResetReason(): string | undefined {
    return this.core.lastResetReason;
  }

  /**
   * The driver notified queue `index`: from a register write, or from the
   * VMM when the ioeventfd on the notification address fires.
   */
  notifyQueue(index: number): void {
    this.core.notifyQueue(index);
  }

  signalUsedBuffer(queueIndex: number): void {
    this.core.signalUsedBuffer(queueIndex);
  }

  signalConfigChange(): void {
    this.core.signalConfigChange();
  }

  needsReset(reason: string): void {
    this.core.needsReset(reason);
  }

  /** Sends a used buffer notification for `queue` the transport's way. */
  protected abstract deliverUsedBuffer(queue: number): void;
  /** Sends a configuration change notification the transport's way. */
  protected abstract deliverConfigChange(): void;
  /** The device was reset: clears the transport's interrupt state. */
  protected abstract resetInterrupts(): void;
}
