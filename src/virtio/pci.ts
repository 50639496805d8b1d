/**
 * The virtio-pci transport, modern (virtio 1.x) only (virtio 1.2 section
 * 4.1): a PCI function with vendor 0x1af4 and device ID 0x1040 + device
 * type, whose vendor capabilities point into one BAR:
 *
 *   BAR 0, 64-bit memory, non-prefetchable (ISR reads clear it), 32 KiB:
 *     0x0000  common configuration (4.1.4.3), 0x3c bytes
 *     0x1000  ISR status (4.1.4.5), 1 byte
 *     0x2000  device-specific configuration (4.1.4.6), up to 4 KiB
 *     0x3000  notifications (4.1.4.4): queue i at 0x3000 + 4 * i
 *     0x4000  MSI-X table (16 bytes a vector)
 *     0x5000  MSI-X PBA
 *
 * Each region has its own 4 KiB page, so the MSI-X table shares a page
 * with nothing else (as PCI 3.0 6.8.2 recommends) and the notification
 * page holds only doorbells.
 *
 * Notifications: a write to a queue's doorbell reaches
 * {@link VirtioPciTransport.notifyQueue}. The VMM should register an
 * ioeventfd on `BAR 0 address + notifyOffset(i)` (2 bytes, datamatch i, or
 * length 0: each queue has its own address) and move it when the BAR
 * moves.
 *
 * Interrupts: with MSI-X enabled, a used buffer notification for queue q
 * signals its queue_msix_vector and a configuration change the
 * config_msix_vector (NO_VECTOR: none is sent). Without MSI-X, the ISR bit
 * is set and the INTx line is held high until the driver reads the ISR.
 */
import type { IrqLine } from '../base/irq.js';
import {
  PCI_CAP_ID_VENDOR,
  PCI_INTERRUPT_PIN_INTA,
  PCI_COMMAND_INTX_DISABLE,
  PCI_STATUS,
  PCI_STATUS_INTERRUPT,
  PciConfigSpace,
} from '../devices/pci/config-space.js';
import type { PciBar, PciDevice } from '../devices/pci/device.js';
import { Msix, type MsiSink } from '../devices/pci/msix.js';
import { silentLogger, type Logger } from '../base/log.js';
import type { BusDevice } from '../base/bus.js';
import type { GuestMemory } from '../base/memory.js';
import type { VirtioDevice } from './device.js';
import { VIRTIO_ID_BLOCK, VIRTIO_ID_NET } from './features.js';
import { VirtioTransport, queueAddressAt, type QueueArea } from './transport.js';

/** PCI IDs (4.1.2). */
export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
export const VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040;
/** Revision 1: a device with no legacy interface. */
export const VIRTIO_PCI_MODERN_REVISION = 1;

/** Class codes by device type; anything else is "unclassified device". */
export const PCI_CLASS_STORAGE_OTHER = 0x018000;
export const PCI_CLASS_NETWORK_ETHERNET = 0x020000;
export const PCI_CLASS_OTHER = 0xff0000;

/** cfg_type of the virtio vendor capabilities (4.1.4). */
export const VIRTIO_PCI_CAP_COMMON_CFG = 1;
export const VIRTIO_PCI_CAP_NOTIFY_CFG = 2;
export const VIRTIO_PCI_CAP_ISR_CFG = 3;
export const VIRTIO_PCI_CAP_DEVICE_CFG = 4;
export const VIRTIO_PCI_CAP_PCI_CFG = 5;

/** struct virtio_pci_cap, from the capability's first byte (4.1.4). */
export const VIRTIO_PCI_CAP_LEN = 2;
export const VIRTIO_PCI_CAP_CFG_TYPE = 3;
export const VIRTIO_PCI_CAP_BAR = 4;
export const VIRTIO_PCI_CAP_ID = 5;
export const VIRTIO_PCI_CAP_OFFSET = 8;
export const VIRTIO_PCI_CAP_LENGTH = 12;
/** notify_off_multiplier in virtio_pci_notify_cap; pci_cfg_data in virtio_pci_cfg_cap. */
export const VIRTIO_PCI_NOTIFY_CAP_MULTIPLIER = 16;
export const VIRTIO_PCI_CFG_CAP_DATA = 16;
const VIRTIO_PCI_CAP_SIZE = 16;

