/**
 * The guest profiler without KVM: System.map parsing and lookup, the
 * report built from made-up samples and console lines, and the sampler
 * driven through fake vCPUs that fill their ring the way the native thread
 * does.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DEFAULT_PROFILE_RATE_HZ,
  formatProfileJson,
  formatProfileText,
  ProfileError,
  Profiler,
  ProfileRecorder,
  systemMapCandidates,
  TOP_FUNCTIONS,
  type ProfileReport,
  type SampledVcpu,
} from '../../src/tools/profiler.js';
import { REAL_MODE_SYMBOL, SymbolTable, UNKNOWN_SYMBOL, USER_SYMBOL } from '../../src/tools/symbols.js';
import { fixtures } from '../../fixtures/index.js';

const MAP = `
0000000000000000 D __per_cpu_start
0000000001000000 A phys_startup_64
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000100 t early_helper
ffffffff81000200 T __memset
ffffffff81000200 W memset
ffffffff81000300 W compat_sys_ipc
ffffffff81000300 T sys_ni_syscall
ffffffff81000300 W compat_sys_kexec_load
ffffffff81000400 T default_idle
ffffffff81000500 T tick_periodic
ffffffff81000600 T _etext
ffffffff81200000 R __start_rodata
ffffffff81200040 r some_table
ffffffff81300000 D _sdata
ffffffff81400000 T _sinittext
ffffffff81400000 T start_kernel
ffffffff81400800 t do_initcalls
ffffffff81401000 T _einittext
ffffffff81500000 B _end
                 U undefined_thing
                 w weak_undefined
not a symbol line
`;

const A = (offset: number) => 0xffffffff81000000n + BigInt(offset);

describe('SymbolTable', () => {
  const table = SymbolTable.parseSystemMap(MAP);

  it('keeps only text symbols as functions', () => {
    // startup_64, early_helper, memset, sys_ni_syscall, default_idle, tick_periodic, start_kernel, do_initcalls
    expect(table.size).toBe(8);
  });

  it('finds the function a RIP is in, with its offset', () => {
    expect(table.lookup(A(0x400))).toEqual({ name: 'default_idle', offset: 0 });
    expect(table.lookup(A(0x4ab))).toEqual({ name: 'default_idle', offset: 0xab });
    expect(table.lookup(A(0x5ff))).toEqual({ name: 'tick_periodic', offset: 0xff });
    expect(table.lookup(A(0x400810))).toEqual({ name: 'do_initcalls', offset: 0x10 });
    expect(table.lookup(A(0x123))).toEqual({ name: 'early_helper', offset: 0x23 });
  });

  it('names an address with aliases the way a reader expects', () => {
    expect(table.lookup(A(0)).name).toBe('startup_64');
    expect(table.lookup(A(0x210)).name).toBe('memset');
    expect(table.lookup(A(0x300)).name).toBe('sys_ni_syscall');
  });

  it('groups user-space RIPs as [user]', () => {
    expect(table.lookup(0x401000n)).toEqual({ name: USER_SYMBOL, offset: 0 });
    expect(table.lookup(0x7fff_ffff_ffffn).name).toBe(USER_SYMBOL);
    expect(table.lookup(0x10_0000n).name).toBe(USER_SYMBOL);
  });

  it('groups the first MiB as [real mode]: a parked vCPU is not user time', () => {
    expect(table.lookup(0xfff0n)).toEqual({ name: REAL_MODE_SYMBOL, offset: 0 }); // the reset vector
    expect(table.lookup(0x9a000n).name).toBe(REAL_MODE_SYMBOL); // a trampoline
    expect(table.lookup(0n).name).toBe(REAL_MODE_SYMBOL);
  });

  it('does not stretch the last function over data, padding or the end of text', () => {
    expect(table.lookup(A(0x600)).name).toBe(UNKNOWN_SYMBOL); // _etext itself
    expect(table.lookup(A(0x1000)).name).toBe(UNKNOWN_SYMBOL); // past _etext
    expect(table.lookup(A(0x200050)).name).toBe(UNKNOWN_SYMBOL); // rodata
    expect(table.lookup(A(0x401000)).name).toBe(UNKNOWN_SYMBOL); // _einittext
    expect(table.lookup(A(0x600000)).name).toBe(UNKNOWN_SYMBOL); // past _end
    expect(table.lookup(0xffffffff80000000n).name).toBe(UNKNOWN_SYMBOL); // below the first symbol
    expect(table.lookup(0xffff_8000_0000_0000n).name).toBe(UNKNOWN_SYMBOL);
  });

  it('finds nothing in a file without symbols', () => {
    expect(SymbolTable.parseSystemMap('hello\nworld\n').size).toBe(0);
    expect(SymbolTable.parseSystemMap('').lookup(A(0)).name).toBe(UNKNOWN_SYMBOL);
  });

  let fixtureMap: string | undefined;
  try {
    fixtureMap = fixtures().systemMap;
  } catch {
    fixtureMap = undefined;
  }
  it.skipIf(fixtureMap === undefined)('reads the fixture kernel System.map', () => {
    const text = readFileSync(fixtureMap!, 'utf8');
    const real = SymbolTable.parseSystemMap(text);
    expect(real.size).toBeGreaterThan(10_000);
    // Every function's own address resolves to a function at offset 0 (an alias may win the name).
    const lines = text.split('\n').filter((l) => / [tT] [a-z]\w+$/.test(l));
    for (const l of lines.slice(0, 500)) {
      const [addr, , name] = l.split(' ');
      const hit = real.lookup(BigInt(`0x${addr}`));
      expect(hit.offset, name).toBe(0);
    }
    const idle = /^([0-9a-f]+) T default_idle$/m.exec(text);
    expect(idle).not.toBeNull();
    expect(real.lookup(BigInt(`0x${idle![1]}`) + 1n)).toEqual({ name: 'default_idle', offset: 1 });
  });
});

describe('ProfileRecorder', () => {
  const table = SymbolTable.parseSystemMap(MAP);
  const meta = { kernel: '/k/vmlinux', symbolsPath: '/k/System.map', rateHz: 99, durationMs: 10_000 };

  function repeat(rip: bigint, n: number): bigint[] {
    return Array.from({ length: n }, () => rip);
  }

  it('counts samples per function across RIPs, with percentages, hottest first', () => {
    const r = new ProfileRecorder(table, [0]);
    r.addSamples(0, [...repeat(A(0x400), 30), ...repeat(A(0x410), 30)]); // default_idle at two RIPs
    r.addSamples(0, repeat(A(0x520), 30)); // tick_periodic
    r.addSamples(0, repeat(0x401000n, 10)); // user space
    const report = r.report(meta);
    expect(report.samples).toBe(100);
    expect(report.functions).toBe(3);
    expect(report.top).toEqual([
      { name: 'default_idle', samples: 60, percent: 60 },
      { name: 'tick_periodic', samples: 30, percent: 30 },
      { name: USER_SYMBOL, samples: 10, percent: 10 },
    ]);
  });

  it('keeps vCPUs apart and adds them up overall', () => {
    const r = new ProfileRecorder(table, [0, 1]);
    r.addSamples(0, repeat(A(0x400), 9));
    r.addSamples(1, repeat(A(0x500), 3));
    r.addSamples(1, repeat(A(0x400), 1));
    r.addDropped(1, 5);
    const report = r.report(meta);
    expect(report.samples).toBe(13);
    expect(report.dropped).toBe(5);
    expect(report.vcpus.map((v) => [v.id, v.samples, v.dropped])).toEqual([
      [0, 9, 0],
      [1, 4, 5],
    ]);
    expect(report.vcpus[1]!.top[0]).toEqual({ name: 'tick_periodic', samples: 3, percent: 75 });
    expect(report.top[0]).toEqual({ name: 'default_idle', samples: 10, percent: 76.92 });
  });

  it(`lists at most ${TOP_FUNCTIONS} functions`, () => {
    const map = Array.from({ length: 40 }, (_, i) => `ffffffff81${(i * 16).toString(16).padStart(6, '0')} T fn${i}`).join('\n');
    const r = new ProfileRecorder(SymbolTable.parseSystemMap(`${map}\nffffffff81100000 D _sdata\n`), [0]);
    for (let i = 0; i < 40; i++) r.addSamples(0, repeat(A(i * 16), i + 1));
    const report = r.report(meta);
    expect(report.functions).toBe(40);
    expect(report.top).toHaveLength(TOP_FUNCTIONS);
    expect(report.top[0]!.name).toBe('fn39');
    expect(report.top.every((row, i) => i === 0 || row.samples <= report.top[i - 1]!.samples)).toBe(true);
  });

  it('keeps the console timeline and finds the longest silence with what ran in it', () => {
    const r = new ProfileRecorder(table, [0]);
    r.addSamples(0, repeat(A(0x100), 2));
    r.addLine(500, 'Linux version 6.1');
    r.addSamples(0, repeat(A(0x520), 8)); // 500 ms -> 7000 ms: the tick
    r.addSamples(0, repeat(A(0x400), 2));
    r.addLine(7000, 'io scheduler registered');
    r.addSamples(0, repeat(0x401000n, 3));
    r.addLine(8000, 'TSVMM-INIT-OK');
    const report = r.report(meta);
    expect(report.timeline).toEqual([
      { ms: 500, line: 'Linux version 6.1' },
      { ms: 7000, line: 'io scheduler registered' },
      { ms: 8000, line: 'TSVMM-INIT-OK' },
    ]);
    const longest = report.gaps[0]!;
    expect(longest).toMatchObject({ startMs: 500, endMs: 7000, durationMs: 6500, after: 'Linux version 6.1', samples: 10 });
    expect(longest.top[0]).toEqual({ name: 'tick_periodic', samples: 8, percent: 80 });
    // The gap before the first line has no line before it; the one after the last runs to the end.
    const first = report.gaps.find((g) => g.startMs === 0)!;
    expect(first.after).toBeUndefined();
    expect(first.top[0]!.name).toBe('early_helper');
    expect(report.gaps.find((g) => g.after === 'TSVMM-INIT-OK')).toMatchObject({ endMs: 10_000, samples: 0 });
    expect(report.gaps.map((g) => g.durationMs)).toEqual([6500, 2000, 1000, 500]);
  });
});

describe('report formats', () => {
  const table = SymbolTable.parseSystemMap(MAP);

  function sample(cpus: number[]): ProfileReport {
    const r = new ProfileRecorder(table, cpus);
    for (const cpu of cpus) r.addSamples(cpu, [A(0x400), A(0x400), A(0x500), 0x401000n]);
    r.addLine(12_345, 'Run /init as init process');
    r.addLine(13_000, 'TSVMM-INIT-OK');
    return r.report({ kernel: '/k/vmlinux', symbolsPath: '/k/System.map', rateHz: 99, durationMs: 14_000, outcome: 'reboot: guest rebooted' });
  }

  it('text: a header, the hottest functions and the timeline with host seconds', () => {
    const text = formatProfileText(sample([0]));
    expect(text).toMatch(/^kernel: +\/k\/vmlinux$/m);
    expect(text).toMatch(/^symbols: +\/k\/System\.map \(8 functions\)$/m);
    expect(text).toMatch(/^rate: +99 Hz/m);
    expect(text).toMatch(/^duration: +14\.000 s$/m);
    expect(text).toMatch(/^outcome: +reboot/m);
    expect(text).toMatch(/^samples: +4 \(vcpu0 4\)$/m);
    expect(text).toMatch(/^dropped: +0 /m);
    expect(text).toMatch(/^ +2 +50\.00 +default_idle$/m);
    expect(text).toMatch(/^ +1 +25\.00 +\[user\]$/m);
    expect(text).toMatch(/^\[ +12\.345s\] Run \/init as init process$/m);
    expect(text).toMatch(/^\[ +13\.000s\] TSVMM-INIT-OK$/m);
    expect(text).not.toMatch(/vCPU 0/); // one vCPU: no separate table
    // The timeline comes last and in order.
    const timeline = text.slice(text.indexOf('## Console timeline'));
    expect(text.indexOf('Hottest functions')).toBeLessThan(text.indexOf('## Console timeline'));
    expect(timeline.indexOf('Run /init')).toBeGreaterThan(0);
    expect(timeline.indexOf('Run /init')).toBeLessThan(timeline.indexOf('TSVMM-INIT-OK'));
  });

  it('text: one table per vCPU when there are several', () => {
    const text = formatProfileText(sample([0, 1]));
    expect(text).toMatch(/^samples: +8 \(vcpu0 4, vcpu1 4\)$/m);
    expect(text).toMatch(/^## Hottest functions, vCPU 0/m);
    expect(text).toMatch(/^## Hottest functions, vCPU 1/m);
  });

  it('json: the same report', () => {
    const report = sample([0, 1]);
    expect(JSON.parse(formatProfileJson(report))).toEqual(report);
  });
});

/** A vCPU whose kick stores a RIP the way the native thread does. */
class FakeVcpu implements SampledVcpu {
  running = true;
  kicks = 0;
  ring: BigUint64Array | undefined;
  constructor(
    readonly id: number,
    private readonly rips: () => bigint[],
  ) {}
  sampleRing(slots: number): BigUint64Array {
    this.ring = new BigUint64Array(slots + 1);
    return this.ring;
  }
  sample(): void {
    this.kicks++;
    const ring = this.ring!;
    const cap = ring.length - 1;
    for (const rip of this.rips()) {
      const n = Number(ring[0]);
      ring[1 + (n % cap)] = rip;
      ring[0] = BigInt(n + 1);
    }
  }
}

