/**
 * virtio-blk with real ext4 images made by mkfs: the guest reads a file the
 * host wrote, writes one the host reads back with debugfs, and cannot write
 * to a read-only disk.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { debugfsCat, makeExt4 } from '../helpers/disk.js';
import { PROMPT, GuestSession, kvmUnavailable, testCmdline } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';

const noKvm = kvmUnavailable();
const md5 = (b: Uint8Array) => createHash('md5').update(b).digest('hex');

describe.skipIf(noKvm !== undefined)(`virtio-blk${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-blk-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it(
    'reads, writes and flushes an ext4 disk; a read-only disk refuses writes and stays unchanged',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const random = randomBytes(300 * 1024);
      const data = makeExt4(dir, 'data', { 'random.bin': random });
      const ro = makeExt4(dir, 'ro', { 'keep.txt': Buffer.from('read-only\n') }, 16);
      const roBefore = md5(readFileSync(ro));

      const guest = await GuestSession.boot({
        kernel: fx.bzImage,
        initrd: fx.initramfs,
        cmdline: testCmdline(),
        disks: [
          { path: data, serial: 'tsvmm-data' },
          { path: ro, readonly: true },
        ],
      });
      await guest.waitFor(/TSVMM-INIT-OK/);
      await guest.waitFor(PROMPT);

      // The serial from --disk ...,serial= reaches the guest (GET_ID).
      expect((await guest.run('cat /sys/block/vda/serial')).output.trim()).toBe('tsvmm-data');
      expect((await guest.run('cat /sys/block/vdb/ro')).output.trim()).toBe('1');
      // The default transport: virtio-pci functions, interrupting by MSI-X.
      expect((await guest.run('readlink -f /sys/block/vda/device')).output).toMatch(/pci0000:00/);
      expect((await guest.run('grep -c PCI-MSI /proc/interrupts')).output.trim()).not.toBe('0');

      expect((await guest.run('mkdir -p /mnt/a /mnt/b && mount -t ext4 /dev/vda /mnt/a')).status).toBe(0);
      const sum = await guest.run('md5sum /mnt/a/random.bin');
      expect(sum.output).toContain(md5(random));

      const write = await guest.run('dd if=/dev/urandom of=/mnt/a/new.bin bs=4096 count=100 2>/dev/null && md5sum /mnt/a/new.bin && sync');
      expect(write.status).toBe(0);
      const guestSum = /([0-9a-f]{32})/.exec(write.output)?.[1];
      expect(guestSum).toBeDefined();

      expect((await guest.run('mount -t ext4 -o ro /dev/vdb /mnt/b')).status).toBe(0);
      expect((await guest.run('cat /mnt/b/keep.txt')).output).toContain('read-only');
      // The file system is read-only, and so is the block device beneath it.
      expect((await guest.run('echo no > /mnt/b/new.txt')).status).not.toBe(0);
      expect((await guest.run('umount /mnt/b && dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync')).status).not.toBe(0);

      const stats = guest.vm.stats().devices as Record<string, { reads: number; writes: number; flushes: number; bytesRead: number }>;
      expect(stats.blk0!.bytesRead).toBeGreaterThanOrEqual(random.length);
      expect(stats.blk0!.writes).toBeGreaterThan(0);
      expect(stats.blk0!.flushes).toBeGreaterThan(0);

      await guest.run('umount /mnt/a');
      const outcome = await guest.finish('reboot -f');
      expect(outcome.kind).toBe('reboot');

      // The host reads what the guest wrote.
      expect(md5(debugfsCat(data, '/new.bin'))).toBe(guestSum);
      expect(md5(readFileSync(ro))).toBe(roBefore);
    }),
    RETRY_TIMEOUT_MS,
  );
});
