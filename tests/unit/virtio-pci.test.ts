import { describe, expect, it } from 'vitest';
import { FakeIrqLine } from '../../src/testing/index.js';
import {
  MSIX_CAP_MESSAGE_CONTROL,
  MSIX_CAP_PBA,
  MSIX_CAP_TABLE,
  MSIX_CONTROL_ENABLE,
  MSIX_CONTROL_FUNCTION_MASK,
  MSIX_ENTRY_SIZE,
  PCI_BAR0,
  PCI_CAPABILITY_LIST,
  PCI_CAP_ID_MSIX,
  PCI_CAP_ID_VENDOR,
  PCI_CLASS_CODE,
  PCI_COMMAND,
  PCI_COMMAND_INTX_DISABLE,
  PCI_COMMAND_MASTER,
  PCI_COMMAND_MEMORY,
  PCI_DEVICE_ID,
  PCI_INTERRUPT_LINE,
  PCI_INTERRUPT_PIN,
  PCI_REVISION_ID,
  PCI_STATUS,
  PCI_STATUS_INTERRUPT,
  PCI_SUBSYSTEM_ID,
  PCI_SUBSYSTEM_VENDOR_ID,
  PCI_VENDOR_ID,
  PciAllocator,
  PciBarRouter,
  PciBus,
  PciConfigIo,
  type MsiMessage,
  type MsiSink,
} from '../../src/devices/pci/index.js';
import { GuestMemory } from '../../src/base/memory.js';
import { readConfigBytes, type VirtioActivation, type VirtioDevice } from '../../src/virtio/device.js';
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
  VIRTIO_F_EVENT_IDX,
  VIRTIO_F_VERSION_1,
  VIRTIO_ID_BLOCK,
  VIRTIO_ID_NET,
  featureMask,
} from '../../src/virtio/features.js';
import {
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_PCI_CAP_BAR,
  VIRTIO_PCI_CAP_CFG_TYPE,
  VIRTIO_PCI_CAP_COMMON_CFG,
  VIRTIO_PCI_CAP_DEVICE_CFG,
  VIRTIO_PCI_CAP_ISR_CFG,
  VIRTIO_PCI_CAP_LEN,
  VIRTIO_PCI_CAP_LENGTH,
  VIRTIO_PCI_CAP_NOTIFY_CFG,
  VIRTIO_PCI_CAP_OFFSET,
  VIRTIO_PCI_CAP_PCI_CFG,
  VIRTIO_PCI_CFG_CAP_DATA,
  VIRTIO_PCI_COMMON_CFGGENERATION,
  VIRTIO_PCI_COMMON_DF,
  VIRTIO_PCI_COMMON_DFSELECT,
  VIRTIO_PCI_COMMON_GF,
  VIRTIO_PCI_COMMON_GFSELECT,
  VIRTIO_PCI_COMMON_MSIX,
  VIRTIO_PCI_COMMON_NUMQ,
  VIRTIO_PCI_COMMON_Q_AVAILLO,
  VIRTIO_PCI_COMMON_Q_DESCHI,
  VIRTIO_PCI_COMMON_Q_DESCLO,
  VIRTIO_PCI_COMMON_Q_ENABLE,
  VIRTIO_PCI_COMMON_Q_MSIX,
  VIRTIO_PCI_COMMON_Q_NOFF,
  VIRTIO_PCI_COMMON_Q_SELECT,
  VIRTIO_PCI_COMMON_Q_SIZE,
  VIRTIO_PCI_COMMON_Q_USEDLO,
  VIRTIO_PCI_COMMON_STATUS,
  VIRTIO_PCI_DEVICE_CFG_OFFSET,
  VIRTIO_PCI_ISR_CONFIG,
  VIRTIO_PCI_ISR_OFFSET,
  VIRTIO_PCI_ISR_QUEUE,
  VIRTIO_PCI_MSIX_PBA_OFFSET,
  VIRTIO_PCI_MSIX_TABLE_OFFSET,
  VIRTIO_PCI_NOTIFY_CAP_MULTIPLIER,
  VIRTIO_PCI_NOTIFY_OFFSET,
  VirtioPciTransport,
  virtioPciClassCode,
} from '../../src/virtio/pci.js';
import { QueueError, VIRTQ_DESC_F_NEXT } from '../../src/virtio/queue.js';
import { FakeVirtqueue, GuestAllocator, type QueueLayout } from '../../src/testing/index.js';
import { PciPortIo } from '../helpers/pci.js';

