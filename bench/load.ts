/**
 * Leaks under load: one process runs `load-vms` Linux guests at once
 * through the library for `load-seconds`, each with a virtio-blk disk (a
 * real raw image) and the serial console busy the whole time: every guest
 * loops writing to its disk, flushing, reading back, and printing a line
 * per round (WORKLOAD). The process's RSS, V8 heap and open fds
 * are sampled once every guest is in its loop and then every
 * `load-interval` seconds; a VMM that keeps buffers, requests, timers or
 * descriptors per request shows up as growth, and a guest that stops
 * making progress (rounds no longer counted) fails the benchmark.
 *
 * Console output is counted and only its last line kept, so the
 * measurement is of tsvmm, not of a transcript growing in this process.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createVm, type VirtualMachine } from '../src/index.js';
import { fixtures } from '../fixtures/index.js';
import type { Benchmark, BenchContext, BenchResult } from './lib/benchmark.js';
import { BOOT_TIMEOUT_MS, PROMPT, testCmdline } from './lib/guest.js';
import { processUsage, type ProcessUsage } from './lib/process-usage.js';
import { round } from './lib/stats.js';

const DISK_MIB = 64;
/**
 * The guest's loop: 256 KiB written at a moving offset with O_DIRECT and a
 * flush, read back with O_DIRECT (so both reach the device, not the page
 * cache), and a line of console output. The marker is split so the typed
 * line never matches.
 */
const ROUND_KIB = 256;
const WORKLOAD =
  'i=0; while :; do o=$(( (i % 64) * 4 )); dd if=/dev/zero of=/dev/vda bs=64k count=4 seek=$o oflag=direct conv=fsync 2>/dev/null || break; ' +
  'dd if=/dev/vda of=/dev/null bs=64k count=4 skip=$o iflag=direct 2>/dev/null || break; ' +
  'echo "@@RO""UND $i: wrote and read back 256 KiB at offset $((o * 64)) KiB; load $(cat /proc/loadavg)"; i=$((i+1)); done; echo "@@LOOP ENDED"';

interface Guest {
  vm: VirtualMachine;
  /** Console bytes seen. */
  bytes: number;
  /** Rounds the guest reported (its last @@ROUND + 1). */
  rounds: number;
  tail: string;
  ended: boolean;
}

interface Sample extends ProcessUsage {
  atS: number;
  rounds: number[];
  consoleMiB: number;
}

async function bootGuest(kernel: string, initrd: string, disk: string, i: number): Promise<Guest> {
  const vm = await createVm({
    kernel,
    initrd,
    memory: '128M',
    cmdline: testCmdline('quiet tsvmm.mode=shell'),
    disks: [{ path: disk }],
    name: `bench-load-${i}`,
  });
  const g: Guest = { vm, bytes: 0, rounds: 0, tail: '', ended: false };
  vm.console.on('data', (chunk: Buffer) => {
    g.bytes += chunk.length;
    g.tail = (g.tail + chunk.toString('latin1')).slice(-4096);
    const rounds = [...g.tail.matchAll(/@@ROUND (\d+)/g)];
    if (rounds.length > 0) g.rounds = Math.max(g.rounds, Number(rounds[rounds.length - 1]![1]) + 1);
  });
  void vm.wait().then(() => {
    g.ended = true;
  });
  vm.start();
  return g;
}

