/**
 * The command line: a thin layer over the library. `tsvmm run` builds a VM
 * from flags, connects the guest console to stdin/stdout, and exits with
 * the code of the VM's outcome.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readFileSync, writeSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { createLogger, LOG_LEVELS, type Logger, type LogLevel } from './base/log.js';
import type { VirtualMachine } from './vmm/machine.js';
import { DEFAULT_CMDLINE, MAX_CPUS, parseMemorySize, type ConsoleKind } from './vmm/config.js';
import type { SerialTarget } from './vmm/serial-target.js';
import { createVm, type VmConfig } from './vm.js';
import { EXIT_CODES, EXIT_EXPECT_UNMET, EXIT_TIMEOUT, EXIT_USAGE, type VmOutcome } from './vmm/outcome.js';
import type { DiskConfig, NetConfig } from './vmm/virtio-devices.js';
import { parseDiskOption, parseNetOption } from './vmm/virtio-devices.js';
import { DEFAULT_PROFILE_RATE_HZ, MAX_PROFILE_RATE_HZ } from './tools/profiler.js';
import { ConfigFileError, readVmConfigFile, type FileVmConfig } from './config-file.js';
import { ApiServer, apiSocketPath } from './tools/api.js';
import { apiRequest, attachConsole, listSockets, socketFor, unreachable } from './api-client.js';
import { native } from './kvm/native.js';
import { EscapeKeys } from './escape-keys.js';
import { TsvmmError } from './base/errors.js';

interface RunOptions {
  config?: string;
  print?: boolean;
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  console: ConsoleKind;
  serial?: SerialTarget;
  memory: string;
  cpus: number;
  disk: DiskConfig[];
  net: NetConfig[];
  bootMode: 'auto' | 'host' | 'guest';
  kernelCache?: string | false;
  pit: 'emulated' | 'kernel';
  exitPath: 'thread' | 'loop';
  transport: 'pci' | 'mmio';
  acpi: boolean;
  mergeable?: boolean;
  haltPollNs?: number;
  sandbox: boolean;
  emulationFallback: 'auto' | 'on' | 'off';
  logLevel: LogLevel;
  stats: boolean;
  name: string;
  kvmDevice: string;
  profile?: string;
  systemMap?: string;
  profileRate?: number;
  profileFormat?: 'text' | 'json';
  apiSocket?: string;
  detach?: boolean;
  expect?: RegExp;
  expectExit?: boolean;
  timeout?: number;
  consoleLog?: string;
}

/** Milliseconds from "90s", "5m", "1h", "250ms" or a plain number of seconds. */
export function parseDuration(value: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(value.trim());
  if (!m) throw new InvalidArgumentError(`"${value}" is not a duration: give a number with ms, s, m or h (e.g. 90s, 5m)`);
  const ms = Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h'];
  if (ms <= 0 || ms > 2 ** 31 - 1) throw new InvalidArgumentError(`duration "${value}" must be more than 0 and at most 24 days`);
  return ms;
}

function regexArg(value: string): RegExp {
  try {
    return new RegExp(value);
  } catch (err) {
    throw new InvalidArgumentError(`not a valid regular expression (${(err as Error).message})`);
  }
}

/** A duration as people write it back: 90 s, 5 min. */
function showDuration(ms: number): string {
  return ms % 60_000 === 0 ? `${ms / 60_000} min` : ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

function intArg(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n)) throw new InvalidArgumentError('not a whole number');
  return n;
}

