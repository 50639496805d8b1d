/**
 * The CPU state Linux's 64-bit boot protocol asks for (boot.rst, "64-bit
 * Boot Protocol"): long mode with paging on, an identity map covering the
 * kernel, zero page and command line, a GDT with flat __BOOT_CS (0x10) and
 * __BOOT_DS (0x18), interrupts off, %rsi = boot_params.
 *
 * This module writes the GDT, IDT and page tables into guest memory and
 * returns the register values as plain data; the vCPU code programs them
 * with KVM_SET_SREGS / KVM_SET_REGS. Descriptor encoding: Intel SDM vol. 3,
 * 3.4.5 (segment descriptors) and 7.2.3 (TSS descriptor in 64-bit mode).
 */

import type { DescriptorTable as CpuDescriptorTable, Segment as CpuSegment } from '../../kvm/cpu.js';
import type { GuestMemory } from '../../base/memory.js';
import {
  BOOT_GDT_ENTRIES,
  BOOT_GDT_START,
  BOOT_IDT_SIZE,
  BOOT_IDT_START,
  BOOT_STACK_POINTER,
  PAGE_SIZE,
  PD_COUNT,
  PD_START,
  PDPT_START,
  PML4_START,
  MMIO_GAP_START,
} from '../layout.js';

/**
 * A segment register as the boot sets it: the struct kvm_segment fields of
 * {@link CpuSegment}, with a plain-number base (boot addresses are below 4 GiB).
 */
export type Segment = CpuSegment & { base: number; unusable: number };

/** A descriptor table register (GDTR/IDTR) as the boot sets it. */
export type DescriptorTable = CpuDescriptorTable & { base: number };

/** General-purpose register values at entry; registers not listed are 0. */
export interface BootRegisters {
  rip: number;
  /** boot_params (the zero page). */
  rsi: number;
  rsp: number;
  rbp: number;
  /** Only the always-one bit 1: interrupts off. */
  rflags: number;
}

/** The special registers (struct kvm_sregs fields) of the boot state. */
export interface LongModeSregs {
  gdt: DescriptorTable;
  idt: DescriptorTable;
  cs: Segment;
  ds: Segment;
  es: Segment;
  fs: Segment;
  gs: Segment;
  ss: Segment;
  tr: Segment;
  /** PE | ET | PG. CD and NW are clear, so caching is on. */
  cr0: number;
  /** The PML4 of the identity map. */
  cr3: number;
  /** PAE (required for long mode). */
  cr4: number;
  /** LME | LMA. */
  efer: number;
}

/**
 * Everything the vCPU needs to start a Linux kernel in 64-bit mode:
 * `sregs` for KVM_SET_SREGS (fields not listed, such as LDT, CR2, CR8 and
 * the APIC base, keep their reset values) and `regs` for KVM_SET_REGS.
 */
export interface LongModeCpuState {
  sregs: LongModeSregs;
  regs: BootRegisters;
}

export const X86_CR0_PE = 1 << 0;
export const X86_CR0_ET = 1 << 4;
export const X86_CR0_PG = 0x8000_0000;
export const X86_CR4_PAE = 1 << 5;
export const EFER_LME = 1 << 8;
export const EFER_LMA = 1 << 10;

/** Page-table entry bits (SDM vol. 3, 4.5). */
export const PTE_PRESENT = 1 << 0;
export const PTE_WRITABLE = 1 << 1;
export const PTE_PWT = 1 << 3;
export const PTE_PCD = 1 << 4;
/** In a page-directory entry: maps a 2 MiB page directly. */
export const PDE_PAGE_SIZE = 1 << 7;

/** Boot GDT selectors. boot.rst fixes __BOOT_CS = 0x10 and __BOOT_DS = 0x18. */
export const BOOT_CS_SELECTOR = 0x10;
export const BOOT_DS_SELECTOR = 0x18;
export const BOOT_TSS_SELECTOR = 0x20;

/**
 * Access byte (low 8 bits) and flags nibble (bits 12-15) of a descriptor,
 * as the kernel's GDT_ENTRY() macro takes them (arch/x86/include/asm/segment.h).
 */
export const GDT_FLAGS = {
  /** G=1 L=1, P=1 DPL=0 S=1 type=0xb (execute/read, accessed). */
  CODE64: 0xa09b,
  /** G=1 D/B=1, P=1 DPL=0 S=1 type=0x3 (read/write, accessed). */
  DATA: 0xc093,
  /** G=1, P=1 DPL=0 S=0 type=0xb (busy 64-bit TSS). */
  TSS64: 0x808b,
} as const;

/**
 * Encodes a segment descriptor from the GDT_ENTRY() flags word, a 32-bit
 * base and a 20-bit limit.
 */
export function gdtEntry(flags: number, base: number, limit: number): bigint {
  const b = BigInt(base >>> 0);
  const l = BigInt(limit >>> 0);
  const f = BigInt(flags & 0xf0ff);
  return ((b & 0xff00_0000n) << 32n) | (f << 40n) | ((l & 0xf_0000n) << 32n) | ((b & 0x00ff_ffffn) << 16n) | (l & 0xffffn);
}

