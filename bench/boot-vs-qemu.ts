/**
 * tsvmm against QEMU on the same boot: the stock (unpatched) fixture
 * kernel and the fixture initramfs, /init printing TSVMM-INIT-OK and
 * running `reboot -f` (tsvmm.mode=reboot), 128 MiB, one vCPU.
 *
 * Cases, run alternately (one of each per round, order rotated):
 * - tsvmm: createVm() from src/index.js and the boot timer, as bench/boot.ts
 *   does; bootMode 'auto' (what a user gets: the bzImage is decompressed on
 *   the host); 'tsvmm-classic' (bootMode 'guest', the in-guest
 *   decompressor as under QEMU) can be selected with --boot-vs-qemu-cases;
 * - qemu-pc: `qemu-system-x86_64 -M pc -enable-kvm ...`, SeaBIOS, the
 *   linuxboot option ROM and the kernel's own decompressor included;
 * - qemu-microvm: `-M microvm,x-option-roms=off,rtc=off,pit=off`, qboot.
 *
 * Each with two command lines: `console=ttyS0 reboot=k panic=-1
 * tsvmm.mode=reboot`, and the same plus `quiet`. microvm gets `reboot=t`
 * appended: it has no i8042 and no ACPI reset, so with `reboot=k` the
 * kernel's reset falls through to a jump to the firmware's reset vector,
 * qboot loads the kernel again and the guest boots forever (measured:
 * -no-reboot never sees a reset). `reboot=` is read only when the guest
 * resets, so the times to /init are unaffected.
 *
 * Times are wall clock in this process (process.hrtime): from before
 * createVm (tsvmm) or spawn (QEMU) to the console line TSVMM-INIT-OK and
 * to the end of the VM (vm.wait() resolving; QEMU's process exit). The
 * tsvmm figure therefore includes reading the files and decompressing the
 * kernel, the QEMU one QEMU's process start, firmware and decompressor;
 * neither includes starting Node.
 *
 * Needs a hardware-virtualised /dev/kvm (probeHostOnce().emulationGaps
 * empty): on a PVM-style host neither QEMU nor tsvmm can boot a stock
 * kernel, and the benchmark prints one row saying how to run it in the
 * emulated AMD-V host instead.
 */
import { spawn } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import { createVm, type ExitPath } from '../src/index.js';
import { probeHostOnce } from '../src/kvm/probe.js';
import { fixtures } from '../fixtures/index.js';
import type { Benchmark, BenchContext, BenchResult, Row } from './lib/benchmark.js';
import { INIT_MARKER, timeBoot } from './lib/boot-timer.js';
import { shellQuote } from './lib/guest-shell.js';
import { max, median, min, round, secondsSince } from './lib/stats.js';
import { qemuArgv } from './lib/qemu.js';

const MEMORY = '128M';
export const BASE_CMDLINE = 'console=ttyS0 reboot=k panic=-1 tsvmm.mode=reboot';
const MICROVM_MACHINE = 'microvm,x-option-roms=off,rtc=off,pit=off';
const HOW_TO_RUN = 'tests/hosts/amdv/run.sh -- npm run bench -- boot-vs-qemu';

type Case = 'tsvmm' | 'tsvmm-hvc' | 'tsvmm-classic' | 'qemu-pc' | 'qemu-microvm';
const CASES: readonly Case[] = ['tsvmm', 'tsvmm-hvc', 'tsvmm-classic', 'qemu-pc', 'qemu-microvm'];
const DEFAULT_CASES: readonly Case[] = ['tsvmm', 'tsvmm-hvc', 'qemu-pc', 'qemu-microvm'];
type Variant = 'verbose' | 'quiet';
const VARIANTS: readonly Variant[] = ['verbose', 'quiet'];

const LABELS: Record<Case, string> = {
  tsvmm: 'tsvmm (createVm, host-decompressed)',
  'tsvmm-hvc': 'tsvmm, virtio console (hvc0)',
  'tsvmm-classic': 'tsvmm (createVm, in-guest decompressor)',
  'qemu-pc': 'qemu -M pc (spawn, SeaBIOS)',
  'qemu-microvm': 'qemu -M microvm (spawn, qboot)',
};
const isQemu = (c: Case) => c.startsWith('qemu-');

function cmdlineFor(c: Case, v: Variant): string {
  const base = v === 'quiet' ? `${BASE_CMDLINE} quiet` : BASE_CMDLINE;
  if (c === 'tsvmm-hvc') return base.replace('console=ttyS0', 'console=hvc0');
  return c === 'qemu-microvm' ? `${base} reboot=t` : base;
}

