/**
 * tsvmm benchmarks: `npm run bench [-- OPTIONS] [NAMES...]`.
 *
 * Runs the selected benchmarks one after another, prints a table per
 * benchmark on stdout (progress goes to stderr), and writes every raw
 * number with the host's facts to bench/out/results-<timestamp>.json.
 * See bench/README.md.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Benchmark, BenchContext, BenchResult, OptionSpec } from './lib/benchmark.js';
import { hostFacts } from './lib/host.js';
import { round, secondsSince } from './lib/stats.js';
import { renderTable } from './lib/table.js';

/** Every benchmark module, in the order they run. Add new modules here. */
const MODULES: ReadonlyArray<{ name: string; file: string; load: () => Promise<Benchmark> }> = [
  { name: 'exit-loop', file: 'bench/exit-loop.ts', load: async () => (await import('./exit-loop.js')).exitLoop },
  { name: 'boot', file: 'bench/boot.ts', load: async () => (await import('./boot.js')).boot },
  { name: 'boot-vs-qemu', file: 'bench/boot-vs-qemu.ts', load: async () => (await import('./boot-vs-qemu.js')).bootVsQemu },
  { name: 'disk', file: 'bench/disk.ts', load: async () => (await import('./disk.js')).disk },
  { name: 'net', file: 'bench/net.ts', load: async () => (await import('./net.js')).netThroughput },
  { name: 'smp', file: 'bench/smp.ts', load: async () => (await import('./smp.js')).smp },
  { name: 'profiler', file: 'bench/profiler.ts', load: async () => (await import('./profiler.js')).profilerOverhead },
  { name: 'idle', file: 'bench/idle.ts', load: async () => (await import('./idle.js')).idle },
  { name: 'lifecycle', file: 'bench/lifecycle.ts', load: async () => (await import('./lifecycle.js')).lifecycle },
  { name: 'startup', file: 'bench/startup.ts', load: async () => (await import('./startup.js')).startup },
  { name: 'load', file: 'bench/load.ts', load: async () => (await import('./load.js')).load },
];

/** Modules that failed to load: each takes only itself down (and is reported), not the whole runner. */
const BROKEN: Array<{ name: string; file: string; error: string }> = [];

async function loadBenchmarks(): Promise<Benchmark[]> {
  const loaded: Benchmark[] = [];
  for (const m of MODULES) {
    try {
      loaded.push(await m.load());
    } catch (err) {
      BROKEN.push({ name: m.name, file: m.file, error: err instanceof Error ? (err.message.split('\n')[0] ?? err.message) : String(err) });
    }
  }
  return loaded;
}

const BENCHMARKS: readonly Benchmark[] = await loadBenchmarks();

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..');
const OUT_DIR = join(REPO, 'bench', 'out');

class UsageError extends Error {}

interface Args {
  names: string[];
  quick: boolean;
  list: boolean;
  help: boolean;
  values: Map<string, string>;
}

function allOptions(): OptionSpec[] {
  return BENCHMARKS.flatMap((b) => b.options);
}

function parseArgs(argv: readonly string[]): Args {
  const known = new Map(allOptions().map((o) => [o.name, o]));
  const args: Args = { names: [], quick: false, list: false, help: false, values: new Map() };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--quick') args.quick = true;
    else if (a === '--list') args.list = true;
    else if (a === '--help' || a === '-h') args.help = true;
    else if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = a.slice(2, eq >= 0 ? eq : undefined);
      if (name === 'only') {
        const v = eq >= 0 ? a.slice(eq + 1) : argv[++i];
        if (v === undefined) throw new UsageError('--only needs a value');
        args.names.push(...v.split(',').filter((s) => s.length > 0));
        continue;
      }
      if (!known.has(name)) throw new UsageError(`unknown option ${a}`);
      const v = eq >= 0 ? a.slice(eq + 1) : argv[++i];
      if (v === undefined) throw new UsageError(`${a} needs a value`);
      args.values.set(name, v);
    } else {
      args.names.push(a);
    }
  }
  return args;
}

function usage(): string {
  const optionWidth = Math.max(22, ...allOptions().map((o) => o.name.length + 8));
  const lines = [
    'usage: npm run bench -- [--quick] [--list] [NAME...] [--only NAME,...] [OPTIONS]',
    '',
    '  NAME      run only these benchmarks (default: all)',
    '  --quick   skip the slow benchmarks (boots): only the exit loop',
    '  --list    list the benchmarks and exit',
    '',
    'benchmarks:',
    ...BENCHMARKS.map((b) => `  ${b.name.padEnd(10)} ${b.slow ? '(slow) ' : ''}${b.description}`),
    '',
    'options (command line, else environment variable, else default):',
    ...allOptions().map((o) => `${`  --${o.name} V`.padEnd(optionWidth)}${o.description} [${o.env ? `$${o.env}, ` : ''}default ${o.default}]`),
  ];
  return lines.join('\n');
}

function select(args: Args): Benchmark[] {
  for (const n of args.names) {
    const broken = BROKEN.find((b) => b.name === n);
    if (broken) throw new UsageError(`benchmark "${n}" cannot be loaded (${broken.file}): ${broken.error}`);
    if (!BENCHMARKS.some((b) => b.name === n)) throw new UsageError(`unknown benchmark "${n}" (known: ${BENCHMARKS.map((b) => b.name).join(', ')})`);
  }
  let chosen = args.names.length > 0 ? BENCHMARKS.filter((b) => args.names.includes(b.name)) : [...BENCHMARKS];
  if (args.quick) {
    const skipped = chosen.filter((b) => b.slow).map((b) => b.name);
    if (skipped.length > 0) process.stderr.write(`--quick: skipping ${skipped.join(', ')}\n`);
    chosen = chosen.filter((b) => !b.slow);
  }
  return chosen;
}

