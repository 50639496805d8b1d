/**
 * The classic boot path: the bzImage's own decompressor runs in the guest.
 * On a host that emulates guest kernel code this alone takes minutes, so it
 * has a file (and a vitest worker) of its own.
 */
import { describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { kvmUnavailable, describeCli, runCli, testCmdline } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';

const noKvm = kvmUnavailable();

describe.skipIf(noKvm !== undefined)(`classic bzImage boot${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it(
    'boots a bzImage the classic way (the kernel decompresses itself) and reboots',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const r = await runCli([
        'run',
        '--kernel',
        fx.bzImage,
        '--initrd',
        fx.initramfs,
        '--memory',
        '128M',
        '--boot-mode',
        'guest',
        '--log-level',
        'info',
        '--cmdline',
        testCmdline('tsvmm.mode=reboot'),
      ]);
      expect(r.stderr).toContain('"kind":"bzimage-guest"');
      expect(r.stdout, describeCli(r)).toContain('TSVMM-INIT-OK');
      expect(r.stdout, describeCli(r)).toContain('reboot: Restarting system');
      expect(r.code).toBe(0);
    }),
    RETRY_TIMEOUT_MS,
  );
});
