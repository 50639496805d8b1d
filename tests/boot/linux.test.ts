/**
 * Boots the fixture kernel for real. Each test is one boot; they assert on
 * what the guest printed and on how the VM ended.
 */
import { describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { PROMPT, GuestSession, kvmUnavailable, describeCli, runCli, testCmdline } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';
import { hostCpuModelName } from '../../src/kvm/probe.js';

const noKvm = kvmUnavailable();

describe.skipIf(noKvm !== undefined)(`Linux boot${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it(
    'boots a host-decompressed bzImage to the initramfs shell, talks to it, and ends with reboot -f',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const guest = await GuestSession.boot({
        kernel: fx.bzImage,
        initrd: fx.initramfs,
        cmdline: testCmdline(),
        bootMode: 'host',
      });
      expect(guest.vm.boot.kind).toBe('bzimage-host');
      await guest.waitFor(/TSVMM-INIT-OK/);
      await guest.waitFor(PROMPT);

      const hello = await guest.run('echo hello $((6*7))');
      expect(hello.output).toContain('hello 42');
      expect(hello.status).toBe(0);

      const cmdline = await guest.run('cat /proc/cmdline');
      expect(cmdline.output).toContain('console=ttyS0');

      // The guest names its CPU as the host does (the brand leaves KVM leaves zero).
      const model = await guest.run("grep -m1 '^model name' /proc/cpuinfo");
      expect(model.output).toContain(`: ${hostCpuModelName()}`);

      const failing = await guest.run('false');
      expect(failing.status).toBe(1);

      // Metrics make sense: every byte the guest printed went through the UART.
      const stats = guest.vm.stats();
      const serial = stats.devices.serial as { bytesOut: number; bytesIn: number };
      guest.vm.console.flush();
      expect(serial.bytesOut).toBe(Buffer.byteLength(guest.output, 'latin1'));
      expect(serial.bytesIn).toBeGreaterThan(0);
      expect(stats.exits.io).toBeGreaterThan(0);
      expect(stats.irqsInjected).toBeGreaterThan(0);
      // Each byte out is a THR write: at least as many COM1 accesses as bytes.
      expect(stats.pio.com1).toBeGreaterThanOrEqual(serial.bytesOut);

      const outcome = await guest.finish('reboot -f');
      expect(outcome.kind).toBe('reboot');
      expect(outcome.exitCode).toBe(0);
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    'boots an ELF vmlinux from the CLI with its vCPU on the event loop (--exit-path loop); poweroff -f ends it with exit code 0',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const r = await runCli([
        'run',
        '--kernel',
        fx.vmlinux,
        '--initrd',
        fx.initramfs,
        '--memory',
        '128M',
        '--exit-path',
        'loop',
        '--cmdline',
        testCmdline('tsvmm.mode=poweroff'),
      ]);
      expect(r.stdout, describeCli(r)).toContain('TSVMM-INIT-OK');
      expect(r.stdout, describeCli(r)).toMatch(/reboot: (System halted|Power down)/);
      expect(r.code).toBe(0);
      // Logs go to stderr, never into the console stream.
      expect(r.stdout, describeCli(r)).not.toContain('"level"');
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    'reports a guest panic with exit code 3 (xz bzImage, host-decompressed)',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const r = await runCli([
        'run',
        '--kernel',
        fx.bzImageXz,
        '--initrd',
        fx.initramfs,
        '--memory',
        '128M',
        '--boot-mode',
        'host',
        '--cmdline',
        testCmdline('tsvmm.mode=panic'),
      ]);
      expect(r.stdout, describeCli(r)).toContain('TSVMM-PANIC-NOW');
      expect(r.stdout, describeCli(r)).toContain('Kernel panic - not syncing');
      expect(r.stderr).toMatch(/tsvmm: guest kernel panic/);
      expect(r.code).toBe(3);
    }),
    RETRY_TIMEOUT_MS,
  );
});