/** struct virtio_pci_common_cfg field offsets (4.1.4.3; names as Linux's uapi virtio_pci.h). */
export const VIRTIO_PCI_COMMON_DFSELECT = 0x00;
export const VIRTIO_PCI_COMMON_DF = 0x04;
export const VIRTIO_PCI_COMMON_GFSELECT = 0x08;
export const VIRTIO_PCI_COMMON_GF = 0x0c;
export const VIRTIO_PCI_COMMON_MSIX = 0x10;
export const VIRTIO_PCI_COMMON_NUMQ = 0x12;
export const VIRTIO_PCI_COMMON_STATUS = 0x14;
export const VIRTIO_PCI_COMMON_CFGGENERATION = 0x15;
export const VIRTIO_PCI_COMMON_Q_SELECT = 0x16;
export const VIRTIO_PCI_COMMON_Q_SIZE = 0x18;
export const VIRTIO_PCI_COMMON_Q_MSIX = 0x1a;
export const VIRTIO_PCI_COMMON_Q_ENABLE = 0x1c;
export const VIRTIO_PCI_COMMON_Q_NOFF = 0x1e;
export const VIRTIO_PCI_COMMON_Q_DESCLO = 0x20;
export const VIRTIO_PCI_COMMON_Q_DESCHI = 0x24;
export const VIRTIO_PCI_COMMON_Q_AVAILLO = 0x28;
export const VIRTIO_PCI_COMMON_Q_AVAILHI = 0x2c;
export const VIRTIO_PCI_COMMON_Q_USEDLO = 0x30;
export const VIRTIO_PCI_COMMON_Q_USEDHI = 0x34;
export const VIRTIO_PCI_COMMON_Q_NDATA = 0x38;
export const VIRTIO_PCI_COMMON_Q_RESET = 0x3a;
export const VIRTIO_PCI_COMMON_CFG_LENGTH = 0x3c;

/** "No MSI-X vector" in config_msix_vector and queue_msix_vector (4.1.5.1.2). */
export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** ISR status bits (4.1.4.5). */
export const VIRTIO_PCI_ISR_QUEUE = 0x1;
export const VIRTIO_PCI_ISR_CONFIG = 0x2;

/** The BAR and its layout (see the top of this file). */
export const VIRTIO_PCI_BAR = 0;
export const VIRTIO_PCI_BAR_SIZE = 0x8000;
export const VIRTIO_PCI_COMMON_CFG_OFFSET = 0x0000;
export const VIRTIO_PCI_ISR_OFFSET = 0x1000;
export const VIRTIO_PCI_DEVICE_CFG_OFFSET = 0x2000;
export const VIRTIO_PCI_DEVICE_CFG_LENGTH = 0x1000;
export const VIRTIO_PCI_NOTIFY_OFFSET = 0x3000;
export const VIRTIO_PCI_NOTIFY_LENGTH = 0x1000;
export const VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER = 4;
export const VIRTIO_PCI_MSIX_TABLE_OFFSET = 0x4000;
export const VIRTIO_PCI_MSIX_PBA_OFFSET = 0x5000;
const REGION_SIZE = 0x1000;
/** Vectors that fit the table's 4 KiB page. */
export const VIRTIO_PCI_MAX_VECTORS = REGION_SIZE / 16;

