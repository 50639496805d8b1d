/**
 * The machine: a VM the builder (src/vmm/builder.ts) made from a
 * configuration. It runs the vCPUs, hands each exit to the buses, turns
 * what the guest does into an outcome, and tears everything down in order.
 */
import { EventEmitter } from 'node:events';
import { runLogged, type Logger } from '../base/log.js';
import type { Bus } from '../base/bus.js';
import type { GuestMemory } from '../base/memory.js';
import { TsvmmError } from '../base/errors.js';
import { handleExit, STOP, type ExitContext, type GuestStop } from '../kvm/exits.js';
import { EmulationFallback } from '../kvm/fallback.js';
import type { Kvm, VmFd } from '../kvm/kvm.js';
import type { HostProbe } from '../kvm/probe.js';
import type { Vcpu } from '../kvm/vcpu.js';
import type { CoalescedRing } from '../kvm/coalesced.js';
import type { FastReadTable } from '../kvm/fast-reads.js';
import { confineProcess, vcpuSeccompFilter, VCPU_THREAD_SYSCALLS, type SandboxStatus } from '../kvm/sandbox.js';
import type { BootInfo } from '../arch/boot/loader.js';
import type { Serial16550 } from '../devices/serial.js';
import type { Pit8254 } from '../devices/pit.js';
import { type ConsoleStream, type ConsoleEvent, panicMessage } from './console.js';
import { runOnConsole, type RunOptions, type RunResult } from './shell.js';
import { outcome, type VmOutcome } from './outcome.js';
import type { MachineConfig } from './config.js';
import { buildMachine, StartupClock, type MachineParts, type PreparedInputs, type StartupTimes } from './builder.js';

export type { StartupTimes };
import type { VirtioDevices } from './virtio-devices.js';

/** The coalesced ring's backstop drain: from 50 ms, doubling to 1 s while nothing waits (see pollCoalesced). */
const COALESCED_BACKSTOP_MIN_MS = 50;
const COALESCED_BACKSTOP_MAX_MS = 1000;
/** The drain while a console prints and its LSR polls are answered in the addon (see pollCoalesced). */
const COALESCED_STREAM_MS = 5;

/** What a VM is doing: see {@link VirtualMachine.state}. */
export type VmState = 'created' | 'running' | 'paused' | 'ended';