function qemuArgvFor(c: Case, kernel: string, initrd: string, cmdline: string): string[] {
  return qemuArgv(c === 'qemu-pc' ? 'pc' : MICROVM_MACHINE, MEMORY, kernel, initrd, cmdline);
}

interface BootRun {
  case: Case;
  variant: Variant;
  round: number;
  /** The command line the guest got (tsvmm: with what tsvmm appends). */
  cmdline: string;
  /** QEMU only: the command as typed. */
  command?: string;
  /** tsvmm only: createVm() (files, machine, decompression). */
  createS?: number;
  /** From before createVm / spawn to the first console byte. */
  firstOutputS: number | null;
  /** From before createVm / spawn to the line TSVMM-INIT-OK. */
  initS: number | null;
  /** From before createVm / spawn to the console line "reboot: Restarting system" (the guest's last words). */
  restartLineS: number | null;
  /** From before createVm / spawn to the end of the VM (vm.wait(); QEMU's exit). */
  endS: number;
  /** tsvmm: the outcome kind; QEMU: 'exit 0', 'exit N', 'signal S', 'guest restarted', 'timeout'. */
  outcome: string;
  outcomeMessage: string;
  ok: boolean;
  bootKind?: string;
  exits?: Record<string, number>;
  pio?: Record<string, number>;
  mmio?: Record<string, number>;
  unhandledPio?: Record<string, number>;
  irqsInjected?: number;
  /** Writes replayed from the coalesced ring, and port reads the addon answered (neither reached TypeScript as an exit). */
  coalescedWrites?: number;
  fastReads?: number;
  emulationFallback?: Record<string, number>;
  /** Bytes the guest wrote to the console. */
  consoleBytes: number;
  /** The guest kernel's own printk timestamp of "Run /init", when printed (verbose). */
  guestRunInitS: number | null;
  /** The guest kernel's printk timestamp of "reboot: Restarting system" (printed in both variants): its uptime at the reset. */
  guestRestartS: number | null;
  loadAverageBefore: number[];
  loadAverageAfter: number[];
  stderrTail?: string;
  consoleTail: string;
}

const fmt = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : String(x));
const load = () => os.loadavg().map((x) => round(x, 2));

function printkTime(output: string, re: RegExp): number | null {
  const m = re.exec(output);
  return m ? Number(m[1]) : null;
}
const guestRunInit = (output: string) => printkTime(output, /\[\s*(\d+\.\d+)\] Run \/init as init process/);
const guestRestart = (output: string) => printkTime(output, /\[\s*(\d+\.\d+)\] reboot: Restarting system/);

async function bootTsvmm(c: Case, v: Variant, r: number, timeoutS: number, exitPath: ExitPath): Promise<BootRun> {
  const fx = fixtures();
  const loadAverageBefore = load();
  const t0 = process.hrtime.bigint();
  const vm = await createVm({
    kernel: fx.stockBzImage,
    initrd: fx.initramfs,
    cmdline: cmdlineFor(c, v),
    memory: MEMORY,
    bootMode: c === 'tsvmm-classic' ? 'guest' : 'auto',
    exitPath,
    ...(c === 'tsvmm-hvc' ? { console: 'virtio' as const } : {}),
    name: `bench-bvq-${c}-${v}`,
  });
  const createS = secondsSince(t0);
  const restart = watchRestartLine();
  vm.console.on('data', restart.onData);
  const timed = await timeBoot(vm, timeoutS);
  const stats = vm.stats();
  // timeBoot's times are from vm.start(), which follows createVm at once.
  const fromT0 = (x: number | null) => (x === null ? null : round(createS + x, 3));
  return {
    case: c,
    variant: v,
    round: r,
    cmdline: vm.cmdline,
    createS: round(createS, 3),
    firstOutputS: fromT0(timed.firstOutputS),
    initS: fromT0(timed.initS),
    restartLineS: restart.at === undefined ? null : round(secondsSince(t0, restart.at), 3),
    endS: round(createS + timed.endS, 3),
    outcome: timed.outcome.kind,
    outcomeMessage: timed.outcome.message,
    ok: timed.initS !== null && timed.outcome.kind === 'reboot',
    bootKind: vm.boot.kind,
    exits: stats.exits,
    pio: stats.pio,
    mmio: stats.mmio,
    unhandledPio: stats.unhandledPio,
    irqsInjected: stats.irqsInjected,
    coalescedWrites: stats.coalescedWrites,
    fastReads: stats.fastReads,
    emulationFallback: stats.emulationFallback,
    consoleBytes: Buffer.byteLength(timed.output, 'latin1'),
    guestRunInitS: guestRunInit(timed.output),
    guestRestartS: guestRestart(timed.output),
    loadAverageBefore,
    loadAverageAfter: load(),
    consoleTail: timed.output.slice(-1500),
  };
}

