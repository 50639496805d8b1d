/**
 * ELF vmlinux: a 64-bit little-endian x86-64 executable whose PT_LOAD
 * segments are copied to their physical addresses (p_paddr) and entered at
 * e_entry, which for x86-64 is the physical address of startup_64
 * (arch/x86/kernel/vmlinux.lds.S: ENTRY(phys_startup_64)).
 *
 * The same parser reads the decompressed payload of a bzImage, which is
 * `vmlinux.bin` (vmlinux stripped by objcopy) followed by relocation data:
 * everything outside the program headers' ranges is ignored.
 */

import type { GuestMemory } from '../../base/memory.js';
import { HIMEM_START } from '../layout.js';
import { BootError, hex } from './errors.js';

const ELF_MAGIC = [0x7f, 0x45, 0x4c, 0x46] as const;
const ELFCLASS32 = 1;
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const ET_EXEC = 2;
const EM_386 = 3;
const EM_X86_64 = 62;
const PT_LOAD = 1;
/** sizeof(Elf64_Ehdr) */
const EHDR64_SIZE = 64;
/** sizeof(Elf64_Phdr) */
const PHDR64_SIZE = 56;

/** Elf64_Ehdr field offsets. */
const EH = {
  CLASS: 4,
  DATA: 5,
  TYPE: 16,
  MACHINE: 18,
  ENTRY: 24,
  PHOFF: 32,
  PHENTSIZE: 54,
  PHNUM: 56,
} as const;

/** Elf64_Phdr field offsets. */
const PH = {
  TYPE: 0,
  FLAGS: 4,
  OFFSET: 8,
  VADDR: 16,
  PADDR: 24,
  FILESZ: 32,
  MEMSZ: 40,
} as const;

/** One PT_LOAD segment. */
export interface ElfSegment {
  /** Where its bytes start in the file. */
  offset: number;
  /** Physical load address. */
  paddr: number;
  /** Virtual address (0xffffffff8... for the kernel): informational. */
  vaddr: bigint;
  /** Bytes copied from the file. */
  filesz: number;
  /** Bytes in memory; those past filesz are zeroed (.bss). */
  memsz: number;
  /** PF_X | PF_W | PF_R. */
  flags: number;
}

/** A validated x86-64 ELF kernel. */
export interface ElfKernel {
  /** Physical entry point. */
  entry: number;
  /** PT_LOAD segments in file order (memsz > 0 only). */
  segments: ElfSegment[];
  /** Lowest physical address loaded. */
  start: number;
  /** One past the highest physical address loaded. */
  end: number;
}

/** True when `bytes` starts with the ELF magic. */
export function isElf(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && ELF_MAGIC.every((b, i) => bytes[i] === b);
}

/**
 * Parses and validates an x86-64 ELF kernel image. `what` names the image
 * in messages ("vmlinux", "decompressed bzImage payload"). Throws
 * {@link BootError}: `not-a-kernel`, `not-64-bit` or `corrupt`.
 */
