/** Timing one guest boot from vm.start(): first console output, the /init marker, the end. */
import type { VirtualMachine } from '../../src/vmm/machine.js';
import type { VmOutcome } from '../../src/vmm/outcome.js';
import { round, secondsSince } from './stats.js';

/** The line the fixture /init prints (fixtures/initramfs/init). */
export const INIT_MARKER = 'TSVMM-INIT-OK';

export interface TimedBoot {
  firstOutputS: number | null;
  initS: number | null;
  endS: number;
  outcome: VmOutcome;
  output: string;
}

/**
 * Starts `vm` and waits for it to end. `timeoutS` is a hang guard, not a
 * speed check: a stuck guest is stopped so it cannot stall the whole run.
 */
export async function timeBoot(vm: VirtualMachine, timeoutS: number): Promise<TimedBoot> {
  let output = '';
  let firstOutput: bigint | undefined;
  let initAt: bigint | undefined;
  vm.console.on('data', (chunk: Buffer) => {
    const now = process.hrtime.bigint();
    firstOutput ??= now;
    // Search only the new text plus enough of the old to catch a marker split across chunks.
    const from = Math.max(0, output.length - INIT_MARKER.length);
    output += chunk.toString('latin1');
    if (initAt === undefined && output.indexOf(INIT_MARKER, from) >= 0) initAt = now;
  });
  const start = process.hrtime.bigint();
  vm.start();
  const guard = setTimeout(() => void vm.stop(`bench: no end after ${timeoutS} s`), timeoutS * 1000);
  const outcome = await vm.wait();
  const end = process.hrtime.bigint();
  clearTimeout(guard);
  return {
    firstOutputS: firstOutput === undefined ? null : round(secondsSince(start, firstOutput), 3),
    initS: initAt === undefined ? null : round(secondsSince(start, initAt), 3),
    endS: round(secondsSince(start, end), 3),
    outcome,
    output,
  };
}