const WINDOW = 0xc000_0000;

/** A two-queue device that answers every chain with a used element of length 1 and counts its config writes. */
class CountingDevice implements VirtioDevice {
  readonly deviceType = 0x21;
  readonly name = 'counting';
  readonly offeredFeatures = featureMask(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX);
  readonly queueMaxSizes = [16, 8];
  readonly config = Uint8Array.from([0xde, 0xad, 0xbe, 0xef]);
  live: VirtioActivation | undefined;
  resets = 0;

  readConfig(offset: number, data: Uint8Array): void {
    readConfigBytes(this.config, offset, data);
  }
  writeConfig(offset: number, data: Uint8Array): void {
    if (offset < this.config.length) this.config.set(data.subarray(0, this.config.length - offset), offset);
  }
  activate(activation: VirtioActivation): void {
    this.live = activation;
  }
  queueNotify(index: number): void {
    const { memory, queues, interrupt } = this.live!;
    const q = queues[index]!;
    try {
      let chain;
      while ((chain = q.pop(memory))) q.addUsed(memory, chain.head, 1);
      if (q.needsNotification(memory)) interrupt.signalUsedBuffer(index);
    } catch (err) {
      if (!(err instanceof QueueError)) throw err;
      interrupt.needsReset(err.message);
    }
  }
  reset(): void {
    this.resets++;
    this.live = undefined;
  }
}

class RecordingSink implements MsiSink {
  readonly routes = new Map<number, MsiMessage>();
  readonly fired: number[] = [];
  update(vector: number, message: MsiMessage | undefined): void {
    if (message) this.routes.set(vector, message);
    else this.routes.delete(vector);
  }
  fire(vector: number, message: MsiMessage): void {
    expect(this.routes.get(vector)).toEqual(message);
    this.fired.push(vector);
  }
}

/**
 * The guest's side: configuration space through ports 0xCF8/0xCFC, the
 * BAR through the PCI memory window, as Linux's virtio_pci_modern does.
 */
class Guest {
  readonly port: PciPortIo;
  barBase = 0;

  constructor(
    readonly bus: PciBus,
    readonly window: PciBarRouter,
    readonly slot: number,
  ) {
    this.port = new PciPortIo(new PciConfigIo(bus));
  }

  cfg(register: number, size: number): number {
    return this.port.read(this.slot, register, size);
  }

  setCfg(register: number, size: number, value: number): void {
    this.port.write(this.slot, register, size, value);
  }

  /** Reads BAR 0's address the way pci_read_bases leaves it. */
  findBar(): void {
    const low = this.cfg(PCI_BAR0, 4) & ~0xf;
    const high = this.cfg(PCI_BAR0 + 4, 4);
    this.barBase = high * 0x1_0000_0000 + (low >>> 0);
  }

  read(offset: number, size: number): number {
    const b = new Uint8Array(size);
    this.window.read(this.barBase + offset - WINDOW, b);
    return b.reduce((v, byte, i) => v + byte * 2 ** (8 * i), 0);
  }

  write(offset: number, size: number, value: number): void {
    const b = new Uint8Array(size);
    for (let i = 0; i < size; i++) b[i] = Math.floor(value / 2 ** (8 * i)) & 0xff;
    this.window.write(this.barBase + offset - WINDOW, b);
  }

