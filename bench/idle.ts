/**
 * What an idle guest costs the host: the fixture kernel booted to its
 * initramfs shell by the CLI (`node bin/tsvmm.js run`, the built package a
 * user runs, not this benchmark's TypeScript loader), then left alone for
 * twice `idle-seconds` while that process's CPU time (every thread, user
 * and system, from /proc/PID/stat) is measured over each half (the row's
 * figure is the second; the note gives the first, just after the boot,
 * too), with 1 and with 2 vCPUs, each
 * without halt polling and with KVM's default window. An idle guest halts
 * inside KVM_RUN, and its timer ticks are the in-kernel LAPIC's, so the VMM
 * should sleep: the figure is the share of one host core the whole VMM
 * process used. Linux counts the time a thread spends running the guest as
 * user time; guest_time says how much of it that was, so the rows also
 * give what the VMM did apart from the guest's own work, and each row
 * splits the time by thread (from /proc/PID/task/*\/stat): the main thread
 * (the event loop, the device models), the vCPU threads (tsvmm-vcpuN;
 * QEMU's "CPU N/KVM"), the rest (V8's and libuv's; QEMU's I/O threads).
 *
 * Beside it, where QEMU can run KVM guests here (not on a host whose KVM
 * emulates guest kernel code: lib/qemu.ts), `qemu-system-x86_64 -M
 * microvm` with the same kernel, initramfs and command line, idle at the
 * same prompt for as long, measured the same way.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { apiRequest } from '../src/api-client.js';
import { fixtures } from '../fixtures/index.js';
import { PROMPT, testCmdline } from '../fixtures/index.js';
import { type ProcStat, readStat, threadStats } from '../fixtures/proc.js';
import type { Benchmark, BenchContext, BenchResult, Row } from './lib/benchmark.js';
import { checkQemu, qemuArgv, qemuRow } from './lib/qemu.js';
import { round } from './lib/stats.js';

const MEMORY = '128M';

/** KVM's own halt-poll window here (the kvm module's halt_poll_ns default), for the side-by-side row. */
const KVM_DEFAULT_HALT_POLL_NS = 200_000;

type ProcTimes = Pick<ProcStat, 'userS' | 'systemS' | 'guestS'>;

/** utime, stime and guest_time of a process from /proc/PID/stat, in seconds (every thread). */
function procTimes(pid: number): ProcTimes {
  return readStat(`/proc/${pid}/stat`);
}

/** Which part of a VMM process a thread is, from its name: tsvmm's and QEMU's vCPU threads, its main thread, the rest (V8's, libuv's, QEMU's I/O threads). */
type ThreadRole = 'main' | 'vcpu' | 'other';
const VCPU_THREAD = /^(tsvmm-vcpu\d+|CPU \d+\/KVM)$/;

/** CPU time (user + system, and guest_time apart) of each thread of `pid` in seconds, by tid; threads that end while read are left out. */
function threadTimes(pid: number): Map<string, { role: ThreadRole; cpuS: number; guestS: number }> {
  const out = new Map<string, { role: ThreadRole; cpuS: number; guestS: number }>();
  for (const [tid, t] of threadStats(pid)) {
    const role: ThreadRole = tid === String(pid) ? 'main' : VCPU_THREAD.test(t.comm) ? 'vcpu' : 'other';
    out.set(tid, { role, cpuS: t.userS + t.systemS, guestS: t.guestS });
  }
  return out;
}

/** Share of a core each role used between two {@link threadTimes} readings, `wallS` apart (threads in both readings). */
function roleShares(
  before: ReturnType<typeof threadTimes>,
  after: ReturnType<typeof threadTimes>,
  wallS: number,
): Record<ThreadRole, number> & { vcpuGuest: number } {
  const shares = { main: 0, vcpu: 0, other: 0, vcpuGuest: 0 };
  for (const [tid, a] of after) {
    const b = before.get(tid);
    if (!b) continue;
    shares[a.role] += (a.cpuS - b.cpuS) / wallS;
    if (a.role === 'vcpu') shares.vcpuGuest += (a.guestS - b.guestS) / wallS;
  }
  for (const k of Object.keys(shares) as Array<keyof typeof shares>) shares[k] = round(shares[k], 5);
  return shares;
}

interface IdleTimes {
  idleS: number;
  userS: number;
  /** Of userS: running the guest (guest_time, to 10 ms). */
  guestS: number;
  systemS: number;
  coreShare: number;
  /** coreShare without the guest's own time: what the VMM process did around it. */
  vmmShare: number;
  /** coreShare by thread: the main thread (the event loop and the device models), the vCPU threads (of it, running the guest), the rest. */
  threads: Record<ThreadRole, number> & { vcpuGuest: number };
}

