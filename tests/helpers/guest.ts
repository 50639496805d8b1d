/**
 * Helpers for boot tests: a guest driven through the library API (console
 * as a stream, commands typed into the guest shell), and the CLI run as a
 * child process. Timeouts here are hang guards, never speed checks: a boot
 * on a host that emulates guest kernel code takes a minute or more.
 */
import { spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createVm, type ConsoleMatch, type RunResult, type VmConfig, type VmOutcome } from '../../src/index.js';
import type { VirtualMachine } from '../../src/vmm/machine.js';

export const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** Every guest console the helpers saw, in order: a failed test's consoles are read back (see host.ts). */
export const consolesSeen: Array<() => string> = [];
/** How each VM the helpers saw ended, as tsvmm said it (a CLI's stderr, a VM's outcome message). */
export const endingsSeen: Array<() => string> = [];
export const CLI = join(REPO, 'bin', 'tsvmm.js');

/**
 * A hang guard, not a speed check: a boot here takes 1 to 3 minutes (the
 * classic path up to 5), and several times that when other guests share
 * the two cores.
 */
export const BOOT_TIMEOUT_MS = 15 * 60 * 1000;

/** Why KVM tests cannot run here, or undefined when they can. */
export function kvmUnavailable(): string | undefined {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return undefined;
  } catch (err) {
    return `/dev/kvm is not usable here (${(err as NodeJS.ErrnoException).code}): boot tests need KVM`;
  }
}

/**
 * The busybox shell prompt at the end of the console output. Its line
 * editor follows the prompt with a cursor-position query (ESC [6n).
 */
export const PROMPT = /# (?:\x1b\[6n)?$/;

/** The kernel command line the boot tests use, plus extra parameters. */
export function testCmdline(extra = ''): string {
  return `console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd ${extra}`.trim();
}

/**
 * A booted guest, driven through the library's own harness
 * (`vm.console.waitFor`, `vm.run`) with the boot tests' hang guard as the
 * default timeout, and its console registered for {@link consolesSeen}.
 */
export class GuestSession {
  readonly outcome: Promise<VmOutcome>;

  private constructor(readonly vm: VirtualMachine) {
    consolesSeen.push(() => vm.console.text());
    endingsSeen.push(() => this.ending);
    vm.console.resume(); // the transcript is what the tests read
    // 'exit' comes before the console's waits learn of the end.
    vm.once('exit', (o) => (this.ending = o.message));
    this.outcome = vm.wait();
    vm.start();
  }

  private ending = '';

  /** Everything the guest printed (its newest MiB). */
  get output(): string {
    return this.vm.console.text();
  }

  static async boot(config: VmConfig): Promise<GuestSession> {
    const vm = await createVm({ memory: '128M', ...config });
    return new GuestSession(vm);
  }

  /** `vm.console.waitFor` with the hang guard. */
  waitFor(pattern: RegExp, timeoutMs = BOOT_TIMEOUT_MS): Promise<ConsoleMatch> {
    return this.vm.console.waitFor(pattern, { timeout: timeoutMs });
  }

  /** `vm.run` with the hang guard. */
  run(command: string, timeoutMs = BOOT_TIMEOUT_MS): Promise<RunResult> {
    return this.vm.run(command, { timeout: timeoutMs });
  }

  /** Types a command that does not return (reboot -f) and waits for the VM to end. */
  async finish(command: string): Promise<VmOutcome> {
    this.vm.console.write(`${command}\n`);
    return this.outcome;
  }
}

/** A CLI child's console so far; `ended` once the process has exited. */
export type ConsoleOutput = (() => string) & { ended: boolean };

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs `tsvmm` with `args` (optionally wrapped, e.g. in `ip netns exec`),
 * and lets `drive` talk to it while it runs. A child still running after
 * `timeoutMs` is killed, with its console's last lines on stderr.
 */
export function runCli(
  args: string[],
  opts: {
    wrap?: string[];
    timeoutMs?: number;
    drive?: (child: import('node:child_process').ChildProcessWithoutNullStreams, out: ConsoleOutput) => void;
  } = {},
): Promise<CliResult> {
  const argv = [...(opts.wrap ?? []), process.execPath, CLI, ...args];
  const child = spawn(argv[0]!, argv.slice(1), { stdio: 'pipe' });
  let stdout = '';
  let stderr = '';
  const out: ConsoleOutput = Object.assign(() => stdout, { ended: false });
  consolesSeen.push(out);
  endingsSeen.push(() => stderr);
  child.stdout.on('data', (d: Buffer) => {
    stdout += d.toString('latin1');
  });
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString('latin1');
  });
  opts.drive?.(child, out);
  // Below the test's own timeout, so a hung guest fails the test with its console, not a bare timeout.
  const timeoutMs = opts.timeoutMs ?? BOOT_TIMEOUT_MS - 60_000;
  const timeout = setTimeout(() => {
    console.error(`runCli: killed tsvmm after ${timeoutMs} ms; console tail:\n${stdout.slice(-3000)}\nstderr tail:\n${stderr.slice(-2000)}`);
    child.kill('SIGKILL');
  }, timeoutMs);
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => {
      out.ended = true;
      clearTimeout(timeout);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** Resolves when `out()` matches `pattern` (polling; for CLI children). */
export async function until(out: () => string, pattern: RegExp, timeoutMs = BOOT_TIMEOUT_MS): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!pattern.test(out())) {
    if ((out as Partial<ConsoleOutput>).ended) throw new Error(`tsvmm ended while waiting for ${pattern}; output:\n${out().slice(-2000)}`);
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${pattern}; output so far:\n${out().slice(-2000)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