function bootQemu(c: Case, v: Variant, r: number, timeoutS: number): Promise<BootRun> {
  const fx = fixtures();
  const cmdline = cmdlineFor(c, v);
  const argv = qemuArgvFor(c, fx.stockBzImage, fx.initramfs, cmdline);
  const loadAverageBefore = load();
  return new Promise((resolve) => {
    let output = '';
    let stderr = '';
    let firstOutput: bigint | undefined;
    let initAt: bigint | undefined;
    let stopped: string | undefined;
    const t0 = process.hrtime.bigint();
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    const restart = watchRestartLine();
    child.stdout.on('data', restart.onData);
    let done = false;
    let lateGuard: NodeJS.Timeout | undefined;
    const stop = (why: string) => {
      if (stopped !== undefined) return;
      // What the process was doing (thread states and kernel wait channels), for a hang.
      stopped = `${why}; QEMU threads before SIGKILL: ${processState(child.pid)}`;
      child.kill('SIGKILL');
      // A process stuck in the kernel may not die: do not wait for it forever.
      lateGuard = setTimeout(() => {
        stopped += `; still not gone 20 s after SIGKILL: ${processState(child.pid)}`;
        finish();
      }, 20_000);
    };
    child.stdout.on('data', (chunk: Buffer) => {
      const now = process.hrtime.bigint();
      firstOutput ??= now;
      const from = Math.max(0, output.length - 64);
      output += chunk.toString('latin1');
      if (initAt === undefined && output.indexOf(INIT_MARKER, from) >= 0) initAt = now;
      // A guest that resets into its firmware and boots again never ends (-no-reboot sees no reset).
      if (initAt !== undefined) {
        const after = output.indexOf(INIT_MARKER) + INIT_MARKER.length;
        if (output.indexOf('Linux version', after) >= 0 || output.indexOf(INIT_MARKER, after) >= 0) {
          stop('guest restarted: the kernel booted again after /init (the reset went to the firmware, which loaded the kernel again)');
        }
      }
    });
    child.stderr.on('data', (chunk: Buffer) => {
      stderr += chunk.toString('latin1');
    });
    const guard = setTimeout(() => stop(`no exit after ${timeoutS} s`), timeoutS * 1000);
    let end: bigint | undefined;
    let status: { code: number | null; signal: NodeJS.Signals | null } | undefined;
    const finish = () => {
      if (done) return;
      done = true;
      clearTimeout(guard);
      clearTimeout(lateGuard);
      const endAt = end ?? process.hrtime.bigint();
      const at = (x: bigint | undefined) => (x === undefined ? null : round(secondsSince(t0, x), 3));
      let outcome: string;
      if (stopped !== undefined)
        outcome = `${stopped.startsWith('guest restarted') ? 'guest restarted' : 'timeout'}${status === undefined ? ', not gone after SIGKILL' : ''}`;
      else if (status === undefined) outcome = 'spawn failed';
      else outcome = status.code !== null ? `exit ${status.code}` : `signal ${status.signal}`;
      resolve({
        case: c,
        variant: v,
        round: r,
        cmdline,
        command: shellQuote(argv),
        firstOutputS: at(firstOutput),
        initS: at(initAt),
        restartLineS: restart.at === undefined ? null : round(secondsSince(t0, restart.at), 3),
        endS: round(secondsSince(t0, endAt), 3),
        outcome,
        outcomeMessage: stopped ?? stderr.trim().split('\n').slice(-1)[0] ?? '',
        ok: initAt !== undefined && outcome === 'exit 0',
        consoleBytes: Buffer.byteLength(output, 'latin1'),
        guestRunInitS: guestRunInit(output),
        guestRestartS: guestRestart(output),
        loadAverageBefore,
        loadAverageAfter: load(),
        stderrTail: stderr.slice(-1500),
        consoleTail: output.slice(-1500),
      });
    };
    child.on('exit', (code, signal) => {
      end = process.hrtime.bigint();
      status = { code, signal };
    });
    child.on('error', (err) => {
      stderr += `${err.message}\n`;
    });
    // 'close': the process has exited and its stdio is drained.
    child.on('close', finish);
  });
}