/** The value of each option: command line, then environment, then default. */
function resolveOptions(bench: Benchmark, args: Args): Record<string, string> {
  const out: Record<string, string> = {};
  for (const o of bench.options) {
    const env = o.env !== undefined ? process.env[o.env] : undefined;
    out[o.name] = args.values.get(o.name) ?? (env !== undefined && env !== '' ? env : String(o.default));
  }
  return out;
}

function context(bench: Benchmark, values: Record<string, string>): BenchContext {
  const option = (name: string): string => {
    const v = values[name];
    if (v === undefined) throw new Error(`${bench.name} reads option "${name}" without declaring it`);
    return v;
  };
  return {
    option,
    numberOption(name) {
      const v = Number(option(name));
      if (!Number.isFinite(v)) throw new UsageError(`--${name} must be a number (got "${option(name)}")`);
      return v;
    },
    outDir: OUT_DIR,
    progress: (message) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${message}\n`),
  };
}

/** How this run was started, as one would type it again. */
function invocation(argv: readonly string[]): string {
  const quoted = argv.map((a) => (/^[\w./=,:-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
  if (process.env.npm_lifecycle_event === 'bench') return `npm run bench${argv.length > 0 ? ` -- ${quoted}` : ''}`;
  return `npx tsx bench/run.ts${argv.length > 0 ? ` ${quoted}` : ''}`;
}

interface BenchRecord {
  name: string;
  description: string;
  options: Record<string, string>;
  startedAt: string;
  durationS: number;
  rows?: BenchResult['rows'];
  commands?: string[];
  raw?: unknown;
  error?: string;
}

async function main(): Promise<number> {
  const argv = process.argv.slice(2);
  let args: Args;
  let chosen: Benchmark[];
  try {
    args = parseArgs(argv);
    chosen = select(args);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`bench: ${err.message}\n\n${usage()}\n`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(`${usage()}\n`);
    return 0;
  }
  if (args.list) {
    for (const b of BENCHMARKS) process.stdout.write(`${b.name}\t${b.slow ? 'slow' : 'quick'}\t${b.description}\n`);
    for (const b of BROKEN) process.stdout.write(`${b.name}\tbroken\tcannot be loaded (${b.file}): ${b.error}\n`);
    return BROKEN.length > 0 ? 1 : 0;
  }
  // Running everything: a module that cannot be loaded is a failure of this run, reported, not skipped silently.
  const unloadable = args.names.length === 0 ? BROKEN : [];
  for (const b of unloadable) process.stderr.write(`bench: ${b.name} cannot be loaded (${b.file}): ${b.error}\n`);
  if (chosen.length === 0) {
    process.stderr.write('bench: nothing selected\n');
    return 2;
  }

  mkdirSync(OUT_DIR, { recursive: true });
  const startedAt = new Date();
  const command = invocation(argv);
  const host = hostFacts(REPO);
  process.stdout.write(
    `tsvmm benchmarks, ${startedAt.toISOString()}\n` +
      `host: Linux ${host.kernelRelease}, ${host.cpuModel}, ${host.cpus} CPUs, load ${host.loadAverage.join(' ')}\n` +
      `KVM emulation fallback: ${host.emulationFallback ? `on (gaps: ${(host.emulationGaps as string[]).join(', ')})` : Array.isArray(host.emulationGaps) ? 'off' : `unknown (${host.emulationGaps.error})`}\n` +
      `command: ${command}\n`,
  );

  const records: BenchRecord[] = [];
  let failed = false;
  for (const b of unloadable) {
    failed = true;
    records.push({ name: b.name, description: `cannot be loaded (${b.file})`, options: {}, startedAt: startedAt.toISOString(), durationS: 0, error: b.error });
    process.stdout.write(`\n${b.name}: FAILED to load ${b.file}: ${b.error}\n`);
  }
  for (const bench of chosen) {
    const values = resolveOptions(bench, args);
    const t0 = process.hrtime.bigint();
    const record: BenchRecord = { name: bench.name, description: bench.description, options: values, startedAt: new Date().toISOString(), durationS: 0 };
    try {
      const result = await bench.run(context(bench, values));
      record.rows = result.rows;
      record.commands = result.commands ?? [];
      record.raw = result.raw;
      const opts = Object.entries(values)
        .map(([k, v]) => `${k}=${v}`)
        .join(' ');
      process.stdout.write(`\n${renderTable(`${bench.name} (${opts})`, result.rows)}\n`);
    } catch (err) {
      failed = true;
      record.error = err instanceof Error ? (err.stack ?? err.message) : String(err);
      process.stdout.write(`\n${bench.name}: FAILED: ${err instanceof Error ? err.message : String(err)}\n`);
    }
    record.durationS = round(secondsSince(t0), 1);
    records.push(record);
  }

  const finishedAt = new Date();
  const file = join(OUT_DIR, `results-${startedAt.toISOString().replace(/[:.]/g, '-')}.json`);
  const json = {
    startedAt: startedAt.toISOString(),
    finishedAt: finishedAt.toISOString(),
    command,
    argv: process.argv,
    host,
    loadAverageAtEnd: os.loadavg().map((x) => round(x, 2)),
    benchmarks: records,
  };
  writeFileSync(file, `${JSON.stringify(json, null, 2)}\n`);
  process.stdout.write(`\nraw results: ${relative(process.cwd(), file)}\n`);
  return failed ? 1 : 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  },
);
