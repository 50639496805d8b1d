/**
 * The library's VM: the machine (src/vmm/machine.ts) with the tools that
 * watch it from above, such as the profiler, wired in from the
 * configuration.
 */
import { VirtualMachine } from './vmm/machine.js';
import { readInput, type MachineConfig } from './vmm/config.js';
import { silentLogger } from './base/log.js';
import { Profiler, type ProfileConfig } from './tools/profiler.js';

/** How a VM is built: the machine's configuration, and the tools to attach. */
export interface VmConfig extends MachineConfig {
  /** Sample the guest's RIP while it runs and write a profile when it ends (see src/tools/profiler.ts). */
  profile?: ProfileConfig;
}

/** Builds a VM (nothing runs until `start()`). Bad input rejects with a one-line error. */
export async function createVm(config: VmConfig): Promise<VirtualMachine> {
  const { profile, ...machine } = config;
  if (!profile) return VirtualMachine.create(machine);
  const log = config.logger ?? silentLogger;
  // The kernel first, so that a bad path is reported as such, not as a missing System.map.
  const kernel = await readInput('kernel', config.kernel);
  const profiler = await Profiler.prepare(profile, config.kernel, log.child({ part: 'profiler' }));
  return VirtualMachine.create({ ...machine, kernel, observers: [...(machine.observers ?? []), profiler] });
}
