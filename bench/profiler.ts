/**
 * What the guest boot profiler costs: time from vm.start() to /init
 * (TSVMM-INIT-OK) with and without `profile: { path, rateHz }` in the
 * VmConfig (src/tools/profiler.ts), booted through the library as bench/boot.ts
 * does. The fixture bzImage (host-decompressed) with its System.map given
 * explicitly; /init runs `reboot -f` (tsvmm.mode=reboot).
 *
 * Cases: 'off', and one per rate in --profiler-rates. They run interleaved
 * (off, 99, off, 99, ... with the order rotated every run), one boot at a
 * time. The profiler's own cost is one exit per sample per vCPU (about
 * 30 to 50 us here), so at 99 Hz it is well under 1%: far below the noise
 * of single boots on a shared host. The profile JSON's counts (samples,
 * kicks, dropped) are kept so the cost can also be estimated from them.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { createVm } from '../src/index.js';
import type { ProfileReport } from '../src/tools/profiler.js';
import { fixtures } from '../fixtures/index.js';
import { testCmdline } from './lib/guest.js';
import type { Benchmark, BenchContext, BenchResult, Row } from './lib/benchmark.js';
import { timeBoot } from './lib/boot-timer.js';
import { median, round, secondsSince } from './lib/stats.js';

const MEMORY = '128M';

/** 0 = profiler off. */
type Rate = number;

interface BootRun {
  rateHz: Rate;
  run: number;
  createS: number;
  initS: number | null;
  endS: number;
  outcome: string;
  outcomeMessage: string;
  exits: Record<string, number>;
  profile?:
    | { samples: number; dropped: number; kicks: number; durationMs: number; functions: number; top: Array<{ name: string; percent: number }> }
    | { error: string };
  loadAverageBefore: number[];
  loadAverageAfter: number[];
}

async function bootOnce(rateHz: Rate, run: number, dir: string, cmdline: string, timeoutS: number): Promise<BootRun> {
  const fx = fixtures();
  const path = join(dir, `profile-${rateHz}-${run}.json`);
  const loadAverageBefore = os.loadavg().map((x) => round(x, 2));
  const t0 = process.hrtime.bigint();
  const vm = await createVm({
    kernel: fx.bzImage,
    initrd: fx.initramfs,
    cmdline,
    memory: MEMORY,
    name: `bench-profiler-${rateHz}`,
    ...(rateHz > 0 ? { profile: { path, rateHz, systemMap: fx.systemMap, format: 'json' as const } } : {}),
  });
  const createS = secondsSince(t0);
  const timed = await timeBoot(vm, timeoutS);

  let profile: BootRun['profile'];
  if (rateHz > 0) {
    try {
      if (!existsSync(path)) throw new Error(`no profile written at ${path}`);
      const report = JSON.parse(readFileSync(path, 'utf8')) as ProfileReport;
      profile = {
        samples: report.samples,
        dropped: report.dropped,
        kicks: report.vcpus.reduce((n, v) => n + v.kicks, 0),
        durationMs: report.durationMs,
        functions: report.functions,
        top: report.top.slice(0, 5).map((f) => ({ name: f.name, percent: f.percent })),
      };
    } catch (err) {
      profile = { error: (err as Error).message };
    }
  }
  return {
    rateHz,
    run,
    createS: round(createS, 3),
    initS: timed.initS,
    endS: timed.endS,
    outcome: timed.outcome.kind,
    outcomeMessage: timed.outcome.message,
    exits: vm.stats().exits,
    ...(profile ? { profile } : {}),
    loadAverageBefore,
    loadAverageAfter: os.loadavg().map((x) => round(x, 2)),
  };
}

function parseRates(value: string): number[] {
  const rates = value
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.length > 0)
    .map(Number);
  if (rates.length === 0 || rates.some((r) => !Number.isInteger(r) || r < 1 || r > 1000)) {
    throw new Error(`--profiler-rates: give sampling rates in Hz, 1 to 1000, comma-separated (got "${value}")`);
  }
  return rates;
}

