/**
 * The machine's configuration: what a VM is built from, its defaults and
 * limits, and the checks that turn bad input into a one-line
 * {@link VmConfigError} before anything is built.
 */
import { readFile } from 'node:fs/promises';
import type { Logger } from '../base/log.js';
import { TsvmmError } from '../base/errors.js';
import type { Vcpu } from '../kvm/vcpu.js';
import type { SandboxConfig } from '../kvm/sandbox.js';
import type { VmOutcome } from './outcome.js';
import { describeSerialTarget, type SerialTarget } from './serial-target.js';
import { PAGE_SIZE } from '../arch/layout.js';
import type { DiskConfig, NetConfig, VirtioTransportKind } from './virtio-devices.js';

/** The default kernel command line: a microVM with its console on COM1. */
export const DEFAULT_CMDLINE = 'console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd';

/** The guest console: the 16550 UART (ttyS0), virtio-console (hvc0), or none. */
export type ConsoleKind = 'serial' | 'virtio' | 'off';

/** The default command line for a console: DEFAULT_CMDLINE with its console= for that device. */
export function defaultCmdline(console: ConsoleKind = 'serial'): string {
  return console === 'virtio' ? DEFAULT_CMDLINE.replace('console=ttyS0', 'console=hvc0') : DEFAULT_CMDLINE;
}

export const DEFAULT_MEMORY = 256 * 1024 * 1024;
export const MAX_CPUS = 8;

export type BootMode = 'auto' | 'host' | 'guest';
export type ExitPath = 'thread' | 'loop';

/**
 * Something that watches a VM from outside the machine: it sees the
 * console's lines, the vCPUs at start, and the outcome. The profiler
 * (src/tools/profiler.ts) is one.
 */
export interface VmObserver {
  /** Files the observer writes while or after the VM runs: the sandbox leaves them writable. */
  readonly outputs?: readonly string[];
  /** Each complete line of the guest console's output. */
  consoleLine?(line: string): void;
  /** When the vCPUs start. */
  start?(vcpus: readonly Vcpu[]): void;
  /** When the VM has ended, after every vCPU stopped and before wait() resolves. */
  finish?(outcome: VmOutcome): void;
}

