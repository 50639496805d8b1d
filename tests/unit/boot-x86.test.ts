import { describe, expect, it } from 'vitest';
import { GuestMemory } from '../../src/base/memory.js';
import { BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PD_START, PDPT_START, PML4_START } from '../../src/arch/layout.js';
import {
  BOOT_CS_SELECTOR,
  BOOT_DS_SELECTOR,
  BOOT_TSS_SELECTOR,
  GDT_FLAGS,
  bootGdt,
  gdtEntry,
  segmentFromGdtEntry,
  setupLongMode,
  writeIdentityPageTables,
} from '../../src/arch/boot/x86.js';

const MiB = 1024 * 1024;

function memory(size = 1 * MiB): GuestMemory {
  return GuestMemory.fromBuffer(new Uint8Array(size));
}

describe('segment descriptors', () => {
  it('encodes the flat descriptors Linux and Firecracker use', () => {
    expect(gdtEntry(GDT_FLAGS.CODE64, 0, 0xfffff)).toBe(0x00af_9b00_0000_ffffn);
    expect(gdtEntry(GDT_FLAGS.DATA, 0, 0xfffff)).toBe(0x00cf_9300_0000_ffffn);
    expect(gdtEntry(GDT_FLAGS.TSS64, 0, 0xfffff)).toBe(0x008f_8b00_0000_ffffn);
  });

  it('places every base and limit bit where the SDM says', () => {
    const entry = gdtEntry(0x409b, 0x1234_5678, 0xabcde);
    expect(entry).toBe(0x124a_9b34_5678_bcden);
    const seg = segmentFromGdtEntry(entry, 3);
    expect(seg.base).toBe(0x1234_5678);
    expect(seg.limit).toBe(0xabcde); // G=0: bytes
    expect(seg.selector).toBe(0x18);
    expect(seg.db).toBe(1);
    expect(seg.g).toBe(0);
  });

  it('decodes the 64-bit code descriptor back to a long-mode CS', () => {
    const cs = segmentFromGdtEntry(gdtEntry(GDT_FLAGS.CODE64, 0, 0xfffff), 2);
    expect(cs).toEqual({
      base: 0,
      limit: 0xffff_ffff,
      selector: 0x10,
      type: 0xb,
      present: 1,
      dpl: 0,
      db: 0,
      s: 1,
      l: 1,
      g: 1,
      avl: 0,
      unusable: 0,
    });
  });

  it('decodes the data and TSS descriptors', () => {
    expect(segmentFromGdtEntry(gdtEntry(GDT_FLAGS.DATA, 0, 0xfffff), 3)).toEqual({
      base: 0,
      limit: 0xffff_ffff,
      selector: 0x18,
      type: 0x3,
      present: 1,
      dpl: 0,
      db: 1,
      s: 1,
      l: 0,
      g: 1,
      avl: 0,
      unusable: 0,
    });
    const tr = segmentFromGdtEntry(gdtEntry(GDT_FLAGS.TSS64, 0, 0xfffff), 4);
    expect(tr).toMatchObject({ selector: 0x20, type: 0xb, s: 0, present: 1, l: 0, db: 0 });
  });

  it('marks a not-present descriptor unusable', () => {
    expect(segmentFromGdtEntry(0n, 0).unusable).toBe(1);
  });
});

