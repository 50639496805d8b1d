/**
 * The guest console as a Node stream, and the watcher that reads the
 * guest's own words about how it ends (panic, power off).
 */
import { Duplex } from 'node:stream';
import { TsvmmError } from '../base/errors.js';
import { ByteBatcher } from '../base/batcher.js';

/**
 * How long guest output may wait to be batched. Not setImmediate: a vCPU
 * running on the event loop's thread ends its burst of KVM_RUN calls when
 * the loop has an immediate to run, which would cost a loop turn per byte.
 */
export const CONSOLE_FLUSH_MS = 2;
/** How long a chunk waits while output streams (a boot log): one frame at 60 Hz. */
export const CONSOLE_STREAM_FLUSH_MS = 16;
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
 * Console output kept for {@link ConsoleStream.waitFor} and
 * {@link ConsoleStream.text}, whether or not anyone reads the stream: the
 * newest 1 MiB (a boot log is tens of KiB).
 */
export const CONSOLE_TRANSCRIPT_LIMIT = 1024 * 1024;
/**
 * How far back into output it has already searched a pending wait looks
 * again when more arrives: a match must end in new output and begin at
 * most this far before it (64 KiB; a console line is far shorter).
 */
export const WAIT_RESCAN_BYTES = 64 * 1024;
/** Lines of console output a failed wait carries. */
export const CONSOLE_TAIL_LINES = 20;

/** Why a {@link ConsoleStream.waitFor} (or `vm.run`) failed. */
export type ConsoleWaitCode = 'ERR_TSVMM_WAIT_TIMEOUT' | 'ERR_TSVMM_WAIT_VM_ENDED' | 'ERR_TSVMM_WAIT_ABORTED';

/**
 * A wait on the console that did not see its pattern: the time was up, the
 * VM ended, or the caller's AbortSignal fired (`cause` is the signal's
 * reason). `tail` is the console's last lines, for the failure message.
 */