/** The width of each common configuration field; the 64-bit ones as two 32-bit halves (4.1.3.1). */
const COMMON_FIELD_WIDTH: ReadonlyMap<number, number> = new Map([
  [VIRTIO_PCI_COMMON_DFSELECT, 4],
  [VIRTIO_PCI_COMMON_DF, 4],
  [VIRTIO_PCI_COMMON_GFSELECT, 4],
  [VIRTIO_PCI_COMMON_GF, 4],
  [VIRTIO_PCI_COMMON_MSIX, 2],
  [VIRTIO_PCI_COMMON_NUMQ, 2],
  [VIRTIO_PCI_COMMON_STATUS, 1],
  [VIRTIO_PCI_COMMON_CFGGENERATION, 1],
  [VIRTIO_PCI_COMMON_Q_SELECT, 2],
  [VIRTIO_PCI_COMMON_Q_SIZE, 2],
  [VIRTIO_PCI_COMMON_Q_MSIX, 2],
  [VIRTIO_PCI_COMMON_Q_ENABLE, 2],
  [VIRTIO_PCI_COMMON_Q_NOFF, 2],
  [VIRTIO_PCI_COMMON_Q_DESCLO, 4],
  [VIRTIO_PCI_COMMON_Q_DESCHI, 4],
  [VIRTIO_PCI_COMMON_Q_AVAILLO, 4],
  [VIRTIO_PCI_COMMON_Q_AVAILHI, 4],
  [VIRTIO_PCI_COMMON_Q_USEDLO, 4],
  [VIRTIO_PCI_COMMON_Q_USEDHI, 4],
  [VIRTIO_PCI_COMMON_Q_NDATA, 2],
  [VIRTIO_PCI_COMMON_Q_RESET, 2],
]);

/** The low half of each queue address; the high half is 4 bytes above. */
const PCI_QUEUE_AREAS: Readonly<Record<QueueArea, number>> = {
  descriptor: VIRTIO_PCI_COMMON_Q_DESCLO,
  driver: VIRTIO_PCI_COMMON_Q_AVAILLO,
  device: VIRTIO_PCI_COMMON_Q_USEDLO,
};

/** The PCI class code for a virtio device type. */
export function virtioPciClassCode(deviceType: number): number {
  switch (deviceType) {
    case VIRTIO_ID_BLOCK:
      return PCI_CLASS_STORAGE_OTHER;
    case VIRTIO_ID_NET:
      return PCI_CLASS_NETWORK_ETHERNET;
    default:
      return PCI_CLASS_OTHER;
  }
}

export interface VirtioPciTransportOptions {
  readonly memory: GuestMemory;
  /** The INTx (INTA#) line: level-triggered, high while the ISR is non-zero and MSI-X is off. */
  readonly intx: IrqLine;
  /** Where MSI-X messages go. */
  readonly msi: MsiSink;
  /** The GSI INTA# is routed to, left in Interrupt Line as firmware would. */
  readonly interruptLine?: number;
  /** MSI-X table size; default one vector per queue plus one for configuration changes. */
  readonly msixVectors?: number;
  readonly logger?: Logger;
}

/** One region of the BAR and who serves it; offsets given to read/write are from `start`. */
interface BarRegion {
  readonly start: number;
  readonly size: number;
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

/** One virtio device as a PCI function. Plug it into a PciBus; its BAR 0 carries everything. */
export class VirtioPciTransport extends VirtioTransport implements PciDevice {
  readonly name: string;
  readonly config: PciConfigSpace;
  readonly bars: readonly PciBar[];
  readonly msix: Msix;

  private readonly intx: IrqLine;
  private readonly regions: readonly BarRegion[];
  private readonly queueVectors: number[];
  private configVector = VIRTIO_MSI_NO_VECTOR;
  private isr = 0;
  private intxLevel = false;
  private readonly pciCfgCapability: number;