/** Measures process `pid` over `idleS` seconds. */
async function measure(pid: number, idleS: number): Promise<IdleTimes> {
  const t0 = performance.now();
  const p0 = procTimes(pid);
  const t0Threads = threadTimes(pid);
  await new Promise((r) => setTimeout(r, idleS * 1000));
  const p1 = procTimes(pid);
  const t1Threads = threadTimes(pid);
  const wallS = (performance.now() - t0) / 1000;
  const userS = p1.userS - p0.userS;
  const systemS = p1.systemS - p0.systemS;
  const guestS = p1.guestS - p0.guestS;
  return {
    idleS: round(wallS, 2),
    userS: round(userS, 2),
    guestS: round(guestS, 2),
    systemS: round(systemS, 2),
    coreShare: round((userS + systemS) / wallS, 5),
    vmmShare: round(Math.max(0, userS + systemS - guestS) / wallS, 5),
    threads: roleShares(t0Threads, t1Threads, wallS),
  };
}

/**
 * Spawns `argv`, waits for the shell prompt on its stdout, lets the boot
 * settle for 2 s, then measures the process over two windows of `idleS`
 * one after the other: `first`, just after the boot, where the process
 * may still be settling (in the emulated AMD-V host, on 2026-12-04, V8's
 * memory reducer ran its one collection about 20 s after the prompt, with
 * no exit at all), and `times`, the idle process after it. `during` runs
 * just before the first window and just after the second (its results are
 * returned); the process is killed at the end in any case.
 */
async function idleProcess<T>(
  argv: string[],
  idleS: number,
  timeoutS: number,
  what: string,
  during?: () => Promise<T>,
): Promise<{ first: IdleTimes; times: IdleTimes; before?: T; after?: T }> {
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
  const closed = new Promise<string>((resolve) => child.on('close', (code, signal) => resolve(signal ? `signal ${signal}` : `exit ${code}`)));
  child.on('error', () => {});
  let output = '';
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => (stderr = (stderr + c.toString('latin1')).slice(-2000)));
  const atPrompt = new Promise<void>((resolve) => {
    child.stdout.on('data', (c: Buffer) => {
      output = (output + c.toString('latin1')).slice(-256);
      if (PROMPT.test(output)) resolve();
    });
  });
  const guard = setTimeout(() => child.kill('SIGKILL'), timeoutS * 1000);
  try {
    if ((await Promise.race([atPrompt.then(() => 'prompt'), closed])) !== 'prompt') {
      throw new Error(`idle: ${what} ended before its shell prompt (${await closed}): ${(stderr.trim() || output.trim()).slice(-500)}`);
    }
    clearTimeout(guard);
    await new Promise((r) => setTimeout(r, 2000));
    const pid = child.pid!;
    const before = await during?.();
    const first = await measure(pid, idleS);
    const times = await measure(pid, idleS);
    const after = await during?.();
    return { first, times, ...(before !== undefined ? { before } : {}), ...(after !== undefined ? { after } : {}) };
  } finally {
    clearTimeout(guard);
    child.kill('SIGKILL');
    await closed;
  }
}

interface IdleRun extends IdleTimes {
  /** The window before this one, just after the boot. */
  first: IdleTimes;
  cpus: number;
  haltPollNs: number;
  exits: Record<string, number>;
}

