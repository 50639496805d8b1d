/**
 * The kernel cache (src/vmm/kernel-cache.ts): a bzImage payload decompressed
 * once is read back by its content hash on the next boot, and a cache that
 * is missing, damaged or unwritable never changes what boots.
 */
import { mkdtempSync, readdirSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { decompressKernelPayload, payloadKey } from '../../src/arch/boot/decompress.js';
import { loadLinux, prepareKernel } from '../../src/arch/boot/loader.js';
import { GuestMemory } from '../../src/base/memory.js';
import { buildBzImage, buildPrintAndHaltKernel, PRINT_AND_HALT_ENTRY } from '../../src/testing/index.js';
import { defaultKernelCacheDir, KernelCache } from '../../src/vmm/kernel-cache.js';

const dirs: string[] = [];
function cacheDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'tsvmm-kcache-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const elf = buildPrintAndHaltKernel('cached\n');
const payload = new Uint8Array(gzipSync(elf));
const entries = (dir: string) => readdirSync(dir).filter((n) => n.endsWith('.vmlinux'));

describe('kernel cache', () => {
  it('decompresses on a miss and keeps the result under the payload hash; the next boot reads it back', async () => {
    const dir = cacheDir();
    const cache = new KernelCache(dir);
    const first = await decompressKernelPayload(payload, cache);
    expect(first.cached).toBeFalsy();
    expect(Buffer.compare(first.data, elf)).toBe(0);
    const key = await payloadKey(payload);
    expect(entries(dir)).toEqual([`${key}.vmlinux`]);

    const second = await decompressKernelPayload(payload, cache);
    expect(second.cached).toBe(true);
    expect(Buffer.compare(second.data, elf)).toBe(0);
    // Another payload is another entry.
    const other = new Uint8Array(gzipSync(buildPrintAndHaltKernel('other\n')));
    expect((await decompressKernelPayload(other, cache)).cached).toBeFalsy();
    expect(entries(dir)).toHaveLength(2);
  });

  it('boots a bzImage from its cache entry, and replaces an entry that is damaged', async () => {
    const dir = cacheDir();
    const image = buildBzImage({ payload });
    const boot = async () => {
      const bytes = new Uint8Array(32 * 1024 * 1024);
      const info = await loadLinux(GuestMemory.fromBuffer(bytes), { kernel: prepareKernel(image, 'host', new KernelCache(dir)), cmdline: '' });
      expect(info.kind).toBe('bzimage-host');
      expect(info.entry).toBe(PRINT_AND_HALT_ENTRY);
    };
    await boot();
    const [name] = entries(dir);
    // Damaged in place, at the right size: not an ELF any more.
    writeFileSync(join(dir, name!), new Uint8Array(elf.length).fill(0xcc));
    await boot();
    const healed = await new KernelCache(dir).get(name!.replace('.vmlinux', ''), elf.length);
    expect(Buffer.compare(healed!, elf)).toBe(0);
  });

  it('ignores an entry of the wrong size', async () => {
    const dir = cacheDir();
    const key = await payloadKey(payload);
    writeFileSync(join(dir, `${key}.vmlinux`), new Uint8Array(10));
    const got = await decompressKernelPayload(payload, new KernelCache(dir));
    expect(got.cached).toBeFalsy();
    expect(statSync(join(dir, `${key}.vmlinux`)).size).toBe(elf.length);
  });

  it('boots without a cache it cannot create', async () => {
    const file = join(cacheDir(), 'not-a-directory');
    writeFileSync(file, 'x');
    const cache = new KernelCache(join(file, 'kernels'));
    const got = await decompressKernelPayload(payload, cache);
    expect(Buffer.compare(got.data, elf)).toBe(0);
    expect((await decompressKernelPayload(payload, cache)).cached).toBeFalsy();
  });

  it('keeps the newest entries by last use, and removes temporary files left by dead writers', async () => {
    const dir = cacheDir();
    const cache = new KernelCache(dir, undefined, 2);
    const keys: string[] = [];
    for (const [i, text] of ['a\n', 'b\n'].entries()) {
      const p = new Uint8Array(gzipSync(buildPrintAndHaltKernel(text)));
      await decompressKernelPayload(p, cache);
      const key = await payloadKey(p);
      keys.push(key);
      const t = new Date(Date.now() - (10 - i) * 60_000);
      utimesSync(join(dir, `${key}.vmlinux`), t, t);
    }
    // A read is a use: 'a' becomes the newest.
    expect(await cache.get(keys[0]!, buildPrintAndHaltKernel('a\n').length)).toBeDefined();
    const stale = join(dir, `.${keys[1]}.1.dead.tmp`);
    writeFileSync(stale, 'partial');
    const old = new Date(Date.now() - 2 * 3600_000);
    utimesSync(stale, old, old);

    await decompressKernelPayload(payload, cache);
    expect(entries(dir).sort()).toEqual([`${keys[0]}.vmlinux`, `${await payloadKey(payload)}.vmlinux`].sort());
    expect(readdirSync(dir).filter((n) => n.endsWith('.tmp'))).toEqual([]);
  });

  it('lives under $TSVMM_CACHE, else $XDG_CACHE_HOME/tsvmm, else ~/.cache/tsvmm', () => {
    expect(defaultKernelCacheDir({ TSVMM_CACHE: '/c' })).toBe('/c/kernels');
    expect(defaultKernelCacheDir({ XDG_CACHE_HOME: '/x' })).toBe('/x/tsvmm/kernels');
    expect(defaultKernelCacheDir({})).toMatch(/\/\.cache\/tsvmm\/kernels$/);
  });
});
