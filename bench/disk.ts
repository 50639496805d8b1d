/**
 * virtio-blk as a guest program sees it: busybox dd against a raw disk
 * (/dev/vda, no file system) in the fixture guest, and the very same
 * commands, run by the same static busybox, on the host against an image
 * file of the same size, side by side.
 *
 * Steps, in the guest and then on the host (each on a fresh sparse image
 * made with `truncate`):
 * 1. sequential write: dd if=/dev/zero bs=1M count=N conv=fsync,notrunc;
 * 2. sequential read after dropping caches (guest: sync + drop_caches; the
 *    host's caches are left alone, they are shared with everyone), bs=1M;
 * 3. the same read with iflag=direct (O_DIRECT, bypassing the page cache);
 * 4. 4 KiB O_DIRECT reads, one dd process, sequential offsets: one request
 *    in flight at a time (QD1), no fork per read;
 * 5. 4 KiB O_DIRECT reads at random offsets, one dd process per read from
 *    a shell loop (busybox has no fio): includes a fork and exec per read;
 * 6. the same loop reading /dev/zero: the fork + exec + shell cost alone,
 *    to subtract from 5.
 * Each step is timed by the shell running it (/proc/uptime before and after,
 * see lib/guest-shell.ts); the host steps are timed around the process.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { fixtures } from '../fixtures/index.js';
import { GuestSession, PROMPT, testCmdline } from './lib/guest.js';
import type { Benchmark, BenchContext, BenchResult, Row } from './lib/benchmark.js';
import { HOST_BUSYBOX, runTimed, runTimedOnHost, shellQuote, type ShellGuest } from './lib/guest-shell.js';
import { qemuRow } from './lib/qemu.js';
import { round } from './lib/stats.js';

const MEMORY = '128M';
const MIB = 1024 * 1024;

type Step = 'write' | 'read' | 'readDirect' | 'seq4k' | 'rand4k' | 'forkOnly';

interface StepResult {
  step: Step;
  command: string;
  /** Seconds, timed in the shell (guest) or around the process (host). */
  seconds: number;
  /** For the host: the same step timed with /proc/uptime in the shell, as in the guest. */
  uptimeSeconds?: number;
  /** Host-side wall time around typing the command and seeing its end (guest only): includes the console round trip. */
  hostSideS?: number;
  loadAverage: number[];
  /** virtio-blk counters consumed by this step (guest only). */
  blk?: Record<string, number>;
  out: string;
}

function commands(dev: string, mib: number, seq4k: number, randomReads: number): Record<Step, string> {
  const blocks = mib * 256; // 4 KiB blocks in the region written
  const loop = (body: string) => `n=0; f=0; while [ $n -lt ${randomReads} ]; do ${body} 2>/dev/null || f=$((f+1)); n=$((n+1)); done; echo "@@FA""IL $f"`;
  const skip = `skip=$(( (RANDOM * 32768 + RANDOM) % ${blocks} ))`;
  return {
    write: `dd if=/dev/zero of=${dev} bs=1M count=${mib} conv=fsync,notrunc 2>&1`,
    read: `dd if=${dev} of=/dev/null bs=1M count=${mib} 2>&1`,
    readDirect: `dd if=${dev} of=/dev/null bs=1M count=${mib} iflag=direct 2>&1`,
    seq4k: `dd if=${dev} of=/dev/null bs=4k count=${seq4k} iflag=direct 2>&1`,
    rand4k: loop(`dd if=${dev} of=/dev/null bs=4k count=1 ${skip} iflag=direct`),
    forkOnly: loop(`dd if=/dev/zero of=/dev/null bs=4k count=1 ${skip}`),
  };
}

function failures(out: string): number {
  const m = /@@FAIL (\d+)/.exec(out);
  return m ? Number(m[1]) : Number.NaN;
}

function blkCounters(guest: GuestSession): Record<string, number> {
  const devices = guest.vm.stats().devices as Record<string, Record<string, unknown>>;
  const blk = devices.blk0 ?? {};
  return Object.fromEntries(Object.entries(blk).filter((e): e is [string, number] => typeof e[1] === 'number'));
}

function diff(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.entries(after).map(([k, v]) => [k, v - (before[k] ?? 0)]));
}

/** Four significant digits: guest figures here are fractions of a MB/s. */
const sig4 = (x: number) => Number(x.toPrecision(4));

const load = () => os.loadavg().map((x) => round(x, 2));

