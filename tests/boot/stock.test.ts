/**
 * Stock kernels: the test kernel's configuration built from unpatched Linux,
 * and Debian's unmodified distribution kernel with an initramfs that loads
 * its virtio modules. Both need a hardware-virtualised /dev/kvm (on a PVM
 * host a stock kernel cannot complete a user SYSCALL); on a PVM host
 * `npm test` runs this file again inside the emulated AMD-V host.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { PROMPT, GuestSession, testCmdline } from '../helpers/guest.js';
import { hardwareVirtUnavailable, RETRY_TIMEOUT_MS, retryEmulatorFault } from '../helpers/host.js';

const noHardware = hardwareVirtUnavailable();
const md5 = (b: Uint8Array) => createHash('md5').update(b).digest('hex');

describe.skipIf(noHardware !== undefined)(`stock kernels${noHardware ? ` (skipped: ${noHardware})` : ''}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-stock-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it(
    'boots the unpatched test kernel to the shell, runs a command and reboots (exit 0)',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const guest = await GuestSession.boot({ kernel: fx.stockBzImage, initrd: fx.initramfs, cmdline: testCmdline() });
      await guest.waitFor(/TSVMM-INIT-OK/);
      await guest.waitFor(PROMPT);
      // No emulation fallback on this host: nothing to step over, no clearcpuid.
      expect(guest.vm.cmdline).not.toContain('clearcpuid');
      expect(guest.output).not.toContain('stranded SYSCALL');
      const r = await guest.run('echo stock $((6*7)); uname -r');
      expect(r.output).toContain('stock 42');
      expect(r.output).toContain(fx.kernelRelease);
      const outcome = await guest.finish('reboot -f');
      expect(outcome.kind).toBe('reboot');
      expect(outcome.exitCode).toBe(0);
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    "boots Debian's distribution kernel: virtio modules from the initramfs, disks over PCI and ACPI virtio-mmio, 2 CPUs from the MADT, poweroff through ACPI",
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const pciData = randomBytes(4 << 20);
      const mmioData = randomBytes(2 << 20);
      const pciImage = join(dir, 'pci.img');
      const mmioImage = join(dir, 'mmio.img');
      writeFileSync(pciImage, pciData);
      writeFileSync(mmioImage, mmioData);

      const guest = await GuestSession.boot({
        kernel: fx.distroKernel,
        initrd: fx.distroInitramfs,
        memory: '512M',
        cpus: 2,
        disks: [
          { path: pciImage, transport: 'pci' },
          { path: mmioImage, transport: 'mmio' },
        ],
      });
      await guest.waitFor(/TSVMM-DISTRO-INIT-OK/);
      await guest.waitFor(PROMPT);
      expect(guest.output).not.toContain('A valid RSDP was not found');
      expect(guest.output).not.toMatch(/insmod FAIL/);
      expect((await guest.run('uname -r')).output.trim()).toBe(fx.distroRelease);

      // Both CPUs, found through the MADT.
      expect((await guest.run('grep -c ^processor /proc/cpuinfo')).output.trim()).toBe('2');
      expect((await guest.run('cat /sys/firmware/acpi/tables/APIC >/dev/null && echo madt')).output).toContain('madt');

      // One disk on each transport: the PCI one is a virtio PCI function
      // (vendor 0x1af4), the other a platform device from the DSDT's LNRO0005.
      const devs = (await guest.run('for d in /sys/block/vd*; do echo "$(basename $d) $(readlink -f $d/device)"; done')).output;
      const lines = devs
        .trim()
        .split('\n')
        .map((l) => l.trim());
      expect(lines).toHaveLength(2);
      const pciDisk = lines.find((l) => /pci0000:00/.test(l))?.split(' ')[0];
      const mmioDisk = lines.find((l) => /LNRO0005|virtio-mmio|\.virtio_mmio/i.test(l))?.split(' ')[0];
      expect(pciDisk, devs).toBeDefined();
      expect(mmioDisk, devs).toBeDefined();
      const pciSum = await guest.run(`md5sum /dev/${pciDisk}`);
      expect(pciSum.output).toContain(md5(pciData));
      const mmioSum = await guest.run(`md5sum /dev/${mmioDisk}`);
      expect(mmioSum.output).toContain(md5(mmioData));

      // A write through each transport reaches the host's image.
      const w = await guest.run(
        `echo tsvmm-pci-write | dd of=/dev/${pciDisk} bs=512 seek=100 conv=fsync 2>/dev/null && echo tsvmm-mmio-write | dd of=/dev/${mmioDisk} bs=512 seek=7 conv=fsync 2>/dev/null`,
      );
      expect(w.status).toBe(0);

      // MSI-X: the PCI disk's interrupts are PCI-MSI, not an IOAPIC line.
      const irqs = (await guest.run('grep -i virtio /proc/interrupts')).output;
      expect(irqs).toMatch(/PCI-MSI/);

      const outcome = await guest.finish('poweroff -f');
      expect(outcome.kind).toBe('poweroff');
      expect(outcome.exitCode).toBe(0);
      expect(outcome.message).toMatch(/ACPI/);
      expect(
        readFileSync(pciImage)
          .subarray(100 * 512, 100 * 512 + 15)
          .toString(),
      ).toBe('tsvmm-pci-write');
      expect(
        readFileSync(mmioImage)
          .subarray(7 * 512, 7 * 512 + 16)
          .toString(),
      ).toBe('tsvmm-mmio-write');
    }),
    RETRY_TIMEOUT_MS,
  );
});
