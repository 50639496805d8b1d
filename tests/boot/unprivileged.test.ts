/**
 * Least privilege: tsvmm needs no root. An unprivileged user (uid 65534)
 * with read-write access to a KVM device node, owning a disk image and a
 * TAP device created for it, runs a VM with both, and a user without them
 * is refused with the one-line error that names the fix. The guest is a
 * few instructions (print "ok", halt): what is checked is what the VMM
 * opens, not what Linux does.
 *
 * Needs root to set the scene (a KVM device node owned by the user, a
 * network namespace with a TAP device owned by the user), and setpriv.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, chownSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildPrintAndHaltKernel } from '../../src/testing/index.js';
import { oneLine } from '../helpers/assert.js';
import { kvmUnavailable, describeCli, runCli, until } from '../helpers/guest.js';

const USER = 65534;
const NS = `tsvmm-unpriv-${process.pid}`;
/** A hang guard, not a speed check. */
const GUARD_MS = 120_000;

function skipReason(): string | undefined {
  const noKvm = kvmUnavailable();
  if (noKvm) return noKvm;
  if (process.getuid?.() !== 0) return 'setting up an unprivileged user (device node, TAP owner) needs root';
  try {
    execFileSync('setpriv', ['--version'], { stdio: 'ignore' });
    execFileSync('ip', ['-V'], { stdio: 'ignore' });
  } catch {
    return 'needs setpriv (util-linux) and ip (iproute2)';
  }
  return undefined;
}
const skip = skipReason();

describe.skipIf(skip !== undefined)(`an unprivileged user${skip ? ` (skipped: ${skip})` : ''}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-unpriv-'));
  const kernel = join(dir, 'print-ok.elf');
  const disk = join(dir, 'disk.img');
  const kvm = join(dir, 'kvm');
  const tun = join(dir, 'tun');
  const setpriv = ['setpriv', `--reuid=${USER}`, `--regid=${USER}`, '--clear-groups'];
  /**
   * The command prefix that runs as the user in the namespace. With
   * `tunAccess`, the user's own node for /dev/net/tun is bound over it in
   * a private mount namespace (some hosts, this one included, keep
   * /dev/net/tun root-only; Debian makes it 0666).
   */
  const asUser = (tunAccess: boolean): string[] =>
    tunAccess
      ? [
          'ip',
          'netns',
          'exec',
          NS,
          'unshare',
          '--mount',
          '--propagation',
          'private',
          'sh',
          '-c',
          'mount --bind "$0" /dev/net/tun && exec "$@"',
          tun,
          ...setpriv,
        ]
      : ['ip', 'netns', 'exec', NS, ...setpriv];
  const userNode = (path: string, device: string) => {
    const [major, minor] = execFileSync('stat', ['-c', '%t %T', device]).toString().trim().split(' ');
    execFileSync('mknod', ['-m', '600', path, 'c', String(parseInt(major!, 16)), String(parseInt(minor!, 16))]);
    chownSync(path, USER, USER);
  };

  beforeAll(() => {
    chmodSync(dir, 0o755);
    writeFileSync(kernel, buildPrintAndHaltKernel('ok\n'), { mode: 0o644 });
    writeFileSync(disk, Buffer.alloc(1 << 20), { mode: 0o600 });
    chownSync(disk, USER, USER);
    // The user's own nodes for the KVM and TUN devices (as the kvm group or
    // a udev rule would give them), leaving the host's own nodes alone.
    userNode(kvm, '/dev/kvm');
    userNode(tun, '/dev/net/tun');
    execFileSync('ip', ['netns', 'add', NS]);
    execFileSync('ip', ['netns', 'exec', NS, 'ip', 'tuntap', 'add', 'dev', 'utap0', 'mode', 'tap', 'user', String(USER), 'group', String(USER)]);
    // Owned by root: a TAP with no owner is open to anyone who can open /dev/net/tun.
    execFileSync('ip', ['netns', 'exec', NS, 'ip', 'tuntap', 'add', 'dev', 'rtap0', 'mode', 'tap', 'user', '0']);
  });
  afterAll(() => {
    try {
      execFileSync('ip', ['netns', 'del', NS]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it(
    'runs a VM with a disk and a TAP device it owns, without root',
    async () => {
      let stopped = false;
      const r = await runCli(['run', '--kernel', kernel, '--memory', '32M', '--kvm-device', kvm, '--disk', disk, '--net', 'tap=utap0'], {
        wrap: asUser(true),
        timeoutMs: GUARD_MS,
        drive: (child, out) => {
          void until(out, /ok/, GUARD_MS).then(
            () => {
              stopped = true;
              child.kill('SIGTERM');
            },
            (err: unknown) => {
              console.error(String(err));
              child.kill('SIGKILL');
            },
          );
        },
      });
      expect(r.stderr).not.toMatch(/permission|EPERM|EACCES/i);
      expect(r.stdout, describeCli(r)).toContain('ok');
      expect(stopped).toBe(true);
      expect(r.code).toBe(143);
      expect(r.stderr).toContain('stopped by SIGTERM');
    },
    GUARD_MS + 30_000,
  );

  it(
    'is refused, with the fix named, a TAP device that belongs to root',
    async () => {
      const r = await runCli(['run', '--kernel', kernel, '--memory', '32M', '--kvm-device', kvm, '--net', 'tap=rtap0'], {
        wrap: asUser(true),
        timeoutMs: GUARD_MS,
      });
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toMatch(/cannot open TAP rtap0: permission denied; create it for your user with `sudo ip tuntap add dev rtap0 mode tap user/);
    },
    GUARD_MS + 30_000,
  );

  it(
    'is told to get access to /dev/net/tun when it has none',
    async () => {
      const r = await runCli(['run', '--kernel', kernel, '--memory', '32M', '--kvm-device', kvm, '--net', 'tap=utap0'], {
        wrap: asUser(false),
        timeoutMs: GUARD_MS,
      });
      if (execFileSync('stat', ['-c', '%a', '/dev/net/tun']).toString().trim() === '666') {
        expect(r.stderr).not.toMatch(/\/dev\/net\/tun/); // this host already lets every user open it
      } else {
        expect(r.code).toBe(1);
        expect(oneLine(r.stderr)).toMatch(/cannot open TAP utap0: no permission on \/dev\/net\/tun; give your user read-write access/);
      }
    },
    GUARD_MS + 30_000,
  );

  it(
    'is refused a disk image it cannot write',
    async () => {
      const rootDisk = join(dir, 'root-disk.img');
      writeFileSync(rootDisk, Buffer.alloc(1 << 20), { mode: 0o644 });
      const r = await runCli(['run', '--kernel', kernel, '--memory', '32M', '--kvm-device', kvm, '--disk', rootDisk], {
        wrap: asUser(true),
        timeoutMs: GUARD_MS,
      });
      expect(r.code).toBe(1);
      expect(oneLine(r.stderr)).toMatch(/root-disk\.img/);
      expect(oneLine(r.stderr)).toMatch(/permission|readonly/i);
    },
    GUARD_MS + 30_000,
  );
});
