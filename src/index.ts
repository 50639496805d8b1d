/**
 * tsvmm as a library: build a VM, start it, talk to its console, wait for
 * its outcome.
 *
 * ```ts
 * import { createVm } from 'tsvmm';
 * const vm = await createVm({ kernel: 'bzImage', initrd: 'initrd.gz' });
 * vm.console.pipe(process.stdout);
 * vm.start();
 * const outcome = await vm.wait(); // { kind: 'reboot', exitCode: 0, ... }
 * ```
 *
 * As a boot-test harness (a shell on the guest console):
 *
 * ```ts
 * await using vm = await createVm({ kernel: 'bzImage', initrd: 'initrd.gz' });
 * vm.start();
 * await vm.console.waitFor(/# $/m, { timeout: 60_000 });
 * const { output, status } = await vm.run('uname -r');
 * ```
 */
export { createVm, type VmConfig } from './vm.js';

export { VirtualMachine, VmStateError, type VmState, type VmStats, type StartupTimes } from './vmm/machine.js';
export {
  VmConfigError,
  type VmConfigErrorKind,
  DEFAULT_CMDLINE,
  DEFAULT_MEMORY,
  MIN_MEMORY,
  MAX_MEMORY,
  defaultCmdline,
  MAX_CPUS,
  parseMemorySize,
  type MachineConfig,
  type VmObserver,
  type BootMode,
  type ExitPath,
  type ConsoleKind,
} from './vmm/config.js';
export { ConsoleDevice, type ConsoleDeviceStats } from './virtio/console/device.js';
export {
  ConsoleStream,
  ConsoleWaitError,
  CONSOLE_TRANSCRIPT_LIMIT,
  type ConsoleMatch,
  type ConsoleWaitCode,
  type WaitForOptions,
} from './vmm/console.js';
export type { RunOptions, RunResult } from './vmm/shell.js';
export { SerialTargetError, type SerialTarget, type SerialTargetErrorKind } from './vmm/serial-target.js';
export { TsvmmError, TsvmmKindError } from './base/errors.js';
export { BusError } from './base/bus.js';
export { GuestMemoryError } from './base/memory.js';
export { VcpuError } from './kvm/vcpu.js';
export { LayoutError } from './arch/layout.js';
export { AcpiError } from './arch/acpi/tables.js';
export { AmlError } from './arch/acpi/aml.js';
export { PciError, type PciErrorCode } from './devices/pci/errors.js';
export { QueueError, type QueueErrorKind } from './virtio/queue.js';
export { BlkError, type BlkErrorCode } from './virtio/blk/errors.js';
export { NetError, type NetErrorCode } from './virtio/net/errors.js';
export { ApiSocketError } from './tools/api.js';
export { SandboxError, type SandboxErrorKind, type SandboxConfig, type SandboxStatus } from './kvm/sandbox.js';
export type { DiskConfig, NetConfig } from './vmm/virtio-devices.js';
export { EXIT_CODES, EXIT_EXPECT_UNMET, EXIT_TIMEOUT, type VmOutcome, type OutcomeKind } from './vmm/outcome.js';
export { ConfigFileError, parseVmConfig, readVmConfigFile, vmConfigSchema, type FileVmConfig } from './config-file.js';
export { KvmError, type KvmErrorKind } from './kvm/kvm.js';
export { BootError, type BootErrorKind } from './arch/boot/errors.js';
export { createLogger, type LogLevel } from './base/log.js';
export { ProfileError, DEFAULT_PROFILE_RATE_HZ, type ProfileConfig, type ProfileFormat, type ProfileReport } from './tools/profiler.js';
export { SymbolTable, type SymbolHit } from './tools/symbols.js';
