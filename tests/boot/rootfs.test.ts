/**
 * A root file system on virtio-blk, no initramfs: the guest runs /sbin/init
 * from the disk. Then crash safety: the guest writes and syncs files while
 * four other writers keep writing, the VMM is killed with SIGKILL in the
 * middle of it, and after a journal replay (e2fsck, as after a power cut)
 * every synced file is intact in the image.
 */
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { BOOT_TIMEOUT_MS, PROMPT, kvmUnavailable, describeCli, runCli, testCmdline, until } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';
import { debugfsCat } from '../helpers/disk.js';

const noKvm = kvmUnavailable();

describe.skipIf(noKvm !== undefined)(`root file system on virtio-blk${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-rootfs-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it(
    'boots root=/dev/vda from an ext4 image, and synced files survive SIGKILL of the VMM during concurrent writes',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const image = join(dir, 'rootfs.ext4');
      copyFileSync(fx.rootfs, image);
      let guestSum = '';
      const synced = new Map<string, string>();
      const r = await runCli(
        ['run', '--kernel', fx.bzImage, '--memory', '128M', '--disk', image, '--cmdline', testCmdline('root=/dev/vda rw rootfstype=ext4')],
        {
          drive: (child, out) => {
            void (async () => {
              await until(out, /TSVMM-ROOTFS-OK/);
              await until(out, PROMPT);
              child.stdin.write(
                'cat /proc/1/cmdline; echo; dd if=/dev/urandom of=/crash.bin bs=4096 count=64 2>/dev/null; md5sum /crash.bin; sync; echo "@@SY""NCED"\n',
              );
              await until(out, /@@SYNCED/);
              guestSum = /([0-9a-f]{32})\s+\/crash\.bin/.exec(out())?.[1] ?? '';
              // Four writers that never stop, and files written and synced one after another beside them.
              child.stdin.write(
                'for w in 1 2 3 4; do (while :; do dd if=/dev/zero of=/junk$w bs=64k count=4 2>/dev/null; done) & done; ' +
                  'for k in 1 2 3 4; do dd if=/dev/urandom of=/s$k.bin bs=4096 count=4 2>/dev/null; sync; echo "@@S""YNC $(md5sum /s$k.bin)"; done\n',
              );
              await until(out, /@@SYNC [0-9a-f]{32}\s+\/s4\.bin/);
              for (const m of out().matchAll(/@@SYNC ([0-9a-f]{32})\s+\/(s\d\.bin)/g)) synced.set(m[2]!, m[1]!);
              child.kill('SIGKILL'); // while the writers still write
            })().catch((err: unknown) => {
              console.error(String(err)); // the console so far: what the guest did instead
              child.kill('SIGKILL');
            });
          },
        },
      );
      expect(r.stdout, describeCli(r)).toContain('TSVMM-ROOTFS-OK');
      // init came from the disk: there was no initramfs.
      expect(r.stdout, describeCli(r)).toContain('/sbin/init');
      expect(r.signal).toBe('SIGKILL');
      expect(guestSum).toMatch(/^[0-9a-f]{32}$/);
      // As after a power cut: the journal is replayed, and nothing is left to repair.
      const fsck = spawnSync('e2fsck', ['-fy', image], { encoding: 'utf8' });
      expect(fsck.status, fsck.stdout).toBeLessThan(4);
      const onDisk = createHash('md5').update(debugfsCat(image, '/crash.bin')).digest('hex');
      expect(onDisk).toBe(guestSum);
      // The console may garble a line under load; s4 (waited for) and every line read must hold.
      expect(synced.has('s4.bin')).toBe(true);
      for (const [file, sum] of synced)
        expect(
          createHash('md5')
            .update(debugfsCat(image, `/${file}`))
            .digest('hex'),
          file,
        ).toBe(sum);
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    'refuses an image another tsvmm is using',
    async () => {
      const fx = fixtures();
      const image = join(dir, 'locked.ext4');
      copyFileSync(fx.rootfs, image);
      // The first VMM holds the lock while it runs; the second must refuse at once.
      let second: Awaited<ReturnType<typeof runCli>> | undefined;
      const first = await runCli(['run', '--kernel', fx.bzImage, '--memory', '128M', '--disk', image, '--cmdline', testCmdline('root=/dev/vda')], {
        drive: (child) => {
          void (async () => {
            await new Promise((r) => setTimeout(r, 2000));
            second = await runCli(['run', '--kernel', fx.bzImage, '--disk', image]);
            child.kill('SIGTERM');
          })();
        },
      });
      expect(first.code).toBe(143);
      expect(second?.code).toBe(1);
      expect(second?.stderr).toMatch(/in use by another process \(locked\)/);
    },
    BOOT_TIMEOUT_MS,
  );
});