export function parseElfKernel(bytes: Uint8Array, what = 'vmlinux'): ElfKernel {
  if (!isElf(bytes)) {
    throw new BootError('not-a-kernel', `${what} is not an ELF file: pass a bzImage or an ELF vmlinux`);
  }
  if (bytes.length < EHDR64_SIZE) {
    throw new BootError('corrupt', `${what} is truncated: ${bytes.length} bytes is shorter than an ELF header`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const cls = dv.getUint8(EH.CLASS);
  if (cls === ELFCLASS32) {
    throw new BootError('not-64-bit', `${what} is a 32-bit ELF: tsvmm boots x86-64 kernels only (build with CONFIG_64BIT=y)`);
  }
  if (cls !== ELFCLASS64 || dv.getUint8(EH.DATA) !== ELFDATA2LSB) {
    throw new BootError('not-a-kernel', `${what} is not a 64-bit little-endian ELF: pass an x86-64 vmlinux`);
  }
  const machine = dv.getUint16(EH.MACHINE, true);
  if (machine === EM_386) {
    throw new BootError('not-64-bit', `${what} is an i386 ELF: tsvmm boots x86-64 kernels only (build with CONFIG_64BIT=y)`);
  }
  if (machine !== EM_X86_64) {
    throw new BootError('not-a-kernel', `${what} is an ELF for machine ${machine}, not x86-64 (62): pass an x86-64 kernel`);
  }
  const type = dv.getUint16(EH.TYPE, true);
  if (type !== ET_EXEC) {
    throw new BootError('not-a-kernel', `${what} is an ELF of type ${type}, not an executable (ET_EXEC): pass the kernel's vmlinux`);
  }

  const phoff = readSize(dv, EH.PHOFF, what, 'e_phoff');
  const phentsize = dv.getUint16(EH.PHENTSIZE, true);
  const phnum = dv.getUint16(EH.PHNUM, true);
  if (phnum === 0) {
    throw new BootError('corrupt', `${what} has no program headers, so nothing to load`);
  }
  if (phentsize < PHDR64_SIZE) {
    throw new BootError('corrupt', `${what} has program headers of ${phentsize} bytes (an Elf64_Phdr is ${PHDR64_SIZE})`);
  }
  if (phoff + phnum * phentsize > bytes.length) {
    throw new BootError('corrupt', `${what} is truncated: its ${phnum} program headers at ${hex(phoff)} run past the end of the file (${bytes.length} bytes)`);
  }

  const segments: ElfSegment[] = [];
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    if (dv.getUint32(ph + PH.TYPE, true) !== PT_LOAD) continue;
    const seg: ElfSegment = {
      offset: readSize(dv, ph + PH.OFFSET, what, `segment ${i} p_offset`),
      paddr: readSize(dv, ph + PH.PADDR, what, `segment ${i} p_paddr`),
      vaddr: dv.getBigUint64(ph + PH.VADDR, true),
      filesz: readSize(dv, ph + PH.FILESZ, what, `segment ${i} p_filesz`),
      memsz: readSize(dv, ph + PH.MEMSZ, what, `segment ${i} p_memsz`),
      flags: dv.getUint32(ph + PH.FLAGS, true),
    };
    if (seg.offset + seg.filesz > bytes.length) {
      throw new BootError(
        'corrupt',
        `${what} is truncated: segment ${i} needs file bytes ${hex(seg.offset)}-${hex(seg.offset + seg.filesz)} but the file has ${bytes.length}`,
      );
    }
    if (seg.filesz > seg.memsz) {
      throw new BootError('corrupt', `${what} segment ${i} has more file bytes (${seg.filesz}) than memory bytes (${seg.memsz})`);
    }
    if (!Number.isSafeInteger(seg.paddr + seg.memsz)) {
      throw new BootError('corrupt', `${what} segment ${i} at ${hex(seg.paddr)} with ${seg.memsz} bytes overflows the address space`);
    }
    if (seg.memsz > 0) segments.push(seg);
  }
  if (segments.length === 0) {
    throw new BootError('corrupt', `${what} has no loadable (PT_LOAD) segments`);
  }

  const byAddr = [...segments].sort((a, b) => a.paddr - b.paddr);
  for (let i = 1; i < byAddr.length; i++) {
    const prev = byAddr[i - 1]!;
    const cur = byAddr[i]!;
    if (prev.paddr + prev.memsz > cur.paddr) {
      throw new BootError('corrupt', `${what} segments overlap at physical ${hex(cur.paddr)}`);
    }
  }

  const entry = physicalEntry(dv.getBigUint64(EH.ENTRY, true), segments, what);
  const start = byAddr[0]!.paddr;
  const end = Math.max(...segments.map((s) => s.paddr + s.memsz));
  return { entry, segments, start, end };
}

/**
 * e_entry is physical for x86-64 vmlinux. Should a kernel link it at its
 * virtual address instead, translate through the segment that holds it.
 */
function physicalEntry(entry: bigint, segments: ElfSegment[], what: string): number {
  for (const s of segments) {
    if (entry >= BigInt(s.paddr) && entry < BigInt(s.paddr + s.memsz)) return Number(entry);
  }
  for (const s of segments) {
    if (entry >= s.vaddr && entry < s.vaddr + BigInt(s.memsz)) {
      return s.paddr + Number(entry - s.vaddr);
    }
  }
  throw new BootError('corrupt', `${what} entry point ${hex(entry)} is outside every loadable segment`);
}

function readSize(dv: DataView, offset: number, what: string, field: string): number {
  const v = dv.getBigUint64(offset, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BootError('corrupt', `${what} has an impossible ${field} ${hex(v)}`);
  }
  return Number(v);
}

/**
 * Copies the segments of `elf` (parsed from `bytes`) into guest memory and
 * zeroes each segment's tail up to p_memsz. Refuses segments below
 * HIMEM_START, where the boot structures live, and segments outside RAM.
 */
export function loadElfSegments(mem: GuestMemory, bytes: Uint8Array, elf: ElfKernel, what = 'vmlinux'): void {
  for (const seg of elf.segments) {
    if (seg.paddr < HIMEM_START) {
      throw new BootError(
        'corrupt',
        `${what} loads a segment at ${hex(seg.paddr)}, below 1 MiB where the boot structures live: pass a kernel linked for a normal PC`,
      );
    }
    if (!mem.checkRange(seg.paddr, seg.memsz)) {
      throw new BootError(
        'memory-too-small',
        `${what} segment ${hex(seg.paddr)}-${hex(seg.paddr + seg.memsz)} is outside guest RAM: give the guest more memory`,
      );
    }
  }
  for (const seg of elf.segments) {
    mem.write(seg.paddr, bytes.subarray(seg.offset, seg.offset + seg.filesz));
    mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz, 0);
  }
}