const RESTART_LINE = 'reboot: Restarting system';

/** Notes when the console shows the guest's "reboot: Restarting system" line. */
function watchRestartLine(): { at: bigint | undefined; onData: (chunk: Buffer) => void } {
  let text = '';
  const w = {
    at: undefined as bigint | undefined,
    onData: (chunk: Buffer) => {
      if (w.at !== undefined) return;
      text = (text + chunk.toString('latin1')).slice(-200);
      if (text.includes(RESTART_LINE)) w.at = process.hrtime.bigint();
    },
  };
  return w;
}

/** Each thread of a process: state and kernel wait channel, from /proc (Linux). */
function processState(pid: number | undefined): string {
  if (pid === undefined) return 'no pid';
  try {
    return readdirSync(`/proc/${pid}/task`)
      .map((t) => {
        const stat = readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8');
        const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
        let wchan = '?';
        try {
          wchan = readFileSync(`/proc/${pid}/task/${t}/wchan`, 'utf8').trim() || '0';
        } catch {
          /* not readable */
        }
        const comm = readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').trim();
        return `${comm} ${state} ${wchan}`;
      })
      .join(', ');
  } catch (err) {
    return `unreadable (${(err as Error).message})`;
  }
}

function parseList<T extends string>(option: string, value: string, known: readonly T[]): T[] {
  const names = value
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  for (const n of names) if (!known.includes(n as T)) throw new Error(`--${option}: unknown "${n}" (known: ${known.join(', ')})`);
  if (names.length === 0) throw new Error(`--${option}: give at least one`);
  return [...new Set(names)] as T[];
}

function qemuVersion(): string | null {
  try {
    return execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 30_000 })
      .split('\n')[0]!
      .trim();
  } catch {
    return null;
  }
}

/** Why this host cannot run the comparison, or undefined when it can. */
function hostProblem(): string | undefined {
  let gaps: string[];
  try {
    gaps = probeHostOnce().emulationGaps;
  } catch (err) {
    return `KVM could not be probed (${(err as Error).message.split('\n')[0]}): needs a hardware-virtualised /dev/kvm; on these machines run: ${HOW_TO_RUN}`;
  }
  if (gaps.length > 0) {
    return (
      `this KVM emulates guest kernel code (probeHost gaps: ${gaps.join(', ')}): neither QEMU nor tsvmm can boot the stock kernel here. ` +
      `It needs a hardware-virtualised host; run it in the emulated AMD-V host: ${HOW_TO_RUN}`
    );
  }
  return undefined;
}