  /** Walks the capability list: [offset, id] pairs in chain order. */
  capabilities(): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    for (let at = this.cfg(PCI_CAPABILITY_LIST, 1); at !== 0; at = this.cfg(at + 1, 1)) {
      out.push([at, this.cfg(at, 1)]);
      if (out.length > 48) throw new Error('capability loop');
    }
    return out;
  }

  setStatus(bits: number): void {
    this.write(VIRTIO_PCI_COMMON_STATUS, 1, bits);
  }

  status(): number {
    return this.read(VIRTIO_PCI_COMMON_STATUS, 1);
  }

  /** vp_modern_get_features / set_features, then FEATURES_OK. */
  negotiate(features: bigint): boolean {
    this.setStatus(0);
    this.setStatus(STATUS_ACKNOWLEDGE);
    this.setStatus(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for (const half of [0, 1]) {
      this.write(VIRTIO_PCI_COMMON_GFSELECT, 4, half);
      this.write(VIRTIO_PCI_COMMON_GF, 4, Number((features >> BigInt(32 * half)) & 0xffff_ffffn));
    }
    this.setStatus(this.status() | STATUS_FEATURES_OK);
    return (this.status() & STATUS_FEATURES_OK) !== 0;
  }

  /** vp_active_vq (the address halves as vp_iowrite64_twopart writes them); returns queue_notify_off. */
  setupQueue(index: number, layout: QueueLayout, vector: number): number {
    this.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index);
    this.write(VIRTIO_PCI_COMMON_Q_SIZE, 2, layout.size);
    for (const [low, addr] of [
      [VIRTIO_PCI_COMMON_Q_DESCLO, layout.descTable],
      [VIRTIO_PCI_COMMON_Q_AVAILLO, layout.availRing],
      [VIRTIO_PCI_COMMON_Q_USEDLO, layout.usedRing],
    ] as const) {
      this.write(low, 4, addr % 0x1_0000_0000);
      this.write(low + 4, 4, Math.floor(addr / 0x1_0000_0000));
    }
    this.write(VIRTIO_PCI_COMMON_Q_MSIX, 2, vector);
    return this.read(VIRTIO_PCI_COMMON_Q_NOFF, 2);
  }

  enableQueue(index: number): void {
    this.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index);
    this.write(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
  }

  /** What pci_msix_setup does: enable with everything masked, program and unmask entries, unmask the function. */
  enableMsix(msixCap: number, vectors: number): void {
    const control = msixCap + MSIX_CAP_MESSAGE_CONTROL;
    this.setCfg(control, 2, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
    for (let v = 0; v < vectors; v++) {
      const entry = VIRTIO_PCI_MSIX_TABLE_OFFSET + v * MSIX_ENTRY_SIZE;
      this.write(entry, 4, 0xfee0_0000);
      this.write(entry + 4, 4, 0);
      this.write(entry + 8, 4, 0x4020 + v);
      this.write(entry + 12, 4, 0);
    }
    this.setCfg(control, 2, MSIX_CONTROL_ENABLE);
  }
}

function rig(device = new CountingDevice()) {
  const bytes = new Uint8Array(1 << 20);
  const mem = GuestMemory.fromBuffer(bytes);
  const intx = new FakeIrqLine();
  const sink = new RecordingSink();
  const transport = new VirtioPciTransport(device, { memory: mem, intx, msi: sink, interruptLine: 11 });
  const bus = new PciBus();
  const slot = bus.add(transport);
  const window = new PciBarRouter(bus, 'memory', WINDOW, 0x1000_0000);
  new PciAllocator({ mmio32: { base: WINDOW, size: 0x1000_0000 } }).assign(transport);
  const guest = new Guest(bus, window, slot);
  guest.findBar();
  // pci_set_master: virtio-pci enables bus mastering before touching the device.
  guest.setCfg(PCI_COMMAND, 2, guest.cfg(PCI_COMMAND, 2) | PCI_COMMAND_MASTER);
  const allocator = new GuestAllocator(0x1000, bytes.length);
  const queues = device.queueMaxSizes.map((max) => FakeVirtqueue.create(mem, allocator, max));
  const msixCap = guest.capabilities().find(([, id]) => id === PCI_CAP_ID_MSIX)![0];
  /** The whole bring-up; `msix` false leaves the device on INTx. */
  const start = (options: { msix: boolean } = { msix: true }) => {
    if (options.msix) guest.enableMsix(msixCap, transport.msix.vectors);
    expect(guest.negotiate(featureMask(VIRTIO_F_VERSION_1))).toBe(true);
    if (options.msix) {
      guest.write(VIRTIO_PCI_COMMON_MSIX, 2, 0);
      expect(guest.read(VIRTIO_PCI_COMMON_MSIX, 2)).toBe(0);
    }
    queues.forEach((q, i) => {
      expect(guest.setupQueue(i, q.layout, options.msix ? i + 1 : VIRTIO_MSI_NO_VECTOR)).toBe(i);
    });
    queues.forEach((_q, i) => {
      guest.enableQueue(i);
    });
    guest.setStatus(guest.status() | STATUS_DRIVER_OK);
  };
  return { mem, intx, sink, transport, device, bus, guest, queues, start, msixCap };
}

