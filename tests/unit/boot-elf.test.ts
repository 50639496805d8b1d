import { describe, expect, it } from 'vitest';
import { BootError, type BootErrorKind } from '../../src/arch/boot/errors.js';
import { isElf, loadElfSegments, parseElfKernel } from '../../src/arch/boot/elf.js';
import { buildElfKernel } from '../../src/testing/index.js';
import { GuestMemory } from '../../src/base/memory.js';

const MiB = 1024 * 1024;

function expectBootError(fn: () => unknown, kind: BootErrorKind, message?: RegExp): void {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(BootError);
    expect((err as BootError).kind).toBe(kind);
    if (message) expect((err as BootError).message).toMatch(message);
    return;
  }
  throw new Error(`expected BootError ${kind}`);
}

const text = new Uint8Array(0x1800).map((_, i) => (i * 7) & 0xff);
const data = new Uint8Array(0x100).fill(0xd4);

/** Like a real vmlinux: text at 16 MiB, data, a percpu segment with vaddr 0, and .bss. */
function kernelElf(trailer?: Uint8Array): Uint8Array {
  return buildElfKernel({
    entry: 0x100_0000,
    segments: [
      { paddr: 0x100_0000, data: text },
      { paddr: 0x120_0000, vaddr: 0n, data: new Uint8Array(0x40).fill(0x9c) },
      { paddr: 0x140_0000, data, memsz: 0x3000 },
    ],
    ...(trailer ? { trailer } : {}),
  });
}

describe('parseElfKernel', () => {
  it('reads the PT_LOAD segments with their physical addresses', () => {
    const elf = parseElfKernel(kernelElf());
    expect(elf.entry).toBe(0x100_0000);
    expect(elf.segments.map((s) => [s.paddr, s.filesz, s.memsz])).toEqual([
      [0x100_0000, 0x1800, 0x1800],
      [0x120_0000, 0x40, 0x40],
      [0x140_0000, 0x100, 0x3000],
    ]);
    expect(elf.segments[0]!.vaddr).toBe(0xffff_ffff_8100_0000n);
    expect(elf.start).toBe(0x100_0000);
    expect(elf.end).toBe(0x140_3000);
  });

  it('ignores data after the segments, like the relocations after vmlinux.bin', () => {
    const withRelocs = kernelElf(new Uint8Array(4096).fill(0xee));
    expect(parseElfKernel(withRelocs)).toEqual(parseElfKernel(kernelElf()));
  });

  it('translates a virtual e_entry through its segment', () => {
    const elf = buildElfKernel({ entry: 0xffff_ffff_8100_0040n, segments: [{ paddr: 0x100_0000, data: text }] });
    expect(parseElfKernel(elf).entry).toBe(0x100_0040);
  });

  it('recognises the ELF magic', () => {
    expect(isElf(kernelElf())).toBe(true);
    expect(isElf(Uint8Array.from([0x7f, 0x45, 0x4c]))).toBe(false);
  });
});

