/**
 * The guest boot profiler: samples each vCPU's instruction pointer at a
 * fixed rate while the guest runs, symbolises the samples with the kernel's
 * System.map, and writes the hottest guest functions and a timeline of the
 * console lines with host timestamps. On hosts whose KVM emulates guest
 * kernel code, this is what shows where boot time goes.
 *
 * How a sample is taken: a Node timer kicks each vCPU thread with
 * `sample = true`; the thread leaves KVM_RUN, stores RIP (KVM_GET_REGS) in
 * a ring buffer shared with JS and re-enters without a report to JS. A kick
 * costs one exit (30 to 50 us here). Measured here: boot time 1.065-1.073x at
 * 99 Hz and 1.13x at 1000 Hz (bench/README.md); the 1 kHz step matches one exit
 * per sample, the first few percent at 99 Hz are not yet explained.
 * The default rate is 99 Hz rather than 100 so samples do not run in
 * lockstep with a HZ=100 guest tick, and each period is jittered for the
 * same reason. The ring is drained on every timer tick and every console
 * line, which is also how samples get their (approximate) time.
 *
 * Output format. Text (the default), in sections:
 *
 * ```text
 * # tsvmm guest profile
 * kernel:    <kernel path>
 * symbols:   <System.map path> (<n> functions)
 * rate:      <hz> Hz per vCPU
 * duration:  <seconds> s
 * outcome:   <how the VM ended>
 * samples:   <total> (vcpu0 <n>, vcpu1 <n>, ...)
 * dropped:   <total> (vcpu0 <n>, ...)      samples the ring overwrote before they were read
 *
 * ## Hottest functions, all vCPUs (top 30 of <distinct>)
 *  samples       %  function
 *     2210   26.85  default_idle
 *
 * ## Hottest functions, vCPU <id> (top 30 of <distinct>)   one section per vCPU when there are several
 *
 * ## Longest gaps between console lines (top 10)
 *   12.345s ->  20.111s    7.766s  after: <line before the gap>
 *             52.1% tick_periodic, 20.3% ..., ...             the hottest functions during the gap
 *
 * ## Console timeline (host seconds since the VM started)
 * [  12.345s] <line>
 * ```
 *
 * `[user]` groups samples taken in guest user space, `[real mode]` those
 * below 1 MiB (a secondary vCPU waiting for its startup IPI sits at the
 * reset vector), `[unknown]` kernel addresses no text symbol covers. With `format: 'json'` (or a path ending
 * in `.json`) the same report is written as a {@link ProfileReport}.
 */
import type { VmObserver } from '../vmm/config.js';
import { writeFileSync } from 'node:fs';
import { access, constants, readFile, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Logger } from '../base/log.js';
import { silentLogger } from '../base/log.js';
import type { VmOutcome } from '../vmm/outcome.js';
import { SymbolTable } from './symbols.js';
import { TsvmmKindError } from '../base/errors.js';

/** What to profile and where to write it (VmConfig.profile, `--profile`). */
export interface ProfileConfig {
  /** Where the report is written when the VM ends. */
  path: string;
  /** The kernel's System.map. Default: one found next to the kernel file. */
  systemMap?: string;
  /** Samples per second per vCPU, 1 to {@link MAX_PROFILE_RATE_HZ}. Default {@link DEFAULT_PROFILE_RATE_HZ}. */
  rateHz?: number;
  /** Report format. Default: 'json' when `path` ends in `.json`, else 'text'. */
  format?: ProfileFormat;
}

export type ProfileFormat = 'text' | 'json';

export const DEFAULT_PROFILE_RATE_HZ = 99;
/** Node timers have 1 ms resolution; at 1 kHz a kick per ms costs about 5% of a vCPU. */
export const MAX_PROFILE_RATE_HZ = 1000;
/** Functions listed per table. */
export const TOP_FUNCTIONS = 30;
/** Gaps between console lines listed. */
export const TOP_GAPS = 10;
/** Functions named per gap. */
const GAP_FUNCTIONS = 3;
/** Samples each vCPU's ring holds between drains; a drain follows every kick, so it never fills in practice. */
const RING_SLOTS = 4096;
/** A guest printing without end must not grow the timeline without bound. */
const MAX_TIMELINE_LINES = 100_000;