  constructor(device: VirtioDevice, options: VirtioPciTransportOptions) {
    const log = (options.logger ?? silentLogger).child({ device: device.name, transport: 'pci' });
    super(device, { memory: options.memory, logger: log, transportName: 'virtio-pci (modern)' });
    const queueCount = device.queueMaxSizes.length;
    const vectors = options.msixVectors ?? queueCount + 1;
    if (queueCount * VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER > VIRTIO_PCI_NOTIFY_LENGTH || vectors > VIRTIO_PCI_MAX_VECTORS) {
      throw new RangeError(`${device.name}: ${queueCount} queues and ${vectors} MSI-X vectors do not fit the virtio-pci BAR layout`);
    }
    this.name = device.name;
    this.intx = options.intx;
    this.queueVectors = new Array<number>(queueCount).fill(VIRTIO_MSI_NO_VECTOR);

    this.config = new PciConfigSpace({
      vendorId: VIRTIO_PCI_VENDOR_ID,
      deviceId: VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device.deviceType,
      revisionId: VIRTIO_PCI_MODERN_REVISION,
      classCode: virtioPciClassCode(device.deviceType),
      subsystemVendorId: VIRTIO_PCI_VENDOR_ID,
      subsystemId: device.deviceType,
      interruptPin: PCI_INTERRUPT_PIN_INTA,
      ...(options.interruptLine !== undefined ? { interruptLine: options.interruptLine } : {}),
    });
    this.config.defineBar(VIRTIO_PCI_BAR, { kind: 'mem64', size: VIRTIO_PCI_BAR_SIZE });
    this.config.onCommand(() => this.updateIntx());
    this.addVirtioCapability(VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_COMMON_CFG_OFFSET, VIRTIO_PCI_COMMON_CFG_LENGTH);
    const multiplier = new Uint8Array(4);
    new DataView(multiplier.buffer).setUint32(0, VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER, true);
    this.addVirtioCapability(VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_NOTIFY_OFFSET, Math.max(queueCount, 1) * VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER, multiplier);
    this.addVirtioCapability(VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_ISR_OFFSET, 1);
    this.addVirtioCapability(VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_DEVICE_CFG_OFFSET, VIRTIO_PCI_DEVICE_CFG_LENGTH);
    this.pciCfgCapability = this.addVirtioCapability(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, new Uint8Array(4), {
      // The driver picks the window (bar, offset, length) and moves data through pci_cfg_data.
      writable: [
        [VIRTIO_PCI_CAP_BAR, VIRTIO_PCI_CAP_BAR + 1],
        [VIRTIO_PCI_CAP_OFFSET, VIRTIO_PCI_CAP_LENGTH + 4],
        [VIRTIO_PCI_CFG_CAP_DATA, VIRTIO_PCI_CFG_CAP_DATA + 4],
      ],
      onRead: (offset, length) => {
        if (offset + length > VIRTIO_PCI_CFG_CAP_DATA) this.pciCfgAccess('read');
      },
      onWrite: (offset, length) => {
        if (offset + length > VIRTIO_PCI_CFG_CAP_DATA) this.pciCfgAccess('write');
      },
    });
    this.msix = new Msix(this.config, {
      vectors,
      tableBar: VIRTIO_PCI_BAR,
      tableOffset: VIRTIO_PCI_MSIX_TABLE_OFFSET,
      pbaBar: VIRTIO_PCI_BAR,
      pbaOffset: VIRTIO_PCI_MSIX_PBA_OFFSET,
      sink: options.msi,
      onControlChange: () => this.updateIntx(),
      logger: log,
    });

    const msix = this.msix;
    this.regions = [
      region(
        VIRTIO_PCI_COMMON_CFG_OFFSET,
        VIRTIO_PCI_COMMON_CFG_LENGTH,
        (o, d) => this.readCommon(o, d),
        (o, d) => this.writeCommon(o, d),
      ),
      region(
        VIRTIO_PCI_ISR_OFFSET,
        1,
        (_o, d) => this.readIsr(d),
        () => this.core.badAccess('ISR status write'),
      ),
      region(
        VIRTIO_PCI_DEVICE_CFG_OFFSET,
        VIRTIO_PCI_DEVICE_CFG_LENGTH,
        (o, d) => device.readConfig(o, d),
        (o, d) => device.writeConfig(o, d),
      ),
      region(
        VIRTIO_PCI_NOTIFY_OFFSET,
        VIRTIO_PCI_NOTIFY_LENGTH,
        (_o, d) => d.fill(0),
        (o) => this.writeNotify(o),
      ),
      region(
        VIRTIO_PCI_MSIX_TABLE_OFFSET,
        Msix.tableSize(vectors),
        (o, d) => msix.readTable(o, d),
        (o, d) => msix.writeTable(o, d),
      ),
      region(
        VIRTIO_PCI_MSIX_PBA_OFFSET,
        Msix.pbaSize(vectors),
        (o, d) => msix.readPba(o, d),
        (o, d) => msix.writePba(o, d),
      ),
    ];
    const bar: BusDevice = { read: (o, d) => this.readBar(o, d), write: (o, d) => this.writeBar(o, d) };
    this.bars = [{ index: VIRTIO_PCI_BAR, size: VIRTIO_PCI_BAR_SIZE, kind: 'mem64', device: bar }];
  }

