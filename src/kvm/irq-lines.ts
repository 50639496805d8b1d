/**
 * Interrupt lines into KVM's in-kernel irqchip, as devices see them
 * ({@link IrqLine}). Both count every edge they send in `counter.irqs`
 * (the VM's `stats().irqsInjected`).
 */
import type { IrqLine } from '../base/irq.js';
import type { NativeAddon } from './native.js';
import type { VmFd } from './kvm.js';

/** A GSI driven with KVM_IRQ_LINE: one ioctl per level change, two per edge. */
export class KvmIrqLine implements IrqLine {
  constructor(
    private readonly vm: VmFd,
    readonly gsi: number,
    private readonly counter: { irqs: number },
  ) {}
  setLevel(high: boolean): void {
    if (high) this.counter.irqs++;
    this.vm.irqLine(this.gsi, high);
  }
  trigger(): void {
    this.counter.irqs++;
    this.vm.irqLine(this.gsi, true);
    this.vm.irqLine(this.gsi, false);
  }
}

/**
 * A GSI behind an irqfd (KVM_IRQFD): an edge is one eventfd write, and KVM
 * raises and lowers the GSI itself. A level line sends an edge on each
 * rise and nothing on a fall, which is what an edge-triggered pin sees of
 * a level anyway: right for the ISA lines (the UART's IRQ 4, the PIT's
 * IRQ 0), which the MP table and the MADT declare edge-triggered. A line
 * whose level the guest may read as a level (virtio-mmio's) keeps
 * `levelLine` for setLevel.
 */
export class IrqfdLine implements IrqLine {
  private high = false;
  constructor(
    private readonly addon: NativeAddon,
    readonly fd: number,
    private readonly counter: { irqs: number },
    private readonly levelLine?: IrqLine,
  ) {}
  setLevel(high: boolean): void {
    if (this.levelLine) {
      this.levelLine.setLevel(high);
      return;
    }
    if (high && !this.high) this.trigger();
    this.high = high;
  }
  trigger(): void {
    this.counter.irqs++;
    this.addon.eventfdWrite(this.fd, 1);
  }
}