export type ProfileErrorKind = 'system-map-missing' | 'system-map-unreadable' | 'system-map-invalid' | 'bad-rate' | 'output-unwritable';

export class ProfileError extends TsvmmKindError<ProfileErrorKind> {
  constructor(kind: ProfileErrorKind, message: string, options?: { cause?: unknown }) {
    super('PROFILE_', kind, message, options);
  }
}

/** One row of a hottest-functions table. */
export interface FunctionRow {
  name: string;
  samples: number;
  /** Of the samples in the table's scope (all vCPUs, one vCPU, one gap), 0 to 100. */
  percent: number;
}

/** The report, as written in JSON. */
export interface ProfileReport {
  kernel: string;
  symbols: { path: string; functions: number };
  rateHz: number;
  durationMs: number;
  outcome?: string;
  samples: number;
  dropped: number;
  /** Distinct functions sampled. */
  functions: number;
  top: FunctionRow[];
  vcpus: Array<{ id: number; samples: number; dropped: number; kicks: number; functions: number; top: FunctionRow[] }>;
  /** The longest stretches without console output, longest first. */
  gaps: Array<{
    startMs: number;
    endMs: number;
    durationMs: number;
    /** The console line the gap follows; undefined for the start of the boot. */
    after?: string;
    samples: number;
    top: FunctionRow[];
  }>;
  timeline: Array<{ ms: number; line: string }>;
  /** Console lines not kept in the timeline (past its limit). */
  timelineOmitted: number;
}

/** Description of the run for the report header. */
export interface ProfileMeta {
  kernel: string;
  symbolsPath: string;
  rateHz: number;
  durationMs: number;
  outcome?: string;
}

/**
 * Accumulates samples and console lines, with no timers or KVM: the part of
 * the profiler the unit tests drive with made-up samples. Samples are kept
 * per raw RIP and symbolised once, when the report is made.
 */
export class ProfileRecorder {
  private readonly perVcpu = new Map<number, { counts: Map<bigint, number>; dropped: number; kicks: number }>();
  /** Samples between console line k-1 and line k, all vCPUs, under key k. */
  private readonly perGap = new Map<number, Map<bigint, number>>();
  private readonly lines: Array<{ ms: number; line: string }> = [];
  private linesSeen = 0;

  constructor(
    private readonly symbols: SymbolTable,
    vcpuIds: readonly number[],
  ) {
    for (const id of vcpuIds) this.perVcpu.set(id, { counts: new Map(), dropped: 0, kicks: 0 });
  }

  private vcpu(id: number) {
    let v = this.perVcpu.get(id);
    if (!v) {
      v = { counts: new Map(), dropped: 0, kicks: 0 };
      this.perVcpu.set(id, v);
    }
    return v;
  }

  /** Samples from one vCPU, taken since the last console line. */
  addSamples(vcpu: number, rips: Iterable<bigint>): void {
    const counts = this.vcpu(vcpu).counts;
    let gap = this.perGap.get(this.linesSeen);
    for (const rip of rips) {
      counts.set(rip, (counts.get(rip) ?? 0) + 1);
      if (!gap) {
        gap = new Map();
        this.perGap.set(this.linesSeen, gap);
      }
      gap.set(rip, (gap.get(rip) ?? 0) + 1);
    }
  }

  /** Samples the ring overwrote before they were read. */
  addDropped(vcpu: number, n: number): void {
    this.vcpu(vcpu).dropped += n;
  }

  addKicks(vcpu: number, n: number): void {
    this.vcpu(vcpu).kicks += n;
  }

  /** A complete console line, `ms` after the VM started. */
  addLine(ms: number, line: string): void {
    this.linesSeen++;
    if (this.lines.length < MAX_TIMELINE_LINES) this.lines.push({ ms, line });
  }

