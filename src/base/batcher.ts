/**
 * Bytes that arrive a few at a time (a UART's output: one call per byte),
 * gathered into chunks: a chunk leaves once `size` bytes have gathered,
 * `delayMs` after its first byte, or at {@link ByteBatcher.flush}. `emit`
 * gets a view of the batch that is valid only during the call: it copies
 * what it keeps.
 */
export class ByteBatcher {
  private readonly batch: Buffer;
  private used = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    size: number,
    private readonly delayMs: number,
    private readonly emit: (chunk: Buffer) => void,
    /** Whether the delay's timer may keep the process alive (default true). */
    private readonly holdsProcess = true,
  ) {
    this.batch = Buffer.allocUnsafe(size);
  }

  add(bytes: Uint8Array): void {
    let at = 0;
    while (at < bytes.length) {
      const n = Math.min(bytes.length - at, this.batch.length - this.used);
      this.batch.set(bytes.subarray(at, at + n), this.used);
      this.used += n;
      at += n;
      if (this.used === this.batch.length) this.flush();
    }
    if (this.used > 0 && this.timer === undefined) {
      this.timer = setTimeout(() => this.flush(), this.delayMs);
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
    this.emit(chunk);
  }
}
