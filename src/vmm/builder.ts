/**
 * The machine's builder: reads a validated configuration as a recipe and
 * makes the parts of a VM, in order (check the host, read the inputs,
 * memory, VM, devices, load the kernel, vCPUs). Each device manager
 * (src/vmm/device-manager.ts) inserts its devices into a bus and wires
 * their IRQs; every address and IRQ comes from the layout module. The
 * devices tell the machine what the guest does through {@link GuestEvents},
 * which the machine subscribes to once it exists.
 */
import { EventEmitter } from 'node:events';
import type { Logger } from '../base/log.js';
import { runLogged, silentLogger } from '../base/log.js';
import { Bus } from '../base/bus.js';
import type { IrqLine } from '../base/irq.js';
import { GuestMemory } from '../base/memory.js';
import { Kvm, VmFd } from '../kvm/kvm.js';
import { IrqfdLine, KvmIrqLine } from '../kvm/irq-lines.js';
import { Vcpu } from '../kvm/vcpu.js';
import { CoalescedRing } from '../kvm/coalesced.js';
import { FastReadTable } from '../kvm/fast-reads.js';
import { hostCpuModelName, probeHost, type HostProbe } from '../kvm/probe.js';
import { EMULATED_HOST_CMDLINE, EMULATED_HOST_SMP_CMDLINE } from '../kvm/fallback.js';
import type { GuestStop } from '../kvm/exits.js';
import * as layout from '../arch/layout.js';
import { cpuidForVcpu, parseCpuid } from '../arch/cpuid.js';
import { GsiRouting } from '../arch/irq-routing.js';
import { layoutAcpiConfig, writeAcpiTables } from '../arch/acpi/index.js';
import { loadLinux, prepareKernel, type BootInfo } from '../arch/boot/loader.js';
import { defaultKernelCacheDir, KernelCache } from './kernel-cache.js';
import { prepareInitrdAsync } from '../arch/boot/initrd.js';
import { writeMpTable } from '../arch/mptable.js';
import { Serial16550, UART_LSR, UART_REGISTER_COUNT } from '../devices/serial.js';
import { Pit8254, PIT_REGISTER_COUNT, PortB } from '../devices/pit.js';
import { I8042 } from '../devices/i8042.js';
import { Cmos, CMOS_PORT_COUNT } from '../devices/cmos.js';
import { DebugPort, IgnoredPorts } from '../devices/legacy.js';
import { AcpiPm } from '../devices/acpi-pm.js';
import { PvPanic } from '../devices/pvpanic.js';
import { ConsoleDevice } from '../virtio/console/device.js';
import { ConsoleStream, ConsoleWatcher, type ConsoleEvent } from './console.js';
import { defaultCmdline, readInput, validateConfig, type ConsoleKind, type MachineConfig, type VmObserver } from './config.js';
import { describeSerialTarget, openSerialTarget, type SerialSink, type SerialTarget } from './serial-target.js';
import { LegacyDevices, MmioDevices, PciDevices } from './device-manager.js';
import { VirtioDevices } from './virtio-devices.js';

/** What the devices report about the guest, for the machine to act on. */
export interface GuestEvents {
  /** The guest asked to stop: a reset through the i8042, a power-off through ACPI (`how` says so). */
  stop: [stop: GuestStop, how?: string];
  /** The guest reported a panic through pvpanic. */
  panic: [];
  /** A console line that may end the guest (a panic, "reboot: Power down"). */
  console: [event: ConsoleEvent, line: string];
  /** The guest showed it drives a device path: from then on, its console text ends nothing. */
  uses: [path: 'acpi' | 'pvpanic'];
}

/** What a caller of the builder already has: the kernel's bytes, observers it made, the clock it started. */
export interface PreparedInputs {
  /** The kernel, read from `config.kernel` already. */
  readonly kernel?: Uint8Array;
  /** Observers besides `config.observers`. */
  readonly observers?: readonly VmObserver[];
  /** The start-up clock, started before the caller's own preparation. */
  readonly startup?: StartupClock;
}

