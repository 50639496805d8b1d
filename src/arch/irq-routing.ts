/**
 * KVM's GSI routing table, kept by the VMM: the in-kernel irqchip's default
 * pins plus one MSI route per device interrupt vector. An MSI-X vector is
 * delivered by writing to an eventfd bound (KVM_IRQFD) to its own GSI, so
 * a device interrupt costs one write and no ioctl; the route says which
 * message KVM sends for that GSI.
 *
 * KVM_SET_GSI_ROUTING replaces the whole table, so the table always carries
 * the entries KVM_CREATE_IRQCHIP installs (arch/x86/kvm/irq_comm.c,
 * default_routing): GSI 0-15 to the IOAPIC pin of the same number and to
 * the PIC, GSI 16-23 to the IOAPIC only.
 */
import type { NativeAddon } from '../kvm/native.js';
import { IRQ_MAX } from './layout.js';

/** An MSI message: what a device writes, and where, to interrupt a CPU (PCI 3.0, 6.8). */
export interface MsiMessage {
  address: bigint;
  data: number;
}

/** ISA IRQs that the PIC serves as well as the IOAPIC. */
const PIC_IRQS = 16;
/** GSIs for MSI routes start above the IOAPIC's pins. */
export const MSI_GSI_BASE = IRQ_MAX + 1;
/** KVM's default routing table size (KVM_MAX_IRQ_ROUTES is 4096). */
const MAX_ROUTES = 1024;

export class GsiRouting {
  private readonly msiRoutes = new Map<number, MsiMessage>();
  private nextGsi = MSI_GSI_BASE;
  private dirty = false;

  constructor(
    private readonly addon: NativeAddon,
    private readonly vmFd: number,
  ) {}

  /** A new GSI for an MSI vector; it has no route (sends nothing) until {@link setMsi}. */
  allocate(): number {
    if (this.nextGsi - MSI_GSI_BASE >= MAX_ROUTES) throw new Error(`out of MSI routes (${MAX_ROUTES})`);
    return this.nextGsi++;
  }

  /** Routes `gsi` to `message`, or removes its route (masked or disabled vector). */
  setMsi(gsi: number, message: MsiMessage | undefined): void {
    const old = this.msiRoutes.get(gsi);
    if (message === undefined) {
      if (old === undefined) return;
      this.msiRoutes.delete(gsi);
    } else {
      if (old && old.address === message.address && old.data === message.data) return;
      this.msiRoutes.set(gsi, { ...message });
    }
    this.dirty = true;
    this.commit();
  }

  /** Sends the table to KVM if it changed. */
  commit(): void {
    if (!this.dirty) return;
    this.addon.setGsiRouting(this.vmFd, this.encode());
    this.dirty = false;
  }

  /** The table as a struct kvm_irq_routing. Exposed for tests. */
  encode(): Uint8Array {
    const rt = this.addon.layout.irqRouting;
    const c = this.addon.constants;
    const entries: Array<(dv: DataView, at: number) => void> = [];
    const irqchip = (gsi: number, chip: number, pin: number) =>
      entries.push((dv, at) => {
        dv.setUint32(at + rt.gsi, gsi, true);
        dv.setUint32(at + rt.type, c.KVM_IRQ_ROUTING_IRQCHIP!, true);
        dv.setUint32(at + rt.irqchip, chip, true);
        dv.setUint32(at + rt.pin, pin, true);
      });
    for (let gsi = 0; gsi <= IRQ_MAX; gsi++) {
      irqchip(gsi, c.KVM_IRQCHIP_IOAPIC!, gsi);
      if (gsi < PIC_IRQS) irqchip(gsi, gsi < 8 ? c.KVM_IRQCHIP_PIC_MASTER! : c.KVM_IRQCHIP_PIC_SLAVE!, gsi % 8);
    }
    for (const [gsi, msg] of this.msiRoutes) {
      entries.push((dv, at) => {
        dv.setUint32(at + rt.gsi, gsi, true);
        dv.setUint32(at + rt.type, c.KVM_IRQ_ROUTING_MSI!, true);
        dv.setUint32(at + rt.msiAddressLo, Number(msg.address & 0xffff_ffffn), true);
        dv.setUint32(at + rt.msiAddressHi, Number(msg.address >> 32n), true);
        dv.setUint32(at + rt.msiData, msg.data >>> 0, true);
      });
    }
    const buf = new Uint8Array(rt.headerSize + entries.length * rt.entrySize);
    const dv = new DataView(buf.buffer);
    dv.setUint32(0, entries.length, true);
    entries.forEach((write, i) => {
      write(dv, rt.headerSize + i * rt.entrySize);
    });
    return buf;
  }
}