describe('parseElfKernel errors', () => {
  it('not-a-kernel: not ELF, wrong machine, not an executable', () => {
    expectBootError(() => parseElfKernel(new Uint8Array(64)), 'not-a-kernel');
    expectBootError(
      () => parseElfKernel(buildElfKernel({ entry: 0x100_0000, machine: 183, segments: [{ paddr: 0x100_0000, data: text }] })),
      'not-a-kernel',
      /machine 183/,
    );
    expectBootError(
      () => parseElfKernel(buildElfKernel({ entry: 0x100_0000, type: 3, segments: [{ paddr: 0x100_0000, data: text }] })),
      'not-a-kernel',
      /ET_EXEC/,
    );
  });

  it('not-64-bit: a 32-bit ELF or an i386 machine', () => {
    const elf32 = kernelElf();
    elf32[4] = 1;
    expectBootError(() => parseElfKernel(elf32), 'not-64-bit', /32-bit/);
    expectBootError(() => parseElfKernel(buildElfKernel({ entry: 0x100_0000, machine: 3, segments: [{ paddr: 0x100_0000, data: text }] })), 'not-64-bit');
  });

  it('corrupt: program headers past the end of the file', () => {
    const elf = kernelElf();
    expectBootError(() => parseElfKernel(elf.subarray(0, 100)), 'corrupt', /program headers/);
  });

  it('corrupt: segment data past the end of the file', () => {
    const elf = kernelElf();
    expectBootError(() => parseElfKernel(elf.subarray(0, elf.length - 0x80)), 'corrupt', /segment 2 needs file bytes/);
  });

  it('corrupt: filesz larger than memsz', () => {
    const elf = buildElfKernel({ entry: 0x100_0000, segments: [{ paddr: 0x100_0000, data: text, memsz: 0x10 }] });
    expectBootError(() => parseElfKernel(elf), 'corrupt', /more file bytes/);
  });

  it('corrupt: addresses that overflow', () => {
    const elf = buildElfKernel({ entry: 0x100_0000, segments: [{ paddr: 0x100_0000, data: text }] });
    new DataView(elf.buffer).setBigUint64(64 + 24, 0xffff_ffff_ffff_f000n, true); // p_paddr
    expectBootError(() => parseElfKernel(elf), 'corrupt', /impossible segment 0 p_paddr/);
    const near = buildElfKernel({ entry: 0x100_0000, segments: [{ paddr: 0x100_0000, data: text }] });
    new DataView(near.buffer).setBigUint64(64 + 40, BigInt(Number.MAX_SAFE_INTEGER), true); // p_memsz
    expectBootError(() => parseElfKernel(near), 'corrupt', /overflows/);
  });

  it('corrupt: overlapping segments', () => {
    const elf = buildElfKernel({
      entry: 0x100_0000,
      segments: [
        { paddr: 0x100_0000, data: text },
        { paddr: 0x100_1000, data },
      ],
    });
    expectBootError(() => parseElfKernel(elf), 'corrupt', /overlap/);
  });

  it('corrupt: entry point outside every segment', () => {
    const elf = buildElfKernel({ entry: 0x200_0000, segments: [{ paddr: 0x100_0000, data: text }] });
    expectBootError(() => parseElfKernel(elf), 'corrupt', /entry point 0x2000000/);
  });

  it('corrupt: nothing to load', () => {
    expectBootError(() => parseElfKernel(buildElfKernel({ entry: 0, segments: [] })), 'corrupt', /no program headers/);
  });
});

describe('loadElfSegments', () => {
  it('copies p_filesz bytes to p_paddr and zeroes up to p_memsz', () => {
    const bytes = kernelElf();
    const elf = parseElfKernel(bytes);
    const mem = GuestMemory.fromBuffer(new Uint8Array(32 * MiB));
    mem.fill(0x140_0000, 0x4000, 0xaa); // stale memory where .bss goes
    loadElfSegments(mem, bytes, elf);
    expect(Buffer.compare(mem.slice(0x100_0000, text.length), text)).toBe(0);
    expect(mem.slice(0x120_0000, 0x40).every((b) => b === 0x9c)).toBe(true);
    expect(mem.slice(0x140_0000, 0x100).every((b) => b === 0xd4)).toBe(true);
    expect(mem.slice(0x140_0100, 0x3000 - 0x100).every((b) => b === 0)).toBe(true);
    // Past memsz is left alone.
    expect(mem.readU8(0x140_3000)).toBe(0xaa);
  });

  it('refuses a segment outside guest RAM before writing anything', () => {
    const bytes = kernelElf();
    const elf = parseElfKernel(bytes);
    const mem = GuestMemory.fromBuffer(new Uint8Array(0x140_2000));
    expectBootError(() => loadElfSegments(mem, bytes, elf), 'memory-too-small', /0x1400000-0x1403000 is outside guest RAM/);
    expect(mem.readU8(0x100_0000)).toBe(0);
  });

  it('refuses a segment below 1 MiB, where the boot structures are', () => {
    const bytes = buildElfKernel({ entry: 0x9000, segments: [{ paddr: 0x9000, data }] });
    const mem = GuestMemory.fromBuffer(new Uint8Array(2 * MiB));
    expectBootError(() => loadElfSegments(mem, bytes, parseElfKernel(bytes)), 'corrupt', /below 1 MiB/);
  });
});
