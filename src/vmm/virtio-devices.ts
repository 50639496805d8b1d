/**
 * The device manager for virtio: builds each configured disk and network
 * device, puts it behind its transport (virtio-pci on the PCI bus, or
 * virtio-mmio on the MMIO bus in its layout slot), wires its interrupts and
 * queue notifications, and says what the firmware must describe (ACPI
 * tables, or the kernel command line for virtio-mmio without ACPI).
 *
 * Notifications go through ioeventfds: a guest's doorbell write does not
 * stop the vCPU; KVM signals an eventfd, which the main event loop watches.
 * Interrupts go through irqfds: virtio-mmio raises its GSI, virtio-pci each
 * MSI-X vector's own GSI, routed by KVM (GSI routing) to the message the
 * guest programmed. Each falls back to the plain path (an exit,
 * KVM_IRQ_LINE, KVM_SIGNAL_MSI) where KVM lacks it.
 */
import { runLogged, type Logger } from '../base/log.js';
import type { IrqLine } from '../base/irq.js';
import type { MsiMessage, MsiSink } from '../devices/pci/msix.js';
import type { NativeAddon } from '../kvm/native.js';
import { IrqfdLine } from '../kvm/irq-lines.js';
import { createBlkDevice, parseDiskOption, type BlkDevice } from '../virtio/blk/index.js';
import { createNetDevice, parseNetOption, type NetDevice } from '../virtio/net/index.js';
import type { ConsoleDevice } from '../virtio/console/device.js';
import { MMIO_QUEUE_NOTIFY, MmioTransport, mmioCmdlineFragment } from '../virtio/mmio.js';
import { VirtioPciTransport } from '../virtio/pci.js';
import type { VirtioTransport } from '../virtio/transport.js';
import type { GsiRouting } from '../arch/irq-routing.js';
import type { VmFd } from '../kvm/kvm.js';
import { virtioMmioSlot } from '../arch/layout.js';
import type { MmioDevices, PciDevices } from './device-manager.js';
import type { GuestMemory } from '../base/memory.js';

export { parseDiskOption, parseNetOption };

/** A virtio-pci doorbell write: the 16-bit queue index (virtio 1.2, 4.1.5.2). */
const PCI_DOORBELL_LEN = 2;

/** How a virtio device reaches the guest. */
export type VirtioTransportKind = 'pci' | 'mmio';

export interface DiskConfig {
  path: string;
  readonly?: boolean;
  serial?: string;
  /** Default: the VM's transport. */
  transport?: VirtioTransportKind;
}

export interface NetConfig {
  tap: string;
  mac?: string;
  /** Default: the VM's transport. */
  transport?: VirtioTransportKind;
}

export interface VirtioDevicesOptions {
  vm: VmFd;
  mem: GuestMemory;
  /** virtio-mmio devices go here; its interrupt lines are the plain ones (KVM_IRQ_LINE), used where irqfd is missing. */
  mmio: MmioDevices;
  /** virtio-pci devices go here. */
  pci: PciDevices;
  /** The GSI routes of MSI-X vectors. */
  routing: GsiRouting;
  disks: DiskConfig[];
  nets: NetConfig[];
  /** A virtio-console (hvc0) to attach, built by the machine (it owns the console stream). */
  console?: ConsoleDevice;
  /** The transport of devices that do not choose one. */
  transport: VirtioTransportKind;
  /** True when ACPI describes the virtio-mmio devices (no command-line entries then). */
  acpi: boolean;
  /** Seed for default MAC addresses: the VM name. */
  seed: string;
  log: Logger;
  counter: { irqs: number };
}

/**
 * A virtio-pci device's MSI-X vectors as KVM sees them: each vector that
 * the guest unmasked gets a GSI whose route is its message, and an irqfd on
 * that GSI, so firing it is one eventfd write.
 */
class KvmMsiSink implements MsiSink {
  private readonly vectors = new Map<number, { gsi: number; fd: number }>();

  constructor(
    private readonly mgr: VirtioDevices,
    private readonly vm: VmFd,
    private readonly routing: GsiRouting | undefined,
    private readonly counter: { irqs: number },
  ) {}

  update(vector: number, message: MsiMessage | undefined): void {
    if (!this.routing) return;
    let v = this.vectors.get(vector);
    if (message === undefined) {
      if (v) this.routing.setMsi(v.gsi, undefined);
      return;
    }
    if (!v) {
      v = { gsi: this.routing.allocate(), fd: this.mgr.eventfd() };
      this.vectors.set(vector, v);
      this.routing.setMsi(v.gsi, message);
      this.vm.addon.irqfd(this.vm.fd, v.fd, v.gsi, 0);
      return;
    }
    this.routing.setMsi(v.gsi, message);
  }

