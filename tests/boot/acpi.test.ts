/**
 * How a guest ends, told by devices rather than by console text: ACPI
 * soft-off through the PM1a control register, and a panic through pvpanic
 * (ACPI QEMU0001). A guest process that prints the kernel's own power-off or
 * panic words must not end the VM. Runs on both host kinds.
 */
import { describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { PROMPT, GuestSession, kvmUnavailable, testCmdline } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';

const noKvm = kvmUnavailable();

describe.skipIf(noKvm !== undefined)(`ACPI and pvpanic${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it(
    'keeps running when a guest process prints "reboot: Power down" and "Kernel panic - not syncing"; poweroff -f ends it through ACPI',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const guest = await GuestSession.boot({ kernel: fx.bzImage, initrd: fx.initramfs, cmdline: testCmdline(), cpus: 2 });
      await guest.waitFor(/TSVMM-INIT-OK/);
      await guest.waitFor(PROMPT);
      expect(guest.output).not.toContain('A valid RSDP was not found');
      // The MADT's two CPUs are online.
      expect((await guest.run('cat /sys/devices/system/cpu/online')).output.trim()).toBe('0-1');
      // The virtio-pci and ACPI paths are live in this kernel.
      expect((await guest.run('ls /sys/bus/acpi/devices/ | grep -c QEMU0001')).output.trim()).toBe('1');

      const fake = await guest.run('echo "reboot: Power down"; echo "Kernel panic - not syncing: not really"; echo "reboot: System halted"');
      expect(fake.status).toBe(0);
      const alive = await guest.run('echo still $((40+2))');
      expect(alive.output).toContain('still 42');

      const outcome = await guest.finish('poweroff -f');
      expect(outcome.kind).toBe('poweroff');
      expect(outcome.exitCode).toBe(0);
      expect(outcome.message).toMatch(/ACPI/);
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    'reports a kernel panic through pvpanic (exit code 3)',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const guest = await GuestSession.boot({ kernel: fx.bzImage, initrd: fx.initramfs, cmdline: testCmdline() });
      await guest.waitFor(PROMPT);
      const outcome = await guest.finish('echo c > /proc/sysrq-trigger');
      expect(outcome.kind).toBe('panic');
      expect(outcome.exitCode).toBe(3);
      expect(outcome.message).toMatch(/pvpanic/);
      expect(guest.output).toContain('Kernel panic - not syncing');
    }),
    RETRY_TIMEOUT_MS,
  );
});