  report(meta: ProfileMeta): ProfileReport {
    const names = new Map<bigint, string>();
    const byFunction = (counts: Map<bigint, number>): Map<string, number> => {
      const out = new Map<string, number>();
      for (const [rip, n] of counts) {
        let name = names.get(rip);
        if (name === undefined) {
          name = this.symbols.lookup(rip).name;
          names.set(rip, name);
        }
        out.set(name, (out.get(name) ?? 0) + n);
      }
      return out;
    };

    const all = new Map<string, number>();
    const vcpus: ProfileReport['vcpus'] = [];
    for (const [id, v] of [...this.perVcpu].sort((a, b) => a[0] - b[0])) {
      const fns = byFunction(v.counts);
      for (const [name, n] of fns) all.set(name, (all.get(name) ?? 0) + n);
      vcpus.push({ id, samples: sum(fns), dropped: v.dropped, kicks: v.kicks, functions: fns.size, top: topRows(fns, TOP_FUNCTIONS) });
    }

    // Gap k runs from line k-1 (or the start) to line k (or the end).
    const gaps: ProfileReport['gaps'] = [];
    for (let k = 0; k <= this.linesSeen; k++) {
      const before = k > 0 ? this.lines[k - 1] : undefined;
      const next = k < this.lines.length ? this.lines[k] : undefined;
      // Past the timeline limit gaps have no times: leave them out.
      if (k > 0 && !before) break;
      if (k < this.linesSeen && !next) break;
      const startMs = before?.ms ?? 0;
      const endMs = next?.ms ?? meta.durationMs;
      const fns = byFunction(this.perGap.get(k) ?? new Map());
      gaps.push({
        startMs,
        endMs,
        durationMs: endMs - startMs,
        ...(before ? { after: before.line } : {}),
        samples: sum(fns),
        top: topRows(fns, GAP_FUNCTIONS),
      });
    }
    gaps.sort((a, b) => b.durationMs - a.durationMs || a.startMs - b.startMs);

    return {
      kernel: meta.kernel,
      symbols: { path: meta.symbolsPath, functions: this.symbols.size },
      rateHz: meta.rateHz,
      durationMs: meta.durationMs,
      ...(meta.outcome !== undefined ? { outcome: meta.outcome } : {}),
      samples: sum(all),
      dropped: vcpus.reduce((n, v) => n + v.dropped, 0),
      functions: all.size,
      top: topRows(all, TOP_FUNCTIONS),
      vcpus,
      gaps: gaps.slice(0, TOP_GAPS),
      timeline: [...this.lines],
      timelineOmitted: this.linesSeen - this.lines.length,
    };
  }
}

function sum(counts: Map<string, number>): number {
  let n = 0;
  for (const v of counts.values()) n += v;
  return n;
}

/** The `limit` most sampled functions, ties by name so the order is stable. */
function topRows(counts: Map<string, number>, limit: number): FunctionRow[] {
  const total = sum(counts);
  return [...counts]
    .sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
    .slice(0, limit)
    .map(([name, samples]) => ({ name, samples, percent: total > 0 ? Math.round((samples / total) * 10000) / 100 : 0 }));
}

const seconds = (ms: number, width = 0) => `${(ms / 1000).toFixed(3)}s`.padStart(width);

function functionTable(title: string, rows: FunctionRow[], distinct: number): string[] {
  const out = [`## ${title} (top ${rows.length} of ${distinct})`, ' samples       %  function'];
  for (const r of rows) out.push(`${String(r.samples).padStart(8)}  ${r.percent.toFixed(2).padStart(6)}  ${r.name}`);
  if (rows.length === 0) out.push('  (no samples)');
  return out;
}

