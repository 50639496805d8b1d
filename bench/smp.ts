/**
 * SMP scaling of a CPU-bound guest job: a busybox sh arithmetic loop
 * (`i=$((i+1))` with the `[` builtin: no system calls, no forks), which
 * runs in guest user mode, and guest user mode runs natively even on a
 * host whose KVM emulates guest kernel code. What it does not escape is
 * the guest kernel's timer tick and scheduler, which run emulated there.
 *
 * Two boots of the fixture guest, one after the other:
 * - 1 vCPU: one job; then two jobs at once (both on the one vCPU);
 * - 2 vCPUs: one job pinned to CPU 0; then two jobs at once, each pinned
 *   to its own vCPU with taskset.
 * Then the same commands on the host, by the same static busybox.
 * Each measurement is repeated (rounds) and the medians are compared.
 * Speed-up = 2 x (one job's time) / (two parallel jobs' time): 2.0 is
 * perfect scaling, 1.0 none.
 *
 * Two times per measurement: the loops' span (first loop's start to last
 * loop's end, read by the jobs themselves), the main figure; and the whole
 * command as the starting shell timed it, which adds starting taskset and
 * sh, a fork and exec each, guest kernel work that is emulated here and
 * takes about a second per job.
 *
 * A job that prints no report (it crashed: seen here as a busybox segfault
 * when two jobs start at once) fails its attempt; the attempt is kept in
 * raw.failures with the console output, counted in the table, and retried
 * up to three times.
 */
import os from 'node:os';
import { fixtures } from '../fixtures/index.js';
import { GuestSession, PROMPT, testCmdline } from './lib/guest.js';
import type { Benchmark, BenchContext, BenchResult, Row } from './lib/benchmark.js';
import { HOST_BUSYBOX, runTimed, runTimedOnHost, type Timed } from './lib/guest-shell.js';
import { qemuRow } from './lib/qemu.js';
import { median, round } from './lib/stats.js';

const MEMORY = '128M';

type Where = 'guest1' | 'guest2' | 'host';
type Kind = 'one' | 'two';

interface JobReport {
  cpuAsked: number;
  /** The CPU the job's helper ran on (field 39 of /proc/self/stat). */
  ranOn: number;
  /** /proc/uptime when the loop started and ended, in the job itself. */
  start: number;
  end: number;
  seconds: number;
}

interface Sample {
  where: Where;
  kind: Kind;
  round: number;
  /** The loops alone: first job's start to last job's end, from the jobs' own /proc/uptime reads. */
  span: number;
  /** The whole command, timed by the shell that started it: adds starting taskset and sh (fork + exec) and waiting for them. */
  wall: number;
  jobs: JobReport[];
  loadAverage: number[];
}

/** A measurement in which a job printed no report (it crashed); kept with its console output, and retried. */
interface Failure {
  where: Where;
  kind: Kind;
  round: number;
  attempt: number;
  reports: number;
  output: string;
}

/** Attempts per measurement before it is given up (a crashed job is retried). */
const ATTEMPTS = 3;

/** One job: the loop pinned to `cpu`, reporting its own elapsed time and where it ran. `bb` prefixes busybox applets on the host. */
function job(cpu: number, iterations: number, bb: string): string {
  const loop = `i=0; while [ $i -lt ${iterations} ]; do i=$((i+1)); done`;
  return `${bb}taskset -c ${cpu} ${bb}sh -c 'read a x < /proc/uptime; ${loop}; read b x < /proc/uptime; echo "@@JO""B ${cpu} $a $b $(${bb}cut -d" " -f39 /proc/self/stat)"'`;
}

export function commandFor(kind: Kind, cpus: readonly number[], iterations: number, bb: string): string {
  if (kind === 'one') return job(cpus[0]!, iterations, bb);
  return `${job(cpus[0]!, iterations, bb)} & ${job(cpus[1]!, iterations, bb)} & wait`;
}

function parseJobs(t: Timed): JobReport[] {
  const jobs: JobReport[] = [];
  for (const m of t.out.matchAll(/@@JOB (\d+) (\d+(?:\.\d+)?) (\d+(?:\.\d+)?) (\d+)/g)) {
    const start = Number(m[2]);
    const end = Number(m[3]);
    jobs.push({ cpuAsked: Number(m[1]), start, end, seconds: round(end - start, 2), ranOn: Number(m[4]) });
  }
  return jobs;
}

