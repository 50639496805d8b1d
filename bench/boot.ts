/**
 * Boot time to the test initramfs's /init, through the library as a user
 * would boot: createVm, console 'data' events, vm.wait().
 *
 * Three ways in to the same fixture kernel (fixtures/index.ts):
 * - host: the gzip bzImage, decompressed by tsvmm on the host (bootMode 'host');
 * - classic: the same bzImage run through the kernel's own decompressor (bootMode 'guest');
 * - elf: the uncompressed vmlinux, entered at its PVH entry point;
 * - hvc: as host, with the virtio console (hvc0) instead of the UART.
 *
 * For each, four times: createVm (reading the files, and for 'host' the
 * decompression), vm.start() to the first console output (after the
 * decompressor, on the classic path), vm.start() to the console line
 * TSVMM-INIT-OK, and vm.start() to the end of the VM (/init runs
 * `reboot -f` with tsvmm.mode=reboot). Boots take minutes on a host that emulates guest
 * kernel code, so one run of each by default; runs are interleaved when
 * there are several.
 */
import os from 'node:os';
import { createVm, type BootMode } from '../src/index.js';
import { fixtures } from '../fixtures/index.js';
import { testCmdline } from '../fixtures/index.js';
import type { Benchmark, BenchContext, BenchResult, Row } from './lib/benchmark.js';
import { timeBoot } from './lib/boot-timer.js';
import { median, round, secondsSince } from './lib/stats.js';

const MEMORY = '128M';

type BootCase = 'host' | 'classic' | 'elf' | 'hvc' | 'irqline';
const CASES: readonly BootCase[] = ['host', 'classic', 'elf', 'hvc', 'irqline'];

const LABELS: Record<BootCase, string> = {
  host: 'bzImage, host-decompressed',
  classic: 'bzImage, classic (in-guest decompressor)',
  elf: 'ELF vmlinux (PVH entry)',
  hvc: 'bzImage, host-decompressed, virtio console',
  irqline: 'bzImage, host-decompressed, UART and PIT on KVM_IRQ_LINE (legacyIrqfd: false)',
};

interface BootRun {
  case: BootCase;
  run: number;
  bootKind: string;
  kernel: string;
  /** The command line the guest got (the bench's plus what tsvmm appends). */
  cmdline: string;
  /** createVm(): read inputs, build the machine, load (and for 'host' decompress) the kernel. */
  createS: number;
  /** vm.start() to the first byte on the console. */
  firstOutputS: number | null;
  /** vm.start() to the line TSVMM-INIT-OK. */
  initS: number | null;
  /** vm.start() to vm.wait() resolving. */
  endS: number;
  outcome: string;
  outcomeMessage: string;
  exits: Record<string, number>;
  irqsInjected: number;
  /** Writes replayed from the coalesced ring, and port reads the addon answered (neither reached TypeScript as an exit). */
  coalescedWrites: number;
  fastReads: number;
  emulationFallback: Record<string, number>;
  loadAverageBefore: number[];
  loadAverageAfter: number[];
  consoleTail: string;
}

function kernelFor(c: BootCase): { kernel: string; bootMode: BootMode; console?: 'virtio'; legacyIrqfd?: false } {
  const fx = fixtures();
  switch (c) {
    case 'host':
      return { kernel: fx.bzImage, bootMode: 'host' };
    case 'hvc':
      return { kernel: fx.bzImage, bootMode: 'host', console: 'virtio' };
    case 'irqline':
      return { kernel: fx.bzImage, bootMode: 'host', legacyIrqfd: false };
    case 'classic':
      return { kernel: fx.bzImage, bootMode: 'guest' };
    case 'elf':
      return { kernel: fx.vmlinux, bootMode: 'auto' };
  }
}

async function bootOnce(c: BootCase, run: number, cmdline: string, timeoutS: number): Promise<BootRun> {
  const { kernel, bootMode, console, legacyIrqfd } = kernelFor(c);
  const loadAverageBefore = os.loadavg().map((x) => round(x, 2));
  const t0 = process.hrtime.bigint();
  const vm = await createVm({
    kernel,
    initrd: fixtures().initramfs,
    cmdline: console === 'virtio' ? cmdline.replace('console=ttyS0', 'console=hvc0') : cmdline,
    memory: MEMORY,
    bootMode,
    name: `bench-${c}`,
    ...(console ? { console } : {}),
    ...(legacyIrqfd === false ? { legacyIrqfd } : {}),
  });
  const createS = secondsSince(t0);

  const timed = await timeBoot(vm, timeoutS);
  const stats = vm.stats();
  return {
    case: c,
    run,
    bootKind: vm.boot.kind,
    kernel,
    cmdline: vm.cmdline,
    createS: round(createS, 3),
    firstOutputS: timed.firstOutputS,
    initS: timed.initS,
    endS: timed.endS,
    outcome: timed.outcome.kind,
    outcomeMessage: timed.outcome.message,
    exits: stats.exits,
    irqsInjected: stats.irqsInjected,
    coalescedWrites: stats.coalescedWrites,
    fastReads: stats.fastReads,
    emulationFallback: stats.emulationFallback,
    loadAverageBefore,
    loadAverageAfter: os.loadavg().map((x) => round(x, 2)),
    consoleTail: timed.output.slice(-1500),
  };
}

