/**
 * Running timed shell commands in a guest (and the same commands on the
 * host), for the benchmarks that measure what a guest workload sees:
 * disk, net, smp.
 *
 * Timing is done by the shell that runs the command, from /proc/uptime read
 * with the `read` builtin before and after (no fork, so nothing is added to
 * the measured interval but two small file reads). /proc/uptime has 10 ms
 * resolution; every measured interval here lasts seconds. The fixture's
 * busybox `date` has no `%N`, which is why uptime is used.
 *
 * Two ways to drive a guest: {@link GuestSession} (fixtures/guest.ts,
 * the library in this process), and {@link CliGuest} here, the same
 * `run(cmd)` over a `tsvmm run` child process's stdin/stdout (needed when
 * the VMM must run inside a network namespace).
 */
import type { ChildProcessWithoutNullStreams } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { BOOT_TIMEOUT_MS } from './guest.js';
import { ConsoleStream, type ConsoleMatch } from '../../src/vmm/console.js';
import { runOnConsole, type RunResult } from '../../src/vmm/shell.js';

/** What every guest driver here offers: type a command, get its output and status; and the whole console output so far. */
export interface ShellGuest {
  output: string;
  run(command: string, timeoutMs?: number): Promise<RunResult>;
}

/** A command timed by the shell that runs it; the marker is split so the echoed command line never matches. */
export function timed(command: string): string {
  return `read t0 x < /proc/uptime; ${command}; st=$?; read t1 x < /proc/uptime; echo "@@TI""ME $t0 $t1 $st"`;
}

export interface Timed {
  /** Seconds between the two /proc/uptime reads (10 ms resolution). */
  seconds: number;
  /** Exit status of the command (of its last pipeline/list element). */
  status: number;
  /** Everything the command printed before the marker. */
  out: string;
}

export function parseTimed(out: string): Timed {
  const m = /@@TIME (\d+(?:\.\d+)?) (\d+(?:\.\d+)?) (\d+)/.exec(out);
  if (!m) throw new Error(`no @@TIME line in the output:\n${out.slice(-1500)}`);
  return { seconds: round2(Number(m[2]) - Number(m[1])), status: Number(m[3]), out: out.slice(0, m.index) };
}

function round2(x: number): number {
  return Math.round(x * 100) / 100;
}

/** Runs `timed(command)` in the guest; throws when the command failed (unless allowed). */
export async function runTimed(guest: ShellGuest, command: string, opts: { timeoutMs?: number; allowFailure?: boolean } = {}): Promise<Timed> {
  const from = guest.output.length;
  const r = await guest.run(timed(command), opts.timeoutMs ?? BOOT_TIMEOUT_MS);
  // run() cuts its output after the echo of the typed line; should the line
  // editor have broken that echo up (long lines wrap), fall back to all the
  // console text since the command was typed: the markers printed by the
  // command are split in the typed text, so the echo never matches them.
  const t = parseTimed(r.output.includes('@@TIME') ? r.output : guest.output.slice(from));
  if (t.status !== 0 && !opts.allowFailure) throw new Error(`guest command failed (status ${t.status}): ${command}\n${t.out.slice(-1500)}`);
  return t;
}

/** The static busybox the fixtures pack into the guest; on the host it runs the very same commands. */
export const HOST_BUSYBOX = '/bin/busybox';

export interface HostTimed extends Timed {
  /**
   * Seconds around the whole `busybox sh -c` process, timed by this process
   * (hrtime): finer than /proc/uptime's 10 ms, which matters for host runs
   * that last a fraction of a second; includes starting the shell (a
   * millisecond or two).
   */
  wallS: number;
  /** The command line, as typed. */
  commandLine: string;
}

/** Runs `timed(command)` on the host with busybox sh (optionally wrapped, e.g. in `ip netns exec`). */
export function runTimedOnHost(command: string, opts: { wrap?: string[]; timeoutMs?: number; allowFailure?: boolean } = {}): HostTimed {
  const argv = [...(opts.wrap ?? []), HOST_BUSYBOX, 'sh', '-c', timed(command)];
  const t0 = process.hrtime.bigint();
  const out = execFileSync(argv[0]!, argv.slice(1), {
    encoding: 'latin1',
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: opts.timeoutMs ?? BOOT_TIMEOUT_MS,
    maxBuffer: 64 << 20,
  });
  const wallS = Number(process.hrtime.bigint() - t0) / 1e9;
  const t = parseTimed(out);
  if (t.status !== 0 && !opts.allowFailure) throw new Error(`host command failed (status ${t.status}): ${command}\n${t.out.slice(-1500)}`);
  return { ...t, wallS: Math.round(wallS * 1e6) / 1e6, commandLine: shellQuote([...(opts.wrap ?? []), HOST_BUSYBOX, 'sh', '-c', command]) };
}

/** How a host command line looks when typed, for the `commands` list in the JSON. */
export function shellQuote(argv: readonly string[]): string {
  return argv.map((a) => (/^[\w./=,:@%+-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

/**
 * The library's harness (`waitFor`, `run`) over a `tsvmm run` child: the
 * guest console is the child's stdin/stdout, fed through a ConsoleStream.
 */
export class CliGuest implements ShellGuest {
  readonly console: ConsoleStream;

  constructor(readonly child: ChildProcessWithoutNullStreams) {
    this.console = new ConsoleStream((bytes) => child.stdin.write(bytes));
    this.console.resume();
    child.stdout.on('data', (d: Buffer) => this.console.guestOutput(d));
    child.on('close', () => this.console.finish());
  }

  get output(): string {
    return this.console.text();
  }

  type(line: string): void {
    this.child.stdin.write(`${line}\n`);
  }

  waitFor(pattern: RegExp, timeoutMs = BOOT_TIMEOUT_MS): Promise<ConsoleMatch> {
    return this.console.waitFor(pattern, { timeout: timeoutMs });
  }

  run(command: string, timeoutMs = BOOT_TIMEOUT_MS): Promise<RunResult> {
    return runOnConsole(this.console, command, { timeout: timeoutMs });
  }
}
