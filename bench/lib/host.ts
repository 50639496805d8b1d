/**
 * Facts about the machine a benchmark ran on, saved with the numbers: the
 * same code measures very differently on a PVM-style host (guest kernel
 * code emulated) and on hardware virtualization, and under load.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { probeHostOnce } from '../../src/kvm/probe.js';

export interface HostFacts {
  kernelRelease: string;
  cpuModel: string;
  cpus: number;
  memoryMiB: number;
  node: string;
  /** Load average (1, 5, 15 min) when the run started: other work on a shared host skews everything. */
  loadAverage: number[];
  /** probeHost(kvm).emulationGaps: non-empty means guest kernel code is emulated and tsvmm's fallback is on. */
  emulationGaps: string[] | { error: string };
  emulationFallback: boolean;
  /** Whether KVM is hardware VT-x/AMD-V (vmx/svm flags in /proc/cpuinfo); a PVM host has neither. */
  cpuVirtFlags: string[];
  git: { commit: string; dirty: boolean } | { error: string };
}

function cpuFlags(): string[] {
  try {
    const info = readFileSync('/proc/cpuinfo', 'utf8');
    const flags = /^flags\s*:\s*(.*)$/m.exec(info)?.[1]?.split(/\s+/) ?? [];
    return flags.filter((f) => f === 'vmx' || f === 'svm' || f === 'hypervisor');
  } catch {
    return [];
  }
}

function gitState(cwd: string): HostFacts['git'] {
  try {
    const commit = execFileSync('git', ['rev-parse', 'HEAD'], { cwd, encoding: 'utf8' }).trim();
    const status = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd, encoding: 'utf8' });
    return { commit, dirty: status.trim().length > 0 };
  } catch (err) {
    return { error: (err as Error).message.split('\n')[0] ?? 'git failed' };
  }
}

export function hostFacts(repo: string): HostFacts {
  let emulationGaps: HostFacts['emulationGaps'];
  try {
    emulationGaps = probeHostOnce().emulationGaps;
  } catch (err) {
    emulationGaps = { error: (err as Error).message };
  }
  return {
    kernelRelease: os.release(),
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    cpus: os.cpus().length,
    memoryMiB: Math.round(os.totalmem() / 2 ** 20),
    node: process.version,
    loadAverage: os.loadavg().map((x) => Math.round(x * 100) / 100),
    emulationGaps,
    emulationFallback: Array.isArray(emulationGaps) && emulationGaps.length > 0,
    cpuVirtFlags: cpuFlags(),
    git: gitState(repo),
  };
}