function memoryArg(value: string): string {
  try {
    parseMemorySize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
  return value;
}

/** `--serial`: console, off, file=<path>, socket=<path>. */
function serialArg(value: string): SerialTarget {
  if (value === 'console' || value === 'off') return value;
  const m = /^(file|socket)=(.+)$/.exec(value);
  if (!m) throw new InvalidArgumentError(`"${value}" is not a place for the UART: give console, off, file=<path> or socket=<path>`);
  return m[1] === 'file' ? { file: resolve(m[2]!) } : { socket: resolve(m[2]!) };
}

function collect<T>(parse: (v: string) => T) {
  return (value: string, previous: T[] | undefined): T[] => {
    try {
      return [...(previous ?? []), parse(value)];
    } catch (err) {
      throw new InvalidArgumentError((err as Error).message);
    }
  };
}

/**
 * Forwards the terminal to the guest. In raw mode, Ctrl-A x quits,
 * Ctrl-A Ctrl-A sends one Ctrl-A, and Ctrl-A h prints the keys.
 */
function connectConsole(vm: VirtualMachine, onQuit: () => void): () => void {
  const stdin = process.stdin;
  const raw = stdin.isTTY === true;
  if (raw) stdin.setRawMode(true);
  // Back-pressure for piped input: stop reading while the guest is behind.
  // Not for a terminal, typed at human speed, whose Ctrl-A x must always work.
  let connected = true;
  const send = (bytes: Buffer) => {
    if (!vm.console.write(bytes) && !raw) {
      stdin.pause();
      vm.console.once('drain', () => connected && stdin.resume());
    }
  };
  const keys = new EscapeKeys();
  const onData = (chunk: Buffer) => {
    if (!raw) {
      send(chunk);
      return;
    }
    const typed = keys.filter(chunk);
    if (typed.bytes.length > 0) send(typed.bytes);
    if (typed.help) process.stderr.write('\r\ntsvmm: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A\r\n');
    if (typed.quit) onQuit();
  };
  stdin.on('data', onData);
  // Back-pressure the other way: a terminal or pipe that does not keep up
  // pauses the console stream, which then holds up to CONSOLE_OUTPUT_LIMIT.
  vm.console.on('data', (chunk: Buffer) => {
    if (!process.stdout.write(chunk)) {
      vm.console.pause();
      process.stdout.once('drain', () => vm.console.resume());
    }
  });
  return () => {
    connected = false;
    stdin.off('data', onData);
    if (raw) stdin.setRawMode(false);
    stdin.pause();
  };
}

/** With a sandbox, the control socket's directory stays writable: the socket is removed when the VM ends. */
function withSocketDir(config: VmConfig, socketPath: string | undefined): VmConfig {
  if (socketPath === undefined || !config.sandbox) return config;
  const allow = typeof config.sandbox === 'object' ? (config.sandbox.allow ?? []) : [];
  return { ...config, sandbox: { allow: [...allow, { path: dirname(resolve(socketPath)), access: 'write' }] } };
}

/** Writes all of `chunk` to `fd` (synchronously: a console log must not lag the guest's end). */
function writeAll(fd: number, chunk: Uint8Array): void {
  for (let at = 0; at < chunk.length; ) at += writeSync(fd, chunk, at);
}

/** Where commander took an option's value from: 'cli' when the command line gave it. */
type SourceOf = (key: string) => string | undefined;

/**
 * The VmConfig of a command line: the --config file's fields, with every
 * flag given on the command line in their place (a repeatable flag such as
 * --disk replaces the file's whole list); flag defaults fill what the file
 * leaves out.
 */
export function effectiveConfig(opts: RunOptions, sourceOf: SourceOf): VmConfig {
  const file: FileVmConfig | undefined = opts.config !== undefined ? readVmConfigFile(opts.config) : undefined;
  const given = (key: keyof RunOptions) => sourceOf(key) === 'cli';
  const pick = <K extends keyof RunOptions, F extends keyof FileVmConfig>(key: K, field: F): RunOptions[K] | FileVmConfig[F] =>
    given(key) || file?.[field] === undefined ? opts[key] : file[field];
  const kernel = given('kernel') ? opts.kernel : (file?.kernel ?? opts.kernel);
  if (kernel === undefined) throw new Error('no kernel to boot: pass --kernel <path>, or set "kernel" in the --config file');
  // The file's profile, with each profile flag given in place of its field.
  const profilePath = given('profile') ? opts.profile : file?.profile?.path;
  if (profilePath === undefined && (given('systemMap') || given('profileRate') || given('profileFormat'))) {
    throw new Error('--system-map, --profile-rate and --profile-format only apply to a profile: add --profile <file>');
  }
  const profile =
    profilePath === undefined
      ? undefined
      : {
          ...(file?.profile ?? {}),
          path: profilePath,
          ...(given('systemMap') && opts.systemMap ? { systemMap: opts.systemMap } : {}),
          ...(given('profileRate') && opts.profileRate ? { rateHz: opts.profileRate } : {}),
          ...(given('profileFormat') && opts.profileFormat ? { format: opts.profileFormat } : {}),
        };
  const config: VmConfig = {
    ...(file ?? {}),
    kernel,
    console: pick('console', 'console') as VmConfig['console'],
    serial: pick('serial', 'serial') as VmConfig['serial'],
    memory: pick('memory', 'memory') as VmConfig['memory'],
    cpus: pick('cpus', 'cpus') as number,
    disks: pick('disk', 'disks') as DiskConfig[],
    nets: pick('net', 'nets') as NetConfig[],
    bootMode: pick('bootMode', 'bootMode') as VmConfig['bootMode'],
    kernelCache: pick('kernelCache', 'kernelCache') as VmConfig['kernelCache'],
    pit: pick('pit', 'pit') as VmConfig['pit'],
    exitPath: pick('exitPath', 'exitPath') as VmConfig['exitPath'],
    transport: pick('transport', 'transport') as VmConfig['transport'],
    acpi: pick('acpi', 'acpi') as boolean,
    mergeable: (pick('mergeable', 'mergeable') as boolean | undefined) ?? false,
    haltPollNs: pick('haltPollNs', 'haltPollNs') as number | undefined,
    // The CLI's default is a sandbox; a file may turn it off or widen it.
    sandbox: given('sandbox') ? opts.sandbox : (file?.sandbox ?? opts.sandbox),
    emulationFallback: pick('emulationFallback', 'emulationFallback') as VmConfig['emulationFallback'],
    name: pick('name', 'name') as string,
    kvmDevice: pick('kvmDevice', 'kvmDevice') as string,
  };
  const cmdline = pick('cmdline', 'cmdline') as string | undefined;
  const initrd = pick('initrd', 'initrd') as string | undefined;
  if (cmdline !== undefined) config.cmdline = cmdline;
  if (initrd !== undefined) config.initrd = initrd;
  if (profile !== undefined) config.profile = profile;
  else delete config.profile;
  return config;
}

async function run(opts: RunOptions, sourceOf: SourceOf): Promise<number> {
  if (opts.detach) return detach(opts, sourceOf);
  const log = createLogger(opts.logLevel);
  if (opts.expectExit && opts.expect === undefined) {
    process.stderr.write('tsvmm: --expect-exit ends the VM when the --expect pattern appears: add --expect <regex>\n');
    return EXIT_USAGE;
  }
  let config: VmConfig;
  // The control socket: asked for, or by default for a VM given a name.
  const socketPath = opts.apiSocket ?? (sourceOf('name') === 'cli' ? apiSocketPath(opts.name) : undefined);
  try {
    config = { ...effectiveConfig(opts, sourceOf), logger: log };
  } catch (err) {
    process.stderr.write(errorLine(err));
    return err instanceof ConfigFileError ? EXIT_CODES.error : EXIT_USAGE;
  }
  if (config.console === 'off' && (opts.expect !== undefined || opts.consoleLog !== undefined)) {
    const flag = opts.expect !== undefined ? '--expect' : '--console-log';
    process.stderr.write(`tsvmm: ${flag} reads the guest console, and --console off gives it none: choose --console serial or virtio\n`);
    return EXIT_USAGE;
  }
  // Opened before anything runs: the sandbox allows no new files once the VM starts.
  let consoleLog: number | undefined;
  if (opts.consoleLog !== undefined) {
    try {
      consoleLog = openSync(opts.consoleLog, 'w', 0o644);
    } catch (err) {
      process.stderr.write(
        `tsvmm: cannot write the console log ${opts.consoleLog} (${(err as NodeJS.ErrnoException).code}): give --console-log a file in a writable directory\n`,
      );
      return EXIT_CODES.error;
    }
  }
  try {
    return await runVm(opts, withSocketDir(config, socketPath), log, consoleLog, socketPath);
  } finally {
    if (consoleLog !== undefined) closeSync(consoleLog);
  }
}

/**
 * The flag that fixes an error, by its code: library messages say what is
 * wrong in the library's terms, and the CLI adds the flag to change.
 */
const FLAG_HINTS: ReadonlyArray<[RegExp, string]> = [
  [/^ERR_TSVMM_KERNEL_UNREADABLE$|^ERR_TSVMM_BOOT_(NOT_A_KERNEL|PROTOCOL_TOO_OLD|NOT_64_BIT|UNSUPPORTED_COMPRESSION|CORRUPT)$/, '--kernel <path>'],
  [/^ERR_TSVMM_INITRD_UNREADABLE$|^ERR_TSVMM_BOOT_INITRD/, '--initrd <path>'],
  [/^ERR_TSVMM_BAD_MEMORY$|^ERR_TSVMM_BOOT_MEMORY_TOO_SMALL$/, '--memory <size>'],
  [/^ERR_TSVMM_BAD_CPUS$/, `--cpus 1 to ${MAX_CPUS}`],
  [/^ERR_TSVMM_BOOT_(CMDLINE_TOO_LONG|INVALID_CMDLINE)$/, '--cmdline'],
  [/^ERR_TSVMM_PROFILE_SYSTEM_MAP_/, '--system-map <path>'],
  [/^ERR_TSVMM_PROFILE_BAD_RATE$/, '--profile-rate <hz>'],
  [/^ERR_TSVMM_PROFILE_OUTPUT_UNWRITABLE$/, '--profile <file>'],
  [/^ERR_TSVMM_SANDBOX_UNCONFINABLE$/, '--no-sandbox'],
  [/^ERR_TSVMM_SERIAL_/, '--serial <where>'],
];

/** `tsvmm: <message>`, with the flag to change when the error's code has one. */
function errorLine(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const code = err instanceof TsvmmError ? err.code : undefined;
  const hint = code === undefined ? undefined : FLAG_HINTS.find(([re]) => re.test(code))?.[1];
  return `tsvmm: ${message}${hint ? ` (${hint})` : ''}\n`;
}

async function runVm(opts: RunOptions, config: VmConfig, log: Logger, consoleLog: number | undefined, socketPath: string | undefined): Promise<number> {
  let vm: VirtualMachine;
  try {
    vm = await createVm(config);
  } catch (err) {
    process.stderr.write(errorLine(err));
    log.debug({ err }, 'vm creation failed');
    return EXIT_CODES.error;
  }

  let api: ApiServer | undefined;
  if (socketPath !== undefined) {
    try {
      const addon = native();
      api = await ApiServer.listen(vm, socketPath, {
        peerUid: (socket) => {
          const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
          try {
            return fd === undefined || fd < 0 ? undefined : addon.peerUid(fd);
          } catch {
            return undefined; // refused: the owner check needs the peer's uid
          }
        },
      });
    } catch (err) {
      process.stderr.write(errorLine(err));
      await vm.stop('could not start');
      return EXIT_CODES.error;
    }
  }

  let signalCode: number | undefined;
  // With no console, the terminal stays the terminal: not raw, not read (Ctrl-C is SIGINT).
  const disconnect =
    config.console === 'off'
      ? () => {}
      : connectConsole(vm, () => {
          void vm.stop('quit from the console (Ctrl-A x)');
        });
  // The log gets every byte, whatever stdout's back-pressure; it stops before its fd closes.
  const untapLog = consoleLog === undefined ? undefined : vm.console.tap((chunk) => writeAll(consoleLog, chunk));
  // --expect: the pattern, looked for in all the output; --timeout: a deadline for the whole run.
  let expected = false;
  let timedOut = false;
  if (opts.expect !== undefined) {
    vm.console.waitFor(opts.expect, { from: 0 }).then(
      () => {
        expected = true;
        if (opts.expectExit) void vm.stop('--expect matched (--expect-exit)');
      },
      () => {}, // the VM ended first: reported below
    );
  }
  const deadline =
    opts.timeout === undefined
      ? undefined
      : setTimeout(() => {
          if (vm.state === 'ended') return; // it ended on its own, just now
          timedOut = true;
          void vm.stop(`--timeout ${showDuration(opts.timeout!)} passed`);
        }, opts.timeout);
  const onSignal = (signal: NodeJS.Signals) => {
    signalCode = signal === 'SIGTERM' ? 143 : 130;
    void vm.stop(`stopped by ${signal}`);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);

  try {
    vm.start();
  } catch (err) {
    process.stderr.write(errorLine(err));
    if (deadline) clearTimeout(deadline);
    disconnect();
    untapLog?.();
    await vm.stop('could not start');
    await api?.close();
    return EXIT_CODES.error;
  }
  const result: VmOutcome = await vm.wait();
  if (deadline) clearTimeout(deadline);
  untapLog?.();
  await api?.close();
  disconnect();
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  process.off('SIGHUP', onSignal);
  if (opts.stats) process.stderr.write(`${JSON.stringify({ outcome: result.kind, ...vm.stats() }, null, 2)}\n`);
  if (expected && opts.expectExit && result.kind === 'stopped' && !timedOut && signalCode === undefined) return 0;
  if (timedOut) {
    const waiting = opts.expect !== undefined && !expected ? ` waiting for /${opts.expect.source}/ (--expect)` : '';
    process.stderr.write(
      `\ntsvmm: --timeout ${showDuration(opts.timeout!)} passed${waiting}; stopped the VM. The console's last lines:\n${vm.console.tail()}\n`,
    );
    return EXIT_TIMEOUT;
  }
  if (result.kind !== 'reboot' && result.kind !== 'poweroff') process.stderr.write(`\ntsvmm: ${result.message}\n`);
  if (opts.expect !== undefined && !expected && signalCode === undefined) {
    process.stderr.write(
      `tsvmm: the VM ended (${result.message}) before its console printed a match for /${opts.expect.source}/ (--expect). The console's last lines:\n${vm.console.tail()}\n`,
    );
    return EXIT_EXPECT_UNMET;
  }
  return result.kind === 'stopped' && signalCode !== undefined ? signalCode : result.exitCode;
}

/**
 * `tsvmm run --detach`: the same command line, without --detach, in a
 * child process of its own session (stdin and stdout /dev/null, stderr to
 * NAME.log beside the socket); returns once the VM's control socket
 * answers, printing its name, or with the child's error when it ended
 * first.
 */
async function detach(opts: RunOptions, sourceOf: SourceOf): Promise<number> {
  const name = sourceOf('name') === 'cli' ? opts.name : `vm-${randomBytes(3).toString('hex')}`;
  const socketPath = opts.apiSocket ?? apiSocketPath(name);
  const argv = process.argv.slice(2).filter((a) => a !== '--detach');
  if (sourceOf('name') !== 'cli') argv.push('--name', name);
  const logPath = `${socketPath.replace(/\.sock$/, '')}.log`;
  mkdirSync(dirname(logPath), { recursive: true, mode: 0o700 });
  const logFd = openSync(logPath, 'w', 0o600);
  const child = spawn(process.execPath, [...process.execArgv, process.argv[1]!, ...argv], { detached: true, stdio: ['ignore', 'ignore', logFd] });
  closeSync(logFd);
  let exited: number | undefined;
  child.once('exit', (code) => (exited = code ?? 1));
  const deadline = performance.now() + 120_000;
  while (performance.now() < deadline) {
    if (exited !== undefined) {
      process.stderr.write(readFileSync(logPath, 'utf8'));
      return exited === 0 ? EXIT_CODES.error : exited;
    }
    try {
      const { body } = await apiRequest(socketPath, 'GET', '/vm', 2000);
      // Another VM may answer there (the child then fails): only ours counts.
      if (body.pid !== child.pid) throw new Error('not ours');
      child.unref();
      process.stdout.write(`${name}\n`);
      return 0;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  child.kill('SIGTERM');
  process.stderr.write(`tsvmm: the detached VM did not open its control socket ${socketPath} within 2 min; its log: ${logPath}\n`);
  return EXIT_CODES.error;
}

/** `tsvmm ls`: one line per VM with a socket in the default directory. */
async function listVms(): Promise<number> {
  const rows: string[][] = [['NAME', 'STATE', 'PID', 'CPUS', 'MEMORY', 'STARTED']];
  for (const { name, path } of listSockets()) {
    try {
      const { body } = await apiRequest(path, 'GET', '/vm', 5000);
      const config = (body.config ?? {}) as { cpus?: number; memory?: number | string };
      rows.push([name, String(body.state), String(body.pid), String(config.cpus ?? 1), String(config.memory ?? '256M'), String(body.startedAt)]);
    } catch {
      rows.push([name, 'gone', '-', '-', '-', '-']); // a socket left by a tsvmm that died
    }
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows)
    process.stdout.write(
      `${r
        .map((c, i) => c.padEnd(widths[i]!))
        .join('  ')
        .trimEnd()}\n`,
    );
  return 0;
}

/** `tsvmm info|pause|resume|stop NAME`. */
async function control(verb: 'info' | 'pause' | 'resume' | 'stop', name: string): Promise<number> {
  const path = socketFor(name);
  try {
    if (verb === 'info') {
      const vm = await apiRequest(path, 'GET', '/vm');
      const stats = await apiRequest(path, 'GET', '/vm/stats');
      process.stdout.write(`${JSON.stringify({ ...vm.body, stats: stats.body }, null, 2)}\n`);
      return 0;
    }
    const r = await apiRequest(path, 'PUT', `/vm/${verb}`, verb === 'stop' ? 120_000 : 30_000);
    if (r.status !== 200) {
      process.stderr.write(`tsvmm: ${name}: ${String(r.body.error)}\n`);
      return EXIT_CODES.error;
    }
    const ended = r.body.outcome as { exitCode?: number; message?: string } | undefined;
    process.stdout.write(`${name}: ${String(r.body.state)}${ended ? `, exit code ${ended.exitCode} (${ended.message})` : ''}\n`);
    return 0;
  } catch (err) {
    process.stderr.write(`tsvmm: ${unreachable(path, err as NodeJS.ErrnoException)}\n`);
    return EXIT_CODES.error;
  }
}

/** `tsvmm config --print`: the effective configuration as JSON on stdout. */
function printConfig(opts: RunOptions, sourceOf: SourceOf): number {
  try {
    process.stdout.write(`${JSON.stringify(effectiveConfig(opts, sourceOf), null, 2)}\n`);
    return 0;
  } catch (err) {
    process.stderr.write(errorLine(err));
    return err instanceof ConfigFileError ? EXIT_CODES.error : EXIT_USAGE;
  }
}

/** The version in tsvmm's package.json (one level above dist/ and src/). */
function packageVersion(): string {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

/** The options `tsvmm run` and `tsvmm config` share: everything that makes the VM. */
function addVmOptions(cmd: Command): Command {
  return cmd
    .option('--config <file>', "the VM as JSON (the library's VmConfig; paths relative to the file); flags given here override its fields")
    .option('-k, --kernel <path>', 'kernel to boot: a bzImage or an ELF vmlinux (required unless --config names one)')
    .option('-i, --initrd <path>', 'initramfs to pass to the kernel')
    .option('-c, --cmdline <text>', `kernel command line (default: "${DEFAULT_CMDLINE}", with console=hvc0 for --console virtio)`)
    .addOption(
      new Option(
        '--console <device>',
        'the guest console on stdin/stdout: serial (ttyS0, the 16550 UART), virtio (hvc0, virtio-console: no exit per byte) or off (none; the UART goes where --serial says)',
      )
        .choices(['serial', 'virtio', 'off'])
        .default('serial'),
    )
    .option(
      '--serial <where>',
      'where the UART goes when it is not the console: console (joined to stdout; the default with --console virtio), off (the default with --console off), file=<path>, or socket=<path> (a Unix socket, both ways)',
      serialArg,
    )
    .option('-m, --memory <size>', 'guest RAM, e.g. 256M or 1G', memoryArg, '256M')
    .option('--cpus <n>', `vCPUs, 1 to ${MAX_CPUS}`, intArg, 1)
    .option('--disk <spec>', 'virtio-blk disk: <path>[,readonly][,serial=<id>][,transport=pci|mmio] (repeatable)', collect(parseDiskOption), [])
    .option('--net <spec>', 'virtio-net over a TAP device: tap=<name>[,mac=<mac>][,transport=pci|mmio] (repeatable)', collect(parseNetOption), [])
    .addOption(new Option('--transport <kind>', 'virtio transport for devices that do not choose one').choices(['pci', 'mmio']).default('pci'))
    .option('--halt-poll-ns <ns>', "how long KVM polls a halted vCPU before it sleeps, 0 for never (default: the host's halt_poll_ns)", intArg)
    .option('--mergeable', "let the host's KSM merge identical guest pages across VMs (saves memory; a timing side channel between guests)")
    .option(
      '--no-sandbox',
      'do not confine tsvmm once the VM starts (by default: Landlock for the process where the kernel has it, seccomp on the vCPU threads)',
    )
    .option('--no-acpi', "no ACPI tables: MP table only, virtio-mmio on the command line, the guest's end read from its console")
    .addOption(
      new Option('--boot-mode <mode>', "bzImage boot: host-decompressed, or the kernel's own decompressor").choices(['auto', 'host', 'guest']).default('auto'),
    )
    .option(
      '--kernel-cache <dir>',
      'keep kernels decompressed on the host in <dir>, by content hash, for the next boot (default: $TSVMM_CACHE/kernels or ~/.cache/tsvmm/kernels)',
    )
    .option('--no-kernel-cache', 'decompress the kernel on every boot; keep nothing')
    .addOption(new Option('--pit <impl>', 'i8254 PIT implementation').choices(['emulated', 'kernel']).default('emulated'))
    .addOption(
      new Option('--exit-path <where>', "where a 1-vCPU guest's KVM_RUN runs: its own thread, or the event loop's (experimental, faster)")
        .choices(['thread', 'loop'])
        .default('thread'),
    )
    .addOption(new Option('--emulation-fallback <when>', 'handle instructions the host KVM cannot emulate').choices(['auto', 'on', 'off']).default('auto'))
    .addOption(new Option('--log-level <level>', 'log level (logs go to stderr)').choices([...LOG_LEVELS]).default('warn'))
    .option('--stats', 'print the VM counters as JSON on stderr when it ends', false)
    .option('--name <name>', 'VM name, for logs and stable MAC addresses', 'tsvmm')
    .option('--kvm-device <path>', 'the KVM device to open', '/dev/kvm')
    .option('--profile <file>', 'sample the guest RIP; when the VM ends, write the hottest guest functions and a console timeline to <file>')
    .option('--system-map <path>', "the kernel's System.map for --profile (default: a System.map next to the kernel)")
    .option('--profile-rate <hz>', `samples per second per vCPU for --profile, 1 to ${MAX_PROFILE_RATE_HZ} (default ${DEFAULT_PROFILE_RATE_HZ})`, intArg)
    .addOption(new Option('--profile-format <format>', 'profile format (default: json for a .json file, else text)').choices(['text', 'json']));
}

export function buildProgram(
  onRun: (opts: RunOptions, sourceOf: SourceOf) => Promise<void>,
  onConfig: (opts: RunOptions, sourceOf: SourceOf) => void,
  onControl: (command: () => Promise<number>) => Promise<void>,
): Command {
  const program = new Command('tsvmm')
    .description('A KVM virtual machine monitor with device models in TypeScript')
    .version(packageVersion(), '-V, --version', 'print the tsvmm version')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  addVmOptions(program.command('run').description('boot a Linux kernel with its console on this terminal'))
    .option(
      '--expect <regex>',
      `for scripts: exit ${EXIT_EXPECT_UNMET}, with the console's last lines on stderr, unless the console prints a match (a JavaScript regular expression) and the guest then ends cleanly`,
      regexArg,
    )
    .option('--expect-exit', 'with --expect: stop the VM and exit 0 as soon as the match appears')
    .option(
      '--timeout <duration>',
      `stop the VM after <duration> (90s, 5m, 1h) and exit ${EXIT_TIMEOUT} with the console's last lines on stderr`,
      parseDuration,
    )
    .option('--console-log <file>', 'also write everything the guest console prints to <file>')
    .option('--detach', 'start the VM in the background and print its name (with --name, or a generated one); reach it with tsvmm console, info, stop')
    .option(
      '--api-socket <path>',
      'serve the control socket (tsvmm ls, info, pause, resume, stop) at <path>; default with --name: $XDG_RUNTIME_DIR/tsvmm/<name>.sock',
    )
    .action(async (opts: RunOptions, cmd: Command) => {
      await onRun(opts, (key) => cmd.getOptionValueSource(key));
    });
  program
    .command('ls')
    .description('list the VMs with a control socket under $XDG_RUNTIME_DIR/tsvmm')
    .action(async () => {
      await onControl(listVms);
    });
  for (const [verb, what] of [
    ['info', "print a VM's state, configuration and counters as JSON"],
    ['pause', "pause a VM's vCPUs"],
    ['resume', 'resume a paused VM'],
    ['stop', 'stop a VM (its tsvmm exits with code 130)'],
  ] as const) {
    program
      .command(`${verb} <name>`)
      .description(`${what} (<name>: a VM's --name, or its socket's path)`)
      .action(async (name: string) => {
        await onControl(() => control(verb, name));
      });
  }
  program
    .command('console <name>')
    .description("join this terminal to a running VM's console; Ctrl-A x detaches and leaves the VM running")
    .action(async (name: string) => {
      await onControl(async () => {
        const path = socketFor(name);
        try {
          return await attachConsole(path);
        } catch (err) {
          const e = err as NodeJS.ErrnoException;
          process.stderr.write(`tsvmm: ${e.code === 'EREFUSED' ? e.message : unreachable(path, e)}\n`);
          return EXIT_CODES.error;
        }
      });
    });
  addVmOptions(program.command('config').description('show the VM configuration a command line makes (the same options as run), without running it'))
    .option('--print', 'print the effective configuration as JSON (the default action)')
    .action((opts: RunOptions, cmd: Command) => {
      onConfig(opts, (key) => cmd.getOptionValueSource(key));
    });
  return program;
}

/** Runs the CLI; resolves to the process exit code. */
export async function main(argv: string[]): Promise<number> {
  let code = 0;
  const program = buildProgram(
    async (opts, sourceOf) => {
      code = await run(opts, sourceOf);
    },
    (opts, sourceOf) => {
      code = printConfig(opts, sourceOf);
    },
    async (command) => {
      code = await command();
    },
  );
  try {
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      // Help and version are not errors; commander has printed what it had to.
      return err.exitCode === 0 ? 0 : EXIT_USAGE;
    }
    process.stderr.write(errorLine(err));
    return EXIT_CODES.error;
  }
  return code;
}