/** An operation the VM's state does not allow now (pausing a VM that has ended, resuming one that runs). */
export class VmStateError extends TsvmmError {
  constructor(message: string) {
    super('ERR_TSVMM_VM_STATE', message);
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
  /** Port reads the addon answered without an exit to TypeScript (the UART's LSR polls); not in `exits` or `pio`. */
  fastReads: number;
  emulationFallback: Record<string, number>;
  devices: Record<string, unknown>;
  /** Where the time before the first guest instruction went. */
  startup: StartupTimes;
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
  /** Waits with a signal still pending: see {@link wait}. */
  private readonly waiters = new Set<(o: VmOutcome) => void>();
  /** The outcome, once teardown is over and wait() has resolved. */
  private ended: VmOutcome | undefined;
  private started = false;
  private panicSeen = false;
  /** Set from pause() until resume(); `clock` is the kvmclock KVM_GET_CLOCK gave (undefined: none, or still pausing). */
  private paused: { clock: bigint | undefined; pausing: boolean } | undefined;
  /** The console's first "Kernel panic - not syncing: ..." line. */
  private panicLine: string | undefined;
  private coalesced: CoalescedRing | undefined;
  private coalescedTimer: NodeJS.Timeout | undefined;
  private coalescedFast = false;
  /** Draining every COALESCED_STREAM_MS: output flows while its LSR polls do not exit. */
  private coalescedStreaming = false;
  private coalescedBackstopMs = COALESCED_BACKSTOP_MIN_MS;
  private readonly fastReads: FastReadTable | undefined;
  private sandboxStatus: SandboxStatus | undefined;
  /** Which device paths the guest has shown it uses: then its console text ends nothing. */
  private signals = { acpi: false, pvpanic: false };
  /** The start-up phases create() measured; start() closes the last one. */
  private startupClock: StartupClock | undefined;

  readonly config: Readonly<MachineConfig>;
  readonly memory: GuestMemory;
  readonly vcpus: Vcpu[];
  readonly boot: BootInfo;
  readonly host: HostProbe;
  readonly cmdline: string;
  private readonly parts: MachineParts;
  private readonly kvm: Kvm;
  private readonly vm: VmFd;
  private readonly pio: Bus;
  private readonly mmio: Bus;
  private readonly serial: Serial16550;
  private readonly pit: Pit8254 | undefined;
  private readonly virtio: VirtioDevices;

  private constructor(parts: MachineParts) {
    super();
    this.parts = parts;
    ({ config: this.config, memory: this.memory, vcpus: this.vcpus, boot: this.boot, host: this.host, cmdline: this.cmdline } = parts);
    ({ kvm: this.kvm, vm: this.vm, pio: this.pio, mmio: this.mmio, serial: this.serial, pit: this.pit, virtio: this.virtio } = parts);
    this.console = parts.console;
    this.log = parts.log;
    this.coalesced = parts.coalesced;
    this.fastReads = parts.fastReads;
    this.startupClock = parts.startup;
    this.done = new Promise((resolve) => {
      this.resolveDone = resolve;
    });
    const events = parts.events;
    events.on('stop', (stop, how) => this.onGuestStop(stop, how));
    events.on('panic', () => this.finish(outcome('panic', 'guest kernel panic (reported through pvpanic)')));
    events.on('console', (event, line) => this.onConsoleEvent(event, line));
    events.on('uses', (path) => {
      this.signals[path] = true;
    });
  }

  /**
   * Builds a VM: checks KVM, reads and validates the kernel and initrd,
   * creates memory, devices and vCPUs, and loads the kernel (see
   * src/vmm/builder.ts). Nothing runs until {@link start}. Bad input throws
   * a one-line error (VmConfigError, KvmError, BootError, or a device's
   * error). `profile` is not the machine's: the library's `createVm`
   * attaches the tools a VmConfig asks for (the profiler), through
   * `prepared`.
   */
  static async create(config: MachineConfig, prepared?: PreparedInputs): Promise<VirtualMachine> {
    return new VirtualMachine(await buildMachine(config, prepared));
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
          if (this.stopping) return STOP;
          // Writes the guest made before this exit come first.
          if (this.coalesced) this.drainCoalesced();
          const action = handleExit(exit, ctx);
          if (this.coalesced) {
            if (this.serial.transmitInterruptEnabled !== this.coalescedFast) this.pollCoalesced();
            else if (this.fastReads && !this.fastReads.notifyArmed && !this.coalescedStreaming && !this.coalescedFast) this.streamCoalesced();
          }
          if (action.kind === 'stop' && action.stop) this.onGuestStop(action.stop);
          return action;
        },
        onError: (err) => this.finish(outcome('error', err.message, err)),
        // exitPath 'loop' puts a single vCPU on the event loop's thread. An
        // SMP guest keeps every vCPU on a thread of its own, so they run in
        // parallel (vCPU 0 on the loop beside threaded ones stalled once in
        // four runs of the SMP test, undiagnosed: see the README).
        on: onLoop ? 'loop' : 'thread',
        ...(filtered ? { filter: vcpuSeccompFilter(this.kvm.addon.constants, vcpu.fd) } : {}),
      });
      if (this.fastReads) vcpu.setFastReads(this.fastReads);
    });
    if (this.coalesced) this.pollCoalesced();
    for (const o of this.parts.observers) {
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
    const files = confineProcess(this.kvm.addon, { outputs: this.parts.observers.flatMap((o) => o.outputs ?? []), allow: opts.allow }, this.log);
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
    if (this.ended) return this.done;
    return new Promise((resolve, reject) => {
      // Held in a set the end empties, not in a then() on `done`: an aborted
      // wait leaves nothing behind while the VM runs on.
      const waiter = (o: VmOutcome) => {
        signal.removeEventListener('abort', onAbort);
        resolve(o);
      };
      const onAbort = () => {
        this.waiters.delete(waiter);
        reject(Object.assign(aborted(), { cause: signal.reason }));
      };
      signal.addEventListener('abort', onAbort, { once: true });
      this.waiters.add(waiter);
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
   * (`vm.console.waitFor(...)`); typed input is buffered until then. A VM
   * built with `console: 'off'` has no console to run it on: a TypeError.
   */
  run(command: string, options?: RunOptions): Promise<RunResult> {
    if (this.config.console === 'off') {
      return Promise.reject(new TypeError("vm.run: this VM has no console (console 'off'); give it console 'serial' or 'virtio'"));
    }
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
      irqsInjected: this.parts.irqCounter.irqs,
      coalescedWrites: this.coalesced?.replayed ?? 0,
      fastReads: this.fastReads?.totalHits ?? 0,
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
  private onConsoleEvent(event: ConsoleEvent, line: string): void {
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
   * a write followed by no exit at all: 50 ms, doubling up to 1 s while the
   * ring stays empty, so an idle guest costs one wake-up a second. Re-armed
   * when ETBEI changes.
   *
   * A console's polled writes (printk) read LSR before every byte, and
   * those reads do not exit either (the fast-read table): the first one
   * made while the ring holds writes exits after all (armNotify), and from
   * then on the ring is drained every COALESCED_STREAM_MS until a drain
   * finds it empty, when the notification is armed again. So output waits
   * at most a few milliseconds, and a guest printing costs one drain per
   * COALESCED_STREAM_MS instead of one exit per byte (or one per ring-full,
   * when KVM finds the ring full and lets the write exit).
   */
  private pollCoalesced(): void {
    this.coalescedFast = this.serial.transmitInterruptEnabled;
    this.coalescedStreaming = false;
    if (!this.coalescedFast) {
      this.coalescedBackstopMs = COALESCED_BACKSTOP_MIN_MS;
      this.fastReads?.armNotify();
    }
    this.armCoalesced();
  }

  /** A notified LSR poll came: drain on the streaming timer from now on. */
  private streamCoalesced(): void {
    this.coalescedStreaming = true;
    this.armCoalesced();
  }

  /** (Re)starts the drain timer for the current mode, replacing one already set. */
  private armCoalesced(): void {
    if (this.coalescedTimer) clearTimeout(this.coalescedTimer);
    this.coalescedTimer = undefined;
    if (this.stopping || !this.coalesced) return;
    const delay = this.coalescedFast ? 1 : this.coalescedStreaming ? COALESCED_STREAM_MS : this.coalescedBackstopMs;
    this.coalescedTimer = setTimeout(() => {
      this.coalescedTimer = undefined;
      if (this.stopping || !this.coalesced) return;
      // Armed before the drain: a vCPU thread may write and poll between the
      // drain and anything after it, and that poll must exit if this drain
      // turns out to be the stream's last (an exit it makes is handled
      // after this callback, and starts streaming again).
      if (this.coalescedStreaming) this.fastReads?.armNotify();
      const replayed = this.coalesced.drain(this.pio, this.mmio);
      if (this.serial.transmitInterruptEnabled !== this.coalescedFast) {
        this.pollCoalesced();
        return;
      }
      if (replayed > 0) {
        this.coalescedBackstopMs = COALESCED_BACKSTOP_MIN_MS;
        if (this.coalescedStreaming) this.fastReads?.disarmNotify(); // still streaming: the next tick drains
      } else {
        this.coalescedBackstopMs = Math.min(this.coalescedBackstopMs * 2, COALESCED_BACKSTOP_MAX_MS);
        // Output stopped: back to the backstop, with the notification armed above.
        this.coalescedStreaming = false;
      }
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
    const step = (what: string, f: () => void) => runLogged(this.log, 'vm teardown step failed', what, f);
    await Promise.all(this.vcpus.map((v) => v.stop())).catch((err: unknown) => failed('stop vCPUs', err));
    await this.virtio.drain().catch((err: unknown) => failed('drain device I/O', err));
    // From here on synchronous, so 'exit' listeners run before anything
    // awaiting the console's end or wait() learns of it.
    step('drain the coalesced ring', () => this.drainCoalesced()); // the guest's last output may still wait there
    // Each manager closes all its devices and logs what failed.
    step('close virtio devices', () => this.virtio.close());
    step('close PCI devices', () => this.parts.pci.close());
    step('close MMIO devices', () => this.parts.mmioDevices.close());
    step('close legacy devices', () => this.parts.legacy.close());
    step('end the console', () => this.console.finish(result.message));
    for (const v of this.vcpus) step(`close vCPU ${v.id}`, () => v.close());
    step('close the VM', () => this.vm.close());
    step('close /dev/kvm', () => this.kvm.close());
    step("emit 'exit'", () => this.emit('exit', result));
    this.ended = result;
    this.resolveDone(result);
    for (const w of this.waiters) w(result);
    this.waiters.clear();
  }
}