/** How the machine is built. Paths or bytes for the kernel and initrd. */
export interface MachineConfig {
  kernel: string | Uint8Array;
  initrd?: string | Uint8Array;
  /** The kernel command line; defaults to {@link DEFAULT_CMDLINE}. Device and host parameters are appended. */
  cmdline?: string;
  /** Guest RAM in bytes, or a size such as "256M" or "1G". Default 256 MiB. */
  memory?: number | string;
  /** vCPUs, 1 to {@link MAX_CPUS}. Default 1. */
  cpus?: number;
  /**
   * How to boot a bzImage: 'host' decompresses the kernel in tsvmm and
   * enters it directly; 'guest' runs the kernel's own decompressor (the
   * classic path); 'auto' (default) is 'host' when tsvmm can decompress the
   * payload.
   */
  bootMode?: BootMode;
  /**
   * Where vCPUs run KVM_RUN. 'thread' (default): each on a native thread
   * of its own, which hands every exit to the main thread. 'loop': a
   * single-vCPU guest runs it on the main thread, in bursts between turns
   * of the event loop, with no hand-off per exit (1.05x a C loop per exit
   * here, against 8x; an SMP guest still uses threads). Experimental: one
   * boot in eight hung with it in the emulated AMD-V host (README).
   */
  exitPath?: ExitPath;
  /** 'emulated' (default): the TypeScript i8254. 'kernel': KVM's in-kernel PIT. */
  pit?: 'emulated' | 'kernel';
  /**
   * Marks guest RAM mergeable (MADV_MERGEABLE), so the host's kernel
   * same-page merging (KSM, where enabled) may share identical pages
   * between VMs. Saves memory with many similar guests, but the time a
   * write to a merged page takes tells one guest what another holds: off
   * by default, as in Cloud Hypervisor.
   */
  mergeable?: boolean;
  /**
   * How long KVM polls a halted vCPU for a wake-up before it puts the
   * thread to sleep, in nanoseconds (KVM_CAP_HALT_POLL, per VM). Default:
   * the host's (the kvm module's halt_poll_ns, 200 us on most hosts), which
   * trades up to that much host CPU per halt for a faster wake-up; 0 turns
   * polling off. Ignored (logged) where KVM lacks the cap.
   */
  haltPollNs?: number;
  /** The emulation-failure fallback: 'auto' (default) probes the host. */
  emulationFallback?: 'auto' | 'on' | 'off';
  disks?: DiskConfig[];
  nets?: NetConfig[];
  /**
   * The transport of virtio devices that do not choose their own: 'pci'
   * (default; what distribution kernels find) or 'mmio' (described in
   * ACPI, or on the command line when ACPI is off).
   */
  transport?: VirtioTransportKind;
  /**
   * ACPI tables (default true): CPUs and IOAPIC (MADT), the devices
   * (DSDT), power-off through the PM1 control register, and pvpanic. Off:
   * the MP table alone, virtio-mmio announced on the command line, and the
   * guest's end read from its console.
   */
  acpi?: boolean;
  /**
   * Where a bzImage decompressed on the host is kept, by the SHA-256 of its
   * compressed payload, so that the next boot of the same kernel skips the
   * decompression (the newest 8 kernels are kept). Default:
   * `$TSVMM_CACHE/kernels`, else `$XDG_CACHE_HOME/tsvmm/kernels` or
   * `~/.cache/tsvmm/kernels`; false: no cache. A cache that cannot be read
   * or written never fails a boot.
   */
  kernelCache?: string | false;
  /**
   * Inflate a gzip initramfs on the host (default true): the guest kernel
   * then only copies a cpio archive instead of running inflate.
   */
  initrdInflate?: boolean;
  /**
   * Which device is the guest's console (`vm.console`): 'serial' (default,
   * the UART, ttyS0: two exits per byte), 'virtio' (virtio-console, hvc0,
   * on the default transport: one notification per buffer), or 'off' (no
   * console: `vm.console` carries nothing, and the UART goes where
   * `serial` says). The default command line follows (console=hvc0 for
   * 'virtio'); a command line given is used as is.
   */
  console?: ConsoleKind;
  /**
   * Where the UART goes when it is not the console (early boot messages
   * with earlyprintk=serial, console=ttyS0 given too, a getty on ttyS0):
   * 'console' joins its output to `vm.console` (the default with `console:
   * 'virtio'`); 'off' discards it (the default with `console: 'off'`);
   * `{ file }` writes it to a file; `{ socket }` serves it on a Unix
   * socket, both ways (src/vmm/serial-target.ts). With `console: 'serial'`
   * the UART is the console and this must be 'console' or absent.
   */
  serial?: SerialTarget;
  /**
   * The UART's and the PIT's interrupts through irqfds (default true, where
   * KVM has KVM_CAP_IRQFD): one eventfd write per edge, where KVM_IRQ_LINE
   * takes two ioctls. false drives them with KVM_IRQ_LINE (to compare).
   */
  legacyIrqfd?: boolean;
  /** A name for logs and for deriving stable MAC addresses. Default "tsvmm". */
  name?: string;
  logger?: Logger;
  /** Device to open for KVM. Default /dev/kvm. */
  kvmDevice?: string;
  /** Watchers of the VM: see {@link VmObserver}. */
  observers?: readonly VmObserver[];
  /**
   * Let the UART's THR writes skip the exit (KVM's coalesced PIO ring,
   * replayed before the next exit is handled and on a short timer while
   * the driver has output queued), and its LSR reads be answered in the
   * addon (the fast-read table): a byte printed costs no exit instead of two.
   * Default true; the ring where KVM offers KVM_CAP_COALESCED_PIO.
   */
  coalescedIo?: boolean;
  /**
   * Confine the process once the VM starts (see sandbox.ts): Landlock for
   * the whole process, where the kernel offers it, and a seccomp filter on
   * each vCPU thread. Off by default in the library, since it confines the
   * embedding program too, for the rest of its life: create every VM (and
   * open every file) the program needs before starting a sandboxed one.
   * The CLI turns it on.
   */
  sandbox?: boolean | SandboxConfig;
}

export type VmConfigErrorKind = 'kernel-unreadable' | 'initrd-unreadable' | 'bad-memory' | 'bad-cpus' | 'bad-option';

/** The `code` of each {@link VmConfigErrorKind}. */
const CONFIG_ERROR_CODES = {
  'kernel-unreadable': 'ERR_TSVMM_KERNEL_UNREADABLE',
  'initrd-unreadable': 'ERR_TSVMM_INITRD_UNREADABLE',
  'bad-memory': 'ERR_TSVMM_BAD_MEMORY',
  'bad-cpus': 'ERR_TSVMM_BAD_CPUS',
  'bad-option': 'ERR_TSVMM_BAD_OPTION',
} as const satisfies Record<VmConfigErrorKind, string>;

/** A configuration the machine cannot be built from: `kind` says which part (and `code` the same, in Node's style). */
export class VmConfigError extends TsvmmError {
  constructor(
    readonly kind: VmConfigErrorKind,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(CONFIG_ERROR_CODES[kind], message, options);
  }
}

const SIZE_UNITS: Record<string, number> = { '': 1024 * 1024, k: 1024, m: 1024 * 1024, g: 1024 * 1024 * 1024 };

/** Parses "256M", "1G", "512K" or a plain number of MiB into bytes. */
export function parseMemorySize(value: number | string): number {
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value <= 0) throw new VmConfigError('bad-memory', `invalid memory size ${value}: give bytes as a positive integer`);
    return value;
  }
  const m = /^\s*(\d+)\s*([kmg]?)i?b?\s*$/i.exec(value);
  if (!m) throw new VmConfigError('bad-memory', `invalid memory size "${value}": use a number with K, M or G, such as 256M`);
  const bytes = Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new VmConfigError('bad-memory', `invalid memory size "${value}"`);
  return bytes;
}

