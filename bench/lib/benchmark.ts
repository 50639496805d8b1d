/**
 * The shape every benchmark module has, and what the runner gives it.
 *
 * A benchmark is a name, a description, the options it reads, and a
 * `run()` that returns rows for the table plus raw numbers for the JSON
 * file. To add one (disk MB/s, IOPS, TCP throughput, SMP scaling, profiler
 * overhead...), write `bench/<name>.ts` exporting a {@link Benchmark} and
 * list it in `BENCHMARKS` in bench/run.ts.
 */

/** A command-line option a benchmark reads: `--<name> VALUE`, or the environment variable `env`. */
export interface OptionSpec {
  name: string;
  env?: string;
  description: string;
  default: number | string;
}

/** One line of the results table. */
export interface Row {
  /** What was measured, e.g. "tsvmm (vCPU thread -> main thread)". */
  label: string;
  /** The reported value: a median when there are several samples. */
  value: number;
  /** "us/exit", "s", "x" (a ratio), "MB/s"... */
  unit: string;
  /** Every sample behind `value`, in run order. */
  samples?: number[];
  note?: string;
}

export interface BenchResult {
  rows: Row[];
  /** Raw numbers for the JSON file; anything JSON-serialisable. */
  raw: unknown;
  /** Commands the benchmark ran outside this process (compilers, helpers), as typed in a shell. */
  commands?: string[];
}

export interface BenchContext {
  /** The value of an option this benchmark declared (command line, then environment, then default). */
  option(name: string): string;
  numberOption(name: string): number;
  /** Where benchmarks may put build products and scratch files (bench/out/, gitignored). */
  outDir: string;
  /** Progress on stderr; stdout is kept for the table. */
  progress(message: string): void;
}

export interface Benchmark {
  /** Selects the benchmark on the command line: `npm run bench -- <name>`. */
  name: string;
  description: string;
  /** Takes minutes: skipped by `--quick`. */
  slow: boolean;
  options: OptionSpec[];
  run(ctx: BenchContext): Promise<BenchResult>;
}