/** Everything the builder made: what a {@link VirtualMachine} runs. */
export interface MachineParts {
  readonly config: Readonly<MachineConfig>;
  readonly log: Logger;
  readonly kvm: Kvm;
  readonly vm: VmFd;
  readonly host: HostProbe;
  readonly memory: GuestMemory;
  readonly pio: Bus;
  readonly mmio: Bus;
  readonly legacy: LegacyDevices;
  readonly mmioDevices: MmioDevices;
  readonly pci: PciDevices;
  readonly virtio: VirtioDevices;
  readonly serial: Serial16550;
  readonly pit: Pit8254 | undefined;
  readonly console: ConsoleStream;
  readonly events: EventEmitter<GuestEvents>;
  readonly irqCounter: { irqs: number };
  readonly boot: BootInfo;
  readonly cmdline: string;
  readonly vcpus: Vcpu[];
  readonly coalesced: CoalescedRing | undefined;
  /** Port reads the addon answers (the UART's LSR); undefined with coalescedIo false. */
  readonly fastReads: FastReadTable | undefined;
  readonly startup: StartupClock;
  /** `config.observers` and those the caller prepared. */
  readonly observers: readonly VmObserver[];
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
export class StartupClock {
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

/**
 * Builds the parts of a VM from `config`. Bad input throws a one-line
 * error (VmConfigError, KvmError, BootError, or a device's error) and
 * releases whatever was made.
 */
export async function buildMachine(config: MachineConfig, prepared: PreparedInputs = {}): Promise<MachineParts> {
  const clock = prepared.startup ?? new StartupClock();
  const log = config.logger ?? silentLogger;
  const { memory, cpus, console: consoleKind, serial: serialTarget } = validateConfig(config);
  const observers = [...(config.observers ?? []), ...(prepared.observers ?? [])];

  // Inputs first: a bad path fails before KVM is touched.
  const kernelBytes = prepared.kernel ?? (await readInput('kernel', config.kernel));
  const initrdBytes = config.initrd !== undefined ? await readInput('initrd', config.initrd) : undefined;
  // Decompressing the kernel and inflating the initramfs run on other
  // threads while the VM and its devices are built; loadLinux waits.
  const cacheDir = config.kernelCache === undefined ? defaultKernelCacheDir() : config.kernelCache;
  const kernel = prepareKernel(kernelBytes, config.bootMode ?? 'auto', cacheDir === false ? undefined : new KernelCache(cacheDir, log));
  const initrdReady = initrdBytes && config.initrdInflate !== false ? prepareInitrdAsync(initrdBytes) : undefined;
  clock.mark('inputs');

  const kvm = Kvm.open(config.kvmDevice);
  let vm: VmFd | undefined;
  const managers: Array<{ close(): unknown }> = [];
  const vcpus: Vcpu[] = [];
  try {
    const host = probe(kvm, config, log);
    const fallbackOn = host.emulationGaps.length > 0;
    clock.mark('probe');

    vm = createVm(kvm, config, log);
    const mem = new GuestMemory(VmFd.allocateRam(vm, layout.ramRegions(memory), { mergeable: config.mergeable === true }));
    clock.mark('vm');

    const irqCounter = { irqs: 0 };
    const vmFd = vm;
    const irq = (gsi: number): IrqLine => new KvmIrqLine(vmFd, gsi, irqCounter);
    // The legacy devices' lines (the UART, the PIT) through irqfds where
    // KVM has them: one eventfd write per edge instead of two ioctls.
    const legacyIrqfd = kvm.hasCap('KVM_CAP_IRQFD') && config.legacyIrqfd !== false;
    const legacyFds: number[] = [];
    const legacyIrq = (gsi: number): IrqLine => {
      if (!legacyIrqfd) return irq(gsi);
      const fd = kvm.addon.eventfd(0);
      legacyFds.push(fd);
      kvm.addon.irqfd(vmFd.fd, fd, gsi, 0);
      return new IrqfdLine(kvm.addon, fd, irqCounter);
    };
    const events = new EventEmitter<GuestEvents>();
    const pio = new Bus('pio');
    const mmio = new Bus('mmio');
    const legacy = new LegacyDevices(pio, legacyIrq, log);
    legacy.onClose('legacy irqfds', () => {
      for (const fd of legacyFds.splice(0)) kvm.addon.close(fd);
    }); // the first registered, so the last closed
    const mmioDevices = new MmioDevices(mmio, irq, log);
    managers.push(legacy, mmioDevices);

    // The UART's LSR, polled before each byte printed, answered in the addon.
    const fastReads = config.coalescedIo !== false ? FastReadTable.shared(kvm.addon) : undefined;
    const { consoleStream, serial, hvc } = await consoleDevices(legacy, consoleKind, serialTarget, observers, events, log, fastReads);
    const pit = legacyDevices(legacy, config, events, log);
    const acpiOn = config.acpi !== false;
    if (acpiOn) acpiDevices(legacy, events, log);
    const pci = new PciDevices(legacy, mmioDevices, irq, log);
    managers.push(pci);
    const virtio = await VirtioDevices.create({
      vm,
      mem,
      mmio: mmioDevices,
      pci,
      routing: new GsiRouting(kvm.addon, vm.fd),
      disks: config.disks ?? [],
      nets: config.nets ?? [],
      ...(hvc ? { console: hvc } : {}),
      transport: config.transport ?? 'pci',
      acpi: acpiOn,
      seed: config.name ?? 'tsvmm',
      log,
      counter: irqCounter,
    });
    managers.push(virtio);
    const acpiRsdpAddr = acpiOn ? writeAcpi(mem, cpus, virtio) : undefined;
    clock.mark('devices');

    // --- command line and kernel ---
    const parts = [config.cmdline ?? defaultCmdline(consoleKind), ...virtio.cmdlineFragments];
    if (fallbackOn) parts.push(EMULATED_HOST_CMDLINE);
    if (fallbackOn && cpus > 1) parts.push(EMULATED_HOST_SMP_CMDLINE, ...tscFrequency(kvm, vm, log));
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

    createVcpus(kvm, vm, cpus, boot, vcpus);
    clock.mark('vcpus');
    log.info({ kind: boot.kind, entry: `0x${boot.entry.toString(16)}`, cmdline, memory, cpus }, 'kernel loaded');
    const coalesced = config.coalescedIo !== false ? setUpCoalescedPio(kvm, vm, vcpus[0]!, log) : undefined;
    if (fastReads && coalesced) fastReads.ringPage = coalesced.pageOffset;
    return {
      config,
      log,
      kvm,
      vm,
      host,
      memory: mem,
      pio,
      mmio,
      legacy,
      mmioDevices,
      pci,
      virtio,
      serial,
      pit,
      console: consoleStream,
      events,
      irqCounter,
      boot,
      cmdline,
      vcpus,
      coalesced,
      fastReads,
      startup: clock,
      observers,
    };
  } catch (err) {
    // Everything made so far, each close on its own: the first error is the one to report.
    const release = (what: string, close: () => unknown) => runLogged(log, 'releasing a VM that could not be built failed', what, close);
    for (const m of managers.reverse()) release('devices', () => m.close());
    for (const v of vcpus) release(`vCPU ${v.id}`, () => v.close());
    if (vm) release('the VM', () => vm?.close());
    release('/dev/kvm', () => kvm.close());
    throw err;
  }
}

/** What KVM on this host emulates badly: the emulation fallback's switch. */
function probe(kvm: Kvm, config: MachineConfig, log: Logger): HostProbe {
  const host: HostProbe =
    config.emulationFallback === 'on' ? { emulationGaps: ['forced'] } : config.emulationFallback === 'off' ? { emulationGaps: [] } : probeHost(kvm, log);
  if (host.emulationGaps.length > 0) log.info({ gaps: host.emulationGaps }, 'host KVM emulates guest kernel code: emulation fallback on');
  return host;
}

/** The VM with its in-kernel interrupt controller (and PIT when asked for), and no guest PMU. */
function createVm(kvm: Kvm, config: MachineConfig, log: Logger): VmFd {
  const vm = kvm.createVm();
  try {
    const addon = kvm.addon;
    addon.setTssAddr(vm.fd, layout.KVM_TSS_ADDR);
    addon.setIdentityMapAddr(vm.fd, layout.KVM_IDENTITY_MAP_ADDR);
    addon.createIrqchip(vm.fd);
    if (config.pit === 'kernel') addon.createPit2(vm.fd, addon.constants.KVM_PIT_SPEAKER_DUMMY!);
    disableGuestPmu(kvm, vm, log);
    if (config.haltPollNs !== undefined) setHaltPoll(kvm, vm, config.haltPollNs, log);
    return vm;
  } catch (err) {
    vm.close();
    throw err;
  }
}

/** KVM_CAP_HALT_POLL: how long KVM polls a halted vCPU before it sleeps (see MachineConfig.haltPollNs). */
function setHaltPoll(kvm: Kvm, vm: VmFd, ns: number, log: Logger): void {
  if (!kvm.hasCap('KVM_CAP_HALT_POLL')) {
    log.warn("KVM offers no KVM_CAP_HALT_POLL: haltPollNs ignored, the host's halt_poll_ns applies");
    return;
  }
  try {
    kvm.addon.enableCap(vm.fd, kvm.addon.constants.KVM_CAP_HALT_POLL!, ns);
  } catch (err) {
    log.info({ err }, "KVM_CAP_HALT_POLL refused: the host's halt_poll_ns applies");
  }
}

/**
 * The console and the UART: the UART is always there (early boot
 * messages); it is the console, or its output goes where `serialTarget`
 * says. virtio-console is made when it is the console. The stream's input
 * goes to whichever is the console (nowhere with console 'off'). One
 * watcher per output source, so their lines never interleave.
 */
async function consoleDevices(
  legacy: LegacyDevices,
  consoleKind: ConsoleKind,
  serialTarget: SerialTarget,
  observers: readonly VmObserver[],
  events: EventEmitter<GuestEvents>,
  log: Logger,
  fastReads: FastReadTable | undefined,
): Promise<{ consoleStream: ConsoleStream; serial: Serial16550; hvc: ConsoleDevice | undefined }> {
  let hvc: ConsoleDevice | undefined;
  const serialIsConsole = consoleKind === 'serial';
  const consoleStream = new ConsoleStream(
    (bytes) => (hvc ? hvc.enqueueInput(bytes) : serialIsConsole ? serial.enqueueInput(bytes) : undefined),
    () => (hvc ? hvc.pendingInput : serialIsConsole ? serial.pendingInput : 0),
  );
  const watch = () =>
    new ConsoleWatcher(
      (event, line) => events.emit('console', event, line),
      (line) => {
        for (const o of observers) o.consoleLine?.(line);
      },
    );
  const serialWatcher = watch();
  let sink: SerialSink | undefined;
  const serial = legacy.add(
    { name: 'com1', base: layout.COM1_PORT, size: UART_REGISTER_COUNT, gsi: layout.COM1_IRQ },
    (irq) =>
      new Serial16550({
        irq: irq!,
        output: (bytes) => {
          if (serialTarget === 'console') consoleStream.guestOutput(bytes);
          else sink?.write(bytes);
          serialWatcher.feed(bytes);
        },
        onInputTaken: () => (serialIsConsole ? consoleStream.inputTaken() : sink?.inputTaken()),
        logger: log.child({ dev: 'serial' }),
        ...(fastReads ? { lsrMirror: fastReads.add(layout.COM1_PORT + UART_LSR) } : {}),
      }),
  );
  if (typeof serialTarget === 'object') {
    const opened = await openSerialTarget(
      serialTarget,
      { send: (bytes) => serial.enqueueInput(bytes), pending: () => serial.pendingInput },
      log.child({ dev: 'serial' }),
    );
    sink = opened;
    legacy.onClose(`com1 ${describeSerialTarget(serialTarget)}`, () => opened.close());
  }
  if (consoleKind === 'virtio') {
    const hvcWatcher = watch();
    hvc = new ConsoleDevice({
      output: (bytes) => {
        consoleStream.guestOutput(bytes);
        hvcWatcher.feed(bytes);
      },
      onInputTaken: () => consoleStream.inputTaken(),
      logger: log,
    });
  }
  return { consoleStream, serial, hvc };
}

/**
 * `nopv` leaves the guest without kvmclock, and on these hosts it cannot
 * calibrate its TSC either (no PIT reference there: "Marking TSC unstable
 * due to could not calculate TSC khz"). It then keeps time by jiffies,
 * with a periodic tick that cost an idle guest a third of a host core per
 * vCPU (bench/README.md). Its TSC frequency from KVM ends that.
 */
function tscFrequency(kvm: Kvm, vm: VmFd, log: Logger): string[] {
  try {
    const khz = kvm.addon.getTscKhz(vm.fd);
    return khz > 0 ? [`tsc_early_khz=${khz}`] : [];
  } catch (err) {
    log.warn({ err }, 'KVM_GET_TSC_KHZ on the VM refused: the guest cannot tell its TSC frequency, keeps time by jiffies, and an idle guest costs host CPU');
    return [];
  }
}

/** The PC's other port I/O devices: PIT and port 0x61, i8042, CMOS, the POST port, absent UARTs. */
function legacyDevices(legacy: LegacyDevices, config: MachineConfig, events: EventEmitter<GuestEvents>, log: Logger): Pit8254 | undefined {
  let pit: Pit8254 | undefined;
  if (config.pit !== 'kernel') {
    const p = legacy.add<Pit8254>(
      { name: 'pit', base: layout.PIT_PORT, size: PIT_REGISTER_COUNT, gsi: layout.PIT_IRQ, close: (d) => d.dispose() },
      (irq) => new Pit8254({ irq: irq!, logger: log.child({ dev: 'pit' }) }),
    );
    legacy.add({ name: 'port61', base: layout.PORT_B_PORT, size: 1 }, () => new PortB(p));
    pit = p;
  }
  const i8042 = new I8042({ onReset: () => events.emit('stop', { kind: 'reboot' }), logger: log.child({ dev: 'i8042' }) });
  legacy.add({ name: 'i8042-data', base: layout.I8042_DATA_PORT, size: 1 }, () => i8042.dataPort);
  legacy.add({ name: 'i8042-command', base: layout.I8042_COMMAND_PORT, size: 1 }, () => i8042.commandPort);
  legacy.add({ name: 'cmos', base: layout.CMOS_PORT, size: CMOS_PORT_COUNT }, () => new Cmos());
  legacy.add({ name: 'post', base: layout.DEBUG_PORT, size: 1 }, () => new DebugPort());
  // COM2-COM4: Linux probes them; an absent UART reads as all-ones.
  for (const base of layout.ABSENT_UART_PORTS) {
    legacy.add({ name: `com-absent-${base.toString(16)}`, base, size: UART_REGISTER_COUNT }, () => new IgnoredPorts({ readValue: 0xff }));
  }
  return pit;
}

/**
 * How the guest tells the VMM it ends: ACPI soft-off and pvpanic, both
 * described in the ACPI tables. Until the guest shows it uses them, its
 * console lines are the fallback (the machine's onConsoleEvent).
 */
function acpiDevices(legacy: LegacyDevices, events: EventEmitter<GuestEvents>, log: Logger): void {
  legacy.add(
    { name: 'acpi-pm', base: layout.ACPI_PM1A_EVT_PORT, size: layout.ACPI_PM_PORT_SIZE },
    () =>
      new AcpiPm({
        onPowerOff: () => events.emit('stop', { kind: 'poweroff' }, 'through ACPI'),
        onAcpiEnabled: () => events.emit('uses', 'acpi'),
        logger: log.child({ dev: 'acpi-pm' }),
      }),
  );
  legacy.add(
    { name: 'pvpanic', base: layout.PVPANIC_PORT, size: 1 },
    () =>
      new PvPanic({
        onPanic: () => events.emit('panic'),
        onProbe: () => events.emit('uses', 'pvpanic'),
        logger: log.child({ dev: 'pvpanic' }),
      }),
  );
}

/** The ACPI tables (MADT, DSDT with the devices, FADT); returns the RSDP's address. */
function writeAcpi(mem: GuestMemory, cpus: number, virtio: VirtioDevices): number {
  const slotGsis = Array.from({ length: layout.PCI_MAX_SLOTS }, (_, slot) => [0, 1, 2, 3].map((pin) => layout.pciIntxGsi(slot, pin)));
  return writeAcpiTables(
    mem,
    layoutAcpiConfig({
      cpus,
      virtioMmio: virtio.mmioSlots,
      pci: { mmio32: { base: layout.PCI_MMIO_START, size: layout.PCI_MMIO_SIZE }, slotGsis },
      pvpanic: true,
    }),
  ).rsdpAddress;
}

/** The vCPUs, with CPUID, MSRs, FPU and LAPIC set; vCPU 0 at the kernel's entry. Each joins `vcpus` as soon as it exists. */
function createVcpus(kvm: Kvm, vm: VmFd, cpus: number, boot: BootInfo, vcpus: Vcpu[]): void {
  const supported = parseCpuid(kvm.addon.getSupportedCpuid(kvm.fd), kvm.addon.layout);
  const brand = hostCpuModelName();
  const cpuidOptions = { tscDeadline: kvm.hasCap('KVM_CAP_TSC_DEADLINE_TIMER'), ...(brand !== undefined ? { brand } : {}) };
  for (let id = 0; id < cpus; id++) {
    const vcpu = new Vcpu(vm, id);
    vcpus.push(vcpu);
    vcpu.setCpuid(cpuidForVcpu(supported, id, cpus, cpuidOptions));
    vcpu.setBootMsrs();
    vcpu.setFpuDefaults();
    vcpu.setLapicLint();
    if (id === 0) {
      vcpu.setSregs(boot.cpu.sregs);
      vcpu.setRegs(boot.cpu.regs);
    }
  }
}

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
