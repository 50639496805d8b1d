/**
 * x86 register files as TypeScript objects, and their encoding into the
 * kernel's structs (struct kvm_regs, struct kvm_sregs). Offsets come from
 * the native layout, read from the C headers at build time.
 */
import type { NativeLayout } from './native.js';

/** General-purpose registers, in struct kvm_regs order. */
export const REG_NAMES = [
  'rax',
  'rbx',
  'rcx',
  'rdx',
  'rsi',
  'rdi',
  'rsp',
  'rbp',
  'r8',
  'r9',
  'r10',
  'r11',
  'r12',
  'r13',
  'r14',
  'r15',
  'rip',
  'rflags',
] as const;
export type RegName = (typeof REG_NAMES)[number];
export type Regs = Record<RegName, bigint>;

export function decodeRegs(buf: Uint8Array): Regs {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const out = {} as Regs;
  REG_NAMES.forEach((name, i) => {
    out[name] = dv.getBigUint64(i * 8, true);
  });
  return out;
}

/** Writes the given registers into a struct kvm_regs buffer, leaving others as they are. */
export function encodeRegs(buf: Uint8Array, regs: Partial<Record<RegName, bigint | number>>): void {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  REG_NAMES.forEach((name, i) => {
    const v = regs[name];
    if (v !== undefined) dv.setBigUint64(i * 8, BigInt.asUintN(64, BigInt(v)), true);
  });
}

/** A segment register as KVM describes it (struct kvm_segment; flags are 0 or 1). */
export interface Segment {
  base: bigint | number;
  /** Byte-granular limit: a G=1 descriptor's 20-bit limit scaled to 32 bits. */
  limit: number;
  selector: number;
  /** Descriptor type (4 bits): 0xb code execute/read accessed, 0x3 data read/write accessed; with s=0, 0xb is a busy 64-bit TSS. */
  type: number;
  present: number;
  dpl: number;
  /** D/B: default operand size 32 bits (0 for a 64-bit code segment). */
  db: number;
  /** 1 for code/data, 0 for system descriptors (TSS, LDT). */
  s: number;
  /** L: 64-bit code segment. */
  l: number;
  /** G: the limit counts 4 KiB units. */
  g: number;
  avl: number;
  /** KVM's "unusable" flag: set for a not-present descriptor. */
  unusable?: number;
}

/** A descriptor table register (GDTR/IDTR). */
export interface DescriptorTable {
  base: bigint | number;
  /** Size in bytes minus one. */
  limit: number;
}

export const SEGMENT_NAMES = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;
export type SegmentName = (typeof SEGMENT_NAMES)[number];

export interface Sregs {
  cs: Segment;
  ds: Segment;
  es: Segment;
  fs: Segment;
  gs: Segment;
  ss: Segment;
  tr: Segment;
  ldt: Segment;
  gdt: DescriptorTable;
  idt: DescriptorTable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apicBase: bigint;
}

/** The special registers a boot sets; anything absent keeps its value. */
export type SregsUpdate = Partial<Omit<Sregs, 'cr0' | 'cr2' | 'cr3' | 'cr4' | 'cr8' | 'efer' | 'apicBase'>> &
  Partial<Record<'cr0' | 'cr2' | 'cr3' | 'cr4' | 'cr8' | 'efer' | 'apicBase', bigint | number>>;

