/**
 * Bad input through the real CLI: each gets one line on stderr that names
 * the problem and the fix, a non-zero exit, and no guest runs.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { kvmUnavailable, describeCli, runCli } from '../helpers/guest.js';
import { oneLine, useTempDir } from '../helpers/assert.js';

const dir = useTempDir('tsvmm-cli-');

describe('tsvmm --version', () => {
  it("prints the package's version and exits 0", async () => {
    const { version } = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    const r = await runCli(['--version']);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe(version);
  });
});

describe('tsvmm run: bad input', () => {
  it('refuses a missing kernel', async () => {
    const r = await runCli(['run', '--kernel', join(dir.path, 'nope')]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/cannot read kernel .*nope: no such file; give the path of a readable bzImage or vmlinux \(--kernel <path>\)/);
    expect(r.stdout, describeCli(r)).toBe('');
  });

  it('refuses an unreadable kernel', async () => {
    const r = await runCli(['run', '--kernel', dir.path]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/cannot read kernel .*: is a directory/);
  });

  it('refuses a file that is not a kernel', async () => {
    const junk = join(dir.path, 'junk');
    writeFileSync(junk, Buffer.alloc(64 * 1024, 0x42));
    const r = await runCli(['run', '--kernel', junk, '--emulation-fallback', 'off']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/neither a bzImage .* nor an ELF vmlinux: pass/);
  });

  it('refuses too little memory for the kernel and initrd', async () => {
    const fx = fixtures();
    const r = await runCli(['run', '--kernel', fx.bzImage, '--initrd', fx.initramfs, '--memory', '24M']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/MiB of guest RAM .*--memory/);
  });

  it('refuses a memory size below the minimum', async () => {
    const fx = fixtures();
    const r = await runCli(['run', '--kernel', fx.bzImage, '--memory', '8M']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/too small: give at least 16 MiB .* \(--memory <size>\)/);
  });

  it('refuses a missing initrd', async () => {
    const fx = fixtures();
    const r = await runCli(['run', '--kernel', fx.bzImage, '--initrd', join(dir.path, 'missing.cpio')]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/cannot read initrd .*missing\.cpio: no such file/);
  });

  it.skipIf(kvmUnavailable() !== undefined)('refuses a hand-off polling limit that is not a number of microseconds', async () => {
    const fx = fixtures();
    const r = await runCli(['run', '--kernel', fx.bzImage, '--initrd', fx.initramfs], { env: { TSVMM_HANDOFF_SPIN_US: '50ms' } });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/TSVMM_HANDOFF_SPIN_US must be a whole number of microseconds from 0 to 1000 .*not '50ms'/);
    expect(r.stdout, describeCli(r)).toBe('');
  });

  it('says what to do when there is no KVM device', async () => {
    const fx = fixtures();
    const r = await runCli(['run', '--kernel', fx.bzImage, '--kvm-device', join(dir.path, 'kvm')]);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/not found: this host has no KVM; enable VT-x\/AMD-V/);
  });

  it('says what to do without permission on /dev/kvm', async () => {
    // As an unprivileged user (root would bypass the permission check).
    const fx = fixtures();
    const kernel = join(dir.path, 'bzImage');
    copyFileSync(fx.bzImage, kernel);
    chmodSync(dir.path, 0o755);
    chmodSync(kernel, 0o644);
    const fakeKvm = join(dir.path, 'kvm-no-access');
    writeFileSync(fakeKvm, '');
    chmodSync(fakeKvm, 0o600);
    let setpriv: string[] = [];
    try {
      execFileSync('setpriv', ['--version'], { stdio: 'ignore' });
      setpriv = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'];
    } catch {
      // Already unprivileged: run directly.
    }
    const r = await runCli(['run', '--kernel', kernel, '--kvm-device', fakeKvm], { wrap: setpriv });
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/no permission to open .*kvm-no-access: add your user to the kvm group/);
  });

  it('rejects a bad option value as a usage error (exit 2)', async () => {
    const r = await runCli(['run', '--kernel', 'x', '--memory', 'lots']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/invalid memory size "lots"/);
  });

  it('rejects an out-of-range CPU count', async () => {
    const fx = fixtures();
    const r = await runCli(['run', '--kernel', fx.bzImage, '--cpus', '99']);
    expect(r.code).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/cpus must be 1 to 8 \(got 99\) \(--cpus 1 to 8\)/);
  });

  it('refuses a missing disk image and a TAP device it cannot open', async () => {
    const fx = fixtures();
    const disk = await runCli(['run', '--kernel', fx.bzImage, '--disk', join(dir.path, 'no-disk.img')]);
    expect(disk.code).toBe(1);
    expect(oneLine(disk.stderr)).toMatch(/no-disk\.img/);
    const tap = await runCli(['run', '--kernel', fx.bzImage, '--net', 'tap=this-name-is-far-too-long-for-a-tap']);
    expect(tap.code).not.toBe(0);
    expect(tap.stderr.trim().split('\n')).toHaveLength(1);
    expect(tap.stderr).toMatch(/tap/i);
  });

  it('refuses a serial target that cannot be: a bad spec, the UART elsewhere while it is the console, and a file it cannot create', async () => {
    const fx = fixtures();
    const spec = await runCli(['run', '--kernel', fx.bzImage, '--serial', 'tty']);
    expect(spec.code).toBe(2);
    expect(spec.stderr).toMatch(/"tty" is not a place for the UART: give console, off, file=<path> or socket=<path>/);
    const clash = await runCli(['run', '--kernel', fx.bzImage, '--serial', 'off']);
    expect(clash.code).toBe(1);
    expect(oneLine(clash.stderr)).toMatch(
      /^tsvmm: the UART is the console \(console 'serial'\): serial must be 'console', not off; choose console 'virtio' or 'off' to send it elsewhere$/,
    );
    const file = await runCli(['run', '--kernel', fx.bzImage, '--console', 'virtio', '--serial', `file=${join(dir.path, 'no-dir', 'ttyS0.log')}`]);
    expect(file.code).toBe(1);
    expect(oneLine(file.stderr)).toMatch(
      /^tsvmm: cannot write the serial output file .*ttyS0\.log \(ENOENT\): give serial a file in a writable directory \(--serial <where>\)$/,
    );
    expect(file.stdout).toBe('');
    const expectOff = await runCli(['run', '--kernel', fx.bzImage, '--console', 'off', '--expect', 'x']);
    expect(expectOff.code).toBe(2);
    expect(oneLine(expectOff.stderr)).toBe('tsvmm: --expect reads the guest console, and --console off gives it none: choose --console serial or virtio');
  });
});
