/**
 * `npm run fuzz -- [--target queue|blk|net|pci|all] [--cases N] [--seed S]`:
 * the long fuzz run. Default: all targets, 1,000,000 queue cases and 20,000
 * each of blk, net and pci (the virtio-pci transport), from seed 1. Prints each target's count, time,
 * slowest case and heap before and after; exits 1 with the failing seed.
 */
import { parseArgs } from 'node:util';
import { FUZZ_TARGETS, fuzzImage, runFuzz, type FuzzTarget } from './harness.js';

const DEFAULT_CASES: Record<FuzzTarget, number> = { queue: 1_000_000, blk: 20_000, net: 20_000, pci: 20_000 };

function heapMiB(): string {
  (globalThis as { gc?: () => void }).gc?.();
  return (process.memoryUsage().heapUsed / (1 << 20)).toFixed(1);
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: 'all' },
      cases: { type: 'string' },
      seed: { type: 'string', default: '1' },
    },
  });
  const targets = values.target === 'all' ? FUZZ_TARGETS : [values.target as FuzzTarget];
  for (const t of targets) {
    if (!FUZZ_TARGETS.includes(t)) {
      process.stderr.write(`fuzz: unknown target '${t}': use one of ${FUZZ_TARGETS.join(', ')} or all\n`);
      return 2;
    }
  }
  const seed = Number(values.seed);
  const cases = values.cases === undefined ? undefined : Number(values.cases);
  if (!Number.isSafeInteger(seed) || seed < 0 || (cases !== undefined && (!Number.isSafeInteger(cases) || cases < 1))) {
    process.stderr.write('fuzz: --seed must be a non-negative integer and --cases a positive one\n');
    return 2;
  }
  const image = fuzzImage();
  try {
    for (const target of targets) {
      const n = cases ?? DEFAULT_CASES[target];
      const before = heapMiB();
      const r = await runFuzz(target, n, seed, image.path);
      process.stdout.write(
        `fuzz ${target}: ${r.cases} cases from seed ${r.firstSeed} in ${(r.ms / 1000).toFixed(1)} s, 0 failures; ` +
          `slowest seed ${r.slowestSeed} (${r.slowestMs.toFixed(1)} ms); heap ${before} -> ${heapMiB()} MiB; ` +
          `reached ${r.coverage.reached}, used ${r.coverage.used}, broken rings ${r.coverage.broken}\n`,
      );
    }
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`);
    return 1;
  } finally {
    image.remove();
  }
  return 0;
}

process.exitCode = await main();
