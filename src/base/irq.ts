/**
 * An interrupt line as a device sees it. The VMM wires each device's line
 * to the in-kernel irqchip (KVM_IRQ_LINE or an irqfd); tests use a fake
 * that records what happened.
 */
export interface IrqLine {
  /** Drives the line to a level; used by devices whose line follows state (UART). */
  setLevel(high: boolean): void;
  /** Sends one edge: used by devices that signal events (PIT ticks, virtio). */
  trigger(): void;
}
