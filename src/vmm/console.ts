/**
 * The guest console as a Node stream, and the watcher that reads the
 * guest's own words about how it ends (panic, power off).
 */
import { Duplex } from 'node:stream';

/**
 * How long guest output may wait to be batched. Not setImmediate: a vCPU
 * running on the event loop's thread ends its burst of KVM_RUN calls when
 * the loop has an immediate to run, which would cost a loop turn per byte.
 */
export const CONSOLE_FLUSH_MS = 2;
const CONSOLE_BATCH_BYTES = 4096;
/**
 * Host input waiting for the guest beyond which the console stops taking
 * more: a write's callback waits until the guest has read below it, so a
 * writer that respects back-pressure (a pipe, `stream.pipeline`) is held
 * and the VMM holds at most this plus one chunk.
 */
export const CONSOLE_INPUT_LIMIT = 64 * 1024;
/**
 * Guest output waiting for its reader beyond which new output is dropped
 * (and counted): a reader that stopped (a paused stream, a stdout that
 * does not drain) must not grow the VMM without bound, and a UART has no
 * flow control that would not stall the guest's printk.
 */
export const CONSOLE_OUTPUT_LIMIT = 16 * 1024 * 1024;

/**
 * A duplex stream over the serial port: what the guest prints is readable,
 * what is written reaches the guest's receive FIFO. Output is batched (one
 * byte per THR write would be one chunk per byte): a chunk leaves when 4 KiB
 * have gathered or {@link CONSOLE_FLUSH_MS} after the first byte.
 */
export class ConsoleStream extends Duplex {
  private batch = Buffer.allocUnsafe(CONSOLE_BATCH_BYTES);
  private batched = 0;
  private timer: NodeJS.Timeout | undefined;
  /** The callback of a write held until the guest reads below the limit. */
  private heldWrite: (() => void) | undefined;
  /** Guest output bytes dropped because the reader was {@link CONSOLE_OUTPUT_LIMIT} behind. */
  droppedOutput = 0;
  /** The VM ended (finish()). */
  private vmEnded = false;

  /**
   * `sendToGuest` queues bytes for the guest; `pendingInput` says how many
   * still wait there. Call {@link inputTaken} when the guest takes some.
   */
  constructor(
    private readonly sendToGuest: (bytes: Uint8Array) => void,
    private readonly pendingInput: () => number = () => 0,
  ) {
    super({ allowHalfOpen: true });
  }

  /** The guest took queued input: a held write completes once it is below the limit. */
  inputTaken(): void {
    const held = this.heldWrite;
    if (held && this.pendingInput() < CONSOLE_INPUT_LIMIT) {
      this.heldWrite = undefined;
      held();
    }
  }

  /** Called by the serial device for each byte the guest transmits. */
  guestOutput(bytes: Uint8Array): void {
    let at = 0;
    while (at < bytes.length) {
      const n = Math.min(bytes.length - at, CONSOLE_BATCH_BYTES - this.batched);
      this.batch.set(bytes.subarray(at, at + n), this.batched);
      this.batched += n;
      at += n;
      if (this.batched === CONSOLE_BATCH_BYTES) this.flush();
    }
    if (this.batched > 0 && this.timer === undefined) this.timer = setTimeout(() => this.flush(), CONSOLE_FLUSH_MS);
  }

  /** Pushes buffered guest output now. */
  flush(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.batched === 0) return;
    const chunk = Buffer.from(this.batch.subarray(0, this.batched));
    this.batched = 0;
    // Readable back-pressure is not applied to the guest (a UART has no
    // flow control that would not stall it); output waits for the reader
    // up to a bound, and is dropped beyond it.
    if (this.readableLength + chunk.length > CONSOLE_OUTPUT_LIMIT) {
      this.droppedOutput += chunk.length;
      return;
    }
    this.push(chunk);
  }

  /**
   * Ends the readable side after the last output. Input written from now
   * on goes nowhere: a write held for the guest completes, so no writer
   * waits for a VM that ended.
   */
  finish(): void {
    this.flush();
    this.push(null);
    this.vmEnded = true;
    const held = this.heldWrite;
    this.heldWrite = undefined;
    held?.();
  }

  override _read(): void {
    // Data is pushed as the guest produces it.
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    if (this.vmEnded) {
      cb();
      return;
    }
    this.sendToGuest(chunk);
    if (this.pendingInput() < CONSOLE_INPUT_LIMIT) cb();
    else this.heldWrite = () => cb();
  }
}

/** What the guest's console says about its end. */
export type ConsoleEvent = 'panic' | 'power-down' | 'halted';

const PANIC_MARK = 'Kernel panic - not syncing';
const POWER_DOWN_MARK = 'reboot: Power down';
const HALTED_MARK = 'reboot: System halted';

/**
 * Scans console output line by line for the kernel's panic and power-off
 * messages. A guest without ACPI has no other way to tell the VMM it is
 * powering off, and a panic with panic=-1 is a reboot to the hardware.
 */
export class ConsoleWatcher {
  private line = '';
  /** Complete lines seen, with the host time each one ended (for the profiler timeline). */
  lines = 0;
  panicLine: string | undefined;

  constructor(
    private readonly onEvent: (event: ConsoleEvent, line: string) => void,
    private readonly onLine?: (line: string) => void,
  ) {}

  feed(bytes: Uint8Array): void {
    for (const b of bytes) {
      if (b === 0x0a) {
        this.endLine();
      } else if (b !== 0x0d && this.line.length < 4096) {
        this.line += String.fromCharCode(b);
      }
    }
  }

  private endLine(): void {
    const line = this.line;
    this.line = '';
    this.lines++;
    this.onLine?.(line);
    if (line.includes(PANIC_MARK)) {
      if (this.panicLine === undefined) this.panicLine = line.slice(line.indexOf(PANIC_MARK));
      this.onEvent('panic', line);
    } else if (line.includes(POWER_DOWN_MARK)) {
      this.onEvent('power-down', line);
    } else if (line.includes(HALTED_MARK)) {
      this.onEvent('halted', line);
    }
  }
}