export const bootVsQemu: Benchmark = {
  name: 'boot-vs-qemu',
  description:
    'stock kernel to /init (TSVMM-INIT-OK) and to exit: tsvmm (library) vs qemu -M pc vs qemu -M microvm, verbose and quiet; needs hardware virtualization',
  slow: true,
  options: [
    { name: 'boot-vs-qemu-runs', env: 'TSVMM_BENCH_BOOT_VS_QEMU_RUNS', default: 3, description: 'boots of each case and command line (alternating)' },
    {
      name: 'boot-vs-qemu-cases',
      env: 'TSVMM_BENCH_BOOT_VS_QEMU_CASES',
      default: DEFAULT_CASES.join(','),
      description: `which VMMs, comma-separated (${CASES.join(', ')})`,
    },
    {
      name: 'boot-vs-qemu-variants',
      env: 'TSVMM_BENCH_BOOT_VS_QEMU_VARIANTS',
      default: VARIANTS.join(','),
      description: 'command lines: verbose, quiet (the same plus `quiet`)',
    },
    {
      name: 'boot-vs-qemu-exit-path',
      env: 'TSVMM_BENCH_BOOT_VS_QEMU_EXIT_PATH',
      default: 'loop',
      description: "tsvmm's exitPath: loop (vCPU on the event loop) or thread",
    },
    { name: 'boot-vs-qemu-timeout', env: 'TSVMM_BENCH_BOOT_VS_QEMU_TIMEOUT', default: 900, description: 'seconds before a boot is stopped as hung' },
  ],

  async run(bc: BenchContext): Promise<BenchResult> {
    const runs = bc.numberOption('boot-vs-qemu-runs');
    if (!Number.isInteger(runs) || runs < 1) throw new Error(`--boot-vs-qemu-runs must be a positive integer (got ${runs})`);
    const timeoutS = bc.numberOption('boot-vs-qemu-timeout');
    const exitPath = bc.option('boot-vs-qemu-exit-path');
    if (exitPath !== 'loop' && exitPath !== 'thread') throw new Error(`--boot-vs-qemu-exit-path must be loop or thread (got ${exitPath})`);
    let cases = parseList('boot-vs-qemu-cases', bc.option('boot-vs-qemu-cases'), CASES);
    const variants = parseList('boot-vs-qemu-variants', bc.option('boot-vs-qemu-variants'), VARIANTS);

    const problem = hostProblem();
    if (problem !== undefined) {
      bc.progress(`boot-vs-qemu: skipped: ${problem}`);
      return {
        rows: [{ label: 'boot-vs-qemu: needs a hardware-virtualised host (VT-x/AMD-V)', value: Number.NaN, unit: '-', note: problem }],
        raw: { skipped: problem },
      };
    }

    const rows: Row[] = [];
    const version = qemuVersion();
    if (version === null && cases.some(isQemu)) {
      rows.push({ label: 'qemu-system-x86_64', value: Number.NaN, unit: '-', note: 'not installed: the QEMU cases are skipped' });
      cases = cases.filter((c) => !isQemu(c));
      if (cases.length === 0) return { rows, raw: { qemuVersion: null } };
    }
    const fx = fixtures();

    // Alternate: every round boots each case once per command line, the case order rotating round by round.
    const results: BootRun[] = [];
    let slot = 0;
    for (let r = 0; r < runs; r++) {
      for (const v of variants) {
        const order = cases.map((_, i) => cases[(i + slot) % cases.length]!);
        slot++;
        for (const c of order) {
          bc.progress(`boot-vs-qemu round ${r + 1}/${runs}, ${v}: ${c}...`);
          const b = isQemu(c) ? await bootQemu(c, v, r, timeoutS) : await bootTsvmm(c, v, r, timeoutS, exitPath);
          results.push(b);
          if (!b.ok) bc.progress(`  ${c} ${v} failed; console tail: ${JSON.stringify(b.consoleTail.slice(-400))}`);
          bc.progress(
            `  ${c} ${v}: /init ${b.initS === null ? 'not reached' : `${b.initS.toFixed(2)} s`}, end ${b.endS.toFixed(2)} s (${b.outcome}${b.ok ? '' : `: ${b.outcomeMessage}`})`,
          );
        }
      }
    }

    const of = (c: Case, v: Variant) => results.filter((b) => b.case === c && b.variant === v);
    const okOf = (c: Case, v: Variant) => of(c, v).filter((b) => b.ok);
    const pick = (c: Case, v: Variant, f: (b: BootRun) => number | null | undefined): number[] =>
      okOf(c, v)
        .map(f)
        .filter((x): x is number => typeof x === 'number');
    const med = (xs: number[]) => round(median(xs), 3);
    const failures = (c: Case, v: Variant): string | undefined => {
      const bad = of(c, v).filter((b) => !b.ok);
      return bad.length === 0 ? undefined : `${bad.length} of ${of(c, v).length} failed: ${bad.map((b) => `${b.outcome} (${b.outcomeMessage})`).join('; ')}`;
    };
    const tsvmmCases = cases.filter((c) => !isQemu(c));
    const qemuCases = cases.filter(isQemu);

    for (const v of variants) {
      for (const c of cases) {
        const label = `${v}: ${LABELS[c]}`;
        const loads = of(c, v).map((b) => b.loadAverageBefore[0]);
        const first = of(c, v)[0];
        const kindNote = isQemu(c) ? '' : `${first?.bootKind ?? '?'}; `;
        const guest = median(pick(c, v, (b) => b.guestRunInitS));
        const restart = median(pick(c, v, (b) => b.guestRestartS));
        if (!isQemu(c))
          rows.push({
            label: `${label}: createVm`,
            value: med(pick(c, v, (b) => b.createS)),
            unit: 's',
            samples: pick(c, v, (b) => b.createS),
            note: 'included in the times below',
          });
        rows.push({ label: `${label} -> first output`, value: med(pick(c, v, (b) => b.firstOutputS)), unit: 's', samples: pick(c, v, (b) => b.firstOutputS) });
        rows.push({
          label: `${label} -> /init`,
          value: med(pick(c, v, (b) => b.initS)),
          unit: 's',
          samples: pick(c, v, (b) => b.initS),
          note:
            failures(c, v) ??
            `${kindNote}${Number.isFinite(guest) ? `guest printk "Run /init" at ${guest.toFixed(2)} s; ` : ''}console ${Math.round(median(pick(c, v, (b) => b.consoleBytes)))} B; load ${min(loads as number[])}..${max(loads as number[])}${c === 'qemu-microvm' ? '; +reboot=t (see README)' : ''}`,
        });
        rows.push({
          label: `${label} -> exit`,
          value: med(pick(c, v, (b) => b.endS)),
          unit: 's',
          samples: pick(c, v, (b) => b.endS),
          note: `"Restarting system" on the console at ${fmt(median(pick(c, v, (b) => b.restartLineS)))} s${Number.isFinite(restart) ? `, guest uptime then ${restart.toFixed(2)} s` : ''}`,
        });
      }
      // Ratios of the medians, with the same ratio taken within each round for its spread.
      for (const t of tsvmmCases) {
        for (const q of qemuCases) {
          for (const [what, f] of [
            ['/init', (b: BootRun) => b.initS],
            ['exit', (b: BootRun) => b.endS],
          ] as const) {
            const within: number[] = [];
            for (let r = 0; r < runs; r++) {
              const a = okOf(t, v).find((b) => b.round === r);
              const b = okOf(q, v).find((x) => x.round === r);
              const fa = a ? f(a) : null;
              const fb = b ? f(b) : null;
              if (fa !== null && fb !== null && fb > 0) within.push(fa / fb);
            }
            rows.push({
              label: `${v}: ${t} / ${q}, -> ${what}`,
              value: round(median(pick(t, v, f)) / median(pick(q, v, f)), 3),
              unit: 'x',
              note: within.length > 0 ? `ratio of medians; within rounds ${within.map((x) => x.toFixed(2)).join(', ')}` : 'no pair of good boots',
            });
          }
        }
      }
      // tsvmm's exits per boot: by KVM exit reason, and port / MMIO accesses by device.
      for (const t of tsvmmCases) {
        const good = okOf(t, v);
        if (good.length === 0) continue;
        const counter = (get: (b: BootRun) => Record<string, number> | undefined, prefix: string, what: string) => {
          const keys = [...new Set(good.flatMap((b) => Object.keys(get(b) ?? {})))];
          const meds = keys.map((k) => ({ k, xs: good.map((b) => get(b)?.[k] ?? 0) })).sort((a, b) => median(b.xs) - median(a.xs));
          for (const { k, xs } of meds) rows.push({ label: `${v}: ${t} ${prefix} ${k}`, value: median(xs), unit: what, samples: xs });
        };
        const totals = good.map((b) => Object.values(b.exits ?? {}).reduce((s, x) => s + x, 0));
        rows.push({
          label: `${v}: ${t} exits per boot, total`,
          value: median(totals),
          unit: 'exits',
          samples: totals,
          note: `IRQs injected ${median(good.map((b) => b.irqsInjected ?? 0))}`,
        });
        counter((b) => b.exits, 'exits:', 'exits');
        counter((b) => b.pio, 'pio:', 'accesses');
        counter((b) => b.mmio, 'mmio:', 'accesses');
        const unhandled = [...new Set(good.flatMap((b) => Object.keys(b.unhandledPio ?? {})))];
        if (unhandled.length > 0) {
          const xs = good.map((b) => Object.values(b.unhandledPio ?? {}).reduce((s, x) => s + x, 0));
          rows.push({ label: `${v}: ${t} pio: no device`, value: median(xs), unit: 'accesses', samples: xs, note: `ports ${unhandled.join(', ')}` });
        }
      }
    }

    const commands = [...new Set(results.filter((b) => b.command !== undefined).map((b) => b.command!))];
    return {
      rows,
      commands,
      raw: {
        qemuVersion: version,
        kernel: fx.stockBzImage,
        kernelRelease: fx.kernelRelease,
        initramfs: fx.initramfs,
        memory: MEMORY,
        cmdlines: Object.fromEntries(cases.flatMap((c) => variants.map((v) => [`${c}/${v}`, cmdlineFor(c, v)]))),
        microvmMachine: MICROVM_MACHINE,
        runs: results,
      },
    };
  },
};
