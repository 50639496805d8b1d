/**
 * Commands typed into a shell on the guest console, with their output and
 * exit status: the boot-test harness behind `vm.run`.
 *
 * The contract with the guest: a POSIX shell (busybox sh, dash, bash)
 * reads the console (ttyS0 or hvc0) and echoes what it reads, as an
 * interactive shell on a tty does. The command is one line; it runs as
 * `echo BEGIN; <command>; echo END $?`, so it must not end with `&` or a
 * comment, and it must not read the console itself. Markers carry a tag
 * unique to the call, split by quotes in the typed line so the tty's echo
 * of that line never matches them.
 */
import { randomBytes } from 'node:crypto';
import { CONSOLE_TRANSCRIPT_LIMIT, ConsoleWaitError, type ConsoleStream } from './console.js';

export interface RunOptions {
  /** Milliseconds for the whole command; default: no limit. */
  timeout?: number;
  /** Ends the wait early (the command keeps running in the guest). */
  signal?: AbortSignal;
}

export interface RunResult {
  /** What the command printed (stdout and stderr as the console got them), without carriage returns. */
  output: string;
  /** Its exit status, as the shell's `$?`. */
  status: number;
}

let calls = 0;

/** Types `command` into the shell on `console` and resolves with its output and exit status. */
export async function runOnConsole(console: ConsoleStream, command: string, options: RunOptions = {}): Promise<RunResult> {
  if (/[\r\n]/.test(command)) throw new TypeError('vm.run: the command must be one line (join commands with ; or &&)');
  if (/&\s*$/.test(command)) throw new TypeError("vm.run: the command must not end with & (its status would be the background job's start)");
  const tag = `${(++calls).toString(36)}${randomBytes(4).toString('hex')}`;
  const begin = `__tsvmm_begin_${tag}`;
  const end = `__tsvmm_end_${tag}`;
  const split = (marker: string) => `"${marker.slice(0, 8)}""${marker.slice(8)}"`;
  const deadline = options.timeout === undefined ? undefined : performance.now() + options.timeout;
  const left = () => (deadline === undefined ? undefined : Math.max(0, deadline - performance.now()));
  const from = console.outputLength;
  console.write(`echo ${split(begin)}; ${command}; echo ${split(end)} $?\n`);
  try {
    const started = await console.waitFor(new RegExp(`${begin}\\r?\\n`), { from, timeout: left(), signal: options.signal });
    const ended = await console.waitFor(new RegExp(`${end} (\\d+)\\r?\\n`), { from: started.end, timeout: left(), signal: options.signal });
    const text = console.text(started.end);
    if (console.outputLength - text.length > started.end) {
      throw new RangeError(
        `vm.run: ${JSON.stringify(command)} printed more than the console keeps (${CONSOLE_TRANSCRIPT_LIMIT} bytes); redirect its output to a file in the guest`,
      );
    }
    const output = text.slice(0, ended.index - started.end).replace(/\r/g, '');
    return { output, status: Number(ended.groups[1]) };
  } catch (err) {
    if (err instanceof ConsoleWaitError) {
      throw new ConsoleWaitError(
        err.code,
        err.message.replace(/waiting for .* on the guest console/, `running ${JSON.stringify(command)} on the guest shell`),
        err.pattern,
        err.tail,
        { cause: err.cause },
      );
    }
    throw err;
  }
}
