/**
 * The machine: builds a VM from a configuration as a recipe (check the
 * host, read the inputs, memory, VM, devices, load the kernel, vCPUs), runs
 * it, and reports how it ended.
 */
import { EventEmitter } from 'node:events';
import { readFile } from 'node:fs/promises';
import type { Logger } from '../base/log.js';
import { silentLogger } from '../base/log.js';
import { Serial16550 } from '../devices/serial.js';
import { ConsoleDevice } from '../virtio/console/device.js';
import { Pit8254, PortB } from '../devices/pit.js';
import { I8042 } from '../devices/i8042.js';
import { Cmos } from '../devices/cmos.js';
import { DebugPort, IgnoredPorts } from '../devices/legacy.js';
import type { IrqLine } from '../base/irq.js';
import { Bus } from '../base/bus.js';
import { ConsoleStream, ConsoleWatcher, panicMessage } from './console.js';
import { runOnConsole, type RunOptions, type RunResult } from './shell.js';
import { TsvmmError } from '../base/errors.js';
import { cpuidForVcpu, parseCpuid } from '../arch/cpuid.js';
import { handleExit, type ExitContext, type GuestStop } from '../kvm/exits.js';
import { EMULATED_HOST_CMDLINE, EMULATED_HOST_SMP_CMDLINE, EmulationFallback } from '../kvm/fallback.js';
import { Kvm, VmFd } from '../kvm/kvm.js';
import * as layout from '../arch/layout.js';
import { GuestMemory } from '../base/memory.js';
import { outcome, type VmOutcome } from './outcome.js';
import { probeHost, type HostProbe } from '../kvm/probe.js';
import { Vcpu } from '../kvm/vcpu.js';
import { CoalescedRing } from '../kvm/coalesced.js';
import { confineProcess, vcpuSeccompFilter, VCPU_THREAD_SYSCALLS, type SandboxConfig, type SandboxStatus } from '../kvm/sandbox.js';
import { loadLinux, prepareKernel, type BootInfo } from '../arch/boot/loader.js';
import { prepareInitrdAsync } from '../arch/boot/initrd.js';
import { writeMpTable } from '../arch/mptable.js';
import { VirtioDevices, type DiskConfig, type NetConfig, type VirtioTransportKind } from './virtio-devices.js';
import { AcpiPm } from '../devices/acpi-pm.js';
import { PvPanic } from '../devices/pvpanic.js';
import { PciAllocator } from '../devices/pci/device.js';
import { PciBarRouter, PciBus, PciConfigIo } from '../devices/pci/pci-bus.js';
import { layoutAcpiConfig, writeAcpiTables } from '../arch/acpi/index.js';
import { GsiRouting } from '../arch/irq-routing.js';

/** The default kernel command line: a microVM with its console on COM1. */
export const DEFAULT_CMDLINE = 'console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd';

/** The guest console: the 16550 UART (ttyS0) or virtio-console (hvc0). */
export type ConsoleKind = 'serial' | 'virtio';

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
   * Inflate a gzip initramfs on the host (default true): the guest kernel
   * then only copies a cpio archive instead of running inflate.
   */
  initrdInflate?: boolean;
  /**
   * Which device is the guest's console (`vm.console`): 'serial' (default,
   * the UART, ttyS0: two exits per byte) or 'virtio' (virtio-console,
   * hvc0, on the default transport: one notification per buffer). The
   * default command line follows (console=hvc0); a command line given is
   * used as is.
   */
  console?: ConsoleKind;
  /**
   * With `console: 'virtio'`, what becomes of the UART's output (early boot
   * messages with earlyprintk=serial, or console=ttyS0 given too):
   * 'console' (default) joins it to `vm.console`; 'off' discards it.
   */
  serial?: 'console' | 'off';
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
   * the driver has output queued): one exit per byte printed instead of
   * two. Default true where KVM offers KVM_CAP_COALESCED_PIO.
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

/**
 * Registers COM1's THR (port 0x3f8, one byte) with KVM's coalesced PIO ring
 * where KVM offers it, and returns the ring. The port is the divisor latch
 * while DLAB is set: those writes wait too, which is harmless, since the
 * LCR write that clears DLAB exits and drains the ring first.
 */
function setUpCoalescedPio(kvm: Kvm, vm: VmFd, vcpu: Vcpu, log: Logger): CoalescedRing | undefined {
  const pageOffset = kvm.capValue('KVM_CAP_COALESCED_MMIO');
  if (pageOffset <= 0 || !kvm.hasCap('KVM_CAP_COALESCED_PIO')) {
    log.debug('KVM offers no coalesced PIO: every THR write exits');
    return undefined;
  }
  try {
    const ring = new CoalescedRing(vcpu.run, pageOffset, layout.PAGE_SIZE);
    kvm.addon.registerCoalesced(vm.fd, layout.COM1_PORT, 1, 1);
    return ring;
  } catch (err) {
    log.info({ err }, 'coalesced PIO not set up: every THR write exits');
    return undefined;
  }
}