/** The report as text, in the format described at the top of this module. */
export function formatProfileText(report: ProfileReport): string {
  const perVcpu = (pick: (v: ProfileReport['vcpus'][number]) => number) => report.vcpus.map((v) => `vcpu${v.id} ${pick(v)}`).join(', ');
  const out: string[] = [
    '# tsvmm guest profile',
    `kernel:    ${report.kernel}`,
    `symbols:   ${report.symbols.path} (${report.symbols.functions} functions)`,
    `rate:      ${report.rateHz} Hz per vCPU`,
    `duration:  ${(report.durationMs / 1000).toFixed(3)} s`,
    ...(report.outcome !== undefined ? [`outcome:   ${report.outcome}`] : []),
    `samples:   ${report.samples} (${perVcpu((v) => v.samples)})`,
    `dropped:   ${report.dropped} (${perVcpu((v) => v.dropped)})`,
    '',
    ...functionTable('Hottest functions, all vCPUs', report.top, report.functions),
  ];
  // With one vCPU its table is the one above.
  if (report.vcpus.length > 1) {
    for (const v of report.vcpus) out.push('', ...functionTable(`Hottest functions, vCPU ${v.id}`, v.top, v.functions));
  }
  out.push('', `## Longest gaps between console lines (top ${report.gaps.length})`);
  for (const g of report.gaps) {
    out.push(`${seconds(g.startMs, 10)} -> ${seconds(g.endMs, 10)}  ${seconds(g.durationMs, 10)}  after: ${g.after ?? '(start)'}`);
    const fns = g.top.map((r) => `${r.percent.toFixed(1)}% ${r.name}`).join(', ');
    out.push(`${' '.repeat(12)}${g.samples} samples${fns ? `: ${fns}` : ''}`);
  }
  out.push('', '## Console timeline (host seconds since the VM started)');
  for (const l of report.timeline) out.push(`[${seconds(l.ms, 9)}] ${l.line}`);
  if (report.timelineOmitted > 0) out.push(`(${report.timelineOmitted} more lines not kept)`);
  return `${out.join('\n')}\n`;
}

/** The report as JSON: a {@link ProfileReport}, indented. */
export function formatProfileJson(report: ProfileReport): string {
  return `${JSON.stringify(report, null, 2)}\n`;
}

/**
 * Where a System.map for `kernel` would be: in its directory as
 * `System.map` or `System.map-<version>` (for `/boot/vmlinuz-<version>`),
 * and at the top of a kernel build tree for `arch/x86/boot/bzImage`.
 */