describe('Profiler', () => {
  let dir: string;
  let map: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'tsvmm-profiler-'));
    map = join(dir, 'System.map');
    writeFileSync(map, MAP);
  });
  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

  it('kicks each running vCPU at the rate, reads the samples and writes the report at the end', async () => {
    const out = join(dir, 'profile.txt');
    const p = await Profiler.prepare({ path: out, rateHz: 500 }, join(dir, 'vmlinux'));
    expect(p.symbolsPath).toBe(map);
    expect(p.format).toBe('text');
    const cpu0 = new FakeVcpu(0, () => [A(0x520)]);
    const cpu1 = new FakeVcpu(1, () => [0x401000n]);
    p.start([cpu0, cpu1]);
    await sleep(40);
    p.consoleLine('hello from the guest');
    cpu1.running = false;
    const kicksWhenStopped = cpu1.kicks;
    await sleep(40);
    expect(cpu1.kicks).toBe(kicksWhenStopped);
    p.finish({ kind: 'reboot', exitCode: 0, message: 'guest rebooted' });
    expect(p.error).toBeUndefined();

    expect(cpu0.kicks).toBeGreaterThan(5);
    const report = p.report();
    expect(report.vcpus.map((v) => v.samples)).toEqual([cpu0.kicks, cpu1.kicks]);
    expect(report.vcpus[0]!.top[0]!.name).toBe('tick_periodic');
    expect(report.vcpus[1]!.top[0]!.name).toBe(USER_SYMBOL);
    expect(report.timeline).toHaveLength(1);
    expect(report.timeline[0]!.ms).toBeGreaterThan(20);
    const text = readFileSync(out, 'utf8');
    expect(text).toContain('tick_periodic');
    expect(text).toMatch(/\] hello from the guest$/m);
    expect(text).toMatch(/^outcome: +reboot: guest rebooted$/m);

    // Nothing more happens after the end.
    const kicks = cpu0.kicks;
    await sleep(20);
    expect(cpu0.kicks).toBe(kicks);
  });

  it('counts samples the ring overwrote before they were read as dropped', async () => {
    const out = join(dir, 'dropped.json');
    const p = await Profiler.prepare({ path: out, systemMap: map, rateHz: 1000 }, new Uint8Array(0));
    expect(p.format).toBe('json');
    const burst = new FakeVcpu(0, () => Array.from({ length: 5000 }, () => A(0x400)));
    p.start([burst]);
    while (burst.kicks === 0) await sleep(2);
    burst.running = false;
    p.finish();
    const report = JSON.parse(readFileSync(out, 'utf8')) as ProfileReport;
    expect(report.samples + report.dropped).toBe(5000 * burst.kicks);
    expect(report.dropped).toBeGreaterThan(0);
    expect(report.top[0]!.name).toBe('default_idle');
  });

  it('finds a System.map next to the kernel', () => {
    expect(systemMapCandidates('/boot/vmlinuz-6.1.0-13-amd64')).toEqual(['/boot/System.map', '/boot/System.map-6.1.0-13-amd64']);
    expect(systemMapCandidates('/src/linux/arch/x86/boot/bzImage')).toContain('/src/linux/System.map');
  });

  it('finds System.map-<version> for /boot-style names', async () => {
    const boot = join(dir, 'boot');
    mkdirSync(boot);
    writeFileSync(join(boot, 'System.map-6.1.0-test'), MAP);
    const p = await Profiler.prepare({ path: join(dir, 'p.txt') }, join(boot, 'vmlinuz-6.1.0-test'));
    expect(p.symbolsPath).toBe(join(boot, 'System.map-6.1.0-test'));
    expect(p.rateHz).toBe(DEFAULT_PROFILE_RATE_HZ);
  });

  async function refusal(config: Parameters<typeof Profiler.prepare>[0], kernel: string | Uint8Array): Promise<ProfileError> {
    const err = await Profiler.prepare(config, kernel).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ProfileError);
    expect((err as Error).message).not.toContain('\n');
    return err as ProfileError;
  }

  it('refuses bad input with one line naming the problem and the fix', async () => {
    const out = join(dir, 'x.txt');
    let e = await refusal({ path: out, systemMap: join(dir, 'nope.map') }, join(dir, 'vmlinux'));
    expect(e.kind).toBe('system-map-unreadable');
    expect(e.message).toMatch(/cannot read System\.map .*nope\.map: no such file; give .* profile\.systemMap/);

    e = await refusal({ path: out }, join(dir, 'elsewhere', 'vmlinux'));
    expect(e.kind).toBe('system-map-missing');
    expect(e.message).toMatch(/no System\.map next to the kernel .*: give .* profile\.systemMap/);

    e = await refusal({ path: out }, new Uint8Array(4));
    expect(e.kind).toBe('system-map-missing');

    const junk = join(dir, 'junk.map');
    writeFileSync(junk, 'this is not a symbol map\n');
    e = await refusal({ path: out, systemMap: junk }, join(dir, 'vmlinux'));
    expect(e.kind).toBe('system-map-invalid');
    expect(e.message).toMatch(/junk\.map is not a System\.map/);

    e = await refusal({ path: out, systemMap: dir }, join(dir, 'vmlinux'));
    expect(e.message).toMatch(/is a directory/);

    for (const rateHz of [0, -5, 5000, Number.NaN]) {
      e = await refusal({ path: out, rateHz }, join(dir, 'vmlinux'));
      expect(e.kind).toBe('bad-rate');
      expect(e.message).toMatch(/the profile rate must be 1 to 1000 Hz/);
    }

    e = await refusal({ path: join(dir, 'no-such-dir', 'p.txt') }, join(dir, 'vmlinux'));
    expect(e.kind).toBe('output-unwritable');
    expect(e.message).toMatch(/cannot write the profile to .*p\.txt: directory .*no-such-dir does not exist; give profile.path/);

    e = await refusal({ path: dir }, join(dir, 'vmlinux'));
    expect(e.message).toMatch(/it is a directory/);
  });
});
