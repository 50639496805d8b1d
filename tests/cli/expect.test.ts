/**
 * `tsvmm run` for scripts: --expect (with and without --expect-exit),
 * --timeout and --console-log, through the real CLI and real boots; and
 * their bad input, which never starts a guest.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { BOOT_TIMEOUT_MS, PROMPT, kvmUnavailable, describeCli, runCli, testCmdline, until } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';
import { oneLine, useTempDir } from '../helpers/assert.js';

const noKvm = kvmUnavailable();
const dir = useTempDir('tsvmm-expect-');

describe('tsvmm run --expect, --timeout, --console-log: bad input', () => {
  it('refuses a bad regular expression, a bad duration, and --expect-exit alone', async () => {
    const fx = fixtures();
    const re = await runCli(['run', '--kernel', fx.bzImage, '--expect', '(unclosed']);
    // commander's own line for an option argument it refused.
    expect(re.code).toBe(2);
    expect(re.stderr.trim()).toMatch(/^error: option '--expect <regex>' argument '\(unclosed' is invalid\. not a valid regular expression \([^\n]*\)$/);
    const d = await runCli(['run', '--kernel', fx.bzImage, '--timeout', 'soon']);
    expect(d.code).toBe(2);
    expect(d.stderr.trim()).toMatch(
      /^error: option '--timeout <duration>' argument 'soon' is invalid\. "soon" is not a duration: give a number with ms, s, m or h \(e\.g\. 90s, 5m\)$/,
    );
    const alone = await runCli(['run', '--kernel', fx.bzImage, '--expect-exit']);
    expect(alone.code).toBe(2);
    expect(oneLine(alone.stderr)).toMatch(/--expect-exit .*add --expect <regex>/);
  });

  it('refuses a console log it cannot write, before building a VM', async () => {
    const fx = fixtures();
    const r = await runCli(['run', '--kernel', fx.bzImage, '--console-log', join(dir.path, 'missing', 'log.txt')]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/cannot write the console log .*missing\/log\.txt \(ENOENT\): give --console-log a file in a writable directory/);
  });
});

describe.skipIf(noKvm !== undefined)(`tsvmm run --expect, --timeout, --console-log${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  const base = () => ['run', '--kernel', fixtures().bzImage, '--memory', '128M'];

  it(
    'exits 0 when the line appears and the guest then ends cleanly, with the whole console in --console-log',
    retryEmulatorFault(async () => {
      const log = join(dir.path, 'console.log');
      const r = await runCli([...base(), '--initrd', fixtures().initramfs, '--cmdline', testCmdline(), '--expect', 'TSVMM-INIT-(\\w+)', '--console-log', log], {
        drive: (child, out) => {
          void until(out, PROMPT).then(
            () => child.stdin.write('reboot -f\n'),
            () => child.kill('SIGKILL'),
          );
        },
      });
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout, describeCli(r)).toContain('TSVMM-INIT-OK');
      expect(readFileSync(log, 'latin1')).toBe(r.stdout);
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    'with --expect-exit, stops the VM and exits 0 as soon as the line appears',
    retryEmulatorFault(async () => {
      const r = await runCli([...base(), '--cmdline', testCmdline(), '--expect', 'Command line: .*console=ttyS0', '--expect-exit'], {
        timeoutMs: BOOT_TIMEOUT_MS,
      });
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout, describeCli(r)).toMatch(/Command line: .*console=ttyS0/);
      // Stopped early: long before the kernel looked for a root file system.
      expect(r.stdout, describeCli(r)).not.toContain('VFS:');
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    'exits 5 with the last console lines when the guest ends without the line',
    retryEmulatorFault(async () => {
      // No initramfs: the kernel panics for want of a root file system, and panic=-1 ends the VM.
      const r = await runCli([...base(), '--cmdline', testCmdline(), '--expect', 'TSVMM-INIT-OK']);
      expect(r.code, r.stderr).toBe(5);
      expect(r.stderr).toMatch(
        /tsvmm: the VM ended \(guest kernel panic.*\) before its console printed a match for \/TSVMM-INIT-OK\/ \(--expect\)\. The console's last lines:\n/,
      );
      expect(r.stderr.slice(r.stderr.indexOf('last lines:\n'))).toMatch(/\n.*Kernel panic - not syncing: VFS: Unable to mount root fs/);
    }),
    RETRY_TIMEOUT_MS,
  );

  it('stops the VM at --timeout and exits 124 with the last console lines', async () => {
    const r = await runCli([...base(), '--initrd', fixtures().initramfs, '--cmdline', testCmdline(), '--expect', 'never printed', '--timeout', '15s']);
    expect(r.code, r.stderr).toBe(124);
    expect(r.stderr).toMatch(/tsvmm: --timeout 15 s passed waiting for \/never printed\/ \(--expect\); stopped the VM\. The console's last lines:\n/);
    expect(r.stdout.length).toBeGreaterThan(0);
    const tail = r.stderr
      .slice(r.stderr.indexOf('last lines:\n') + 12)
      .trim()
      .split('\n')
      .at(-1)!;
    expect(r.stdout.replace(/\r/g, '')).toContain(tail);
  });
});
