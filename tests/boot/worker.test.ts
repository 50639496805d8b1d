/**
 * The addon in worker threads. Its state is per Node environment, so:
 *
 * - a Worker creates a VM, runs it to its end and posts back what the guest
 *   printed and how the VM ended;
 * - a VM in a Worker and one on the main thread run at the same time;
 * - a Worker terminated while its VM runs takes its VM with it: the process
 *   carries on, the main thread still runs VMs, and the threads (the
 *   Worker's, its vCPU thread or loop watcher, KVM's own) and fds the VM
 *   had are gone within seconds.
 *
 * Each for both exit paths: vCPUs on threads of their own and on the
 * event loop's thread are torn down differently. The guests are a few
 * instructions (print, then halt; or print "reboot: Power down" to end):
 * what is checked is the VMM's process, not what Linux does.
 *
 * Workers load the built library (dist/, as the sandbox test's programs
 * do); the main thread the sources. Both load the same addon.
 */
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { afterAll, describe, expect, it } from 'vitest';
import { createVm, type ExitPath } from '../../src/index.js';
import { buildPrintAndHaltKernel } from '../../src/testing/index.js';
import { kvmUnavailable, REPO } from '../helpers/guest.js';

const noKvm = kvmUnavailable();
/** A hang guard, not a speed check. */
const GUARD_MS = 120_000;
/** How long a terminated worker's threads and fds may take to go. */
const SETTLE_MS = 5_000;

const EXIT_PATHS: ExitPath[] = ['thread', 'loop'];

interface WorkerJob {
  kernel: string;
  exitPath: ExitPath;
  /** Console text that says the guest is up: the worker posts `{ up }` then, and stops the VM when told 'stop'. */
  upText?: string;
}
type WorkerMessage = { up: true; state: string } | { outcome: { kind: string; message: string }; console: string };

/** The worker's program: one VM, run to its end (or until told to stop). */
const WORKER_PROGRAM = `
import { parentPort, workerData } from 'node:worker_threads';
import { createVm } from ${JSON.stringify(pathToFileURL(join(REPO, 'dist/index.js')).href)};
const { kernel, exitPath, upText } = workerData;
const vm = await createVm({ kernel, memory: '32M', exitPath });
vm.console.resume();
const ended = vm.wait();
vm.start();
if (upText !== undefined) {
  await vm.console.waitFor(upText);
  parentPort.once('message', (m) => { if (m === 'stop') void vm.stop('test over'); });
  parentPort.postMessage({ up: true, state: vm.state });
}
const outcome = await ended;
parentPort.postMessage({ outcome: { kind: outcome.kind, message: outcome.message }, console: vm.console.text() });
`;

/** The worker's next message; rejects when it fails or exits first. */
function nextMessage(w: Worker): Promise<WorkerMessage> {
  return new Promise((resolve, reject) => {
    const off = (): void => {
      w.off('message', onMessage);
      w.off('error', onError);
      w.off('exit', onExit);
    };
    const onMessage = (m: WorkerMessage): void => (off(), resolve(m));
    const onError = (e: Error): void => (off(), reject(e));
    const onExit = (code: number): void => (off(), reject(new Error(`the worker exited (code ${code}) before it answered`)));
    w.on('message', onMessage);
    w.on('error', onError);
    w.on('exit', onExit);
  });
}

function exited(w: Worker): Promise<number> {
  return new Promise((resolve) => w.once('exit', resolve));
}

const threadCount = (): number => readdirSync('/proc/self/task').length;
const fdCount = (): number => readdirSync('/proc/self/fd').length;

/** Polls `read` until it is at most `target` or SETTLE_MS have passed; returns the last value. */
async function settlesTo(read: () => number, target: number): Promise<number> {
  const end = Date.now() + SETTLE_MS;
  let v = read();
  while (v > target && Date.now() < end) {
    await new Promise((r) => setTimeout(r, 50));
    v = read();
  }
  return v;
}

