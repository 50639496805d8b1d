/**
 * The virtio console: `--console virtio` gives the guest hvc0 (virtio-
 * console) as its console. The kernel's messages from the driver's start
 * on and the shell reach stdout through it, typed input comes back, and
 * the UART carries none of it (the byte-per-exit path that makes a verbose
 * boot slow).
 */
import { describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { PROMPT, kvmUnavailable, runCli, testCmdline, until } from '../helpers/guest.js';
import { RETRY_TIMEOUT_MS, retryEmulatorFault } from '../helpers/host.js';

const noKvm = kvmUnavailable();

interface Stats {
  outcome: string;
  devices: { serial: { bytesOut: number }; console0: { txBytes: number; rxBytes: number; transport: { kind: string } } };
}

describe.skipIf(noKvm !== undefined)(`virtio console${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it.each(['pci', 'mmio'] as const)(
    'boots with hvc0 as the console over virtio-%s: boot log, shell, input answered, poweroff exit 0',
    retryEmulatorFault(async (transport: 'pci' | 'mmio') => {
      const fx = fixtures();
      const r = await runCli(
        [
          'run',
          '--kernel',
          fx.bzImage,
          '--initrd',
          fx.initramfs,
          '--memory',
          '128M',
          '--console',
          'virtio',
          '--transport',
          transport,
          '--stats',
          '--cmdline',
          testCmdline('tsvmm.mode=shell').replace('console=ttyS0', 'console=hvc0'),
        ],
        {
          drive: (child, out) => {
            void (async () => {
              await until(out, PROMPT);
              child.stdin.write('echo "answer-$((6 * 7)) on $(cat /sys/class/tty/console/active)"\n');
              await until(out, /answer-42 on/);
              child.stdin.write('poweroff -f\n');
            })().catch(() => child.kill('SIGTERM'));
          },
        },
      );
      // hvc0 prints from the moment the virtio-console driver is up (what Linux printed before is not replayed there).
      expect(r.stdout).toContain('Run /init as init process');
      expect(r.stdout).toContain('TSVMM-INIT-OK');
      expect(r.stdout).toMatch(/answer-42 on hvc0/);
      expect(r.code, r.stderr).toBe(0);
      const stats = JSON.parse(r.stderr.slice(r.stderr.indexOf('{'), r.stderr.lastIndexOf('}') + 1)) as Stats;
      const hvc = stats.devices.console0;
      expect(hvc.transport.kind).toBe(transport);
      expect(hvc.txBytes).toBeGreaterThan(500);
      expect(hvc.rxBytes).toBeGreaterThan(0);
      // Nothing went through the UART.
      expect(stats.devices.serial.bytesOut).toBe(0);
    }),
    RETRY_TIMEOUT_MS,
  );
});