/** The longest halt poll tsvmm asks KVM for: 10 ms, far past any useful poll. */
export const MAX_HALT_POLL_NS = 10_000_000;

/** Minimum guest RAM: below this no Linux kernel boots, whatever its size. */
export const MIN_MEMORY = 16 * 1024 * 1024;
export const MAX_MEMORY = 64 * 1024 * 1024 * 1024;

/** Reads a kernel or initrd given as a path; a VmConfigError names the file and what is wrong. */
export async function readInput(what: 'kernel' | 'initrd', input: string | Uint8Array): Promise<Uint8Array> {
  if (typeof input !== 'string') return input;
  try {
    return await readFile(input);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const kind = what === 'kernel' ? 'kernel-unreadable' : 'initrd-unreadable';
    const reason = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : code === 'EISDIR' ? 'is a directory' : (err as Error).message;
    throw new VmConfigError(
      kind,
      `cannot read ${what} ${input}: ${reason}; give the path of a readable ${what === 'kernel' ? 'bzImage or vmlinux' : 'initramfs'}`,
      { cause: err },
    );
  }
}

/** A configuration checked and with its defaults filled in: what the builder reads. */
export interface ValidatedConfig {
  readonly memory: number;
  readonly cpus: number;
  readonly console: ConsoleKind;
  readonly serial: SerialTarget;
}

/** Checks the fields the builder needs as numbers and kinds; throws a {@link VmConfigError}. */
export function validateConfig(config: MachineConfig): ValidatedConfig {
  const memSize = parseMemorySize(config.memory ?? DEFAULT_MEMORY);
  if (memSize < MIN_MEMORY)
    throw new VmConfigError(
      'bad-memory',
      `guest memory ${memSize >> 20} MiB is too small: give at least ${MIN_MEMORY >> 20} MiB (a distribution kernel wants 128 MiB or more)`,
    );
  if (memSize > MAX_MEMORY)
    throw new VmConfigError('bad-memory', `guest memory ${memSize >> 20} MiB is more than tsvmm supports (${MAX_MEMORY / 2 ** 30} GiB)`);
  const cpus = config.cpus ?? 1;
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > MAX_CPUS) throw new VmConfigError('bad-cpus', `cpus must be 1 to ${MAX_CPUS} (got ${cpus})`);
  if (config.exitPath !== undefined && config.exitPath !== 'thread' && config.exitPath !== 'loop') {
    throw new VmConfigError('bad-option', `exitPath must be 'thread' or 'loop' (got ${String(config.exitPath)})`);
  }
  if (config.haltPollNs !== undefined && !(Number.isSafeInteger(config.haltPollNs) && config.haltPollNs >= 0 && config.haltPollNs <= MAX_HALT_POLL_NS)) {
    throw new VmConfigError('bad-option', `haltPollNs must be a whole number of nanoseconds from 0 to ${MAX_HALT_POLL_NS} (got ${String(config.haltPollNs)})`);
  }
  if (config.kernelCache !== undefined && config.kernelCache !== false && !(typeof config.kernelCache === 'string' && config.kernelCache !== '')) {
    throw new VmConfigError('bad-option', `kernelCache must be a directory or false (got ${String(config.kernelCache)})`);
  }
  const console = config.console ?? 'serial';
  if (console !== 'serial' && console !== 'virtio' && console !== 'off') {
    throw new VmConfigError('bad-option', `console must be 'serial', 'virtio' or 'off' (got ${String(console)})`);
  }
  return { memory: Math.ceil(memSize / PAGE_SIZE) * PAGE_SIZE, cpus, console, serial: validSerial(console, config.serial) };
}

/** The serial target for `console`, or a VmConfigError that says what is wrong. */
function validSerial(console: ConsoleKind, serial: SerialTarget | undefined): SerialTarget {
  const isPath = (v: unknown) => typeof v === 'string' && v !== '';
  const target = serial as { file?: unknown; socket?: unknown } | undefined;
  const ok =
    serial === undefined ||
    serial === 'console' ||
    serial === 'off' ||
    (typeof target === 'object' && target !== null && Object.keys(target).length === 1 && (isPath(target.file) || isPath(target.socket)));
  if (!ok) throw new VmConfigError('bad-option', `serial must be 'console', 'off', { file: path } or { socket: path } (got ${JSON.stringify(serial)})`);
  if (console === 'serial') {
    if (serial !== undefined && serial !== 'console')
      throw new VmConfigError(
        'bad-option',
        `the UART is the console (console 'serial'): serial must be 'console', not ${describeSerialTarget(serial)}; choose console 'virtio' or 'off' to send it elsewhere`,
      );
    return 'console';
  }
  if (console === 'off') {
    if (serial === 'console')
      throw new VmConfigError(
        'bad-option',
        "there is no console (console 'off') to join the UART to: give serial 'off', a file or a socket, or console 'serial'",
      );
    return serial ?? 'off';
  }
  return serial ?? 'console';
}
