/**
 * What an idle guest costs the host: the fixture kernel booted to its
 * initramfs shell through the library, then left alone for `idle-seconds`
 * while the process's CPU time (process.cpuUsage: every thread, user and
 * system) is measured, once with 1 vCPU (on the event loop) and once with
 * 2 (on threads). An idle guest halts inside KVM_RUN, and its timer ticks
 * are the in-kernel LAPIC's, so the VMM should sleep: the figure is the
 * share of one host core the whole VMM process used.
 */
import { createVm } from '../src/index.js';
import { fixtures } from '../fixtures/index.js';
import { PROMPT, testCmdline } from '../fixtures/index.js';
import type { Benchmark, BenchContext, BenchResult, Row } from './lib/benchmark.js';
import { round } from './lib/stats.js';

const MEMORY = '128M';

/** KVM's own halt-poll window here (the kvm module's halt_poll_ns default), for the side-by-side row. */
const KVM_DEFAULT_HALT_POLL_NS = 200_000;

interface IdleRun {
  cpus: number;
  haltPollNs: number;
  idleS: number;
  userS: number;
  systemS: number;
  coreShare: number;
  exits: Record<string, number>;
  outcome: string;
}

async function idleOnce(cpus: number, haltPollNs: number, idleS: number, timeoutS: number): Promise<IdleRun> {
  const fx = fixtures();
  const vm = await createVm({ kernel: fx.bzImage, initrd: fx.initramfs, cmdline: testCmdline(), memory: MEMORY, cpus, haltPollNs, name: `bench-idle-${cpus}` });
  let output = '';
  let prompt: () => void = () => {};
  const atPrompt = new Promise<void>((resolve) => (prompt = resolve));
  vm.console.on('data', (chunk: Buffer) => {
    output = (output + chunk.toString('latin1')).slice(-256);
    if (PROMPT.test(output)) prompt();
  });
  vm.start();
  const guard = setTimeout(() => void vm.stop(`bench: no shell prompt after ${timeoutS} s`), timeoutS * 1000);
  const ended = vm.wait().then(() => 'ended');
  if ((await Promise.race([atPrompt.then(() => 'prompt'), ended])) === 'ended') {
    throw new Error(`idle: the guest ended before its shell prompt (${(await vm.wait()).message})`);
  }
  clearTimeout(guard);
  // Let the boot's last work (deferred initcalls, the shell's start) settle.
  await new Promise((r) => setTimeout(r, 2000));
  const exitsBefore = vm.stats().exits;
  const before = process.cpuUsage();
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, idleS * 1000));
  const used = process.cpuUsage(before);
  const wallS = (performance.now() - t0) / 1000;
  const exitsAfter = vm.stats().exits;
  const exits: Record<string, number> = {};
  for (const [k, v] of Object.entries(exitsAfter)) exits[k] = v - (exitsBefore[k] ?? 0);
  const outcome = await vm.stop('bench: idle measured');
  return {
    cpus,
    haltPollNs,
    idleS: round(wallS, 2),
    userS: round(used.user / 1e6, 3),
    systemS: round(used.system / 1e6, 3),
    coreShare: round((used.user + used.system) / 1e6 / wallS, 5),
    exits,
    outcome: outcome.kind,
  };
}

export const idle: Benchmark = {
  name: 'idle',
  description: "host CPU used by a booted guest idling at its shell prompt (1 and 2 vCPUs; without halt polling beside KVM's default 200 us)",
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
        bc.progress(`idle: booting with ${cpus} vCPU(s), halt poll ${haltPollNs} ns, then ${idleS} s idle`);
        const r = await idleOnce(cpus, haltPollNs, idleS, timeoutS);
        bc.progress(
          `idle: ${cpus} vCPU(s), halt poll ${haltPollNs} ns: ${(r.coreShare * 100).toFixed(3)}% of a core, ${Object.values(r.exits).reduce((a, b) => a + b, 0)} exits`,
        );
        runs.push(r);
      }
    }
    const rows: Row[] = runs.map((r) => ({
      label: `${r.cpus} vCPU${r.cpus > 1 ? 's' : ''} idle at the shell, ${r.haltPollNs === 0 ? 'no halt polling' : `halt poll ${r.haltPollNs / 1000} us (the default)`}: VMM process CPU`,
      value: round(r.coreShare * 100, 3),
      unit: '% core',
      note: `user ${r.userS} s + system ${r.systemS} s over ${r.idleS} s; exits ${JSON.stringify(r.exits)}`,
    }));
    return { rows, raw: { memory: MEMORY, runs } };
  },
};
