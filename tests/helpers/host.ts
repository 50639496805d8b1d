/**
 * What kind of KVM this host has, for boot tests that only a
 * hardware-virtualised host can run (stock and distribution kernels: see
 * ../shared/PLATFORM.md). On a PVM-style host `npm test` runs those tests
 * again inside the emulated AMD-V host (tests/hosts/amdv/), where they run.
 */
import { probeHostOnce } from '../../src/vmm/probe.js';
import { kvmUnavailable } from './guest.js';

export type HostKind = 'hardware' | 'pvm' | 'none';

let cached: HostKind | undefined;

/** 'hardware' (VT-x/AMD-V, or the emulated AMD-V host), 'pvm' (guest kernel code emulated, with gaps), or 'none'. */
export function hostKind(): HostKind {
  if (cached === undefined) {
    cached = kvmUnavailable() !== undefined ? 'none' : probeHostOnce().emulationGaps.length > 0 ? 'pvm' : 'hardware';
  }
  return cached;
}

/** Why a test that needs hardware virtualization cannot run here, or undefined when it can. */
export function hardwareVirtUnavailable(): string | undefined {
  const kind = hostKind();
  if (kind === 'hardware') return undefined;
  if (kind === 'none') return kvmUnavailable();
  return 'this host KVM emulates guest kernel code, where a stock kernel cannot run user space; npm test runs this inside the emulated AMD-V host (tests/hosts/amdv)';
}
