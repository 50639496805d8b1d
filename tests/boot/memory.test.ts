/**
 * Guest RAM and the host's same-page merging (KSM): guest RAM is not
 * mergeable unless the VM asks (`mergeable: true`, CLI `--mergeable`),
 * because merged pages are a timing side channel between guests. Read
 * from the VmFlags of the process's own mappings (/proc/self/smaps: `mg`).
 */
import { readFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createVm } from '../../src/index.js';
import { buildPrintAndHaltKernel } from '../../src/testing/index.js';
import { kvmUnavailable } from '../helpers/guest.js';

const noKvm = kvmUnavailable();
const MEMORY_KIB = 48 * 1024; // a size nothing else in the process maps

/** The VmFlags of every mapping of exactly `kib` KiB (every mapping for -1). */
function flagsOfMappings(kib: number): string[][] {
  const out: string[][] = [];
  let size = -1;
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const s = /^Size:\s+(\d+) kB/.exec(line);
    if (s) size = Number(s[1]);
    const f = /^VmFlags:\s*(.*)$/.exec(line);
    if (f && (kib < 0 || size === kib)) out.push(f[1]!.trim().split(/\s+/));
  }
  return out;
}

describe.skipIf(noKvm !== undefined)(`guest RAM and KSM${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-mem-'));
  const kernel = join(dir, 'print-ok.elf');
  writeFileSync(kernel, buildPrintAndHaltKernel('ok\n'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it.each([
    ['is not mergeable by default', undefined, false],
    ['is mergeable when the VM asks for it', true, true],
  ])(
    'guest RAM %s',
    async (_name, mergeable, expected) => {
      const vm = await createVm({ kernel, memory: `${MEMORY_KIB / 1024}M`, ...(mergeable ? { mergeable } : {}) });
      try {
        if (expected) {
          // Its own mapping: a mergeable VMA does not merge with its neighbours.
          expect(flagsOfMappings(MEMORY_KIB).some((flags) => flags.includes('mg'))).toBe(true);
        } else {
          // Nothing in the process is mergeable (a plain anonymous mapping may merge with its neighbours, so no size to look for).
          expect(flagsOfMappings(-1).some((flags) => flags.includes('mg'))).toBe(false);
        }
      } finally {
        vm.start();
        await vm.stop('test over');
      }
    },
    60_000,
  );
});