describe('virtio-pci: identity and BAR', () => {
  it('is a modern-only virtio function with the class of its device type', () => {
    const { guest } = rig();
    expect(guest.cfg(PCI_VENDOR_ID, 2)).toBe(0x1af4);
    expect(guest.cfg(PCI_DEVICE_ID, 2)).toBe(0x1040 + 0x21);
    expect(guest.cfg(PCI_REVISION_ID, 1)).toBe(1);
    expect(guest.cfg(PCI_CLASS_CODE, 3)).toBe(0xff0000);
    expect(guest.cfg(PCI_SUBSYSTEM_VENDOR_ID, 2)).toBe(0x1af4);
    expect(guest.cfg(PCI_SUBSYSTEM_ID, 2)).toBe(0x21);
    expect(guest.cfg(PCI_INTERRUPT_PIN, 1)).toBe(1);
    expect(guest.cfg(PCI_INTERRUPT_LINE, 1)).toBe(11);
    expect(virtioPciClassCode(VIRTIO_ID_BLOCK)).toBe(0x018000);
    expect(virtioPciClassCode(VIRTIO_ID_NET)).toBe(0x020000);
  });

  it('has one 32 KiB 64-bit memory BAR, programmed and decoding before the guest starts', () => {
    const { guest, transport } = rig();
    expect(guest.barBase).toBe(WINDOW);
    expect(transport.config.barAddress(0)).toBe(WINDOW);
    expect(guest.cfg(PCI_COMMAND, 2) & PCI_COMMAND_MEMORY).toBe(PCI_COMMAND_MEMORY);
    guest.setCfg(PCI_BAR0, 4, 0xffff_ffff);
    expect(guest.cfg(PCI_BAR0, 4) >>> 0).toBe(0xffff_8004);
    guest.setCfg(PCI_BAR0 + 4, 4, 0xffff_ffff);
    expect(guest.cfg(PCI_BAR0 + 4, 4)).toBe(0xffff_ffff);
    expect(transport.notifyOffset(0)).toBe(VIRTIO_PCI_NOTIFY_OFFSET);
    expect(transport.notifyOffset(3)).toBe(VIRTIO_PCI_NOTIFY_OFFSET + 12);
  });
});