export const profilerOverhead: Benchmark = {
  name: 'profiler',
  description: 'boot time to /init with and without the guest profiler (VmConfig.profile), as a ratio',
  slow: true,
  options: [
    {
      name: 'profiler-rates',
      env: 'TSVMM_BENCH_PROFILER_RATES',
      default: '99',
      description: 'sampling rates to compare with no profiler, Hz, comma-separated',
    },
    { name: 'profiler-runs', env: 'TSVMM_BENCH_PROFILER_RUNS', default: 1, description: 'boots of each case (interleaved)' },
    { name: 'profiler-timeout', env: 'TSVMM_BENCH_PROFILER_TIMEOUT', default: 900, description: 'seconds before a boot is stopped as hung' },
  ],

  async run(bc: BenchContext): Promise<BenchResult> {
    const rates = parseRates(bc.option('profiler-rates'));
    const runs = bc.numberOption('profiler-runs');
    const timeoutS = bc.numberOption('profiler-timeout');
    if (!Number.isInteger(runs) || runs < 1) throw new Error(`--profiler-runs must be a positive integer (got ${runs})`);
    const cases: Rate[] = [0, ...rates];
    const cmdline = testCmdline('tsvmm.mode=reboot');
    const dir = mkdtempSync(join(bc.outDir, 'profiler-'));
    const results: BootRun[] = [];
    try {
      for (let r = 0; r < runs; r++) {
        // Rotate the order each run so that neither case always goes first.
        const order = cases.map((_, i) => cases[(i + r) % cases.length]!);
        for (const rate of order) {
          const what = rate === 0 ? 'no profiler' : `profiler at ${rate} Hz`;
          bc.progress(`profiler: boot with ${what} (run ${r + 1}/${runs}), this takes minutes...`);
          const b = await bootOnce(rate, r, dir, cmdline, timeoutS);
          results.push(b);
          bc.progress(`profiler: ${what}: /init ${b.initS === null ? 'not reached' : `${b.initS.toFixed(1)} s`}, end ${b.endS.toFixed(1)} s (${b.outcome})`);
        }
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }

    const ok = (b: BootRun) => b.initS !== null && b.outcome === 'reboot';
    const label = (rate: Rate) => (rate === 0 ? 'no profiler' : `profile at ${rate} Hz`);
    const inits = (rate: Rate) => results.filter((b) => b.rateHz === rate && ok(b)).map((b) => b.initS!);
    const med = (rate: Rate) => round(median(inits(rate)), 3);
    const rows: Row[] = [];
    for (const rate of cases) {
      const all = results.filter((b) => b.rateHz === rate);
      const bad = all.filter((b) => !ok(b));
      const loads = all.map((b) => `${b.loadAverageBefore[0]}->${b.loadAverageAfter[0]}`).join(', ');
      const prof = all
        .map((b) => b.profile)
        .filter(
          (p): p is { samples: number; dropped: number; kicks: number; durationMs: number; functions: number; top: Array<{ name: string; percent: number }> } =>
            p !== undefined && !('error' in p),
        );
      const profErr = all.map((b) => b.profile).find((p): p is { error: string } => p !== undefined && 'error' in p);
      const profNote =
        rate === 0 ? '' : profErr ? `; profile: ${profErr.error}` : prof.length > 0 ? `; ${prof[0]!.samples} samples, ${prof[0]!.dropped} dropped` : '';
      rows.push({
        label: `${label(rate)}: start -> /init`,
        value: med(rate),
        unit: 's',
        samples: inits(rate),
        note:
          bad.length > 0 ? `${bad.length} failed: ${bad.map((b) => `${b.outcome} (${b.outcomeMessage})`).join('; ')}` : `host load (1 min) ${loads}${profNote}`,
      });
    }
    for (const rate of rates) {
      rows.push({
        label: `${label(rate)} / no profiler, start -> /init`,
        value: round(med(rate) / med(0), 4),
        unit: 'x',
        note: 'ratio of medians; single boots on a shared host vary by tens of %',
      });
    }

    return { rows, raw: { cmdline, memory: MEMORY, kernel: fixtures().bzImage, systemMap: fixtures().systemMap, rates, runs, boots: results } };
  },
};