export class ConsoleWaitError extends TsvmmError {
  constructor(
    override readonly code: ConsoleWaitCode,
    message: string,
    readonly pattern: string,
    readonly tail: string,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

export interface WaitForOptions {
  /** Milliseconds to wait; default: no limit. */
  timeout?: number;
  /** Ends the wait early: it rejects with ERR_TSVMM_WAIT_ABORTED. */
  signal?: AbortSignal;
  /**
   * Where to look from, as an offset in the console output (bytes since the
   * VM started). Default: the console's cursor, just after the previous
   * match of waitFor or vm.run (0 before any), so successive waits read the
   * output in order, as expect(1) does. 0 searches the whole transcript.
   */
  from?: number;
}

/** What {@link ConsoleStream.waitFor} found. */
export interface ConsoleMatch {
  /** The matched text. */
  text: string;
  /** The pattern's capture groups (index 0 is the whole match), as RegExp.exec gives them. */
  groups: ReadonlyArray<string | undefined>;
  /** Named groups, when the pattern has any. */
  named: Readonly<Record<string, string>> | undefined;
  /** Offset of the match in the console output. */
  index: number;
  /** Offset just after the match (the console's cursor moves here). */
  end: number;
}

/** A pattern as a RegExp without state: a string is matched literally; g and y are dropped. */
function toRegExp(pattern: RegExp | string): RegExp {
  if (typeof pattern === 'string') return new RegExp(pattern.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
  return new RegExp(pattern.source, pattern.flags.replace(/[gy]/g, ''));
}

/** The last `n` lines of `text`, carriage returns removed. */
function lastLines(text: string, n = CONSOLE_TAIL_LINES): string {
  const lines = text.replace(/\r/g, '').split('\n');
  if (lines.at(-1) === '') lines.pop();
  return lines.slice(-n).join('\n');
}

/**
 * A duplex stream over the serial port: what the guest prints is readable,
 * what is written reaches the guest's receive FIFO. Output is batched (one
 * byte per THR write would be one chunk per byte): a chunk leaves when 4 KiB
 * have gathered or {@link CONSOLE_FLUSH_MS} after the first byte, and
 * {@link CONSOLE_STREAM_FLUSH_MS} after it while output streams.
 */
export class ConsoleStream extends Duplex {
  private readonly batcher = new ByteBatcher(
    CONSOLE_BATCH_BYTES,
    CONSOLE_FLUSH_MS,
    (chunk) => this.emitOutput(Buffer.from(chunk)),
    true,
    CONSOLE_STREAM_FLUSH_MS,
  );
  /** The callback of a write held until the guest reads below the limit. */
  private heldWrite: (() => void) | undefined;
  /** Guest output bytes dropped because the reader was {@link CONSOLE_OUTPUT_LIMIT} behind. */
  droppedOutput = 0;
  /** The VM ended (finish()). */
  private vmEnded = false;
  /** How it ended, as finish() was told. */
  private endReason: string | undefined;
  /** The newest output (latin1: one character per byte), from offset {@link transcriptStart}. */
  private transcript = '';
  private transcriptStart = 0;
  /** Where the next waitFor looks from by default. */
  private cursor = 0;
  /** Wake-ups of pending waits: new output, or the end. */
  private readonly waiters = new Set<() => void>();

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
    this.batcher.add(bytes);
  }

  /** Pushes buffered guest output now. */
  flush(): void {
    this.batcher.flush();
  }

  private emitOutput(chunk: Buffer): void {
    this.record(chunk);
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
   * waits for a VM that ended. `reason` (how the VM ended) goes into the
   * error of every wait that the end fails.
   */
  finish(reason?: string): void {
    this.flush();
    this.push(null);
    this.vmEnded = true;
    this.endReason = reason;
    for (const w of [...this.waiters]) w();
    const held = this.heldWrite;
    this.heldWrite = undefined;
    held?.();
  }

  /** Bytes of output the guest has produced so far (the offset the next byte will have). */
  get outputLength(): number {
    return this.transcriptStart + this.transcript.length;
  }

  /**
   * The console output from offset `from` (default: all that is kept, the
   * newest {@link CONSOLE_TRANSCRIPT_LIMIT} bytes) as latin1 text: one
   * character per byte, so offsets are byte offsets.
   */
  text(from = 0): string {
    return this.transcript.slice(Math.max(0, from - this.transcriptStart));
  }

  /** The last `n` lines of output. */
  tail(n = CONSOLE_TAIL_LINES): string {
    return lastLines(this.transcript.slice(-64 * 1024), n);
  }

  /**
   * Resolves when the guest's output matches `pattern` (a RegExp, or a
   * string matched literally), from the cursor on (see
   * {@link WaitForOptions.from}), and moves the cursor past the match.
   * Rejects with a {@link ConsoleWaitError} carrying the console's last
   * lines when the timeout passes, the VM ends first, or `signal` aborts.
   * Output is matched as latin1 text (one character per byte).
   */
  waitFor(pattern: RegExp | string, options: WaitForOptions = {}): Promise<ConsoleMatch> {
    const re = toRegExp(pattern);
    const from = options.from ?? this.cursor;
    const shown = typeof pattern === 'string' ? JSON.stringify(pattern) : String(pattern);
    return new Promise<ConsoleMatch>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      let settled = false;
      const done = (): void => {
        settled = true;
        this.waiters.delete(check);
        if (timer) clearTimeout(timer);
        options.signal?.removeEventListener('abort', onAbort);
      };
      const fail = (code: ConsoleWaitCode, why: string, cause?: unknown): void => {
        if (settled) return;
        done();
        const tail = this.tail();
        reject(
          new ConsoleWaitError(
            code,
            `${why} waiting for ${shown} on the guest console; its last lines:\n${tail}`,
            shown,
            tail,
            cause === undefined ? undefined : { cause },
          ),
        );
      };
      // Output already searched is searched again only near its end: a
      // chatty guest must not cost a rescan of the whole transcript per chunk.
      let searchedTo = from;
      const check = (): void => {
        if (settled) return;
        const base = Math.max(from, searchedTo - WAIT_RESCAN_BYTES, this.transcriptStart);
        searchedTo = this.outputLength;
        const m = re.exec(this.transcript.slice(base - this.transcriptStart));
        if (m) {
          done();
          const index = base + m.index;
          const end = index + m[0].length;
          this.cursor = Math.max(this.cursor, end);
          resolve({ text: m[0], groups: [...m], named: m.groups ? { ...m.groups } : undefined, index, end });
        } else if (this.vmEnded) {
          fail('ERR_TSVMM_WAIT_VM_ENDED', this.endReason ? `the VM ended (${this.endReason})` : 'the VM ended');
        }
      };
      const onAbort = (): void => fail('ERR_TSVMM_WAIT_ABORTED', 'aborted', options.signal?.reason);
      if (options.signal?.aborted) {
        onAbort();
        return;
      }
      options.signal?.addEventListener('abort', onAbort, { once: true });
      if (options.timeout !== undefined) {
        if (!Number.isFinite(options.timeout) || options.timeout < 0) {
          done();
          reject(new RangeError(`waitFor: timeout must be a number of milliseconds >= 0, not ${options.timeout}`));
          return;
        }
        timer = setTimeout(() => fail('ERR_TSVMM_WAIT_TIMEOUT', `timed out after ${options.timeout} ms`), options.timeout);
      }
      this.waiters.add(check);
      this.flush(); // output still batched counts
      check();
    });
  }

  /**
   * Calls `listener` with every chunk of output as it is recorded, whether
   * or not the stream is read or paused (a console log must not depend on
   * a slow terminal). Returns the function that removes it.
   */
  tap(listener: (chunk: Buffer) => void): () => void {
    this.taps.add(listener);
    return () => this.taps.delete(listener);
  }

  private readonly taps = new Set<(chunk: Buffer) => void>();

  private record(chunk: Buffer): void {
    for (const t of this.taps) t(chunk);
    this.transcript += chunk.toString('latin1');
    const over = this.transcript.length - CONSOLE_TRANSCRIPT_LIMIT;
    if (over > 0) {
      this.transcript = this.transcript.slice(over);
      this.transcriptStart += over;
    }
    for (const w of [...this.waiters]) w();
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

/** The kernel's own words from a console line that carries its panic mark ("Kernel panic - not syncing: ..."). */
export function panicMessage(line: string): string {
  return line.slice(line.indexOf(PANIC_MARK));
}
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
      if (this.panicLine === undefined) this.panicLine = panicMessage(line);
      this.onEvent('panic', line);
    } else if (line.includes(POWER_DOWN_MARK)) {
      this.onEvent('power-down', line);
    } else if (line.includes(HALTED_MARK)) {
      this.onEvent('halted', line);
    }
  }
}