/** The coalesced ring's backstop drain: from 50 ms, doubling to 1 s while nothing waits (see pollCoalesced). */
const COALESCED_BACKSTOP_MIN_MS = 50;
const COALESCED_BACKSTOP_MAX_MS = 1000;

/** What a VM is doing: see {@link VirtualMachine.state}. */
export type VmState = 'created' | 'running' | 'paused' | 'ended';

/** An operation the VM's state does not allow now (pausing a VM that has ended, resuming one that runs). */
export class VmStateError extends TsvmmError {
  constructor(message: string) {
    super('ERR_TSVMM_VM_STATE', message);
  }
}

export class VmConfigError extends Error {
  constructor(
    readonly kind: VmConfigErrorKind,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'VmConfigError';
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
    const reason =
      code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : code === 'EISDIR' ? 'is a directory' : (err as Error).message;
    throw new VmConfigError(kind, `cannot read ${what} ${input}: ${reason}; pass the path of a readable ${what === 'kernel' ? 'bzImage or vmlinux' : 'initramfs'} with --${what}`, { cause: err });
  }
}

/**
 * Hides the PMU from the guest where KVM lets the VMM do so (before any
 * vCPU exists). Zeroing CPUID leaf 0xA is not enough: an AMD guest probes
 * its counters through MSRs without asking CPUID, and KVM logs each
 * unhandled WRMSR.
 */
function disableGuestPmu(kvm: Kvm, vm: VmFd, log: Logger): void {
  const c = kvm.addon.constants;
  const supported = kvm.hasCap('KVM_CAP_PMU_CAPABILITY') ? kvm.addon.checkExtension(kvm.fd, c.KVM_CAP_PMU_CAPABILITY!) : 0;
  if (!(supported & c.KVM_PMU_CAP_DISABLE!)) return;
  try {
    kvm.addon.enableCap(vm.fd, c.KVM_CAP_PMU_CAPABILITY!, c.KVM_PMU_CAP_DISABLE!);
  } catch (err) {
    log.debug({ err }, 'KVM_CAP_PMU_CAPABILITY refused; the guest keeps its PMU');
  }
}

/** An IRQ line driven through KVM_IRQ_LINE on the in-kernel irqchip. */
class KvmIrqLine implements IrqLine {
  constructor(
    private readonly vm: VmFd,
    readonly gsi: number,
    private readonly counter: { irqs: number },
  ) {}
  setLevel(high: boolean): void {
    if (high) this.counter.irqs++;
    this.vm.irqLine(this.gsi, high);
  }
  trigger(): void {
    this.counter.irqs++;
    this.vm.irqLine(this.gsi, true);
    this.vm.irqLine(this.gsi, false);
  }
}

/** Counters for a whole VM; the library exposes them through {@link VirtualMachine.stats}. */
export interface VmStats {
  exits: Record<string, number>;
  /** Port and MMIO accesses by device range (the exits each device cost). */
  pio: Record<string, number>;
  mmio: Record<string, number>;
  /** Port and MMIO accesses that hit no device, by address. */
  unhandledPio: Record<string, number>;
  unhandledMmio: Record<string, number>;
  irqsInjected: number;
  /** Writes that did not exit (KVM's coalesced PIO ring), replayed to their device; `pio` counts them too. */
  coalescedWrites: number;
  emulationFallback: Record<string, number>;
  devices: Record<string, unknown>;
  /** Where the time before the first guest instruction went. */
  startup: StartupTimes;
}

/**
 * The start-up of a VM, in milliseconds: `processToCreate` from the
 * process's start to {@link VirtualMachine.create} (Node's own start and
 * module loading), then each phase of create(), then `toStart` from the
 * end of create() to start() (the first KVM_RUN follows at once). 0 for a
 * phase not reached yet.
 */
export interface StartupTimes {
  processToCreate: number;
  /** Reading the kernel and initrd, inflating a gzip initramfs. */
  inputs: number;
  /** Opening KVM and probing what it emulates. */
  probe: number;
  /** The VM, its interrupt controller and guest RAM. */
  vm: number;
  /** Legacy devices, PCI, virtio devices (disk images, TAP devices), ACPI tables. */
  devices: number;
  /** Parsing the kernel, decompressing it on the host, placing it, the initrd and boot_params. */
  kernel: number;
  /** Creating and setting up the vCPUs. */
  vcpus: number;
  toStart: number;
  /** From the process's start to start(). */
  total: number;
}

/** Marks phase boundaries on the process clock (performance.now(): ms since the process started). */
class StartupClock {
  readonly times: StartupTimes = { processToCreate: 0, inputs: 0, probe: 0, vm: 0, devices: 0, kernel: 0, vcpus: 0, toStart: 0, total: 0 };
  private last: number;

