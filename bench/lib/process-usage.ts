/**
 * What this process holds: RSS, V8 heap and open file descriptors, each
 * after a full garbage collection, so heap figures are live objects only.
 */
import { readdirSync } from 'node:fs';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { round } from './stats.js';

/** V8's gc(), reached without --expose-gc on the command line (the flag set at run time exposes it to new contexts). */
let gc: (() => void) | undefined;
function collect(): void {
  if (!gc) {
    setFlagsFromString('--expose-gc');
    gc = runInNewContext('gc') as () => void;
  }
  gc();
}

export interface ProcessUsage {
  rssMiB: number;
  heapMiB: number;
  fds: number;
}

export function processUsage(): ProcessUsage {
  collect();
  const m = process.memoryUsage();
  return { rssMiB: round(m.rss / 2 ** 20, 1), heapMiB: round(m.heapUsed / 2 ** 20, 1), fds: readdirSync('/proc/self/fd').length };
}