describe('setupLongMode', () => {
  it('writes the GDT with __BOOT_CS at 0x10 and __BOOT_DS at 0x18, and the state matches it', () => {
    const mem = memory();
    const state = setupLongMode(mem, 0x100_0000, 0x7000);
    const s = state.sregs;
    expect(s.gdt).toEqual({ base: BOOT_GDT_START, limit: 6 * 8 - 1 });
    const written = bootGdt().map((_, i) => mem.readU64(BOOT_GDT_START + i * 8));
    expect(written).toEqual([
      0n,
      0n,
      0x00af_9b00_0000_ffffn,
      0x00cf_9300_0000_ffffn,
      0x008f_8b00_0000_ffffn,
      0n, // upper half of the 16-byte TSS descriptor
    ]);
    expect(s.cs).toEqual(segmentFromGdtEntry(written[BOOT_CS_SELECTOR / 8]!, 2));
    for (const seg of [s.ds, s.es, s.fs, s.gs, s.ss]) {
      expect(seg).toEqual(segmentFromGdtEntry(written[BOOT_DS_SELECTOR / 8]!, 3));
    }
    expect(s.tr).toEqual(segmentFromGdtEntry(written[BOOT_TSS_SELECTOR / 8]!, 4));
    expect(s.cs.l).toBe(1);
    expect(s.cs.db).toBe(0);
  });

  it('installs an empty IDT so an early exception ends in a triple fault', () => {
    const mem = memory();
    mem.fill(BOOT_IDT_START, 16, 0xff);
    const { sregs } = setupLongMode(mem, 0x100_0200, 0x7000);
    expect(sregs.idt).toEqual({ base: BOOT_IDT_START, limit: 15 });
    expect(mem.readU64(BOOT_IDT_START)).toBe(0n);
    expect(mem.readU64(BOOT_IDT_START + 8)).toBe(0n);
  });

  it('enables long mode with paging through the identity map', () => {
    const { sregs, regs } = setupLongMode(memory(), 0x100_0200, 0x7000);
    expect(sregs.cr0).toBe(0x8000_0011); // PG | ET | PE
    expect(sregs.cr4).toBe(0x20); // PAE
    expect(sregs.efer).toBe(0x500); // LMA | LME
    expect(sregs.cr3).toBe(PML4_START);
    expect(regs).toEqual({ rip: 0x100_0200, rsi: 0x7000, rsp: BOOT_STACK_POINTER, rbp: BOOT_STACK_POINTER, rflags: 2 });
  });
});

describe('identity page tables', () => {
  it('maps the first 4 GiB 1:1 with 2 MiB pages', () => {
    const mem = memory();
    mem.fill(PML4_START, 4096, 0xee); // stale data must be cleared
    expect(writeIdentityPageTables(mem)).toBe(PML4_START);
    expect(mem.readU64(PML4_START)).toBe(BigInt(PDPT_START | 0x3));
    expect(mem.readU64(PML4_START + 8)).toBe(0n);
    for (let d = 0; d < 4; d++) {
      expect(mem.readU64(PDPT_START + d * 8)).toBe(BigInt((PD_START + d * 4096) | 0x3));
    }
    expect(mem.readU64(PDPT_START + 4 * 8)).toBe(0n);
    expect(mem.readU64(PD_START)).toBe(0x83n);
    expect(mem.readU64(PD_START + 8)).toBe(0x20_0083n);
    expect(mem.readU64(PD_START + 511 * 8)).toBe(0x3fe0_0083n);
    // Second GiB starts in the second PD.
    expect(mem.readU64(PD_START + 4096)).toBe(0x4000_0083n);
  });

  it('walks like the MMU: every 2 MiB page maps to itself', () => {
    const mem = memory();
    writeIdentityPageTables(mem);
    const translate = (va: number): number | undefined => {
      const pml4e = mem.readU64(PML4_START + Math.floor(va / 2 ** 39) * 8);
      if (!(pml4e & 1n)) return undefined;
      const pdpte = mem.readU64(Number(pml4e & ~0xfffn) + (Math.floor(va / 2 ** 30) % 512) * 8);
      if (!(pdpte & 1n)) return undefined;
      const pde = mem.readU64(Number(pdpte & ~0xfffn) + (Math.floor(va / 2 ** 21) % 512) * 8);
      if (!(pde & 1n) || !(pde & 0x80n)) return undefined;
      return Number(pde & ~0x1f_ffffn & 0x000f_ffff_ffff_f000n) + (va % 2 ** 21);
    };
    for (const va of [0, 0x7000, 0x100_0200, 0x1234_5678, 0xbfff_ffff, 0xfee0_0000, 0xffff_ffff]) {
      expect(translate(va)).toBe(va);
    }
    expect(translate(4 * 2 ** 30)).toBeUndefined();
  });

  it('maps the MMIO gap uncached and RAM cacheable', () => {
    const mem = memory();
    writeIdentityPageTables(mem);
    const pde = (addr: number) => mem.readU64(PD_START + (addr / (2 * MiB)) * 8);
    expect(pde(0xbfe0_0000) & 0x18n).toBe(0n);
    expect(pde(0xc000_0000) & 0x18n).toBe(0x18n);
    expect(pde(0xfee0_0000) & 0x18n).toBe(0x18n);
  });

  it('fails cleanly when guest memory does not reach the page tables', () => {
    expect(() => writeIdentityPageTables(GuestMemory.fromBuffer(new Uint8Array(0xa000)))).toThrow(/out of range/);
  });
});