  /** The ISR status, without the read side effect. */
  get isrStatus(): number {
    return this.isr;
  }

  /** The INTx line level this transport drives. */
  get intxAsserted(): boolean {
    return this.intxLevel;
  }

  /** Offset within BAR 0 of queue `queue`'s doorbell: where to put its ioeventfd. */
  notifyOffset(queue: number): number {
    return VIRTIO_PCI_NOTIFY_OFFSET + VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER * queue;
  }

  private readBar(offset: number, data: Uint8Array): void {
    const region = this.regionAt(offset, data.length);
    if (!region) {
      data.fill(0);
      this.core.badAccess(`${data.length}-byte read at BAR offset 0x${offset.toString(16)}, outside every region`);
      return;
    }
    region.read(offset - region.start, data);
  }

  private writeBar(offset: number, data: Uint8Array): void {
    const region = this.regionAt(offset, data.length);
    if (!region) {
      this.core.badAccess(`${data.length}-byte write at BAR offset 0x${offset.toString(16)}, outside every region`);
      return;
    }
    region.write(offset - region.start, data);
  }

  private regionAt(offset: number, length: number): BarRegion | undefined {
    return this.regions.find((r) => offset >= r.start && offset + length <= r.start + r.size);
  }

  private readCommon(offset: number, data: Uint8Array): void {
    data.fill(0);
    const view = new DataView(data.buffer, data.byteOffset, data.length);
    if (data.length === 8 && isQueueAddressLow(offset)) {
      view.setUint32(0, this.readCommonField(offset), true);
      view.setUint32(4, this.readCommonField(offset + 4), true);
      return;
    }
    if (COMMON_FIELD_WIDTH.get(offset) !== data.length) {
      this.core.badAccess(`${data.length}-byte read of common configuration at 0x${offset.toString(16)}`);
      return;
    }
    setLittleEndian(view, this.readCommonField(offset));
  }

  private writeCommon(offset: number, data: Uint8Array): void {
    const view = new DataView(data.buffer, data.byteOffset, data.length);
    if (data.length === 8 && isQueueAddressLow(offset)) {
      this.writeCommonField(offset, view.getUint32(0, true));
      this.writeCommonField(offset + 4, view.getUint32(4, true));
      return;
    }
    if (COMMON_FIELD_WIDTH.get(offset) !== data.length) {
      this.core.badAccess(`${data.length}-byte write of common configuration at 0x${offset.toString(16)}`);
      return;
    }
    this.writeCommonField(offset, getLittleEndian(view));
  }

  private readCommonField(offset: number): number {
    const core = this.core;
    const queue = core.selectedQueue;
    switch (offset) {
      case VIRTIO_PCI_COMMON_DFSELECT:
        return core.deviceFeaturesSel;
      case VIRTIO_PCI_COMMON_DF:
        return core.deviceFeaturesWord();
      case VIRTIO_PCI_COMMON_GFSELECT:
        return core.driverFeaturesSel;
      case VIRTIO_PCI_COMMON_GF:
        return core.driverFeaturesWord();
      case VIRTIO_PCI_COMMON_MSIX:
        return this.configVector;
      case VIRTIO_PCI_COMMON_NUMQ:
        return this.queues.length;
      case VIRTIO_PCI_COMMON_STATUS:
        return core.status;
      case VIRTIO_PCI_COMMON_CFGGENERATION:
        return core.configGeneration & 0xff;
      case VIRTIO_PCI_COMMON_Q_SELECT:
        return core.queueSel;
      case VIRTIO_PCI_COMMON_Q_SIZE:
        // 0 tells the driver the selected queue does not exist.
        return queue?.size ?? 0;
      case VIRTIO_PCI_COMMON_Q_MSIX:
        return this.queueVectors[core.queueSel] ?? VIRTIO_MSI_NO_VECTOR;
      case VIRTIO_PCI_COMMON_Q_ENABLE:
        return core.selectedQueueReady ? 1 : 0;
      case VIRTIO_PCI_COMMON_Q_NOFF:
        // queue_notify_off = queue index: the doorbell of queue i is at notify + 4 * i.
        return queue ? core.queueSel : 0;
    }
    const address = queueAddressAt(offset, PCI_QUEUE_AREAS);
    // queue_notify_data and queue_reset: VIRTIO_F_NOTIF_CONFIG_DATA and RING_RESET are not offered.
    return address ? core.queueAddressWord(address.area, address.half) : 0;
  }

