/**
 * The library's VM: the machine (src/vmm/machine.ts) with the tools that
 * watch it from above, such as the profiler, wired in from the
 * configuration.
 */
import { VirtualMachine } from './vmm/machine.js';
import { readInput, validateConfig, type MachineConfig } from './vmm/config.js';
import { StartupClock } from './vmm/builder.js';
import { silentLogger } from './base/log.js';
import { Profiler, type ProfileConfig } from './tools/profiler.js';

/** How a VM is built: the machine's configuration, and the tools to attach. */
export interface VmConfig extends MachineConfig {
  /** Sample the guest's RIP while it runs and write a profile when it ends (see src/tools/profiler.ts). */
  profile?: ProfileConfig;
}

/** Builds a VM (nothing runs until `start()`). Bad input rejects with a one-line error. */
export async function createVm(config: VmConfig): Promise<VirtualMachine> {
  const { profile } = config;
  // The machine keeps the whole configuration (vm.config, the control socket's GET /vm) and ignores `profile`.
  if (!profile) return VirtualMachine.create(config);
  const startup = new StartupClock();
  const log = config.logger ?? silentLogger;
  // The same order of errors as without a profile: the configuration, the
  // kernel (a bad path is reported as such, not as a missing System.map),
  // then the profile's own inputs. Its reading counts as the inputs phase.
  validateConfig(config);
  const kernel = await readInput('kernel', config.kernel);
  const profiler = await Profiler.prepare(profile, config.kernel, log.child({ part: 'profiler' }));
  return VirtualMachine.create(config, { kernel, observers: [profiler], startup });
}