/** Runs one measurement, retrying when a job printed no report; undefined when every attempt failed. */
async function measure(where: Where, kind: Kind, r: number, exec: () => Promise<Timed>, failures: Failure[]): Promise<Sample | undefined> {
  const expected = kind === 'one' ? 1 : 2;
  for (let attempt = 0; attempt < ATTEMPTS; attempt++) {
    const t = await exec();
    const jobs = parseJobs(t);
    if (jobs.length === expected && t.status === 0) {
      const span = round(Math.max(...jobs.map((j) => j.end)) - Math.min(...jobs.map((j) => j.start)), 2);
      return { where, kind, round: r, span, wall: t.seconds, jobs, loadAverage: load() };
    }
    failures.push({ where, kind, round: r, attempt, reports: jobs.length, output: t.out.slice(-2000) });
  }
  return undefined;
}

const load = () => os.loadavg().map((x) => round(x, 2));

export const smp: Benchmark = {
  name: 'smp',
  description: 'a CPU-bound guest user-mode job on 1 vCPU, then 2 parallel jobs on 2 vCPUs: elapsed seconds and the speed-up (host alongside)',
  slow: true,
  options: [
    { name: 'smp-iterations', env: 'TSVMM_BENCH_SMP_ITERATIONS', default: 3_000_000, description: 'shell loop iterations per job' },
    { name: 'smp-rounds', env: 'TSVMM_BENCH_SMP_ROUNDS', default: 3, description: 'repeats of each measurement' },
  ],

  async run(bc: BenchContext): Promise<BenchResult> {
    const iterations = bc.numberOption('smp-iterations');
    const rounds = bc.numberOption('smp-rounds');
    for (const [name, v] of [
      ['smp-iterations', iterations],
      ['smp-rounds', rounds],
    ] as const) {
      if (!Number.isInteger(v) || v < 1) throw new Error(`--${name} must be a positive integer (got ${v})`);
    }
    const fx = fixtures();
    const cmdline = testCmdline();
    const samples: Sample[] = [];
    const failures: Failure[] = [];
    const guests: Array<{ cpus: number; online: string; nproc: number }> = [];

    for (const cpus of [1, 2] as const) {
      const where: Where = cpus === 1 ? 'guest1' : 'guest2';
      const pin = cpus === 1 ? [0, 0] : [0, 1];
      bc.progress(`smp: booting a ${cpus}-vCPU guest, this takes minutes...`);
      const guest = await GuestSession.boot({ kernel: fx.bzImage, initrd: fx.initramfs, cmdline, memory: MEMORY, cpus, name: `bench-smp${cpus}` });
      try {
        await guest.waitFor(/TSVMM-INIT-OK/);
        await guest.waitFor(PROMPT);
        const info = await runTimed(guest, 'echo "@@CP""US $(cat /sys/devices/system/cpu/online) $(nproc)"');
        const m = /@@CPUS (\S+) (\d+)/.exec(info.out);
        guests.push({ cpus, online: m?.[1] ?? '?', nproc: Number(m?.[2]) });
        if (Number(m?.[2]) !== cpus) throw new Error(`the ${cpus}-vCPU guest reports nproc ${m?.[2]}:\n${info.out}`);
        for (let r = 0; r < rounds; r++) {
          for (const kind of ['one', 'two'] as const) {
            const sample = await measure(where, kind, r, () => runTimed(guest, commandFor(kind, pin, iterations, ''), { allowFailure: true }), failures);
            if (sample) samples.push(sample);
            bc.progress(
              `smp: ${cpus} vCPU, ${kind === 'one' ? 'one job' : 'two jobs'}: ${sample ? `loops ${sample.span} s, command ${sample.wall} s (jobs ${sample.jobs.map((j) => `${j.seconds} s on cpu ${j.ranOn}`).join(', ')})` : `failed ${ATTEMPTS} times`}`,
            );
          }
        }
        const outcome = await guest.finish('reboot -f');
        if (outcome.kind !== 'reboot') throw new Error(`the guest ended with ${outcome.kind}: ${outcome.message}`);
      } finally {
        await guest.vm.stop('bench: smp benchmark ended');
      }
    }

    const hostCommands: string[] = [];
    for (let r = 0; r < rounds; r++) {
      for (const kind of ['one', 'two'] as const) {
        const sample = await measure(
          'host',
          kind,
          r,
          async () => {
            const t = runTimedOnHost(commandFor(kind, [0, 1], iterations, `${HOST_BUSYBOX} `), { allowFailure: true });
            if (r === 0) hostCommands.push(t.commandLine);
            return t;
          },
          failures,
        );
        if (sample) samples.push(sample);
      }
    }

    const of = (where: Where, kind: Kind, pick: (s: Sample) => number = (s) => s.span) => samples.filter((s) => s.where === where && s.kind === kind).map(pick);
    const med = (where: Where, kind: Kind) => round(median(of(where, kind)), 3);
    const medWall = (where: Where, kind: Kind) => round(median(of(where, kind, (s) => s.wall)), 3);
    const misplaced = samples.filter((s) => s.where !== 'guest1' && s.jobs.some((j) => j.ranOn !== j.cpuAsked)).length;
    const failed = (where: Where, kind: Kind) => failures.filter((f) => f.where === where && f.kind === kind).length;
    const note = (where: Where, kind: Kind, extra?: string) => {
      const parts = [`whole command ${medWall(where, kind)} s`];
      const l = samples.filter((s) => s.where === where && s.kind === kind).map((s) => s.loadAverage[0]!);
      if (l.length > 0) parts.push(`load ${Math.min(...l)} .. ${Math.max(...l)}`);
      if (extra) parts.push(extra);
      const f = failed(where, kind);
      if (f > 0) parts.push(`${f} attempt${f > 1 ? 's' : ''} lost a job (crashed; raw.failures), retried`);
      return parts.join('; ');
    };
    const speedup = (one: Where, two: Where, pick: (w: Where, k: Kind) => number) => round((2 * pick(one, 'one')) / pick(two, 'two'), 3);
    const rows: Row[] = [
      { label: '1-vCPU guest: one job', value: med('guest1', 'one'), unit: 's', samples: of('guest1', 'one'), note: note('guest1', 'one') },
      {
        label: '1-vCPU guest: two jobs at once on its one vCPU',
        value: med('guest1', 'two'),
        unit: 's',
        samples: of('guest1', 'two'),
        note: note('guest1', 'two'),
      },
      { label: '2-vCPU guest: one job (taskset -c 0)', value: med('guest2', 'one'), unit: 's', samples: of('guest2', 'one'), note: note('guest2', 'one') },
      {
        label: '2-vCPU guest: two jobs at once (taskset -c 0, -c 1)',
        value: med('guest2', 'two'),
        unit: 's',
        samples: of('guest2', 'two'),
        note: note('guest2', 'two', misplaced > 0 ? `${misplaced} samples had a job on the wrong CPU` : 'each job ran on its CPU'),
      },
      {
        label: 'speed-up: 2 x (1-vCPU one job) / (2-vCPU two jobs)',
        value: speedup('guest1', 'guest2', med),
        unit: 'x',
        note: `2.0 = perfect scaling, 1.0 = none; whole commands: ${speedup('guest1', 'guest2', medWall)} x`,
      },
      {
        label: 'speed-up within the 2-vCPU guest: 2 x one job / two jobs',
        value: speedup('guest2', 'guest2', med),
        unit: 'x',
        note: `whole commands: ${speedup('guest2', 'guest2', medWall)} x`,
      },
      {
        label: '1-vCPU guest: two jobs / one job',
        value: round(med('guest1', 'two') / med('guest1', 'one'), 3),
        unit: 'x',
        note: 'about 2.0: one vCPU shared',
      },
      { label: 'host: one job (taskset -c 0)', value: med('host', 'one'), unit: 's', samples: of('host', 'one'), note: note('host', 'one') },
      { label: 'host: two jobs at once (taskset -c 0, -c 1)', value: med('host', 'two'), unit: 's', samples: of('host', 'two'), note: note('host', 'two') },
      { label: 'host speed-up: 2 x one job / two jobs', value: speedup('host', 'host', med), unit: 'x', note: 'the parallelism the shared host gave' },
      {
        label: 'one job: 1-vCPU guest / host',
        value: round(med('guest1', 'one') / med('host', 'one'), 3),
        unit: 'x',
        note: '1.0 = guest user mode at native speed',
      },
      qemuRow('the same jobs on 1 and 2 vCPUs'),
    ];

    return {
      rows,
      raw: { iterations, rounds, memory: MEMORY, cmdline, kernel: fx.bzImage, guests, hostCommands, hostBusybox: HOST_BUSYBOX, samples, failures },
      commands: hostCommands,
    };
  },
};
