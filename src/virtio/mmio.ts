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
import type { BusDevice } from '../base/bus.js';
import type { GuestMemory } from '../base/memory.js';
import type { IrqLine } from '../base/irq.js';
import { silentLogger, type Logger } from '../base/log.js';
import type { VirtioDevice } from './device.js';
import { VIRTIO_F_VERSION_1, featureBit } from './features.js';
import { VirtioTransport, queueAddressAt, type QueueArea, type TransportStats } from './transport.js';

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

/** "virt" in little-endian. */
export const MMIO_MAGIC = 0x74726976;
export const MMIO_VERSION_MODERN = 2;
/** VendorID: "TSVM" in little-endian; drivers do not interpret it. */
export const MMIO_VENDOR_TSVM = 0x4d565354;

/** InterruptStatus bits. */
export const INTERRUPT_USED_BUFFER = 0x1;
export const INTERRUPT_CONFIG_CHANGE = 0x2;

/** The low register of each queue address; the high one is 4 bytes above. */
const MMIO_QUEUE_AREAS: Readonly<Record<QueueArea, number>> = {
  descriptor: MMIO_QUEUE_DESC_LOW,
  driver: MMIO_QUEUE_DRIVER_LOW,
  device: MMIO_QUEUE_DEVICE_LOW,
};

export interface MmioTransportOptions {
  readonly memory: GuestMemory;
  readonly irq: IrqLine;
  readonly logger?: Logger;
}

/** Counters of what the transport saw; for metrics and tests. */
export type MmioStats = TransportStats;

/**
 * One virtio device behind a virtio-mmio register window. Insert it into
 * the MMIO bus at its layout slot (`virtioMmioSlot`, src/arch/layout.ts:
 * one page). The register decoding is here; the state machine is the
 * shared {@link VirtioTransport} core.
 */
export class MmioTransport extends VirtioTransport implements BusDevice {
  private readonly irq: IrqLine;
  private interruptStatusBits = 0;

  constructor(device: VirtioDevice, options: MmioTransportOptions) {
    super(device, {
      memory: options.memory,
      logger: (options.logger ?? silentLogger).child({ device: device.name, transport: 'mmio' }),
      transportName: 'virtio-mmio version 2',
    });
    this.irq = options.irq;
  }

  /** The InterruptStatus register. */
  get interruptStatus(): number {
    return this.interruptStatusBits;
  }

  read(offset: number, data: Uint8Array): void {
    if (offset >= MMIO_CONFIG) {
      this.device.readConfig(offset - MMIO_CONFIG, data);
      return;
    }
    data.fill(0);
    if (data.length !== 4 || offset % 4 !== 0) {
      this.core.badAccess(`${data.length}-byte read at register 0x${offset.toString(16)}`);
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
      this.core.badAccess(`${data.length}-byte write at register 0x${offset.toString(16)}`);
      return;
    }
    this.writeRegister(offset, new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true));
  }

  protected deliverUsedBuffer(): void {
    this.raise(INTERRUPT_USED_BUFFER);
  }

  protected deliverConfigChange(): void {
    this.raise(INTERRUPT_CONFIG_CHANGE);
  }

  protected resetInterrupts(): void {
    this.interruptStatusBits = 0;
  }

  private raise(bit: number): void {
    this.interruptStatusBits |= bit;
    // Always send the edge, as Firecracker does: a spurious interrupt
    // costs the guest one ISR read, a lost one stalls the queue forever.
    this.irq.trigger();
  }

  private readRegister(offset: number): number {
    const core = this.core;
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
        return core.deviceFeaturesWord();
      case MMIO_QUEUE_NUM_MAX:
        return core.selectedQueue?.maxSize ?? 0;
      case MMIO_QUEUE_READY:
        return core.selectedQueueReady ? 1 : 0;
      case MMIO_INTERRUPT_STATUS:
        return this.interruptStatusBits;
      case MMIO_STATUS:
        return core.status;
      case MMIO_SHM_LEN_LOW:
      case MMIO_SHM_LEN_HIGH:
      case MMIO_SHM_BASE_LOW:
      case MMIO_SHM_BASE_HIGH:
        // No shared memory regions: length and base read as -1 (4.2.2).
        return 0xffff_ffff;
      case MMIO_CONFIG_GENERATION:
        return core.configGeneration;
      default:
        // Write-only and reserved registers (QueueReset too) read as zero.
        return 0;
    }
  }

  private writeRegister(offset: number, value: number): void {
    const core = this.core;
    switch (offset) {
      case MMIO_DEVICE_FEATURES_SEL:
        core.deviceFeaturesSel = value;
        return;
      case MMIO_DRIVER_FEATURES_SEL:
        core.driverFeaturesSel = value;
        return;
      case MMIO_DRIVER_FEATURES:
        core.writeDriverFeatures(value);
        return;
      case MMIO_QUEUE_SEL:
        core.queueSel = value;
        return;
      case MMIO_QUEUE_NUM:
        core.writeQueueSize(value);
        return;
      case MMIO_QUEUE_READY:
        core.writeQueueReady(value);
        return;
      case MMIO_QUEUE_NOTIFY:
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
        core.notifyQueue(value);
        return;
      case MMIO_INTERRUPT_ACK:
        this.interruptStatusBits &= ~value;
        return;
      case MMIO_STATUS:
        core.writeStatus(value);
        return;
      case MMIO_SHM_SEL:
      case MMIO_QUEUE_RESET:
        // No shared memory regions; VIRTIO_F_RING_RESET is not offered.
        return;
    }
    const address = queueAddressAt(offset, MMIO_QUEUE_AREAS);
    if (address) {
      core.writeQueueAddress(address.area, address.half, value);
      return;
    }
    core.badAccess(`write of 0x${value.toString(16)} to read-only or reserved register 0x${offset.toString(16)}`);
  }
}

/**
 * The Linux kernel command-line fragment that declares one virtio-mmio
 * device (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES):
 * `virtio_mmio.device=<size>@0x<base>:<irq>`.
 */
export function mmioCmdlineFragment(base: number, irq: number, size: number): string {
  const sizeText = size % 1024 === 0 ? `${size / 1024}K` : `${size}`;
  return `virtio_mmio.device=${sizeText}@0x${base.toString(16)}:${irq}`;
}

/** The feature mask every device must offer on this transport. */
export const MMIO_REQUIRED_FEATURES = featureBit(VIRTIO_F_VERSION_1);