  constructor() {
    this.last = performance.now();
    this.times.processToCreate = round3(this.last);
  }

  /** Ends `phase` now. */
  mark(phase: Exclude<keyof StartupTimes, 'processToCreate' | 'total'>): void {
    const now = performance.now();
    this.times[phase] = round3(now - this.last);
    this.last = now;
    if (phase === 'toStart') this.times.total = round3(now);
  }
}

function round3(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}

export interface VirtualMachineEvents {
  exit: [VmOutcome];
}

/**
 * A running (or ready) VM. Create with {@link VirtualMachine.create}, then
 * {@link start}; the guest console is {@link console}; {@link wait} gives
 * the outcome.
 */
export class VirtualMachine extends EventEmitter<VirtualMachineEvents> {
  readonly console: ConsoleStream;
  readonly log: Logger;
  private readonly exitCounts = new Map<string, number>();
  private readonly fallbacks: EmulationFallback[] = [];
  private stopping: VmOutcome | undefined;
  private readonly done: Promise<VmOutcome>;
  private resolveDone!: (o: VmOutcome) => void;
  private started = false;
  private panicSeen = false;
  /** Set from pause() until resume(); `clock` is the kvmclock KVM_GET_CLOCK gave (undefined: none, or still pausing). */
  private paused: { clock: bigint | undefined; pausing: boolean } | undefined;
  /** The console's first "Kernel panic - not syncing: ..." line. */
  private panicLine: string | undefined;
  private coalesced: CoalescedRing | undefined;
  private coalescedTimer: NodeJS.Timeout | undefined;
  private coalescedFast = false;
  private coalescedBackstopMs = COALESCED_BACKSTOP_MIN_MS;
  private sandboxStatus: SandboxStatus | undefined;
  /** Which device paths the guest has shown it uses: then its console text ends nothing. */
  private signals = { acpi: false, pvpanic: false };
  /** The start-up phases create() measured; start() closes the last one. */
  private startupClock: StartupClock | undefined;

  private constructor(
    readonly config: Readonly<MachineConfig>,
    private readonly kvm: Kvm,
    private readonly vm: VmFd,
    readonly memory: GuestMemory,
    readonly vcpus: Vcpu[],
    readonly boot: BootInfo,
    readonly host: HostProbe,
    readonly cmdline: string,
    private readonly pio: Bus,
    private readonly mmio: Bus,
    private readonly serial: Serial16550,
    private readonly pit: Pit8254 | undefined,
    private readonly virtio: VirtioDevices,
    private readonly irqCounter: { irqs: number },
    consoleStream: ConsoleStream,
    log: Logger,
  ) {
    super();
    this.console = consoleStream;
    this.log = log;
    this.done = new Promise((resolve) => {
      this.resolveDone = resolve;
    });
  }

