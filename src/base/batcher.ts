/**
 * Bytes that arrive a few at a time (a UART's output: one call per byte),
 * gathered into chunks: a chunk leaves once `size` bytes have gathered,
 * `delayMs` after its first byte, or at {@link ByteBatcher.flush}. While
 * bytes keep coming (the chunk before left less than `streamDelayMs` ago,
 * as when a guest prints its boot log), a chunk waits `streamDelayMs`
 * instead: fewer, larger chunks, each one a timer and a write less, where
 * a byte after a pause (a keystroke's echo) still leaves after `delayMs`.
 * `emit` gets a view of the batch that is valid only during the call: it
 * copies what it keeps.
 */
export class ByteBatcher {
  private readonly batch: Buffer;
  private used = 0;
  private timer: NodeJS.Timeout | undefined;
  /** performance.now() at the last chunk's leaving. */
  private lastFlushAt = Number.NEGATIVE_INFINITY;

  constructor(
    size: number,
    private readonly delayMs: number,
    private readonly emit: (chunk: Buffer) => void,
    /** Whether the delay's timer may keep the process alive (default true). */
    private readonly holdsProcess = true,
    private readonly streamDelayMs = delayMs,
  ) {
    this.batch = Buffer.allocUnsafe(size);
  }

  add(bytes: Uint8Array): void {
    if (bytes.length === 1 && this.used < this.batch.length - 1) {
      // The UART's case, one byte a call: no view, no copy loop.
      this.batch[this.used++] = bytes[0]!;
    } else {
      let at = 0;
      while (at < bytes.length) {
        const n = Math.min(bytes.length - at, this.batch.length - this.used);
        this.batch.set(bytes.subarray(at, at + n), this.used);
        this.used += n;
        at += n;
        if (this.used === this.batch.length) this.flush();
      }
    }
    if (this.used > 0 && this.timer === undefined) {
      const streaming = performance.now() - this.lastFlushAt < this.streamDelayMs;
      this.timer = setTimeout(() => this.flush(), streaming ? this.streamDelayMs : this.delayMs);
      if (!this.holdsProcess) this.timer.unref();
    }
  }

  /** Emits what has gathered now. */
  flush(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.used === 0) return;
    const chunk = this.batch.subarray(0, this.used);
    this.used = 0;
    this.lastFlushAt = performance.now();
    this.emit(chunk);
  }
}
