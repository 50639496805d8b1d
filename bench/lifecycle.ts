/**
 * Leaks across VM lifetimes: one process creates, starts and stops
 * `lifecycle-vms` VMs in turn through the library, each with a virtio-blk
 * disk (a real raw image) and the serial console, and reports its RSS,
 * V8 heap and open file descriptors after the first VM and after the
 * last. A VM that leaves a thread, an fd, a mapping or a listener behind
 * shows up as growth.
 *
 * The guest is a few instructions of 64-bit code loaded as an ELF kernel
 * (it prints "ok" on COM1 and halts), so a lifetime costs milliseconds
 * rather than a Linux boot; everything the VMM builds for a VM (the KVM
 * VM and vCPU, guest RAM, devices, the disk and its lock, eventfds and
 * ioeventfds, the console) is built and torn down each time.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createVm } from '../src/index.js';
import { buildPrintAndHaltKernel } from '../src/testing/index.js';
import type { Benchmark, BenchContext, BenchResult } from './lib/benchmark.js';
import { processUsage, type ProcessUsage } from './lib/process-usage.js';
import { round } from './lib/stats.js';

interface Sample extends ProcessUsage {
  vms: number;
}

function sample(vms: number): Sample {
  return { vms, ...processUsage() };
}

/** Creates, starts and stops one VM; resolves once it printed "ok" and was stopped. */
async function oneLifetime(kernel: string, disk: string, i: number, timeoutS: number): Promise<void> {
  const vm = await createVm({ kernel, memory: '32M', cpus: 1, disks: [{ path: disk }], name: `bench-lifecycle-${i}` });
  let out = '';
  const printed = new Promise<void>((resolve) => {
    vm.console.on('data', (chunk: Buffer) => {
      out += chunk.toString('latin1');
      if (out.includes('ok')) resolve();
    });
  });
  vm.start();
  const guard = setTimeout(() => void vm.stop(`bench: no "ok" after ${timeoutS} s`), timeoutS * 1000);
  const ended = vm.wait().then((o) => o);
  const first = await Promise.race([printed.then(() => undefined), ended]);
  clearTimeout(guard);
  if (first !== undefined) throw new Error(`lifecycle: VM ${i} ended before it printed (${first.message})`);
  await vm.stop('bench: lifetime over');
}

export const lifecycle: Benchmark = {
  name: 'lifecycle',
  description: 'RSS, heap and fds of one process that creates, runs and stops VMs in turn (leak check)',
  slow: false,
  options: [
    { name: 'lifecycle-vms', env: 'TSVMM_BENCH_LIFECYCLE_VMS', default: 50, description: 'VMs created and stopped in turn' },
    { name: 'lifecycle-timeout', env: 'TSVMM_BENCH_LIFECYCLE_TIMEOUT', default: 120, description: 'seconds before a VM that prints nothing is stopped' },
  ],
  async run(bc: BenchContext): Promise<BenchResult> {
    const n = bc.numberOption('lifecycle-vms');
    const timeoutS = bc.numberOption('lifecycle-timeout');
    if (!Number.isInteger(n) || n < 2) throw new Error(`--lifecycle-vms must be an integer of at least 2 (got ${n})`);
    const dir = mkdtempSync(join(tmpdir(), 'tsvmm-bench-lifecycle-'));
    try {
      const kernel = join(dir, 'print-ok.elf');
      writeFileSync(kernel, buildPrintAndHaltKernel('ok\n'));
      const disk = join(dir, 'disk.img');
      writeFileSync(disk, Buffer.alloc(1 << 20));
      const t0 = performance.now();
      await oneLifetime(kernel, disk, 0, timeoutS);
      const first = sample(1);
      for (let i = 1; i < n; i++) {
        await oneLifetime(kernel, disk, i, timeoutS);
        if ((i + 1) % 10 === 0) bc.progress(`lifecycle: ${i + 1} of ${n} VMs`);
      }
      const last = sample(n);
      const seconds = (performance.now() - t0) / 1000;
      return {
        rows: [
          {
            label: `RSS after VM 1 -> after VM ${n}`,
            value: round(last.rssMiB - first.rssMiB, 1),
            unit: 'MiB growth',
            note: `${first.rssMiB} -> ${last.rssMiB} MiB`,
          },
          {
            label: `V8 heap after VM 1 -> after VM ${n}`,
            value: round(last.heapMiB - first.heapMiB, 1),
            unit: 'MiB growth',
            note: `${first.heapMiB} -> ${last.heapMiB} MiB`,
          },
          { label: `open fds after VM 1 -> after VM ${n}`, value: last.fds - first.fds, unit: 'fds growth', note: `${first.fds} -> ${last.fds}` },
          { label: 'time per VM lifetime (create, run, stop)', value: round((seconds * 1000) / n, 1), unit: 'ms' },
        ],
        raw: { vms: n, first, last, seconds: round(seconds, 2) },
      };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
};