describe('virtio-pci: capabilities', () => {
  it('chains from 0x34 through every virtio capability and MSI-X to 0', () => {
    const { guest, transport } = rig();
    const caps = guest.capabilities();
    const vendor = caps
      .filter(([, id]) => id === PCI_CAP_ID_VENDOR)
      .map(([at]) => ({
        type: guest.cfg(at + VIRTIO_PCI_CAP_CFG_TYPE, 1),
        len: guest.cfg(at + VIRTIO_PCI_CAP_LEN, 1),
        bar: guest.cfg(at + VIRTIO_PCI_CAP_BAR, 1),
        offset: guest.cfg(at + VIRTIO_PCI_CAP_OFFSET, 4),
        length: guest.cfg(at + VIRTIO_PCI_CAP_LENGTH, 4),
        extra: guest.cfg(at + VIRTIO_PCI_NOTIFY_CAP_MULTIPLIER, 4),
      }));
    expect(vendor.map((c) => c.type)).toEqual([
      VIRTIO_PCI_CAP_COMMON_CFG,
      VIRTIO_PCI_CAP_NOTIFY_CFG,
      VIRTIO_PCI_CAP_ISR_CFG,
      VIRTIO_PCI_CAP_DEVICE_CFG,
      VIRTIO_PCI_CAP_PCI_CFG,
    ]);
    expect(vendor[0]).toMatchObject({ len: 16, bar: 0, offset: 0, length: 0x3c });
    expect(vendor[1]).toMatchObject({ len: 20, bar: 0, offset: 0x3000, length: 8, extra: 4 });
    expect(vendor[2]).toMatchObject({ len: 16, bar: 0, offset: 0x1000, length: 1 });
    expect(vendor[3]).toMatchObject({ len: 16, bar: 0, offset: 0x2000, length: 0x1000 });
    expect(vendor[4]).toMatchObject({ len: 20 });
    // Every region lies inside BAR 0.
    for (const c of vendor.slice(0, 4)) expect(c.offset + c.length).toBeLessThanOrEqual(0x8000);
    const [msixAt] = caps.find(([, id]) => id === PCI_CAP_ID_MSIX)!;
    expect(guest.cfg(msixAt + MSIX_CAP_MESSAGE_CONTROL, 2) & 0x7ff).toBe(transport.msix.vectors - 1);
    expect(guest.cfg(msixAt + MSIX_CAP_TABLE, 4)).toBe(VIRTIO_PCI_MSIX_TABLE_OFFSET);
    expect(guest.cfg(msixAt + MSIX_CAP_PBA, 4)).toBe(VIRTIO_PCI_MSIX_PBA_OFFSET);
    expect(guest.cfg(caps.at(-1)![0] + 1, 1)).toBe(0);
  });

  it('accesses the BAR through the PCI configuration access capability', () => {
    const { guest } = rig();
    const [at] = guest.capabilities().find(([a]) => guest.cfg(a + VIRTIO_PCI_CAP_CFG_TYPE, 1) === VIRTIO_PCI_CAP_PCI_CFG)!;
    guest.setCfg(at + VIRTIO_PCI_CAP_BAR, 1, 0);
    guest.setCfg(at + VIRTIO_PCI_CAP_OFFSET, 4, VIRTIO_PCI_COMMON_NUMQ);
    guest.setCfg(at + VIRTIO_PCI_CAP_LENGTH, 4, 2);
    expect(guest.cfg(at + VIRTIO_PCI_CFG_CAP_DATA, 2)).toBe(2);
    guest.setCfg(at + VIRTIO_PCI_CAP_OFFSET, 4, VIRTIO_PCI_COMMON_STATUS);
    guest.setCfg(at + VIRTIO_PCI_CAP_LENGTH, 4, 1);
    guest.setCfg(at + VIRTIO_PCI_CFG_CAP_DATA, 1, STATUS_ACKNOWLEDGE);
    expect(guest.status()).toBe(STATUS_ACKNOWLEDGE);
    // The type, ID and next bytes are read-only.
    guest.setCfg(at, 4, 0);
    expect(guest.cfg(at, 1)).toBe(PCI_CAP_ID_VENDOR);
  });
});