  private writeCommonField(offset: number, value: number): void {
    const core = this.core;
    switch (offset) {
      case VIRTIO_PCI_COMMON_DFSELECT:
        core.deviceFeaturesSel = value;
        return;
      case VIRTIO_PCI_COMMON_GFSELECT:
        core.driverFeaturesSel = value;
        return;
      case VIRTIO_PCI_COMMON_GF:
        core.writeDriverFeatures(value);
        return;
      case VIRTIO_PCI_COMMON_MSIX:
        this.configVector = this.vectorOrNone(value);
        return;
      case VIRTIO_PCI_COMMON_STATUS:
        core.writeStatus(value);
        return;
      case VIRTIO_PCI_COMMON_Q_SELECT:
        core.queueSel = value;
        return;
      case VIRTIO_PCI_COMMON_Q_SIZE:
        core.writeQueueSize(value);
        return;
      case VIRTIO_PCI_COMMON_Q_MSIX:
        if (core.queueSel < this.queueVectors.length) this.queueVectors[core.queueSel] = this.vectorOrNone(value);
        else core.badAccess(`queue_msix_vector written for nonexistent queue ${core.queueSel}`);
        return;
      case VIRTIO_PCI_COMMON_Q_ENABLE:
        core.writeQueueReady(value);
        return;
      case VIRTIO_PCI_COMMON_Q_RESET:
        // VIRTIO_F_RING_RESET is not offered.
        return;
    }
    const address = queueAddressAt(offset, PCI_QUEUE_AREAS);
    if (address) {
      core.writeQueueAddress(address.area, address.half, value);
      return;
    }
    core.badAccess(`write of 0x${value.toString(16)} to read-only common configuration field 0x${offset.toString(16)}`);
  }

  /**
   * A vector the table has, or NO_VECTOR: reading back NO_VECTOR is how
   * the driver learns a mapping failed (4.1.5.1.2).
   */
  private vectorOrNone(value: number): number {
    return value < this.msix.vectors ? value : VIRTIO_MSI_NO_VECTOR;
  }

  private readIsr(data: Uint8Array): void {
    data.fill(0);
    data[0] = this.isr;
    // Reading is the acknowledgement: it clears the ISR and deasserts INTx.
    this.isr = 0;
    this.updateIntx();
  }

  private writeNotify(offset: number): void {
    const queue = offset / VIRTIO_PCI_NOTIFY_OFF_MULTIPLIER;
    if (!Number.isInteger(queue) || queue >= this.queues.length) {
      this.core.badAccess(`doorbell write at notification offset 0x${offset.toString(16)}, no queue there`);
      return;
    }
    // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index; the
    // address already says which queue, as it does for an ioeventfd.
    this.core.notifyQueue(queue);
  }

  protected deliverUsedBuffer(queue: number): void {
    this.interrupt(VIRTIO_PCI_ISR_QUEUE, this.queueVectors[queue] ?? VIRTIO_MSI_NO_VECTOR);
  }

  protected deliverConfigChange(): void {
    this.interrupt(VIRTIO_PCI_ISR_CONFIG, this.configVector);
  }

  private interrupt(isrBit: number, vector: number): void {
    if (this.msix.enabled) {
      // The ISR serves INTx only; with MSI-X the vector says what happened.
      if (vector !== VIRTIO_MSI_NO_VECTOR) this.msix.signal(vector);
      return;
    }
    this.isr |= isrBit;
    this.updateIntx();
  }

  protected resetInterrupts(): void {
    // The MSI-X table is PCI state and survives a virtio reset; the event mappings do not (4.1.5.1.2).
    this.isr = 0;
    this.configVector = VIRTIO_MSI_NO_VECTOR;
    this.queueVectors.fill(VIRTIO_MSI_NO_VECTOR);
    this.updateIntx();
  }