async function tsvmmIdle(cpus: number, haltPollNs: number, idleS: number, timeoutS: number): Promise<IdleRun> {
  const fx = fixtures();
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-bench-idle-'));
  const socket = join(dir, 'api.sock');
  try {
    const argv = [
      process.execPath,
      'bin/tsvmm.js',
      'run',
      '--kernel',
      fx.bzImage,
      '--initrd',
      fx.initramfs,
      '--cmdline',
      testCmdline(),
      '--memory',
      MEMORY,
      '--cpus',
      String(cpus),
      '--halt-poll-ns',
      String(haltPollNs),
      '--api-socket',
      socket,
    ];
    const exits = async () => ((await apiRequest(socket, 'GET', '/vm/stats')).body.exits ?? {}) as Record<string, number>;
    const r = await idleProcess(argv, idleS, timeoutS, 'tsvmm', exits);
    const delta: Record<string, number> = {};
    for (const [k, v] of Object.entries(r.after ?? {})) delta[k] = v - (r.before?.[k] ?? 0);
    return { cpus, haltPollNs, ...r.times, first: r.first, exits: delta };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const pct = (share: number) => `${round(share * 100, 3)}%`;
const note = (t: IdleTimes & { first: IdleTimes }) =>
  `the ${t.first.idleS} s before, just after the boot: ${pct(t.first.coreShare)} (main ${pct(t.first.threads.main)}, vCPU ${pct(t.first.threads.vcpu)}, other ${pct(t.first.threads.other)}); ` +
  `this window: user ${t.userS} s (of it the guest's own ${t.guestS} s) + system ${t.systemS} s over ${t.idleS} s, so ${pct(t.vmmShare)} without the guest; ` +
  `by thread: main ${pct(t.threads.main)}, vCPU ${pct(t.threads.vcpu)} (in the guest ${pct(t.threads.vcpuGuest)}), other ${pct(t.threads.other)}`;

export const idle: Benchmark = {
  name: 'idle',
  description:
    "host CPU used by the CLI's process while its guest idles at the shell prompt (1 and 2 vCPUs; without halt polling beside KVM's default 200 us), and QEMU's where it can run",
  slow: true,
  options: [
    { name: 'idle-seconds', env: 'TSVMM_BENCH_IDLE_SECONDS', default: 30, description: 'how long the guest idles while measured' },
    { name: 'idle-timeout', env: 'TSVMM_BENCH_IDLE_TIMEOUT', default: 900, description: 'seconds before a boot that reaches no prompt is stopped' },
  ],
  async run(bc: BenchContext): Promise<BenchResult> {
    const idleS = bc.numberOption('idle-seconds');
    const timeoutS = bc.numberOption('idle-timeout');
    if (!(idleS > 0)) throw new Error(`--idle-seconds must be positive (got ${idleS})`);
    const runs: IdleRun[] = [];
    // No halt polling beside KVM's default window, one after the other in one run.
    for (const cpus of [1, 2]) {
      for (const haltPollNs of [0, KVM_DEFAULT_HALT_POLL_NS]) {
        bc.progress(`idle: booting with ${cpus} vCPU(s), halt poll ${haltPollNs} ns, then twice ${idleS} s idle`);
        const r = await tsvmmIdle(cpus, haltPollNs, idleS, timeoutS);
        bc.progress(
          `idle: ${cpus} vCPU(s), halt poll ${haltPollNs} ns: ${(r.first.coreShare * 100).toFixed(3)}% then ${(r.coreShare * 100).toFixed(3)}% of a core, ${Object.values(r.exits).reduce((a, b) => a + b, 0)} exits`,
        );
        runs.push(r);
      }
    }
    const rows: Row[] = runs.map((r) => ({
      label: `${r.cpus} vCPU${r.cpus > 1 ? 's' : ''} idle at the shell, ${r.haltPollNs === 0 ? 'no halt polling' : `halt poll ${r.haltPollNs / 1000} us (the default)`}: tsvmm run process CPU (the second window at the prompt)`,
      value: round(r.coreShare * 100, 3),
      unit: '% core',
      note: `${note(r)}; exits ${JSON.stringify(r.exits)}`,
    }));
    const qemu = checkQemu();
    let qemuRun: (IdleTimes & { command: string; first: IdleTimes }) | undefined;
    if (qemu.version !== null && Array.isArray(qemu.emulationGaps) && qemu.emulationGaps.length === 0) {
      bc.progress(`idle: booting QEMU -M microvm (1 vCPU), then twice ${idleS} s idle`);
      const fx = fixtures();
      // debug-threads=on names QEMU's vCPU threads "CPU N/KVM", so the split by thread finds them.
      const argv = [
        ...qemuArgv('microvm,x-option-roms=off,rtc=off', MEMORY, fx.bzImage, fx.initramfs, testCmdline('reboot=t')),
        '-name',
        'idle,debug-threads=on',
      ];
      const q = await idleProcess(argv, idleS, timeoutS, 'QEMU');
      qemuRun = { command: argv.join(' '), ...q.times, first: q.first };
      bc.progress(`idle: QEMU -M microvm: ${(qemuRun.first.coreShare * 100).toFixed(3)}% then ${(qemuRun.coreShare * 100).toFixed(3)}% of a core`);
      rows.push({
        label: 'qemu-system-x86_64 -M microvm, 1 vCPU idle at the shell: process CPU (the second window at the prompt)',
        value: round(qemuRun.coreShare * 100, 3),
        unit: '% core',
        note: `${note(qemuRun)}; ${qemu.version}`,
      });
      const ours = runs.find((r) => r.cpus === 1 && r.haltPollNs === KVM_DEFAULT_HALT_POLL_NS);
      if (ours && qemuRun.coreShare > 0) {
        rows.push({ label: 'tsvmm / QEMU -M microvm, 1 vCPU idle (both with halt polling)', value: round(ours.coreShare / qemuRun.coreShare, 2), unit: 'x' });
      }
    } else {
      rows.push(qemuRow('the same guest idle at the same prompt'));
    }
    return { rows, raw: { memory: MEMORY, runs, qemu: qemuRun ?? { skipped: qemu.skipped } } };
  },
};
