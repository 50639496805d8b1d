/**
 * The QEMU side-by-side: `qemu-system-x86_64 -M microvm` booting the same
 * kernel and running the same guest commands would give the figures to
 * set against tsvmm's. Whether that can run here is decided from facts,
 * and the answer goes into the table as a row with no value and a reason.
 *
 * On a host whose KVM emulates guest kernel code (PVM-style, see
 * /work/shared/PLATFORM.md), QEMU cannot boot a stock Linux kernel at all:
 * the emulator fails on instructions such as `int3` and `fwait` with
 * KVM_INTERNAL_ERROR_EMULATION, and QEMU, unlike tsvmm, has no fallback.
 * On a hardware-virtualization host QEMU would boot, but the QEMU runs are
 * not written yet: the row says so rather than pretending.
 */
import { execFileSync } from 'node:child_process';
import { probeHostOnce } from '../../src/kvm/probe.js';
import type { Row } from './benchmark.js';

export interface QemuCheck {
  /** First line of `qemu-system-x86_64 --version`, or null when it is not installed. */
  version: string | null;
  /** probeHost(kvm).emulationGaps, or an error. */
  emulationGaps: string[] | { error: string };
  /** Why there are no QEMU figures in this run. */
  skipped: string;
}

let cached: QemuCheck | undefined;

export function checkQemu(): QemuCheck {
  if (cached) return cached;
  let version: string | null = null;
  try {
    version = execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 30_000 })
      .split('\n')[0]!
      .trim();
  } catch {
    version = null;
  }
  let emulationGaps: QemuCheck['emulationGaps'];
  try {
    emulationGaps = probeHostOnce().emulationGaps;
  } catch (err) {
    emulationGaps = { error: (err as Error).message };
  }
  let skipped: string;
  if (version === null) skipped = 'qemu-system-x86_64 is not installed';
  else if (Array.isArray(emulationGaps) && emulationGaps.length > 0)
    skipped = `${version} is installed, but this KVM emulates guest kernel code (gaps: ${emulationGaps.join(', ')}) and QEMU has no fallback for instructions it cannot emulate: it cannot boot a stock kernel here (PLATFORM.md)`;
  else if (!Array.isArray(emulationGaps)) skipped = `${version} is installed, but KVM could not be probed (${emulationGaps.error})`;
  else
    skipped = `${version} is installed and this host could run it, but the QEMU runs are not implemented in this benchmark yet (boot-vs-qemu compares boots)`;
  cached = { version, emulationGaps, skipped };
  return cached;
}

/** The table row that records the skipped QEMU comparison (value NaN). */
export function qemuRow(what: string): Row {
  return { label: `qemu-system-x86_64 -M microvm: ${what}`, value: Number.NaN, unit: '-', note: `skipped: ${checkQemu().skipped}` };
}

/**
 * The QEMU command line of the side-by-side runs: `machine` (`pc`, or
 * microvm with its options), KVM with the host's CPU model, `memory`,
 * no default devices, the serial port on stdio, and the kernel,
 * initramfs and command line given. -no-reboot: a guest reset ends QEMU.
 */
export function qemuArgv(machine: string, memory: string, kernel: string, initrd: string, cmdline: string): string[] {
  return [
    'qemu-system-x86_64',
    '-M',
    machine,
    '-enable-kvm',
    '-cpu',
    'host',
    '-m',
    memory,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-serial',
    'stdio',
    '-kernel',
    kernel,
    '-initrd',
    initrd,
    '-append',
    cmdline,
  ];
}