  /** Drives INTx and the Interrupt Status bit from the ISR, MSI-X Enable and Interrupt Disable. */
  private updateIntx(): void {
    const pending = this.isr !== 0 && !this.msix.enabled;
    const status = this.config.getU16(PCI_STATUS);
    this.config.setU16(PCI_STATUS, pending ? status | PCI_STATUS_INTERRUPT : status & ~PCI_STATUS_INTERRUPT);
    const level = pending && !(this.config.command & PCI_COMMAND_INTX_DISABLE);
    if (level === this.intxLevel) return;
    this.intxLevel = level;
    this.intx.setLevel(level);
  }

  /**
   * Adds one virtio vendor capability (struct virtio_pci_cap plus `extra`)
   * pointing at `length` bytes at `offset` in the BAR. Returns its offset.
   */
  private addVirtioCapability(
    cfgType: number,
    offset: number,
    length: number,
    extra = new Uint8Array(0),
    options: Parameters<PciConfigSpace['addCapability']>[2] = {},
  ): number {
    const cap = new Uint8Array(VIRTIO_PCI_CAP_SIZE + extra.length);
    const view = new DataView(cap.buffer);
    view.setUint8(VIRTIO_PCI_CAP_LEN, cap.length);
    view.setUint8(VIRTIO_PCI_CAP_CFG_TYPE, cfgType);
    view.setUint8(VIRTIO_PCI_CAP_BAR, VIRTIO_PCI_BAR);
    view.setUint32(VIRTIO_PCI_CAP_OFFSET, offset, true);
    view.setUint32(VIRTIO_PCI_CAP_LENGTH, length, true);
    cap.set(extra, VIRTIO_PCI_CAP_SIZE);
    // The list maintains the ID and next pointer bytes.
    return this.config.addCapability(PCI_CAP_ID_VENDOR, cap.subarray(2), options);
  }

  /**
   * VIRTIO_PCI_CAP_PCI_CFG (4.1.4.9): an access to pci_cfg_data is an
   * access of cap.length bytes at cap.offset in BAR cap.bar. A window that
   * is not 1, 2 or 4 aligned bytes inside BAR 0 does nothing.
   */
  private pciCfgAccess(kind: 'read' | 'write'): void {
    const cap = this.pciCfgCapability;
    const bar = this.config.getU8(cap + VIRTIO_PCI_CAP_BAR);
    const offset = this.config.getU32(cap + VIRTIO_PCI_CAP_OFFSET);
    const length = this.config.getU32(cap + VIRTIO_PCI_CAP_LENGTH);
    const valid = bar === VIRTIO_PCI_BAR && (length === 1 || length === 2 || length === 4) && offset % length === 0 && offset + length <= VIRTIO_PCI_BAR_SIZE;
    if (!valid) {
      // lspci -xxx reads the whole space: an unset window is not a fault.
      if (length !== 0) this.core.badAccess(`PCI cfg access window BAR ${bar} 0x${offset.toString(16)}+${length}`);
      return;
    }
    const data = cap + VIRTIO_PCI_CFG_CAP_DATA;
    if (kind === 'read') {
      const buffer = new Uint8Array(4);
      this.readBar(offset, buffer.subarray(0, length));
      this.config.setBytes(data, buffer);
    } else {
      this.writeBar(offset, this.config.getBytes(data, length));
    }
  }
}

function region(start: number, size: number, read: BarRegion['read'], write: BarRegion['write']): BarRegion {
  return { start, size, read, write };
}

function isQueueAddressLow(offset: number): boolean {
  return Object.values(PCI_QUEUE_AREAS).includes(offset);
}

function setLittleEndian(view: DataView, value: number): void {
  if (view.byteLength === 1) view.setUint8(0, value);
  else if (view.byteLength === 2) view.setUint16(0, value, true);
  else view.setUint32(0, value >>> 0, true);
}

function getLittleEndian(view: DataView): number {
  if (view.byteLength === 1) return view.getUint8(0);
  if (view.byteLength === 2) return view.getUint16(0, true);
  return view.getUint32(0, true);
}