describe.skipIf(noKvm !== undefined)(`VMs in worker threads${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-worker-'));
  const program = join(dir, 'worker.mjs');
  writeFileSync(program, WORKER_PROGRAM);
  const workerKernel = join(dir, 'worker-poweroff.elf');
  writeFileSync(workerKernel, buildPrintAndHaltKernel('hello from a worker\nreboot: Power down\n'));
  const mainKernel = join(dir, 'main-poweroff.elf');
  writeFileSync(mainKernel, buildPrintAndHaltKernel('hello from the main thread\nreboot: Power down\n'));
  const workerIdle = join(dir, 'worker-idle.elf');
  writeFileSync(workerIdle, buildPrintAndHaltKernel('worker guest up\n'));
  const mainIdle = join(dir, 'main-idle.elf');
  writeFileSync(mainIdle, buildPrintAndHaltKernel('main guest up\n'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const startWorker = (job: WorkerJob): Worker => new Worker(pathToFileURL(program), { workerData: job });

  /** A VM on the main thread, run to its end. */
  async function runOnMain(exitPath: ExitPath): Promise<{ kind: string; console: string }> {
    const vm = await createVm({ kernel: mainKernel, memory: '32M', exitPath });
    vm.console.resume();
    const ended = vm.wait();
    vm.start();
    const outcome = await ended;
    return { kind: outcome.kind, console: vm.console.text() };
  }

  it.each(EXIT_PATHS)(
    'a worker runs a VM (exitPath %s) to its end and reports what the guest printed',
    async (exitPath) => {
      const w = startWorker({ kernel: workerKernel, exitPath });
      const gone = exited(w);
      const m = await nextMessage(w);
      expect(m).toEqual({
        outcome: { kind: 'poweroff', message: 'guest powered off' },
        console: 'hello from a worker\nreboot: Power down\n',
      });
      // Nothing of the VM keeps the worker alive once it has ended.
      expect(await gone).toBe(0);
    },
    GUARD_MS,
  );

  it.each(EXIT_PATHS)(
    'a VM in a worker and one on the main thread (both exitPath %s) run at the same time',
    async (exitPath) => {
      const vm = await createVm({ kernel: mainIdle, memory: '32M', exitPath });
      vm.console.resume();
      const mainEnded = vm.wait();
      vm.start();
      await vm.console.waitFor('main guest up', { timeout: GUARD_MS });

      const w = startWorker({ kernel: workerIdle, exitPath, upText: 'worker guest up' });
      const gone = exited(w);
      expect(await nextMessage(w)).toEqual({ up: true, state: 'running' });
      // Both guests are up and running now, each VM in its own environment.
      expect(vm.state).toBe('running');

      const workerEnded = nextMessage(w);
      w.postMessage('stop');
      const [inWorker, onMain] = await Promise.all([workerEnded, vm.stop('test over'), mainEnded]);
      expect(inWorker).toMatchObject({ outcome: { kind: 'stopped' }, console: 'worker guest up\n' });
      expect(onMain.kind).toBe('stopped');
      expect(vm.console.text()).toBe('main guest up\n');
      expect(await gone).toBe(0);
    },
    GUARD_MS,
  );

  it.each(EXIT_PATHS)(
    'terminating a worker whose VM (exitPath %s) runs leaves the process running, without its threads and fds',
    async (exitPath) => {
      // A first worker VM, run to its end, so that what the process starts
      // once for workers and VMs (and keeps) is there before the counts.
      const warm = startWorker({ kernel: workerKernel, exitPath });
      const warmGone = exited(warm);
      expect(await nextMessage(warm)).toMatchObject({ outcome: { kind: 'poweroff' } });
      expect(await warmGone).toBe(0);
      const threads = threadCount();
      const fds = fdCount();

      const w = startWorker({ kernel: workerIdle, exitPath, upText: 'worker guest up' });
      expect(await nextMessage(w)).toEqual({ up: true, state: 'running' });
      // The worker, and its vCPU thread or loop watcher, and KVM's, are here.
      expect(threadCount()).toBeGreaterThan(threads);
      expect(fdCount()).toBeGreaterThan(fds);

      // Its guest idles in HLT: on a vCPU thread inside KVM_RUN, on the
      // loop inside a burst.
      expect(await w.terminate()).toBe(1);
      expect(await settlesTo(threadCount, threads)).toBeLessThanOrEqual(threads);
      expect(await settlesTo(fdCount, fds)).toBeLessThanOrEqual(fds);

      // The main thread goes on running VMs.
      expect(await runOnMain(exitPath)).toEqual({ kind: 'poweroff', console: 'hello from the main thread\nreboot: Power down\n' });
    },
    GUARD_MS,
  );
});