function parseCases(value: string): BootCase[] {
  const names = value
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  for (const n of names) {
    if (!CASES.includes(n as BootCase)) throw new Error(`--boot-cases: unknown case "${n}" (known: ${CASES.join(', ')})`);
  }
  if (names.length === 0) throw new Error('--boot-cases: give at least one case');
  return names as BootCase[];
}

export const boot: Benchmark = {
  name: 'boot',
  description:
    'seconds from vm.start() to /init (TSVMM-INIT-OK) and to the end of the VM: host-decompressed bzImage vs classic bzImage vs ELF vmlinux, serial vs virtio console',
  slow: true,
  options: [
    { name: 'boot-runs', env: 'TSVMM_BENCH_BOOT_RUNS', default: 1, description: 'boots of each case (interleaved)' },
    { name: 'boot-cases', env: 'TSVMM_BENCH_BOOT_CASES', default: CASES.join(','), description: `which boots, comma-separated (${CASES.join(', ')})` },
    { name: 'boot-timeout', env: 'TSVMM_BENCH_BOOT_TIMEOUT', default: 900, description: 'seconds before a boot is stopped as hung' },
  ],

  async run(bc: BenchContext): Promise<BenchResult> {
    const runs = bc.numberOption('boot-runs');
    const timeoutS = bc.numberOption('boot-timeout');
    if (!Number.isInteger(runs) || runs < 1) throw new Error(`--boot-runs must be a positive integer (got ${runs})`);
    const cases = parseCases(bc.option('boot-cases'));
    const cmdline = testCmdline('tsvmm.mode=reboot');
    const fx = fixtures();

    const results: BootRun[] = [];
    for (let r = 0; r < runs; r++) {
      for (const c of cases) {
        bc.progress(`boot ${c} (run ${r + 1}/${runs}): booting, this takes minutes...`);
        const b = await bootOnce(c, r, cmdline, timeoutS);
        results.push(b);
        bc.progress(
          `boot ${c}: create ${b.createS.toFixed(1)} s, /init ${b.initS === null ? 'not reached' : `${b.initS.toFixed(1)} s`}, end ${b.endS.toFixed(1)} s (${b.outcome}, ${b.bootKind})`,
        );
      }
    }

    const ok = (b: BootRun) => b.initS !== null && b.outcome === 'reboot';
    const of = (c: BootCase) => results.filter((b) => b.case === c);
    const med = (c: BootCase, pick: (b: BootRun) => number | null): number => {
      const xs = of(c)
        .filter(ok)
        .map(pick)
        .filter((x): x is number => x !== null);
      return xs.length === 0 ? Number.NaN : round(median(xs), 3);
    };
    const samples = (c: BootCase, pick: (b: BootRun) => number | null): number[] =>
      of(c)
        .filter(ok)
        .map(pick)
        .filter((x): x is number => x !== null);
    const failures = (c: BootCase): string | undefined => {
      const bad = of(c).filter((b) => !ok(b));
      return bad.length === 0 ? undefined : `${bad.length} failed: ${bad.map((b) => `${b.outcome} (${b.outcomeMessage})`).join('; ')}`;
    };

    const rows: Row[] = [];
    for (const c of cases) {
      const kind = of(c)[0]?.bootKind ?? '?';
      rows.push({ label: `${LABELS[c]}: createVm`, value: med(c, (b) => b.createS), unit: 's', samples: samples(c, (b) => b.createS), note: kind });
      rows.push({ label: `${LABELS[c]}: start -> first output`, value: med(c, (b) => b.firstOutputS), unit: 's', samples: samples(c, (b) => b.firstOutputS) });
      const loads = of(c)
        .map((b) => `${b.loadAverageBefore[0]}->${b.loadAverageAfter[0]}`)
        .join(', ');
      rows.push({
        label: `${LABELS[c]}: start -> /init`,
        value: med(c, (b) => b.initS),
        unit: 's',
        samples: samples(c, (b) => b.initS),
        note: failures(c) ?? `host load (1 min) ${loads}`,
      });
      rows.push({ label: `${LABELS[c]}: start -> VM end`, value: med(c, (b) => b.endS), unit: 's', samples: samples(c, (b) => b.endS) });
      rows.push({ label: `${LABELS[c]}: IRQs injected`, value: med(c, (b) => b.irqsInjected), unit: 'irqs', samples: samples(c, (b) => b.irqsInjected) });
    }
    const ratio = (a: BootCase, b: BootCase, label: string) => {
      if (!cases.includes(a) || !cases.includes(b)) return;
      const init = (x: BootCase) => med(x, (r) => r.initS);
      const total = (x: BootCase) => med(x, (r) => r.createS + (r.initS ?? Number.NaN));
      rows.push({
        label: `${label}, start -> /init`,
        value: round(init(a) / init(b), 3),
        unit: 'x',
        note: `createVm + start -> /init: ${(total(a) / total(b)).toFixed(2)} x`,
      });
    };
    ratio('classic', 'host', 'classic / host');
    ratio('elf', 'host', 'elf / host');
    ratio('hvc', 'host', 'virtio console / serial console');
    ratio('host', 'irqline', 'legacy IRQs through irqfd / KVM_IRQ_LINE');

    return {
      rows,
      raw: { cmdline, memory: MEMORY, kernelRelease: fx.kernelRelease, initramfs: fx.initramfs, runs: results },
    };
  },
};