async function waitUntil(what: string, g: Guest, test: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!test()) {
    if (g.ended) throw new Error(`load: ${g.vm.config.name} ended while waiting for ${what}; console:\n${g.tail.slice(-1500)}`);
    if (performance.now() > deadline) throw new Error(`load: ${g.vm.config.name}: no ${what} after ${timeoutMs / 1000} s; console:\n${g.tail.slice(-1500)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

export const load: Benchmark = {
  name: 'load',
  description: 'RSS, heap and fds of one process running several Linux guests with disk and console traffic for minutes (leak check)',
  slow: true,
  options: [
    { name: 'load-vms', env: 'TSVMM_BENCH_LOAD_VMS', default: 4, description: 'guests running at once' },
    { name: 'load-seconds', env: 'TSVMM_BENCH_LOAD_SECONDS', default: 600, description: 'how long the guests run their loop' },
    { name: 'load-interval', env: 'TSVMM_BENCH_LOAD_INTERVAL', default: 60, description: 'seconds between samples' },
  ],
  async run(bc: BenchContext): Promise<BenchResult> {
    const n = bc.numberOption('load-vms');
    const seconds = bc.numberOption('load-seconds');
    const interval = bc.numberOption('load-interval');
    if (!Number.isInteger(n) || n < 1) throw new Error(`--load-vms must be a whole number of at least 1 (got ${n})`);
    if (!(seconds > 0) || !(interval > 0)) throw new Error('--load-seconds and --load-interval must be positive');
    const fx = fixtures();
    const dir = mkdtempSync(join(tmpdir(), 'tsvmm-bench-load-'));
    const guests: Guest[] = [];
    try {
      for (let i = 0; i < n; i++) {
        const disk = join(dir, `disk${i}.img`);
        writeFileSync(disk, Buffer.alloc(DISK_MIB << 20));
        guests.push(await bootGuest(fx.bzImage, fx.initramfs, disk, i));
      }
      bc.progress(`load: ${n} guests booting`);
      for (const g of guests) await waitUntil('shell prompt', g, () => PROMPT.test(g.tail), BOOT_TIMEOUT_MS);
      for (const g of guests) g.vm.console.write(`${WORKLOAD}\n`);
      for (const g of guests) await waitUntil('first round', g, () => g.rounds > 0, 300_000);
      const t0 = performance.now();
      const take = (): Sample => ({
        atS: round((performance.now() - t0) / 1000, 1),
        ...processUsage(),
        rounds: guests.map((g) => g.rounds),
        consoleMiB: round(guests.reduce((s, g) => s + g.bytes, 0) / 2 ** 20, 2),
      });
      const samples: Sample[] = [take()];
      bc.progress(`load: every guest in its loop; running ${seconds} s`);
      while ((performance.now() - t0) / 1000 < seconds) {
        await new Promise((r) => setTimeout(r, Math.min(interval, seconds - (performance.now() - t0) / 1000) * 1000));
        const s = take();
        const prev = samples[samples.length - 1]!;
        samples.push(s);
        bc.progress(`load: ${s.atS} s, RSS ${s.rssMiB} MiB, heap ${s.heapMiB} MiB, fds ${s.fds}, rounds ${s.rounds.join('/')}`);
        const stuck = guests.filter((g, i) => g.ended || s.rounds[i] === prev.rounds[i]);
        if (stuck.length > 0) {
          throw new Error(`load: ${stuck.map((g) => g.vm.config.name).join(', ')} made no progress in ${interval} s; console:\n${stuck[0]!.tail.slice(-1500)}`);
        }
      }
      const first = samples[0]!;
      const last = samples[samples.length - 1]!;
      await Promise.all(guests.map((g) => g.vm.stop('bench: load over')));
      const after = processUsage();
      const rounds = last.rounds.reduce((a, b) => a + b, 0) - first.rounds.reduce((a, b) => a + b, 0);
      const peakRss = Math.max(...samples.map((s) => s.rssMiB));
      return {
        rows: [
          {
            label: `RSS, ${n} guests in their loop -> after ${last.atS} s`,
            value: round(last.rssMiB - first.rssMiB, 1),
            unit: 'MiB growth',
            note: `${first.rssMiB} -> ${last.rssMiB} MiB (peak ${peakRss})`,
            samples: samples.map((s) => s.rssMiB),
          },
          {
            label: `V8 heap, same interval`,
            value: round(last.heapMiB - first.heapMiB, 1),
            unit: 'MiB growth',
            note: `${first.heapMiB} -> ${last.heapMiB} MiB`,
            samples: samples.map((s) => s.heapMiB),
          },
          {
            label: `open fds, same interval`,
            value: last.fds - first.fds,
            unit: 'fds growth',
            note: `${first.fds} -> ${last.fds}; ${after.fds} after the ${n} VMs stopped`,
          },
          {
            label: `guest rounds (${ROUND_KIB} KiB written + flushed + read back, one console line)`,
            value: rounds,
            unit: 'rounds',
            note: `${round((rounds * 2 * ROUND_KIB) / 1024, 1)} MiB of disk I/O, ${round(last.consoleMiB - first.consoleMiB, 2)} MiB of console`,
          },
        ],
        raw: { vms: n, seconds, interval, samples, after },
      };
    } finally {
      await Promise.all(guests.map((g) => g.vm.stop('bench: load over').catch(() => undefined)));
      rmSync(dir, { recursive: true, force: true });
    }
  },
};
