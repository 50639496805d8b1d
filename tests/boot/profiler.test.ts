/**
 * The guest profiler on a real boot: `tsvmm run --profile` samples the
 * fixture kernel from start to `reboot -f` and writes a report naming
 * kernel functions from its System.map, with the console timeline. Also
 * the CLI's refusals, which need no KVM: they happen before the guest runs.
 */
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { ProfileReport } from '../../src/tools/profiler.js';
import { fixtures } from '../../fixtures/index.js';
import { kvmUnavailable, describeCli, runCli, testCmdline } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';
import { oneLine, useTempDir } from '../helpers/assert.js';

const dir = useTempDir('tsvmm-profile-');

describe('tsvmm run --profile: bad input', () => {
  it('refuses an unreadable System.map before the guest runs', async () => {
    const kernel = join(dir.path, 'vmlinux-dummy');
    writeFileSync(kernel, 'not run');
    const r = await runCli(['run', '--kernel', kernel, '--profile', join(dir.path, 'p.txt'), '--system-map', join(dir.path, 'missing.map')], {
      timeoutMs: 60_000,
    });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(
      /cannot read System\.map .*missing\.map: no such file; give the kernel's System\.map as profile\.systemMap \(--system-map <path>\)/,
    );
    expect(r.stdout, describeCli(r)).toBe('');
    expect(existsSync(join(dir.path, 'p.txt'))).toBe(false);
  });

  it('refuses a kernel with no System.map next to it', async () => {
    const kernel = join(dir.path, 'bzImage');
    writeFileSync(kernel, 'not run');
    const r = await runCli(['run', '--kernel', kernel, '--profile', join(dir.path, 'p.txt')], { timeoutMs: 60_000 });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(
      /no System\.map next to the kernel .*bzImage .*: give the kernel's System\.map as profile\.systemMap \(--system-map <path>\)/,
    );
  });

  it('refuses a rate out of range, and profile options without --profile', async () => {
    const kernel = join(dir.path, 'vmlinux-dummy');
    writeFileSync(kernel, 'not run');
    let r = await runCli(['run', '--kernel', kernel, '--profile', join(dir.path, 'p.txt'), '--profile-rate', '5000'], { timeoutMs: 60_000 });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/the profile rate must be 1 to 1000 Hz \(got 5000\) \(--profile-rate <hz>\)/);

    r = await runCli(['run', '--kernel', kernel, '--system-map', join(dir.path, 'System.map')], { timeoutMs: 60_000 });
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/only apply to a profile: add --profile <file>/);
  });
});

const noKvm = kvmUnavailable();

describe.skipIf(noKvm !== undefined)(`profiling a Linux boot${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it(
    'samples the boot and names kernel functions from System.map, with the console timeline',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const out = join(dir.path, 'boot-profile.json');
      // No --system-map: the fixture's System.map sits next to its vmlinux.
      const r = await runCli([
        'run',
        '--kernel',
        fx.vmlinux,
        '--initrd',
        fx.initramfs,
        '--memory',
        '128M',
        '--cmdline',
        testCmdline('tsvmm.mode=reboot'),
        '--profile',
        out,
      ]);
      expect(r.stdout, describeCli(r)).toContain('TSVMM-INIT-OK');
      expect(r.code).toBe(0);
      expect(r.stderr).toBe('');

      const report = JSON.parse(readFileSync(out, 'utf8')) as ProfileReport;
      expect(report.kernel).toBe(fx.vmlinux);
      expect(report.symbols.path).toBe(fx.systemMap);
      expect(report.outcome).toMatch(/^reboot/);
      expect(report.vcpus).toHaveLength(1);
      // A boot here takes a minute; even a fast host gives some samples.
      expect(report.samples).toBeGreaterThan(20);
      expect(report.vcpus[0]!.samples).toBe(report.samples);
      expect(report.vcpus[0]!.kicks).toBeGreaterThanOrEqual(report.samples);

      // What the report names are kernel functions from System.map.
      const textSymbols = new Set(
        readFileSync(fx.systemMap, 'utf8')
          .split('\n')
          .filter((l) => / [tTwW] /.test(l))
          .map((l) => l.split(' ')[2]),
      );
      // Groups such as [user] and [real mode] are in brackets.
      const kernelFns = report.top.map((row) => row.name).filter((name) => !name.startsWith('['));
      for (const name of kernelFns) expect(textSymbols.has(name), name).toBe(true);
      expect(kernelFns.length).toBeGreaterThanOrEqual(10);
      expect(report.functions).toBeGreaterThanOrEqual(20);

      // The timeline has the guest's console in order, with host times inside the run.
      const lines = report.timeline.map((l) => l.line);
      expect(lines.some((l) => l.includes('Linux version'))).toBe(true);
      const initOk = report.timeline.find((l) => l.line.includes('TSVMM-INIT-OK'));
      expect(initOk).toBeDefined();
      expect(initOk!.ms).toBeGreaterThan(0);
      expect(initOk!.ms).toBeLessThanOrEqual(report.durationMs);
      for (let i = 1; i < report.timeline.length; i++) expect(report.timeline[i]!.ms).toBeGreaterThanOrEqual(report.timeline[i - 1]!.ms);
      expect(report.gaps.length).toBeGreaterThan(0);
    }),
    RETRY_TIMEOUT_MS,
  );
});