  /**
   * Builds a VM: checks KVM, reads and validates the kernel and initrd,
   * creates memory, devices and vCPUs, and loads the kernel. Nothing runs
   * until {@link start}. Bad input throws a one-line error (VmConfigError,
   * KvmError, BootError, or a device's error).
   */
  static async create(config: MachineConfig): Promise<VirtualMachine> {
    const clock = new StartupClock();
    const log = config.logger ?? silentLogger;
    const memSize = parseMemorySize(config.memory ?? DEFAULT_MEMORY);
    if (memSize < MIN_MEMORY) throw new VmConfigError('bad-memory', `guest memory ${memSize >> 20} MiB is too small: pass --memory 64M or more`);
    if (memSize > MAX_MEMORY) throw new VmConfigError('bad-memory', `guest memory ${memSize >> 20} MiB is more than tsvmm supports (64 GiB)`);
    const memory = Math.ceil(memSize / layout.PAGE_SIZE) * layout.PAGE_SIZE;
    const cpus = config.cpus ?? 1;
    if (!Number.isInteger(cpus) || cpus < 1 || cpus > MAX_CPUS) throw new VmConfigError('bad-cpus', `--cpus must be 1 to ${MAX_CPUS} (got ${cpus})`);
    if (config.exitPath !== undefined && config.exitPath !== 'thread' && config.exitPath !== 'loop') {
      throw new VmConfigError('bad-option', `exitPath must be 'thread' or 'loop' (got ${String(config.exitPath)})`);
    }

    // Inputs first: a bad path fails before KVM is touched.
    const kernelBytes = await readInput('kernel', config.kernel);
    const initrdBytes = config.initrd !== undefined ? await readInput('initrd', config.initrd) : undefined;
    // Decompressing the kernel and inflating the initramfs run on other
    // threads while the VM and its devices are built; loadLinux waits.
    const kernel = prepareKernel(kernelBytes, config.bootMode ?? 'auto');
    const initrdReady = initrdBytes && config.initrdInflate !== false ? prepareInitrdAsync(initrdBytes) : undefined;
    clock.mark('inputs');

    const kvm = Kvm.open(config.kvmDevice);
    const host: HostProbe =
      config.emulationFallback === 'on'
        ? { emulationGaps: ['forced'] }
        : config.emulationFallback === 'off'
          ? { emulationGaps: [] }
          : probeHost(kvm, log);
    const fallbackOn = host.emulationGaps.length > 0;
    if (fallbackOn) log.info({ gaps: host.emulationGaps }, 'host KVM emulates guest kernel code: emulation fallback on');
    clock.mark('probe');

    const vm = kvm.createVm();
    try {
      const addon = kvm.addon;
      addon.setTssAddr(vm.fd, layout.KVM_TSS_ADDR);
      addon.setIdentityMapAddr(vm.fd, layout.KVM_IDENTITY_MAP_ADDR);
      addon.createIrqchip(vm.fd);
      if (config.pit === 'kernel') addon.createPit2(vm.fd, addon.constants.KVM_PIT_SPEAKER_DUMMY!);
      disableGuestPmu(kvm, vm, log);

      const mem = new GuestMemory(VmFd.allocateRam(vm, layout.ramRegions(memory), { mergeable: config.mergeable === true }));
      clock.mark('vm');
      const irqCounter = { irqs: 0 };
      const irq = (gsi: number): IrqLine => new KvmIrqLine(vm, gsi, irqCounter);

      // --- devices ---
      const pio = new Bus('pio');
      const mmioBus = new Bus('mmio');
      let vmRef: VirtualMachine | undefined;
      const signals = { acpi: false, pvpanic: false };
      const consoleKind = config.console ?? 'serial';
      if (consoleKind !== 'serial' && consoleKind !== 'virtio') throw new VmConfigError('bad-option', `console must be 'serial' or 'virtio' (got ${String(consoleKind)})`);
      // The console stream's input goes to whichever device is the console.
      const consoleStream = new ConsoleStream(
        (bytes) => (hvc ? hvc.enqueueInput(bytes) : serial.enqueueInput(bytes)),
        () => (hvc ? hvc.pendingInput : serial.pendingInput),
      );
      // One watcher per output source, so their lines never interleave.
      const observers = config.observers ?? [];
      const watch = () => new ConsoleWatcher((event, line) => vmRef?.onConsoleEvent(event, line), (line) => {
        for (const o of observers) o.consoleLine?.(line);
      });
      const serialWatcher = watch();
      const serialToConsole = consoleKind === 'serial' || config.serial !== 'off';
      const serial = new Serial16550({
        irq: irq(layout.COM1_IRQ),
        output: (bytes) => {
          if (serialToConsole) consoleStream.guestOutput(bytes);
          serialWatcher.feed(bytes);
        },
        onInputTaken: () => consoleStream.inputTaken(),
        logger: log.child({ dev: 'serial' }),
      });
      const hvcWatcher = watch();
      const hvc =
        consoleKind === 'virtio'
          ? new ConsoleDevice({
              output: (bytes) => {
                consoleStream.guestOutput(bytes);
                hvcWatcher.feed(bytes);
              },
              onInputTaken: () => consoleStream.inputTaken(),
              logger: log,
            })
          : undefined;
      pio.insert(serial, layout.COM1_PORT, 8, 'com1');
      let pit: Pit8254 | undefined;
      if (config.pit !== 'kernel') {
        pit = new Pit8254({ irq: irq(0), logger: log.child({ dev: 'pit' }) });
        pio.insert(pit, 0x40, 4, 'pit');
        pio.insert(new PortB(pit), 0x61, 1, 'port61');
      }
      const i8042 = new I8042({ onReset: () => vmRef?.onGuestStop({ kind: 'reboot' }), logger: log.child({ dev: 'i8042' }) });
      pio.insert(i8042.dataPort, 0x60, 1, 'i8042-data');
      pio.insert(i8042.commandPort, 0x64, 1, 'i8042-command');
      pio.insert(new Cmos(), 0x70, 2, 'cmos');
      pio.insert(new DebugPort(), 0x80, 1, 'post');
      // COM2-COM4: Linux probes them; an absent UART reads as all-ones.
      for (const base of [0x2f8, 0x3e8, 0x2e8]) pio.insert(new IgnoredPorts({ readValue: 0xff }), base, 8, `com-absent-${base.toString(16)}`);

      // How the guest tells the VMM it ends: ACPI soft-off and pvpanic, both
      // described in the ACPI tables. Until the guest shows it uses them,
      // its console lines are the fallback (see onConsoleEvent).
      const acpiOn = config.acpi !== false;
      if (acpiOn) {
        const pm = new AcpiPm({
          onPowerOff: () => vmRef?.onGuestStop({ kind: 'poweroff' }, 'through ACPI'),
          onAcpiEnabled: () => {
            signals.acpi = true;
          },
          logger: log.child({ dev: 'acpi-pm' }),
        });
        pio.insert(pm, layout.ACPI_PM1A_EVT_PORT, layout.ACPI_PM_PORT_SIZE, 'acpi-pm');
        const pvpanic = new PvPanic({
          onPanic: () => vmRef?.finish(outcome('panic', 'guest kernel panic (reported through pvpanic)')),
          onProbe: () => {
            signals.pvpanic = true;
          },
          logger: log.child({ dev: 'pvpanic' }),
        });
        pio.insert(pvpanic, layout.PVPANIC_PORT, 1, 'pvpanic');
      }

      // PCI: configuration mechanism #1, and one window that routes each
      // access to the BAR decoding there.
      const pci = new PciBus({ logger: log.child({ dev: 'pci' }) });
      pio.insert(new PciConfigIo(pci), layout.PCI_CONFIG_PORT, layout.PCI_CONFIG_PORT_SIZE, 'pci-config');
      mmioBus.insert(new PciBarRouter(pci, 'memory', layout.PCI_MMIO_START, layout.PCI_MMIO_SIZE), layout.PCI_MMIO_START, layout.PCI_MMIO_SIZE, 'pci-mmio');
      const routing = new GsiRouting(addon, vm.fd);

      const virtio = await VirtioDevices.create({
        vm,
        mem,
        mmio: mmioBus,
        pci: { bus: pci, allocator: new PciAllocator({ mmio32: { base: layout.PCI_MMIO_START, size: layout.PCI_MMIO_SIZE } }), routing },
        irq,
        disks: config.disks ?? [],
        nets: config.nets ?? [],
        ...(hvc ? { console: hvc } : {}),
        transport: config.transport ?? 'pci',
        acpi: acpiOn,
        seed: config.name ?? 'tsvmm',
        log,
        counter: irqCounter,
      });

      let acpiRsdpAddr: number | undefined;
      if (acpiOn) {
        const slotGsis = Array.from({ length: layout.PCI_MAX_SLOTS }, (_, slot) => [0, 1, 2, 3].map((pin) => layout.pciIntxGsi(slot, pin)));
        acpiRsdpAddr = writeAcpiTables(
          mem,
          layoutAcpiConfig({
            cpus,
            virtioMmio: virtio.mmioSlots,
            pci: { mmio32: { base: layout.PCI_MMIO_START, size: layout.PCI_MMIO_SIZE }, slotGsis },
            pvpanic: true,
          }),
        ).rsdpAddress;
      }

      clock.mark('devices');

      // --- command line and kernel ---
      const parts = [config.cmdline ?? defaultCmdline(consoleKind), ...virtio.cmdlineFragments];
      if (fallbackOn) parts.push(EMULATED_HOST_CMDLINE);
      if (fallbackOn && cpus > 1) parts.push(EMULATED_HOST_SMP_CMDLINE);
      const cmdline = parts.filter((p) => p.length > 0).join(' ');
      let initrd = initrdBytes;
      if (initrdReady) {
        const prepared = await initrdReady;
        if (prepared.inflated) log.debug({ from: initrdBytes?.length, to: prepared.data.length }, 'initramfs inflated on the host');
        initrd = prepared.data;
      }
      const boot = await loadLinux(mem, {
        kernel,
        initrd,
        cmdline,
        mode: config.bootMode ?? 'auto',
        ...(acpiRsdpAddr !== undefined ? { acpiRsdpAddr } : {}),
      });
      // Also for one CPU: the MP table is how a kernel without ACPI finds the IOAPIC.
      writeMpTable(mem, cpus);
      clock.mark('kernel');

      // --- vCPUs ---
      const supported = parseCpuid(addon.getSupportedCpuid(kvm.fd), addon.layout);
      const vcpus: Vcpu[] = [];
      for (let id = 0; id < cpus; id++) {
        const vcpu = new Vcpu(vm, id);
        vcpu.setCpuid(cpuidForVcpu(supported, id, cpus));
        vcpu.setBootMsrs();
        vcpu.setFpuDefaults();
        vcpu.setLapicLint();
        if (id === 0) {
          vcpu.setSregs(boot.cpu.sregs);
          vcpu.setRegs(boot.cpu.regs);
        }
        vcpus.push(vcpu);
      }
      clock.mark('vcpus');
      log.info({ kind: boot.kind, entry: `0x${boot.entry.toString(16)}`, cmdline, memory, cpus }, 'kernel loaded');

      const machine = new VirtualMachine(config, kvm, vm, mem, vcpus, boot, host, cmdline, pio, mmioBus, serial, pit, virtio, irqCounter, consoleStream, log);
      vmRef = machine;
      if (config.coalescedIo !== false) machine.coalesced = setUpCoalescedPio(kvm, vm, vcpus[0]!, log);
      machine.signals = signals;
      machine.startupClock = clock;
      return machine;
    } catch (err) {
      vm.close();
      kvm.close();
      throw err;
    }
  }

