/**
 * Start-up: from `tsvmm run` being spawned to its first KVM_RUN, and where
 * the time goes. Each round spawns, side by side, `node -e 0` (what any
 * Node program pays before its first line) and `tsvmm run --log-level
 * info` on the fixture kernel and initramfs (or Debian's), once without
 * the kernel cache and once with it warm; tsvmm logs its phases
 * (stats().startup) when it starts the vCPU, and is stopped there. The
 * ratio of the medians says what tsvmm adds to Node's own start.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fixtures } from '../fixtures/index.js';
import { testCmdline } from '../fixtures/index.js';
import type { StartupTimes } from '../src/index.js';
import type { Benchmark, BenchContext, BenchResult, Row } from './lib/benchmark.js';
import { median, round } from './lib/stats.js';

const CLI = join(import.meta.dirname, '..', 'bin', 'tsvmm.js');

/** Wall time of `node -e 0`, spawn to exit. */
function bareNode(): Promise<number> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', '0'], { stdio: 'ignore' });
    child.on('error', reject);
    child.on('close', () => resolve(performance.now() - t0));
  });
}

/** Spawns tsvmm, reads its start-up line, stops it: spawn-to-start wall time and the phases it logged. */
function tsvmmStart(kernel: string, initrd: string, cache: string[]): Promise<{ wallMs: number; phases: StartupTimes }> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(
      process.execPath,
      [CLI, 'run', '--kernel', kernel, '--initrd', initrd, '--memory', '256M', '--log-level', 'info', '--cmdline', testCmdline(), ...cache],
      {
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    let err = '';
    let found: { wallMs: number; phases: StartupTimes } | undefined;
    child.stderr.on('data', (d: Buffer) => {
      if (found) return;
      err += d.toString();
      for (const line of err.split('\n')) {
        if (!line.includes('"msg":"start-up"')) continue;
        found = { wallMs: performance.now() - t0, phases: (JSON.parse(line) as { startupMs: StartupTimes }).startupMs };
        child.kill('SIGTERM');
        return;
      }
    });
    child.on('error', reject);
    child.on('close', () => (found ? resolve(found) : reject(new Error(`tsvmm exited before it started the vCPU: ${err.slice(-500)}`))));
  });
}

export const startup: Benchmark = {
  name: 'startup',
  description: 'spawn of `tsvmm run` to its first KVM_RUN, by phase, beside `node -e 0`',
  slow: false,
  options: [
    {
      name: 'startup-rounds',
      env: 'TSVMM_BENCH_STARTUP_ROUNDS',
      default: 10,
      description: 'rounds (one bare node and one tsvmm with and without the kernel cache each)',
    },
    {
      name: 'startup-kernel',
      env: 'TSVMM_BENCH_STARTUP_KERNEL',
      default: 'test',
      description: "'test' (the fixture kernel, gzip) or 'distro' (Debian's, with its initramfs)",
    },
  ],
  async run(bc: BenchContext): Promise<BenchResult> {
    const rounds = bc.numberOption('startup-rounds');
    if (!Number.isInteger(rounds) || rounds < 1) throw new Error(`--startup-rounds must be a positive integer (got ${rounds})`);
    const which = bc.option('startup-kernel');
    if (which !== 'test' && which !== 'distro') throw new Error(`--startup-kernel must be 'test' or 'distro' (got ${which})`);
    const fx = fixtures();
    const [kernel, initrd] = which === 'test' ? [fx.bzImage, fx.initramfs] : [fx.distroKernel, fx.distroInitramfs];
    // The warm runs' cache, filled by a first run that is not counted.
    const cacheDir = mkdtempSync(join(tmpdir(), 'tsvmm-bench-kcache-'));
    const warm = ['--kernel-cache', cacheDir];
    const node: number[] = [];
    const wall: number[] = [];
    const wallCold: number[] = [];
    const phases: StartupTimes[] = [];
    const phasesCold: StartupTimes[] = [];
    try {
      await tsvmmStart(kernel, initrd, warm);
      for (let i = 0; i < rounds; i++) {
        node.push(await bareNode());
        const cold = await tsvmmStart(kernel, initrd, ['--no-kernel-cache']);
        wallCold.push(cold.wallMs);
        phasesCold.push(cold.phases);
        const r = await tsvmmStart(kernel, initrd, warm);
        wall.push(r.wallMs);
        phases.push(r.phases);
        bc.progress(
          `startup: round ${i + 1} of ${rounds}: tsvmm ${r.wallMs.toFixed(0)} ms (kernel cached), ${cold.wallMs.toFixed(0)} ms (no cache), node -e 0 ${node.at(-1)!.toFixed(0)} ms`,
        );
      }
    } finally {
      rmSync(cacheDir, { recursive: true, force: true });
    }
    const ms = (xs: number[]) => round(median(xs), 1);
    const rows: Row[] = [
      { label: 'node -e 0 (spawn to exit)', value: ms(node), unit: 'ms', samples: node.map((x) => round(x, 1)) },
      { label: `tsvmm run (${which} kernel, cached): spawn to first KVM_RUN`, value: ms(wall), unit: 'ms', samples: wall.map((x) => round(x, 1)) },
      { label: 'tsvmm / node -e 0', value: round(median(wall) / median(node), 2), unit: 'x' },
      { label: `tsvmm run --no-kernel-cache: spawn to first KVM_RUN`, value: ms(wallCold), unit: 'ms', samples: wallCold.map((x) => round(x, 1)) },
      { label: '  of which the kernel load phase (no cache)', value: ms(phasesCold.map((p) => p.kernel)), unit: 'ms' },
      { label: 'cached / no cache', value: round(median(wall) / median(wallCold), 2), unit: 'x' },
    ];
    const keys: Array<[keyof StartupTimes, string]> = [
      ['processToCreate', 'process start to create() (Node, module loading, CLI)'],
      ['inputs', 'reading kernel and initrd'],
      ['probe', 'opening KVM, probing it'],
      ['vm', 'VM, irqchip, guest RAM'],
      ['devices', 'devices, ACPI tables'],
      ['kernel', 'kernel load (host decompression finishing), initrd placed'],
      ['vcpus', 'vCPUs'],
      ['toStart', 'create() to start()'],
    ];
    for (const [key, label] of keys) rows.push({ label: `  cached: ${label}`, value: ms(phases.map((p) => p[key])), unit: 'ms' });
    return { rows, raw: { rounds, kernel: which, node, wall, phases, wallCold, phasesCold } };
  },
};