function dv(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

function decodeSegment(view: DataView, at: number, l: NativeLayout['segment']): Segment {
  return {
    base: view.getBigUint64(at + l.base, true),
    limit: view.getUint32(at + l.limit, true),
    selector: view.getUint16(at + l.selector, true),
    type: view.getUint8(at + l.type),
    present: view.getUint8(at + l.present),
    dpl: view.getUint8(at + l.dpl),
    db: view.getUint8(at + l.db),
    s: view.getUint8(at + l.s),
    l: view.getUint8(at + l.l),
    g: view.getUint8(at + l.g),
    avl: view.getUint8(at + l.avl),
    unusable: view.getUint8(at + l.unusable),
  };
}

function encodeSegment(view: DataView, at: number, l: NativeLayout['segment'], s: Segment): void {
  view.setBigUint64(at + l.base, BigInt(s.base), true);
  view.setUint32(at + l.limit, s.limit >>> 0, true);
  view.setUint16(at + l.selector, s.selector, true);
  view.setUint8(at + l.type, s.type);
  view.setUint8(at + l.present, s.present);
  view.setUint8(at + l.dpl, s.dpl);
  view.setUint8(at + l.db, s.db);
  view.setUint8(at + l.s, s.s);
  view.setUint8(at + l.l, s.l);
  view.setUint8(at + l.g, s.g);
  view.setUint8(at + l.avl, s.avl);
  view.setUint8(at + l.unusable, s.unusable ?? 0);
}

const CONTROL_FIELDS = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apicBase'] as const;

export function decodeSregs(buf: Uint8Array, layout: NativeLayout): Sregs {
  const view = dv(buf);
  const l = layout.sregs;
  const out = {} as Sregs;
  for (const name of SEGMENT_NAMES) out[name] = decodeSegment(view, l[name], layout.segment);
  for (const t of ['gdt', 'idt'] as const) {
    out[t] = {
      base: view.getBigUint64(l[t] + layout.dtable.base, true),
      limit: view.getUint16(l[t] + layout.dtable.limit, true),
    };
  }
  for (const f of CONTROL_FIELDS) out[f] = view.getBigUint64(l[f], true);
  return out;
}

/** Patches a struct kvm_sregs buffer (read first with KVM_GET_SREGS) with `update`. */
export function encodeSregs(buf: Uint8Array, layout: NativeLayout, update: SregsUpdate): void {
  const view = dv(buf);
  const l = layout.sregs;
  for (const name of SEGMENT_NAMES) {
    const seg = update[name];
    if (seg) encodeSegment(view, l[name], layout.segment, seg);
  }
  for (const t of ['gdt', 'idt'] as const) {
    const table = update[t];
    if (table) {
      view.setBigUint64(l[t] + layout.dtable.base, BigInt(table.base), true);
      view.setUint16(l[t] + layout.dtable.limit, table.limit, true);
    }
  }
  for (const f of CONTROL_FIELDS) {
    const v = update[f];
    if (v !== undefined) view.setBigUint64(l[f], BigInt(v), true);
  }
}

/** Model-specific registers the boot vCPU state sets (Intel SDM vol. 4). */
export const MSR = {
  IA32_SYSENTER_CS: 0x174,
  IA32_SYSENTER_ESP: 0x175,
  IA32_SYSENTER_EIP: 0x176,
  STAR: 0xc0000081,
  LSTAR: 0xc0000082,
  CSTAR: 0xc0000083,
  SYSCALL_MASK: 0xc0000084,
  KERNEL_GS_BASE: 0xc0000102,
  IA32_TSC: 0x10,
  IA32_MISC_ENABLE: 0x1a0,
  MTRR_DEF_TYPE: 0x2ff,
} as const;

/** IA32_MISC_ENABLE bit 0: fast string operations, which Linux expects set. */
export const MISC_ENABLE_FAST_STRING = 1n;
/** MTRRdefType: MTRRs enabled, default type write-back. */
export const MTRR_ENABLE_WRITEBACK = (1n << 11n) | 6n;

/** Encodes a struct kvm_msrs holding `entries`. */
export function encodeMsrs(layout: NativeLayout, entries: ReadonlyArray<[number, bigint]>): Uint8Array {
  const buf = new Uint8Array(layout.msrsHeaderSize + entries.length * layout.msrEntrySize);
  const view = dv(buf);
  view.setUint32(0, entries.length, true);
  entries.forEach(([index, data], i) => {
    const at = layout.msrsHeaderSize + i * layout.msrEntrySize;
    view.setUint32(at, index, true);
    view.setBigUint64(at + 8, data, true);
  });
  return buf;
}