  /** exitPath 'loop' puts a single vCPU on the event loop's thread; an SMP guest always has threads. */
  private get onLoop(): boolean {
    return this.config.exitPath === 'loop' && this.vcpus.length === 1;
  }

  /** Starts every vCPU thread. The VM runs until the guest ends it or {@link stop}. */
  start(): void {
    if (this.started) throw new Error('VM already started');
    this.started = true;
    const onLoop = this.onLoop;
    if (this.config.sandbox) this.sandboxStatus = this.confine(onLoop);
    this.startupClock?.mark('toStart');
    if (this.startupClock) this.log.info({ startupMs: this.startupClock.times }, 'start-up');
    const filtered = this.sandboxStatus?.vcpuThreads.filtered === true;
    this.vcpus.forEach((vcpu) => {
      const fallback = this.host.emulationGaps.length > 0 ? new EmulationFallback(vcpu, this.memory, this.log.child({ vcpu: vcpu.id })) : undefined;
      if (fallback) this.fallbacks.push(fallback);
      const ctx: ExitContext = {
        pio: this.pio,
        mmio: this.mmio,
        counts: this.exitCounts,
        ...(fallback ? { emulationFallback: (exit) => fallback.handle(exit.insn) } : {}),
      };
      vcpu.start({
        onExit: (exit) => {
          if (this.stopping) return 'stop';
          // Writes the guest made before this exit come first.
          if (this.coalesced) this.drainCoalesced();
          const action = handleExit(exit, ctx);
          if (this.coalesced && this.serial.transmitInterruptEnabled !== this.coalescedFast) this.pollCoalesced();
          if (action.kind === 'continue') return 'continue';
          this.onGuestStop(action.stop);
          return 'stop';
        },
        onKick: () => (this.stopping ? 'stop' : 'continue'),
        onError: (err) => this.finish(outcome('error', err.message, err)),
        // exitPath 'loop' puts a single vCPU on the event loop's thread. An
        // SMP guest keeps every vCPU on a thread of its own, so they run in
        // parallel (vCPU 0 on the loop beside threaded ones stalled once in
        // four runs of the SMP test, undiagnosed: see the README).
        on: onLoop ? 'loop' : 'thread',
        ...(filtered ? { filter: vcpuSeccompFilter(this.kvm.addon.constants, vcpu.fd) } : {}),
      });
    });
    if (this.coalesced) this.pollCoalesced();
    for (const o of this.config.observers ?? []) {
      o.start?.(this.vcpus);
      // 'exit' is emitted after every vCPU stopped and before wait() resolves.
      if (o.finish) this.once('exit', (result) => o.finish?.(result));
    }
  }