  fire(vector: number, message: MsiMessage): void {
    this.counter.irqs++;
    const v = this.vectors.get(vector);
    if (v) this.vm.addon.eventfdWrite(v.fd, 1);
    else this.vm.addon.signalMsi(this.vm.fd, message.address, message.data);
  }
}

type AnyDevice = BlkDevice | NetDevice | ConsoleDevice;

interface Attached {
  name: string;
  transport: VirtioTransport;
  kind: 'blk' | 'net' | 'console';
  device: AnyDevice;
}

/** A virtio-mmio device as the firmware must describe it. */
export interface MmioSlot {
  base: number;
  size: number;
  gsi: number;
}

export class VirtioDevices {
  readonly cmdlineFragments: string[] = [];
  /** The virtio-mmio devices, for the ACPI DSDT. */
  readonly mmioSlots: MmioSlot[] = [];
  private readonly attached: Attached[] = [];
  private readonly devicesToClose: AnyDevice[] = [];
  private readonly fds: number[] = [];
  private readonly polls: number[] = [];
  private closed = false;

  private constructor(
    private readonly addon: NativeAddon,
    private readonly log: Logger,
  ) {}

  /** A new eventfd that close() releases. */
  eventfd(): number {
    const fd = this.addon.eventfd(0);
    this.fds.push(fd);
    return fd;
  }

  static async create(opts: VirtioDevicesOptions): Promise<VirtioDevices> {
    const addon = opts.vm.addon;
    const mgr = new VirtioDevices(addon, opts.log);
    const kvm = opts.vm.kvm;
    const useIrqfd = kvm.hasCap('KVM_CAP_IRQFD');
    const useIoeventfd = kvm.hasCap('KVM_CAP_IOEVENTFD');
    const msiRouting = useIrqfd && kvm.hasCap('KVM_CAP_IRQ_ROUTING') ? opts.routing : undefined;
    try {
      const consoleDevice = opts.console;
      const devices: Array<{ kind: Attached['kind']; transport: VirtioTransportKind; make: () => AnyDevice }> = [
        ...(consoleDevice ? [{ kind: 'console' as const, transport: opts.transport, make: () => consoleDevice }] : []),
        ...opts.disks.map((d, i) => ({
          kind: 'blk' as const,
          transport: d.transport ?? opts.transport,
          make: () =>
            createBlkDevice(
              { path: d.path, readonly: d.readonly ?? false, ...(d.serial !== undefined ? { serial: d.serial } : {}) },
              { logger: opts.log.child({ dev: `blk${i}` }) },
            ),
        })),
        ...opts.nets.map((n, i) => ({
          kind: 'net' as const,
          transport: n.transport ?? opts.transport,
          make: () =>
            createNetDevice(
              { tap: n.tap, ...(n.mac !== undefined ? { mac: n.mac } : {}) },
              { macSeed: `${opts.seed}/net${i}/${n.tap}`, logger: opts.log.child({ dev: `net${i}` }) },
            ),
        })),
      ];
      const counts = { blk: 0, net: 0, console: 0 };
      for (const spec of devices) {
        const name = `${spec.kind}${counts[spec.kind]++}`;
        const device = spec.make();
        // Registered before anything else can fail, so close() releases it.
        mgr.devicesToClose.push(device);
        const logger = opts.log.child({ dev: name });
        const transport =
          spec.transport === 'mmio'
            ? mgr.attachMmio(opts, device, name, logger, useIrqfd, useIoeventfd)
            : mgr.attachPci(opts, device, logger, msiRouting, useIoeventfd);
        mgr.attached.push({ name, transport, kind: spec.kind, device });
      }
    } catch (err) {
      mgr.close();
      throw err;
    }
    return mgr;
  }

  private attachMmio(opts: VirtioDevicesOptions, device: AnyDevice, name: string, logger: Logger, useIrqfd: boolean, useIoeventfd: boolean): MmioTransport {
    const slot = virtioMmioSlot(this.mmioSlots.length);
    const transport = opts.mmio.add({ name: `virtio-${name}`, base: slot.base, size: slot.size, gsi: slot.irq }, (plain) => {
      let irq: IrqLine = plain!;
      if (useIrqfd) {
        const efd = this.eventfd();
        this.addon.irqfd(opts.vm.fd, efd, slot.irq, 0);
        irq = new IrqfdLine(this.addon, efd, opts.counter, plain!);
      }
      return new MmioTransport(device, { memory: opts.mem, irq, logger });
    });
    if (useIoeventfd) {
      device.queueMaxSizes.forEach((_size, queue) => {
        const fd = this.doorbell(queue, transport);
        this.addon.ioeventfd(opts.vm.fd, slot.base + MMIO_QUEUE_NOTIFY, 4, fd, this.addon.constants.KVM_IOEVENTFD_FLAG_DATAMATCH!, queue);
      });
    }
    this.mmioSlots.push({ base: slot.base, size: slot.size, gsi: slot.irq });
    if (!opts.acpi) this.cmdlineFragments.push(mmioCmdlineFragment(slot.base, slot.irq, slot.size));
    return transport;
  }