/** Decodes a descriptor into the segment-register form KVM takes. */
export function segmentFromGdtEntry(entry: bigint, index: number): Segment {
  const bits = (shift: bigint, mask: bigint) => Number((entry >> shift) & mask);
  const base = bits(16n, 0xff_ffffn) | (bits(56n, 0xffn) << 24);
  const rawLimit = bits(0n, 0xffffn) | (bits(48n, 0xfn) << 16);
  const g = bits(55n, 1n);
  const present = bits(47n, 1n);
  return {
    base: base >>> 0,
    // With G=1 the CPU scales the limit to 4 KiB units; KVM wants the result.
    limit: g ? rawLimit * 4096 + 0xfff : rawLimit,
    selector: index * 8,
    type: bits(40n, 0xfn),
    present,
    dpl: bits(45n, 3n),
    db: bits(54n, 1n),
    s: bits(44n, 1n),
    l: bits(53n, 1n),
    g,
    avl: bits(52n, 1n),
    unusable: present ? 0 : 1,
  };
}

/**
 * The boot GDT, by slot: null, unused, code, data, then the 16-byte TSS
 * descriptor whose upper half (base bits 32-63, here 0) fills slot 5.
 */
export function bootGdt(): bigint[] {
  const gdt = new Array<bigint>(BOOT_GDT_ENTRIES).fill(0n);
  gdt[BOOT_CS_SELECTOR / 8] = gdtEntry(GDT_FLAGS.CODE64, 0, 0xfffff);
  gdt[BOOT_DS_SELECTOR / 8] = gdtEntry(GDT_FLAGS.DATA, 0, 0xfffff);
  gdt[BOOT_TSS_SELECTOR / 8] = gdtEntry(GDT_FLAGS.TSS64, 0, 0xfffff);
  return gdt;
}

/** Writes the boot GDT and an empty IDT; returns their table registers. */
export function writeBootGdt(mem: GuestMemory): { gdt: DescriptorTable; idt: DescriptorTable } {
  const gdt = bootGdt();
  gdt.forEach((entry, i) => {
    mem.writeU64(BOOT_GDT_START + i * 8, entry);
  });
  mem.fill(BOOT_IDT_START, BOOT_IDT_SIZE, 0);
  return {
    gdt: { base: BOOT_GDT_START, limit: gdt.length * 8 - 1 },
    idt: { base: BOOT_IDT_START, limit: BOOT_IDT_SIZE - 1 },
  };
}

/**
 * Identity-maps the first PD_COUNT GiB with 2 MiB pages: PML4[0] -> PDPT,
 * PDPT[i] -> PD i, PD entries -> 2 MiB frames. The MMIO gap is mapped
 * uncached (PCD|PWT), as firmware MTRRs would make it. Returns CR3.
 */
export function writeIdentityPageTables(mem: GuestMemory): number {
  const rw = BigInt(PTE_PRESENT | PTE_WRITABLE);
  mem.fill(PML4_START, PAGE_SIZE, 0);
  mem.fill(PDPT_START, PAGE_SIZE, 0);
  mem.writeU64(PML4_START, BigInt(PDPT_START) | rw);
  const twoMiB = 2 * 1024 * 1024;
  for (let d = 0; d < PD_COUNT; d++) {
    const pd = PD_START + d * PAGE_SIZE;
    mem.writeU64(PDPT_START + d * 8, BigInt(pd) | rw);
    for (let i = 0; i < 512; i++) {
      const frame = (d * 512 + i) * twoMiB;
      let flags = PTE_PRESENT | PTE_WRITABLE | PDE_PAGE_SIZE;
      if (frame >= MMIO_GAP_START) flags |= PTE_PCD | PTE_PWT;
      mem.writeU64(pd + i * 8, BigInt(frame) | BigInt(flags));
    }
  }
  return PML4_START;
}

/**
 * Writes the GDT, IDT and identity page tables, and returns the state in
 * which to enter the kernel at `entry` with %rsi = `bootParams`.
 */
export function setupLongMode(mem: GuestMemory, entry: number, bootParams: number): LongModeCpuState {
  const { gdt, idt } = writeBootGdt(mem);
  const cr3 = writeIdentityPageTables(mem);
  const table = bootGdt();
  const code = segmentFromGdtEntry(table[BOOT_CS_SELECTOR / 8]!, BOOT_CS_SELECTOR / 8);
  const data = segmentFromGdtEntry(table[BOOT_DS_SELECTOR / 8]!, BOOT_DS_SELECTOR / 8);
  const tss = segmentFromGdtEntry(table[BOOT_TSS_SELECTOR / 8]!, BOOT_TSS_SELECTOR / 8);
  return {
    sregs: {
      gdt,
      idt,
      cs: code,
      ds: { ...data },
      es: { ...data },
      fs: { ...data },
      gs: { ...data },
      ss: { ...data },
      tr: tss,
      cr0: (X86_CR0_PE | X86_CR0_ET | X86_CR0_PG) >>> 0,
      cr3,
      cr4: X86_CR4_PAE,
      efer: EFER_LME | EFER_LMA,
    },
    regs: {
      rip: entry,
      rsi: bootParams,
      rsp: BOOT_STACK_POINTER,
      rbp: BOOT_STACK_POINTER,
      rflags: 0x2,
    },
  };
}