  /**
   * The sandbox this VM's start applied: what Landlock confined (or why
   * not) and whether the vCPU threads run under seccomp. Undefined without
   * `sandbox` or before start.
   */
  get sandbox(): SandboxStatus | undefined {
    return this.sandboxStatus;
  }

  private confine(onLoop: boolean): SandboxStatus {
    const opts = typeof this.config.sandbox === 'object' ? this.config.sandbox : {};
    const files = confineProcess(this.kvm.addon, { outputs: (this.config.observers ?? []).flatMap((o) => o.outputs ?? []), allow: opts.allow }, this.log);
    const vcpuThreads: SandboxStatus['vcpuThreads'] = onLoop
      ? { filtered: false, reason: "exitPath 'loop' runs KVM_RUN on the main thread, which seccomp cannot narrow" }
      : { filtered: true, syscalls: ['ioctl (KVM_RUN, KVM_GET_REGS on its vCPU)', ...VCPU_THREAD_SYSCALLS] };
    return { files, vcpuThreads };
  }

  /**
   * Resolves with the outcome once the VM has ended and every vCPU thread
   * has stopped. With `signal`, rejects with an AbortError when it aborts
   * first (the VM runs on).
   */
  wait(options: { signal?: AbortSignal } = {}): Promise<VmOutcome> {
    const { signal } = options;
    if (!signal) return this.done;
    const aborted = () => new DOMException('vm.wait() aborted', 'AbortError');
    if (signal.aborted) return Promise.reject(Object.assign(aborted(), { cause: signal.reason }));
    return new Promise((resolve, reject) => {
      const onAbort = () => reject(Object.assign(aborted(), { cause: signal.reason }));
      signal.addEventListener('abort', onAbort, { once: true });
      void this.done.then((o) => {
        signal.removeEventListener('abort', onAbort);
        resolve(o);
      });
    });
  }

  /** Stops the VM from the host side. */
  stop(message = 'stopped by the host'): Promise<VmOutcome> {
    this.finish(outcome('stopped', message));
    return this.done;
  }