  private attachPci(opts: VirtioDevicesOptions, device: AnyDevice, logger: Logger, routing: GsiRouting | undefined, useIoeventfd: boolean): VirtioPciTransport {
    // The slot decides the INTx line; a device takes the next free slot.
    const slot = opts.pci.nextSlot;
    const intx = opts.pci.intx(slot);
    const transport = new VirtioPciTransport(device, {
      memory: opts.mem,
      intx: intx.line,
      msi: new KvmMsiSink(this, opts.vm, routing, opts.counter),
      interruptLine: intx.gsi,
      logger,
    });
    opts.pci.add(transport, {
      slot,
      wire: () => {
        if (useIoeventfd) this.wireDoorbells(opts, transport, device, logger);
      },
    });
    return transport;
  }

  /**
   * Doorbells follow BAR 0 wherever the guest puts it. The eventfds and
   * their watches are made once; a remap only moves the ioeventfds.
   */
  private wireDoorbells(opts: VirtioDevicesOptions, transport: VirtioPciTransport, device: AnyDevice, logger: Logger): void {
    const doorbells = device.queueMaxSizes.map((_size, queue) => ({ queue, fd: this.doorbell(queue, transport), addr: undefined as number | undefined }));
    opts.pci.bus.onBarRemap((remap) => {
      if (remap.device !== transport || remap.bar.index !== 0) return;
      for (const d of doorbells) {
        if (d.addr !== undefined) this.assignDoorbell(opts.vm, d.addr, PCI_DOORBELL_LEN, d.fd, d.queue, false, logger);
        d.addr = remap.address === undefined ? undefined : remap.address + transport.notifyOffset(d.queue);
        if (d.addr !== undefined && !this.assignDoorbell(opts.vm, d.addr, PCI_DOORBELL_LEN, d.fd, d.queue, true, logger)) d.addr = undefined;
      }
    });
  }

  /** An eventfd for queue `queue`'s doorbell, watched on the event loop: each signal notifies the queue. */
  private doorbell(queue: number, transport: VirtioTransport): number {
    const efd = this.eventfd();
    this.polls.push(
      this.addon.pollStart(efd, () => {
        if (this.addon.eventfdRead(efd) > 0) transport.notifyQueue(queue);
      }),
    );
    return efd;
  }

  /**
   * Binds (or unbinds) a doorbell's eventfd to a guest address with
   * datamatch = queue. Where KVM refuses (the guest put two BARs on one
   * address), the write still reaches the transport as an MMIO exit:
   * logged, and false returned.
   */
  private assignDoorbell(vm: VmFd, addr: number, len: number, fd: number, queue: number, assign: boolean, log: Logger): boolean {
    const c = this.addon.constants;
    const flags = c.KVM_IOEVENTFD_FLAG_DATAMATCH! | (assign ? 0 : c.KVM_IOEVENTFD_FLAG_DEASSIGN!);
    try {
      this.addon.ioeventfd(vm.fd, addr, len, fd, flags, queue);
      return true;
    } catch (err) {
      log.debug({ err, addr: `0x${addr.toString(16)}`, queue, assign }, 'ioeventfd not changed; the doorbell exits instead');
      return false;
    }
  }

  /** Per-device and per-transport counters. */
  stats(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const a of this.attached) {
      out[a.name] = { ...a.device.stats, transport: { kind: a.transport instanceof MmioTransport ? 'mmio' : 'pci', ...a.transport.stats } };
    }
    return out;
  }

  /** Waits for disk requests in flight, so nothing the guest wrote is lost. */
  async drain(): Promise<void> {
    await Promise.all(this.attached.map((a) => (a.kind === 'blk' ? (a.device as BlkDevice).drain() : undefined)));
  }

  /**
   * Releases watches, devices (images, TAPs) and fds, each on its own: one
   * that fails is logged and the rest still close. The counters stay
   * readable: stats() after the VM ended.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    const release = (what: string, close: () => void) => runLogged(this.log, 'virtio close failed', what, close);
    for (const p of this.polls.splice(0)) release('fd watch', () => this.addon.pollClose(p));
    for (const d of this.devicesToClose) release('device', () => d.close());
    for (const fd of this.fds.splice(0)) release('eventfd', () => this.addon.close(fd));
  }
}