describe('virtio-pci: common configuration', () => {
  it('shows device features 32 bits at a time, the queue count and each queue maximum', () => {
    const { guest, device } = rig();
    let features = 0n;
    for (const half of [0, 1]) {
      guest.write(VIRTIO_PCI_COMMON_DFSELECT, 4, half);
      features |= BigInt(guest.read(VIRTIO_PCI_COMMON_DF, 4)) << BigInt(32 * half);
    }
    expect(features).toBe(device.offeredFeatures);
    expect(guest.read(VIRTIO_PCI_COMMON_NUMQ, 2)).toBe(2);
    guest.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 1);
    expect(guest.read(VIRTIO_PCI_COMMON_Q_SIZE, 2)).toBe(8);
    guest.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 2);
    expect(guest.read(VIRTIO_PCI_COMMON_Q_SIZE, 2)).toBe(0);
  });

  it('reads back queue addresses, takes a 64-bit write, refuses wrong widths', () => {
    const { guest, transport } = rig();
    guest.negotiate(featureMask(VIRTIO_F_VERSION_1));
    guest.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
    guest.write(VIRTIO_PCI_COMMON_Q_DESCLO, 8, 0x1_0000_2000);
    expect(transport.queues[0]!.descTable).toBe(0x1_0000_2000);
    expect(guest.read(VIRTIO_PCI_COMMON_Q_DESCHI, 4)).toBe(1);
    const bad = transport.stats.badAccesses;
    guest.write(VIRTIO_PCI_COMMON_Q_SELECT, 4, 1); // a 16-bit field
    expect(guest.read(VIRTIO_PCI_COMMON_Q_SELECT, 2)).toBe(0);
    guest.write(VIRTIO_PCI_COMMON_NUMQ, 2, 9); // read-only
    expect(transport.stats.badAccesses).toBe(bad + 2);
  });

  it('refuses FEATURES_OK without VIRTIO_F_VERSION_1', () => {
    const { guest, transport } = rig();
    expect(guest.negotiate(featureMask(VIRTIO_F_EVENT_IDX))).toBe(false);
    expect(transport.status & STATUS_FEATURES_OK).toBe(0);
  });

  it('reads back NO_VECTOR for a vector the table does not have', () => {
    const { guest } = rig();
    guest.write(VIRTIO_PCI_COMMON_MSIX, 2, 3);
    expect(guest.read(VIRTIO_PCI_COMMON_MSIX, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
    guest.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
    guest.write(VIRTIO_PCI_COMMON_Q_MSIX, 2, 2);
    expect(guest.read(VIRTIO_PCI_COMMON_Q_MSIX, 2)).toBe(2);
    guest.write(VIRTIO_PCI_COMMON_Q_MSIX, 2, 0x800);
    expect(guest.read(VIRTIO_PCI_COMMON_Q_MSIX, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
  });

  it('passes device configuration reads and writes to the device', () => {
    const { guest, device } = rig();
    expect(guest.read(VIRTIO_PCI_DEVICE_CFG_OFFSET, 4)).toBe(0xefbe_adde);
    expect(guest.read(VIRTIO_PCI_DEVICE_CFG_OFFSET + 2, 1)).toBe(0xbe);
    guest.write(VIRTIO_PCI_DEVICE_CFG_OFFSET + 1, 1, 0x11);
    expect(device.config[1]).toBe(0x11);
  });
});

describe('virtio-pci: bring-up and interrupts', () => {
  it('brings the device up with MSI-X and fires the queue vector on a used buffer', () => {
    const { guest, transport, device, queues, sink, intx, start } = rig();
    start();
    expect(guest.status()).toBe(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    expect(transport.isActive).toBe(true);
    expect(device.live!.queues[1]!.size).toBe(8);
    expect([...sink.routes.keys()].sort()).toEqual([0, 1, 2]);
    queues[1]!.addChain([{ len: 4, writable: true }]);
    guest.write(VIRTIO_PCI_NOTIFY_OFFSET + 4, 2, 1);
    expect(queues[1]!.takeUsed()).toEqual([{ id: 0, len: 1 }]);
    expect(sink.fired).toEqual([2]);
    expect(intx.edges).toBe(0);
    expect(guest.read(VIRTIO_PCI_ISR_OFFSET, 1)).toBe(0);
    // A configuration change goes to config_msix_vector.
    const generation = guest.read(VIRTIO_PCI_COMMON_CFGGENERATION, 1);
    transport.signalConfigChange();
    expect(sink.fired).toEqual([2, 0]);
    expect(guest.read(VIRTIO_PCI_COMMON_CFGGENERATION, 1)).not.toBe(generation);
  });

  it('sends nothing for a queue mapped to NO_VECTOR, and holds a masked vector pending', () => {
    const { guest, queues, sink, start } = rig();
    start();
    guest.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
    guest.write(VIRTIO_PCI_COMMON_Q_MSIX, 2, VIRTIO_MSI_NO_VECTOR);
    queues[0]!.addChain([{ len: 4, writable: true }]);
    guest.write(VIRTIO_PCI_NOTIFY_OFFSET, 2, 0);
    expect(sink.fired).toEqual([]);
    guest.write(VIRTIO_PCI_COMMON_Q_MSIX, 2, 1);
    guest.write(VIRTIO_PCI_MSIX_TABLE_OFFSET + MSIX_ENTRY_SIZE + 12, 4, 1); // mask vector 1
    queues[0]!.addChain([{ len: 4, writable: true }]);
    guest.write(VIRTIO_PCI_NOTIFY_OFFSET, 2, 0);
    expect(sink.fired).toEqual([]);
    expect(guest.read(VIRTIO_PCI_MSIX_PBA_OFFSET, 4)).toBe(0b10);
    guest.write(VIRTIO_PCI_MSIX_TABLE_OFFSET + MSIX_ENTRY_SIZE + 12, 4, 0);
    expect(sink.fired).toEqual([1]);
  });

  it('without MSI-X, holds INTx high until the driver reads the ISR', () => {
    const { guest, transport, queues, intx, sink, start } = rig();
    start({ msix: false });
    queues[0]!.addChain([{ len: 4, writable: true }]);
    transport.notifyQueue(0); // as when the ioeventfd fires
    expect(intx.level).toBe(true);
    expect(guest.cfg(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT).toBe(PCI_STATUS_INTERRUPT);
    expect(transport.isrStatus).toBe(VIRTIO_PCI_ISR_QUEUE);
    expect(guest.read(VIRTIO_PCI_ISR_OFFSET, 1)).toBe(VIRTIO_PCI_ISR_QUEUE);
    expect(intx.level).toBe(false);
    expect(guest.cfg(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT).toBe(0);
    expect(guest.read(VIRTIO_PCI_ISR_OFFSET, 1)).toBe(0);
    transport.signalConfigChange();
    expect(guest.read(VIRTIO_PCI_ISR_OFFSET, 1)).toBe(VIRTIO_PCI_ISR_CONFIG);
    expect(intx.history).toEqual(['high', 'low', 'high', 'low']);
    expect(sink.fired).toEqual([]);
  });

  it('keeps INTx low under Interrupt Disable and once MSI-X is enabled', () => {
    const { guest, transport, intx, start, msixCap } = rig();
    start({ msix: false });
    guest.setCfg(PCI_COMMAND, 2, guest.cfg(PCI_COMMAND, 2) | PCI_COMMAND_INTX_DISABLE);
    transport.signalConfigChange();
    expect(intx.level).toBe(false);
    expect(guest.cfg(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT).toBe(PCI_STATUS_INTERRUPT);
    guest.setCfg(PCI_COMMAND, 2, guest.cfg(PCI_COMMAND, 2) & ~PCI_COMMAND_INTX_DISABLE);
    expect(intx.level).toBe(true);
    guest.setCfg(msixCap + MSIX_CAP_MESSAGE_CONTROL, 2, MSIX_CONTROL_ENABLE);
    expect(intx.level).toBe(false);
  });

  it('turns a broken ring into DEVICE_NEEDS_RESET and a configuration interrupt', () => {
    const { guest, transport, queues, sink, start } = rig();
    start();
    queues[0]!.writeDescriptor(0, { addr: 0x9000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 0 });
    queues[0]!.publish(0);
    guest.write(VIRTIO_PCI_NOTIFY_OFFSET, 2, 0);
    expect(guest.status() & STATUS_DEVICE_NEEDS_RESET).toBe(STATUS_DEVICE_NEEDS_RESET);
    expect(sink.fired).toEqual([0]);
    expect(transport.lastResetReason).toMatch(/longer than the queue size/);
    guest.write(VIRTIO_PCI_NOTIFY_OFFSET, 2, 0);
    expect(transport.stats.ignoredNotifications).toBe(1);
  });

  it('resets on status 0: queues, vectors, ISR and INTx, keeping the MSI-X table', () => {
    const { guest, transport, device, intx, sink, start } = rig();
    start({ msix: false });
    transport.signalConfigChange();
    expect(intx.level).toBe(true);
    const resets = device.resets;
    guest.setStatus(0);
    expect(device.resets).toBe(resets + 1);
    expect(guest.status()).toBe(0);
    expect(intx.level).toBe(false);
    expect(transport.isrStatus).toBe(0);
    expect(transport.isActive).toBe(false);
    guest.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, 1);
    expect(guest.read(VIRTIO_PCI_COMMON_Q_ENABLE, 2)).toBe(0);
    expect(guest.read(VIRTIO_PCI_COMMON_Q_SIZE, 2)).toBe(8);
    expect(guest.read(VIRTIO_PCI_COMMON_Q_MSIX, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
    expect(guest.read(VIRTIO_PCI_COMMON_MSIX, 2)).toBe(VIRTIO_MSI_NO_VECTOR);
    // And it comes up again, this time with MSI-X.
    sink.fired.length = 0;
    start();
    expect(transport.stats.activations).toBe(2);
    expect(guest.read(VIRTIO_PCI_MSIX_TABLE_OFFSET + 8, 4)).toBe(0x4020);
  });
});
