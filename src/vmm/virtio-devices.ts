/**
 * The device manager for virtio: builds each configured disk and network
 * device, puts its transport on the MMIO bus in its layout slot, wires its
 * interrupt (irqfd) and queue notifications (ioeventfd), and says what the
 * kernel command line must announce.
 *
 * With an ioeventfd on QueueNotify a guest's notification does not stop
 * the vCPU: KVM signals an eventfd, which the main event loop watches. With
 * an irqfd, raising the interrupt is one eventfd write. Both fall back to
 * the plain paths (an MMIO exit, KVM_IRQ_LINE) where KVM lacks them.
 */
import type { Logger } from '../log.js';
import type { IrqLine } from '../devices/irq.js';
import type { NativeAddon } from '../native.js';
import { createBlkDevice, parseDiskOption, type BlkDevice } from '../virtio/blk/index.js';
import { createNetDevice, parseNetOption, type NetDevice } from '../virtio/net/index.js';
import { MMIO_QUEUE_NOTIFY, MMIO_SIZE, MmioTransport, mmioCmdlineFragment } from '../virtio/mmio.js';
import type { Bus } from './bus.js';
import type { VmFd } from './kvm.js';
import { virtioMmioSlot } from './layout.js';
import type { GuestMemory } from './memory.js';

export { parseDiskOption, parseNetOption };

export interface DiskConfig {
  path: string;
  readonly?: boolean;
  serial?: string;
}

export interface NetConfig {
  tap: string;
  mac?: string;
}

export interface VirtioDevicesOptions {
  vm: VmFd;
  mem: GuestMemory;
  mmio: Bus;
  /** The plain interrupt line for a GSI (KVM_IRQ_LINE), used where irqfd is missing. */
  irq: (gsi: number) => IrqLine;
  disks: DiskConfig[];
  nets: NetConfig[];
  /** Seed for default MAC addresses: the VM name. */
  seed: string;
  log: Logger;
  counter: { irqs: number };
}

/** An edge on a GSI through an irqfd: one eventfd write, no ioctl. */
class IrqfdLine implements IrqLine {
  constructor(
    private readonly addon: NativeAddon,
    readonly fd: number,
    private readonly fallback: IrqLine,
    private readonly counter: { irqs: number },
  ) {}
  setLevel(high: boolean): void {
    this.fallback.setLevel(high);
  }
  trigger(): void {
    this.counter.irqs++;
    this.addon.eventfdWrite(this.fd, 1);
  }
}

interface Attached {
  name: string;
  transport: MmioTransport;
  device: BlkDevice | NetDevice;
  kind: 'blk' | 'net';
}

export class VirtioDevices {
  readonly cmdlineFragments: string[] = [];
  private readonly attached: Attached[] = [];
  private readonly fds: number[] = [];
  private readonly polls: number[] = [];
  private closed = false;

  private constructor(private readonly addon: NativeAddon) {}

  static async create(opts: VirtioDevicesOptions): Promise<VirtioDevices> {
    const addon = opts.vm.addon;
    const mgr = new VirtioDevices(addon);
    const useIrqfd = opts.vm.kvm.hasCap('KVM_CAP_IRQFD');
    const useIoeventfd = opts.vm.kvm.hasCap('KVM_CAP_IOEVENTFD');
    try {
      const devices: Array<{ kind: 'blk' | 'net'; make: () => BlkDevice | NetDevice }> = [
        ...opts.disks.map((d, i) => ({
          kind: 'blk' as const,
          make: () =>
            createBlkDevice(
              { path: d.path, readonly: d.readonly ?? false, ...(d.serial !== undefined ? { serial: d.serial } : {}) },
              { logger: opts.log.child({ dev: `blk${i}` }) },
            ),
        })),
        ...opts.nets.map((n, i) => ({
          kind: 'net' as const,
          make: () =>
            createNetDevice(
              { tap: n.tap, ...(n.mac !== undefined ? { mac: n.mac } : {}) },
              { macSeed: `${opts.seed}/net${i}/${n.tap}`, logger: opts.log.child({ dev: `net${i}` }) },
            ),
        })),
      ];
      let blkIndex = 0;
      let netIndex = 0;
      devices.forEach((spec, slotIndex) => {
        const slot = virtioMmioSlot(slotIndex);
        const name = spec.kind === 'blk' ? `blk${blkIndex++}` : `net${netIndex++}`;
        const device = spec.make();
        // Registered before anything else can fail, so close() releases it.
        mgr.attached.push({ name, device, kind: spec.kind, transport: undefined as unknown as MmioTransport });
        const plain = opts.irq(slot.irq);
        let irq: IrqLine = plain;
        if (useIrqfd) {
          const efd = addon.eventfd(0);
          mgr.fds.push(efd);
          addon.irqfd(opts.vm.fd, efd, slot.irq, 0);
          irq = new IrqfdLine(addon, efd, plain, opts.counter);
        }
        const transport = new MmioTransport(device, { memory: opts.mem, irq, logger: opts.log.child({ dev: name }) });
        mgr.attached[mgr.attached.length - 1]!.transport = transport;
        opts.mmio.insert(transport, slot.base, MMIO_SIZE, `virtio-${name}`);
        if (useIoeventfd) {
          device.queueMaxSizes.forEach((_size, queue) => {
            const efd = addon.eventfd(0);
            mgr.fds.push(efd);
            addon.ioeventfd(opts.vm.fd, slot.base + MMIO_QUEUE_NOTIFY, 4, efd, addon.constants.KVM_IOEVENTFD_FLAG_DATAMATCH!, queue);
            mgr.polls.push(
              addon.pollStart(efd, () => {
                if (addon.eventfdRead(efd) > 0) transport.notifyQueue(queue);
              }),
            );
          });
        }
        mgr.cmdlineFragments.push(mmioCmdlineFragment(slot.base, slot.irq));
      });
    } catch (err) {
      mgr.close();
      throw err;
    }
    return mgr;
  }

  /** Per-device and per-transport counters. */
  stats(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const a of this.attached) {
      out[a.name] = { ...a.device.stats, transport: a.transport ? { ...a.transport.stats } : undefined };
    }
    return out;
  }

  /** Waits for disk requests in flight, so nothing the guest wrote is lost. */
  async drain(): Promise<void> {
    await Promise.all(this.attached.map((a) => (a.kind === 'blk' ? (a.device as BlkDevice).drain() : undefined)));
  }

  /** Releases fds, watches and images. The counters stay readable: stats() after the VM ended. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.polls.splice(0)) this.addon.pollClose(p);
    for (const a of this.attached) a.device.close();
    for (const fd of this.fds.splice(0)) this.addon.close(fd);
  }
}