export function systemMapCandidates(kernel: string): string[] {
  const dir = dirname(kernel);
  const out = [join(dir, 'System.map')];
  const versioned = /^(?:vmlinuz|vmlinux|bzImage|kernel)-(.+)$/.exec(basename(kernel));
  if (versioned) out.push(join(dir, `System.map-${versioned[1]}`));
  if (/(^|\/)arch\/x86(_64)?\/boot$/.test(dir)) out.push(join(dir, '..', '..', '..', 'System.map'));
  return out;
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

function reasonOf(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : code === 'EISDIR' ? 'is a directory' : (err as Error).message;
}

/** Fails now, before the guest runs, if the report could not be written at the end. */
async function checkWritable(path: string): Promise<void> {
  const full = resolve(path);
  const fail = (why: string, err?: unknown) =>
    new ProfileError('output-unwritable', `cannot write the profile to ${path}: ${why}; give profile.path a file in a writable directory`, { cause: err });
  try {
    const st = await stat(full);
    if (st.isDirectory()) throw fail('it is a directory');
    await access(full, constants.W_OK).catch((err: unknown) => {
      throw fail(reasonOf(err), err);
    });
    return;
  } catch (err) {
    if (err instanceof ProfileError) throw err;
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw fail(reasonOf(err), err);
  }
  try {
    await access(dirname(full), constants.W_OK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw fail(code === 'ENOENT' ? `directory ${dirname(full)} does not exist` : `directory ${dirname(full)}: ${reasonOf(err)}`, err);
  }
}

/** What the profiler needs of a vCPU ({@link Vcpu} has it). */
export interface SampledVcpu {
  readonly id: number;
  readonly running: boolean;
  sample(): void;
  /** Gives the vCPU's thread a ring of `slots` samples, and returns it: index 0 counts the samples written, 1..slots hold them. */
  sampleRing(slots: number): BigUint64Array;
}

interface Sampler {
  vcpu: SampledVcpu;
  /** Slot 0: samples written; slots 1..RING_SLOTS: the ring. */
  ring: BigUint64Array;
  /** Samples read so far (the writer's count when last drained). */
  read: number;
}

/**
 * Samples a VM's vCPUs and writes the report. {@link prepare} reads the
 * symbols and checks the output path (before anything runs); {@link start}
 * once the vCPU threads run; {@link consoleLine} for each console line;
 * {@link finish} when the VM has ended.
 */
export class Profiler implements VmObserver {
  readonly rateHz: number;
  readonly format: ProfileFormat;
  /** Set when the report could not be written. */
  error: Error | undefined;
  private samplers: Sampler[] = [];
  private recorder: ProfileRecorder | undefined;
  private timer: NodeJS.Timeout | undefined;
  private startedAt = 0;
  private nextTickAt = 0;
  private finished = false;
  private finalReport: ProfileReport | undefined;

  /** The report file: the sandbox leaves it writable. */
  get outputs(): readonly string[] {
    return [this.config.path];
  }

  private constructor(
    readonly config: Readonly<ProfileConfig>,
    readonly symbols: SymbolTable,
    readonly symbolsPath: string,
    readonly kernel: string,
    private readonly log: Logger,
  ) {
    this.rateHz = config.rateHz ?? DEFAULT_PROFILE_RATE_HZ;
    this.format = config.format ?? (config.path.toLowerCase().endsWith('.json') ? 'json' : 'text');
  }

  /**
   * Checks the configuration, finds and reads the System.map, and checks
   * that the report can be written. `kernel` is the kernel's path (for
   * finding a System.map next to it), or bytes. Throws {@link ProfileError}.
   */
  static async prepare(config: ProfileConfig, kernel: string | Uint8Array, log: Logger = silentLogger): Promise<Profiler> {
    const rate = config.rateHz ?? DEFAULT_PROFILE_RATE_HZ;
    if (!Number.isFinite(rate) || rate < 1 || rate > MAX_PROFILE_RATE_HZ) {
      throw new ProfileError('bad-rate', `the profile rate must be 1 to ${MAX_PROFILE_RATE_HZ} Hz (got ${rate})`);
    }
    const kernelName = typeof kernel === 'string' ? kernel : '(kernel given as bytes)';
    let mapPath = config.systemMap;
    if (mapPath === undefined) {
      if (typeof kernel !== 'string') {
        throw new ProfileError('system-map-missing', 'profiling a kernel given as bytes needs its System.map: give profile.systemMap');
      }
      for (const candidate of systemMapCandidates(kernel)) {
        if (await isFile(candidate)) {
          mapPath = candidate;
          break;
        }
      }
      if (mapPath === undefined) {
        throw new ProfileError(
          'system-map-missing',
          `no System.map next to the kernel ${kernel} (looked for ${systemMapCandidates(kernel)
            .map((p) => basename(p))
            .join(', ')}): give the kernel's System.map as profile.systemMap`,
        );
      }
    }
    let text: string;
    try {
      text = await readFile(mapPath, 'utf8');
    } catch (err) {
      throw new ProfileError(
        'system-map-unreadable',
        `cannot read System.map ${mapPath}: ${reasonOf(err)}; give the kernel's System.map as profile.systemMap`,
        { cause: err },
      );
    }
    const symbols = SymbolTable.parseSystemMap(text);
    if (symbols.size === 0) {
      throw new ProfileError(
        'system-map-invalid',
        `${mapPath} is not a System.map: it has no "address type name" lines with text symbols; give the System.map from the kernel's build as profile.systemMap`,
      );
    }
    await checkWritable(config.path);
    log.debug({ systemMap: mapPath, functions: symbols.size, rateHz: rate }, 'profiler ready');
    return new Profiler(config, symbols, mapPath, kernelName, log);
  }

  /** Starts sampling. The vCPU threads must be running (a sample buffer belongs to a thread). */
  start(vcpus: readonly SampledVcpu[]): void {
    if (this.recorder) throw new Error('profiler already started');
    this.recorder = new ProfileRecorder(
      this.symbols,
      vcpus.map((v) => v.id),
    );
    this.samplers = vcpus.map((vcpu) => ({ vcpu, ring: vcpu.sampleRing(RING_SLOTS), read: 0 }));
    this.startedAt = performance.now();
    this.nextTickAt = this.startedAt;
    this.schedule();
  }

  /** Host milliseconds since {@link start}. */
  now(): number {
    return performance.now() - this.startedAt;
  }

  /** Records a complete console line with the time it ended. */
  consoleLine(line: string): void {
    if (!this.recorder || this.finished) return;
    // Samples taken so far belong before this line.
    this.drain();
    this.recorder.addLine(this.now(), line);
  }

  private schedule(): void {
    const period = 1000 / this.rateHz;
    // Uniform in [0.5, 1.5) periods: the mean rate is kept, and samples
    // cannot phase-lock with a periodic guest activity such as the tick.
    this.nextTickAt += period * (0.5 + Math.random());
    const now = performance.now();
    // After a stall (a busy event loop), carry on from now instead of
    // firing a burst of catch-up kicks.
    if (this.nextTickAt < now - period) this.nextTickAt = now;
    this.timer = setTimeout(() => this.tick(), Math.max(0, this.nextTickAt - now));
    this.timer.unref();
  }

  private tick(): void {
    this.timer = undefined;
    if (this.finished) return;
    this.drain();
    for (const s of this.samplers) {
      if (!s.vcpu.running) continue;
      try {
        s.vcpu.sample();
        this.recorder!.addKicks(s.vcpu.id, 1);
      } catch (err) {
        // The thread ended between the check and the kick: nothing to sample.
        this.log.debug({ err, vcpu: s.vcpu.id }, 'sample kick failed');
      }
    }
    this.schedule();
  }

  /** Moves new samples from each ring into the recorder. */
  private drain(): void {
    const recorder = this.recorder;
    if (!recorder) return;
    for (const s of this.samplers) {
      // Acquire: pairs with the vCPU thread's release store of the count.
      const written = Number(Atomics.load(s.ring, 0));
      let from = s.read;
      if (written - from > RING_SLOTS) {
        recorder.addDropped(s.vcpu.id, written - from - RING_SLOTS);
        from = written - RING_SLOTS;
      }
      if (written > from) {
        const rips: bigint[] = [];
        for (let i = from; i < written; i++) rips.push(s.ring[1 + (i % RING_SLOTS)]!);
        recorder.addSamples(s.vcpu.id, rips);
      }
      s.read = written;
    }
  }

  /** The report so far (or, after {@link finish}, the final one). */
  report(outcome?: VmOutcome): ProfileReport {
    if (this.finalReport) return this.finalReport;
    if (!this.recorder) throw new Error('profiler not started');
    this.drain();
    return this.recorder.report({
      kernel: this.kernel,
      symbolsPath: this.symbolsPath,
      rateHz: this.rateHz,
      durationMs: this.now(),
      ...(outcome ? { outcome: `${outcome.kind}: ${outcome.message}` } : {}),
    });
  }

  /**
   * Stops sampling and writes the report. Runs when the VM has ended, before
   * its wait() resolves, so it writes synchronously and never throws: a
   * failure is logged and kept in {@link error}.
   */
  finish(outcome?: VmOutcome): void {
    if (this.finished || !this.recorder) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    try {
      const report = this.report(outcome);
      this.finalReport = report;
      this.finished = true;
      writeFileSync(this.config.path, this.format === 'json' ? formatProfileJson(report) : formatProfileText(report));
      this.log.info({ path: this.config.path, samples: report.samples, dropped: report.dropped }, 'profile written');
    } catch (err) {
      this.finished = true;
      this.error = err as Error;
      this.log.error({ err, path: this.config.path }, `cannot write the profile to ${this.config.path}: ${(err as Error).message}`);
    }
  }
}