export const disk: Benchmark = {
  name: 'disk',
  description:
    'virtio-blk from inside the guest with busybox dd on a raw disk: sequential write/read MB/s, 4 KiB read IOPS; the same dd on the host against an image file',
  slow: true,
  options: [
    { name: 'disk-image-mib', env: 'TSVMM_BENCH_DISK_IMAGE_MIB', default: 256, description: 'size of the raw disk image' },
    { name: 'disk-mib', env: 'TSVMM_BENCH_DISK_MIB', default: 16, description: 'MiB written and read sequentially, from the start of the disk' },
    { name: 'disk-seq4k', env: 'TSVMM_BENCH_DISK_SEQ4K', default: 1024, description: '4 KiB O_DIRECT reads by one dd (QD1)' },
    { name: 'disk-random', env: 'TSVMM_BENCH_DISK_RANDOM', default: 100, description: '4 KiB random reads (within the MiB written), one dd process each' },
  ],

  async run(bc: BenchContext): Promise<BenchResult> {
    const imageMib = bc.numberOption('disk-image-mib');
    const mib = bc.numberOption('disk-mib');
    const seq4k = Math.min(bc.numberOption('disk-seq4k'), mib * 256);
    const randomReads = bc.numberOption('disk-random');
    for (const [name, v] of [
      ['disk-image-mib', imageMib],
      ['disk-mib', mib],
      ['disk-seq4k', seq4k],
      ['disk-random', randomReads],
    ] as const) {
      if (!Number.isInteger(v) || v < 1) throw new Error(`--${name} must be a positive integer (got ${v})`);
    }
    if (mib > imageMib) throw new Error(`--disk-mib ${mib} is more than the image, --disk-image-mib ${imageMib}`);
    const fx = fixtures();
    const dir = mkdtempSync(join(bc.outDir, 'disk-'));
    const ran: string[] = [];
    const guestImage = join(dir, 'guest.img');
    const hostImage = join(dir, 'host.img');
    try {
      for (const img of [guestImage, hostImage]) {
        execFileSync('truncate', ['-s', `${imageMib}M`, img]);
        ran.push(shellQuote(['truncate', '-s', `${imageMib}M`, img]));
      }

      // The guest.
      const cmdline = testCmdline();
      bc.progress(`disk: booting the guest with a ${imageMib} MiB raw disk, this takes minutes...`);
      const guest = await GuestSession.boot({
        kernel: fx.bzImage,
        initrd: fx.initramfs,
        cmdline,
        memory: MEMORY,
        disks: [{ path: guestImage }],
        name: 'bench-disk',
      });
      const guestSteps: StepResult[] = [];
      let facts: { sectors: number; dropCaches: boolean; scheduler: string };
      try {
        await guest.waitFor(/TSVMM-INIT-OK/);
        await guest.waitFor(PROMPT);
        const info = await runTimed(
          guest,
          'echo "@@SE""CTORS $(cat /sys/block/vda/size)"; [ -w /proc/sys/vm/drop_caches ] && echo "@@DR""OP"; echo "@@SC""HED $(cat /sys/block/vda/queue/scheduler)"',
        );
        facts = {
          sectors: Number(/@@SECTORS (\d+)/.exec(info.out)?.[1]),
          dropCaches: /@@DROP/.test(info.out),
          scheduler: /@@SCHED (.*)/.exec(info.out)?.[1]?.trim() ?? '',
        };
        if (facts.sectors !== imageMib * 2048)
          throw new Error(`the guest sees /dev/vda with ${facts.sectors} sectors, expected ${imageMib * 2048}:\n${info.out}`);
        const cmds = commands('/dev/vda', mib, seq4k, randomReads);
        const sh: ShellGuest = guest;
        for (const step of Object.keys(cmds) as Step[]) {
          if (step === 'read' || step === 'readDirect') {
            await runTimed(guest, facts.dropCaches ? 'sync; echo 3 > /proc/sys/vm/drop_caches' : 'sync');
          }
          bc.progress(`disk: guest ${step}...`);
          const before = blkCounters(guest);
          const t0 = process.hrtime.bigint();
          const t = await runTimed(sh, cmds[step]);
          const hostSideS = Number(process.hrtime.bigint() - t0) / 1e9;
          guestSteps.push({
            step,
            command: cmds[step],
            seconds: t.seconds,
            hostSideS: round(hostSideS, 3),
            loadAverage: load(),
            blk: diff(blkCounters(guest), before),
            out: t.out.trim(),
          });
          bc.progress(`disk: guest ${step}: ${t.seconds} s`);
        }
        const outcome = await guest.finish('reboot -f');
        if (outcome.kind !== 'reboot') throw new Error(`the guest ended with ${outcome.kind}: ${outcome.message}`);
      } finally {
        await guest.vm.stop('bench: disk benchmark ended');
      }

      // The host: the same commands, same busybox, against a file of the same size.
      const hostSteps: StepResult[] = [];
      const hostCmds = commands(hostImage, mib, seq4k, randomReads);
      for (const step of Object.keys(hostCmds) as Step[]) {
        if (step === 'read' || step === 'readDirect') execFileSync('sync');
        bc.progress(`disk: host ${step}...`);
        const t = runTimedOnHost(hostCmds[step]);
        ran.push(t.commandLine);
        hostSteps.push({ step, command: hostCmds[step], seconds: round(t.wallS, 4), uptimeSeconds: t.seconds, loadAverage: load(), out: t.out.trim() });
      }

      // Rows: guest, host, ratio for each measure.
      const g = (s: Step) => guestSteps.find((x) => x.step === s)!;
      const h = (s: Step) => hostSteps.find((x) => x.step === s)!;
      const bytes = mib * MIB;
      const mbps = (r: StepResult) => sig4(bytes / 1e6 / r.seconds);
      const perSec = (n: number) => (r: StepResult) => sig4(n / r.seconds);
      // Random reads with the fork-only loop's time taken out: what one read costs on its own.
      const netIops = (rand: StepResult, fork: StepResult) => (rand.seconds > fork.seconds ? sig4(randomReads / (rand.seconds - fork.seconds)) : Number.NaN);
      for (const s of ['rand4k', 'forkOnly'] as const) {
        for (const r of [g(s), h(s)]) {
          const f = failures(r.out);
          if (f !== 0) throw new Error(`disk: ${s}: ${Number.isNaN(f) ? 'no failure count' : `${f} of ${randomReads} dd runs failed`}:\n${r.out}`);
        }
      }

      const rows: Row[] = [];
      const triple = (label: string, unit: string, gv: number, hv: number, gNote?: string, hNote?: string) => {
        rows.push({ label: `${label}: guest`, value: gv, unit, ...(gNote ? { note: gNote } : {}) });
        rows.push({ label: `${label}: host`, value: hv, unit, ...(hNote ? { note: hNote } : {}) });
        // Guest / host is a tiny fraction where guest kernel code is emulated: print how many times the host is faster.
        rows.push({ label: `${label}: host / guest`, value: round(hv / gv, 2), unit: 'x', note: `guest / host ${(gv / hv).toPrecision(3)}` });
      };
      const reqNote = (r: StepResult) => {
        const b = r.blk ?? {};
        const n = (b.reads ?? 0) + (b.writes ?? 0);
        const moved = (b.bytesRead ?? 0) + (b.bytesWritten ?? 0);
        return n > 0
          ? `${r.seconds} s; ${n} virtio requests, ${round(moved / n / 1024, 1)} KiB each${b.flushes ? `, ${b.flushes} flushes` : ''}`
          : `${r.seconds} s`;
      };
      triple(`sequential write, ${mib} MiB, bs=1M, conv=fsync`, 'MB/s', mbps(g('write')), mbps(h('write')), reqNote(g('write')), `${h('write').seconds} s`);
      triple(
        `sequential read, ${mib} MiB, bs=1M`,
        'MB/s',
        mbps(g('read')),
        mbps(h('read')),
        `${facts.dropCaches ? 'guest caches dropped' : 'no drop_caches in this guest'}; ${reqNote(g('read'))}`,
        `${h('read').seconds} s; from the host page cache (not dropped)`,
      );
      triple(
        `sequential read, ${mib} MiB, bs=1M, iflag=direct`,
        'MB/s',
        mbps(g('readDirect')),
        mbps(h('readDirect')),
        reqNote(g('readDirect')),
        `${h('readDirect').seconds} s; O_DIRECT: bypasses the host page cache`,
      );
      triple(
        `4 KiB reads, iflag=direct, one dd, QD1 (${seq4k})`,
        'IOPS',
        perSec(seq4k)(g('seq4k')),
        perSec(seq4k)(h('seq4k')),
        reqNote(g('seq4k')),
        `${h('seq4k').seconds} s`,
      );
      triple(
        `4 KiB random reads, iflag=direct, one dd per read (${randomReads}, fork+exec included)`,
        'IOPS',
        perSec(randomReads)(g('rand4k')),
        perSec(randomReads)(h('rand4k')),
        reqNote(g('rand4k')),
        `${h('rand4k').seconds} s`,
      );
      triple(
        `the same loop on /dev/zero (fork+exec+shell only, ${randomReads})`,
        'runs/s',
        perSec(randomReads)(g('forkOnly')),
        perSec(randomReads)(h('forkOnly')),
        `${g('forkOnly').seconds} s`,
        `${h('forkOnly').seconds} s`,
      );
      triple(
        '4 KiB random reads, fork-only loop time subtracted',
        'IOPS',
        netIops(g('rand4k'), g('forkOnly')),
        netIops(h('rand4k'), h('forkOnly')),
        'randoms / (random loop s - /dev/zero loop s): noisy, a difference of two loops',
        'O_DIRECT: bypasses the host page cache',
      );
      rows.push(qemuRow('the same dd commands'));

      return {
        rows,
        raw: {
          imageMib,
          mib,
          seq4k,
          randomReads,
          memory: MEMORY,
          cmdline,
          kernel: fx.bzImage,
          guestFacts: facts,
          hostBusybox: HOST_BUSYBOX,
          guest: guestSteps,
          host: hostSteps,
        },
        commands: ran,
      };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
};
