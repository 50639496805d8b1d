/**
 * The contract between a virtio device model (blk, net) and the transport
 * that exposes it to the guest (virtio-mmio today, virtio-pci later). The
 * device knows nothing about registers; the transport knows nothing about
 * disks or packets.
 */
import type { GuestMemory } from '../base/memory.js';
import type { Queue } from './queue.js';

/** How a device signals the driver; implemented by the transport. */
export interface VirtioInterrupt {
  /** A used buffer notification for queue `queueIndex` (the device decided one is needed). */
  signalUsedBuffer(queueIndex: number): void;
  /** The device configuration space changed. */
  signalConfigChange(): void;
  /**
   * The device hit an error it cannot recover from (usually a malformed
   * ring): sets DEVICE_NEEDS_RESET and tells the driver. The device stops
   * using its queues until the driver resets it.
   */
  needsReset(reason: string): void;
}

/** Everything a device gets when the driver sets DRIVER_OK. */
export interface VirtioActivation {
  readonly memory: GuestMemory;
  /** One per entry of {@link VirtioDevice.queueMaxSizes}; some may be not ready. */
  readonly queues: readonly Queue[];
  readonly interrupt: VirtioInterrupt;
  /** The features the driver accepted (a subset of the offered ones). */
  readonly features: bigint;
}

/** A virtio device model, independent of the transport. */
export interface VirtioDevice {
  /** Virtio device ID (VIRTIO_ID_*). */
  readonly deviceType: number;
  /** A short name for logs ("virtio-blk", "virtio-net"). */
  readonly name: string;
  /** Feature bits offered to the driver, including VIRTIO_F_VERSION_1. */
  readonly offeredFeatures: bigint;
  /** Maximum size of each virtqueue; the array length is the number of queues. */
  readonly queueMaxSizes: readonly number[];
  /**
   * Device-specific checks of the driver's feature choice (dependencies
   * between bits) at FEATURES_OK: a reason to refuse, or undefined.
   */
  validateFeatures?(features: bigint): string | undefined;
  /** Reads `data.length` bytes of configuration space at `offset`; out of range reads as zero. */
  readConfig(offset: number, data: Uint8Array): void;
  /** Writes configuration space; read-only fields ignore writes. */
  writeConfig(offset: number, data: Uint8Array): void;
  /**
   * Starts the device (DRIVER_OK). Throwing refuses activation: the
   * transport then sets DEVICE_NEEDS_RESET.
   */
  activate(activation: VirtioActivation): void;
  /** The driver notified queue `index` (QueueNotify write or ioeventfd). */
  queueNotify(index: number): void;
  /**
   * Stops the device and forgets the activation (status 0 written). A
   * device with host I/O still in flight that can touch guest memory
   * returns a promise that settles when the last of it has finished; the
   * transport shows status 0 to the driver only then (virtio 1.2 2.4.1:
   * the driver waits for that). Those requests are not reported to the
   * guest.
   */
  reset(): Promise<void> | void;
  /**
   * The driver stopped queue `index` while the device is live (virtio-mmio
   * QueueReady = 0): the device takes nothing more from it and touches
   * neither its ring nor its buffers again; a promise as for reset(), after
   * which the transport shows the queue as not ready.
   */
  stopQueue?(index: number): Promise<void> | void;
}

/** Copies bytes of a device's config image into `data`, zero beyond its end. */
export function readConfigBytes(config: Uint8Array, offset: number, data: Uint8Array): void {
  data.fill(0);
  if (offset < 0 || offset >= config.length) return;
  data.set(config.subarray(offset, Math.min(config.length, offset + data.length)));
}