  /**
   * Types `command` into the shell on the guest console and resolves with
   * what it printed and its exit status; rejects with a ConsoleWaitError
   * (the console's last lines in it) on `timeout`, `signal`, or the VM's
   * end. The guest must run a shell on its console: see src/vmm/shell.ts
   * for the contract. Wait for the shell's prompt first
   * (`vm.console.waitFor(...)`); typed input is buffered until then.
   */
  run(command: string, options?: RunOptions): Promise<RunResult> {
    return runOnConsole(this.console, command, options);
  }

  /**
   * `await using vm = await createVm(...)`: stops the VM (when it has not
   * ended) and releases its threads, memory and file descriptors.
   */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop('disposed');
  }

  /**
   * What the VM is doing: 'created' (before start), 'running', 'paused',
   * 'ended' (stopping or stopped: {@link wait} has or will have the outcome).
   */
  get state(): VmState {
    if (this.stopping) return 'ended';
    if (!this.started) return 'created';
    return this.paused ? 'paused' : 'running';
  }

  /**
   * Stops every vCPU where it is (out of guest mode, the guest's state kept)
   * until {@link resume}; devices keep completing I/O already under way.
   * The guest's kvmclock is saved, so after resume the guest does not see
   * the pause as time that passed. Needs vCPUs on threads (exitPath
   * 'thread', the default). Resolves once every vCPU is out.
   */
  async pause(): Promise<void> {
    if (this.state !== 'running') throw new VmStateError(`cannot pause a VM that is ${this.state}`);
    if (this.onLoop) throw new VmStateError("pause needs vCPUs on threads of their own: exitPath 'thread' (the default), not 'loop'");
    const paused: NonNullable<typeof this.paused> = { clock: undefined, pausing: true };
    this.paused = paused;
    try {
      await Promise.all(this.vcpus.map((v) => v.pause()));
    } finally {
      paused.pausing = false;
    }
    if (this.stopping) return;
    try {
      paused.clock = this.kvm.addon.getClock(this.vm.fd);
    } catch (err) {
      this.log.warn({ err }, 'KVM_GET_CLOCK failed: the guest will see the pause as time passed');
    }
    this.log.info('vm paused');
  }

  /** Lets a paused VM run on, with its kvmclock where the pause left it. */
  resume(): void {
    const paused = this.paused;
    if (!paused || paused.pausing || this.stopping) throw new VmStateError(`cannot resume a VM that is ${paused?.pausing ? 'still pausing' : this.state}`);
    if (paused.clock !== undefined) {
      try {
        this.kvm.addon.setClock(this.vm.fd, paused.clock);
      } catch (err) {
        this.log.warn({ err }, 'KVM_SET_CLOCK failed: the guest will see the pause as time passed');
      }
    }
    this.paused = undefined;
    for (const v of this.vcpus) v.resume();
    this.log.info('vm resumed');
  }

  /** The VM's counters now. */
  stats(): VmStats {
    const fallback: Record<string, number> = {};
    for (const f of this.fallbacks) for (const [k, v] of f.counts) fallback[k] = (fallback[k] ?? 0) + v;
    const hexKeys = (m: Map<number, number>) => Object.fromEntries([...m].map(([k, v]) => [`0x${k.toString(16)}`, v]));
    return {
      exits: Object.fromEntries(this.exitCounts),
      pio: Object.fromEntries(this.pio.accesses),
      mmio: Object.fromEntries(this.mmio.accesses),
      unhandledPio: hexKeys(this.pio.unhandled),
      unhandledMmio: hexKeys(this.mmio.unhandled),
      irqsInjected: this.irqCounter.irqs,
      coalescedWrites: this.coalesced?.replayed ?? 0,
      emulationFallback: fallback,
      startup: { ...(this.startupClock?.times ?? new StartupClock().times) },
      devices: {
        serial: { ...this.serial.stats, consoleOutputDropped: this.console.droppedOutput },
        ...(this.pit ? { pit: { ...this.pit.stats } } : {}),
        ...this.virtio.stats(),
      },
    };
  }

  /**
   * The console fallback, for kernels without ACPI or pvpanic: once the
   * guest has shown it drives a device path (it bound pvpanic, or its ACPI
   * subsystem wrote the PM1 registers), the same words from any guest
   * process are only text.
   */
  private onConsoleEvent(event: 'panic' | 'power-down' | 'halted', line: string): void {
    if (event === 'panic' ? this.signals.pvpanic : this.signals.acpi) {
      this.log.debug({ event, line }, 'console line ignored: the guest reports this through a device');
      return;
    }
    if (event === 'panic') {
      this.panicSeen = true;
      this.panicLine ??= panicMessage(line).trim();
      this.log.warn({ line }, 'guest kernel panic');
    } else if (event === 'power-down') {
      this.onGuestStop({ kind: 'poweroff' });
    } else {
      this.onGuestStop({ kind: 'halt' });
    }
  }

  private onGuestStop(stop: GuestStop, how?: string): void {
    // A panic with panic=-1 ends in a reboot: report the panic.
    if (this.panicSeen && (stop.kind === 'reboot' || stop.kind === 'halt' || stop.kind === 'triple-fault')) {
      this.finish(outcome('panic', `guest kernel panic: ${this.consolePanicLine()}`));
      return;
    }
    switch (stop.kind) {
      case 'reboot':
        this.finish(outcome('reboot', 'guest rebooted'));
        break;
      case 'poweroff':
        this.finish(outcome('poweroff', how ? `guest powered off ${how}` : 'guest powered off'));
        break;
      case 'halt':
        this.finish(outcome('poweroff', 'guest halted'));
        break;
      case 'crash':
        this.finish(outcome('panic', 'guest reported a crash'));
        break;
      case 'triple-fault':
        this.finish(outcome('triple-fault', 'guest triple fault (the CPU reset itself)'));
        break;
      case 'error':
        this.finish(outcome('error', stop.message, new Error(stop.message)));
        break;
    }
  }

  private consolePanicLine(): string {
    return this.panicLine ?? 'see the console';
  }

  private drainCoalesced(): void {
    this.coalesced?.drain(this.pio, this.mmio);
  }

  /**
   * The drain timer: every millisecond while the UART's driver has output
   * queued (it enabled the THR-empty interrupt, and waits for it after
   * each burst of THR writes, which do not exit). Otherwise a backstop for
   * a write followed by no exit at all (console writes end with an LSR
   * read, which exits; a bare `out` before `hlt` does not): 50 ms, doubling
   * up to 1 s while the ring stays empty, so an idle guest costs one
   * wake-up a second. Re-armed when ETBEI changes.
   */
  private pollCoalesced(): void {
    if (this.coalescedTimer) clearTimeout(this.coalescedTimer);
    this.coalescedTimer = undefined;
    if (this.stopping || !this.coalesced) return;
    this.coalescedFast = this.serial.transmitInterruptEnabled;
    if (!this.coalescedFast) this.coalescedBackstopMs = COALESCED_BACKSTOP_MIN_MS;
    this.armCoalesced();
  }

  private armCoalesced(): void {
    const delay = this.coalescedFast ? 1 : this.coalescedBackstopMs;
    this.coalescedTimer = setTimeout(() => {
      this.coalescedTimer = undefined;
      if (this.stopping || !this.coalesced) return;
      const replayed = this.coalesced.drain(this.pio, this.mmio);
      if (this.serial.transmitInterruptEnabled !== this.coalescedFast) {
        this.pollCoalesced();
        return;
      }
      this.coalescedBackstopMs = replayed > 0 ? COALESCED_BACKSTOP_MIN_MS : Math.min(this.coalescedBackstopMs * 2, COALESCED_BACKSTOP_MAX_MS);
      this.armCoalesced();
    }, delay);
    this.coalescedTimer.unref();
  }

  /** Records the outcome (first one wins), stops every vCPU, then resolves {@link wait}. */
  private finish(result: VmOutcome): void {
    if (this.stopping) return;
    this.stopping = result;
    if (this.coalescedTimer) clearTimeout(this.coalescedTimer);
    this.coalescedTimer = undefined;
    this.log.info({ outcome: result.kind, message: result.message }, 'vm ending');
    void this.teardown(result);
  }

  /**
   * Stops the vCPUs, lets device I/O drain, then closes everything in
   * order. Total: a step that fails is logged and the rest still runs, and
   * wait() always settles.
   */
  private async teardown(result: VmOutcome): Promise<void> {
    const failed = (what: string, err: unknown) => this.log.error({ err, step: what }, 'vm teardown step failed');
    const step = (what: string, f: () => void): void => {
      try {
        f();
      } catch (err) {
        failed(what, err);
      }
    };
    await Promise.all(this.vcpus.map((v) => v.stop())).catch((err: unknown) => failed('stop vCPUs', err));
    await this.virtio.drain().catch((err: unknown) => failed('drain device I/O', err));
    // From here on synchronous, so 'exit' listeners run before anything
    // awaiting the console's end or wait() learns of it.
    step('drain the coalesced ring', () => this.drainCoalesced()); // the guest's last output may still wait there
    step('stop the PIT', () => this.pit?.dispose());
    step('close devices', () => this.virtio.close());
    step('end the console', () => this.console.finish());
    for (const v of this.vcpus) step(`close vCPU ${v.id}`, () => v.close());
    step('close the VM', () => this.vm.close());
    step('close /dev/kvm', () => this.kvm.close());
    step("emit 'exit'", () => this.emit('exit', result));
    this.resolveDone(result);
  }
}

