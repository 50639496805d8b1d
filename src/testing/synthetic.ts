/**
 * Tiny, well-formed kernel images built in memory: an x86-64 ELF with the
 * segments you give it, and a bzImage wrapping a payload. For loader tests,
 * and for vCPU tests that want a "kernel" of a few instructions without
 * building Linux.
 */

import { BOOT_FLAG_MAGIC, HDR, HDRS_MAGIC, LOADFLAGS, PROTOCOL_VERSION_2_15, SETUP_HEADER_END_2_15, XLF } from '../arch/boot/bzimage.js';

export interface SyntheticSegment {
  paddr: number;
  /** Defaults to paddr + 0xffffffff80000000, as the kernel's __START_KERNEL_map. */
  vaddr?: bigint;
  data: Uint8Array;
  /** Defaults to data.length; more zero-fills (.bss). */
  memsz?: number;
  /** PF_R | PF_X by default. */
  flags?: number;
}

export interface SyntheticElfOptions {
  segments: SyntheticSegment[];
  entry: number | bigint;
  /** ELF class: 2 (64-bit, default) or 1. */
  elfClass?: number;
  /** e_machine: 62 (x86-64) by default. */
  machine?: number;
  /** e_type: 2 (ET_EXEC) by default. */
  type?: number;
  /** Bytes appended after the segment data (like the relocations after vmlinux.bin). */
  trailer?: Uint8Array;
}

const START_KERNEL_MAP = 0xffff_ffff_8000_0000n;

/** Builds an ELF64 executable with one PT_LOAD program header per segment. */
export function buildElfKernel(opts: SyntheticElfOptions): Uint8Array {
  const ehsize = 64;
  const phentsize = 56;
  const phoff = ehsize;
  let dataOffset = phoff + opts.segments.length * phentsize;
  dataOffset = Math.ceil(dataOffset / 16) * 16;
  const offsets: number[] = [];
  let size = dataOffset;
  for (const seg of opts.segments) {
    offsets.push(size);
    size += Math.ceil(seg.data.length / 16) * 16;
  }
  const trailer = opts.trailer ?? new Uint8Array(0);
  const out = new Uint8Array(size + trailer.length);
  const dv = new DataView(out.buffer);
  out.set([0x7f, 0x45, 0x4c, 0x46]);
  out[4] = opts.elfClass ?? 2;
  out[5] = 1; // little-endian
  out[6] = 1; // EV_CURRENT
  dv.setUint16(16, opts.type ?? 2, true);
  dv.setUint16(18, opts.machine ?? 62, true);
  dv.setUint32(20, 1, true);
  dv.setBigUint64(24, BigInt(opts.entry), true);
  dv.setBigUint64(32, BigInt(phoff), true);
  dv.setUint16(52, ehsize, true);
  dv.setUint16(54, phentsize, true);
  dv.setUint16(56, opts.segments.length, true);
  opts.segments.forEach((seg, i) => {
    const ph = phoff + i * phentsize;
    dv.setUint32(ph, 1, true); // PT_LOAD
    dv.setUint32(ph + 4, seg.flags ?? 5, true);
    dv.setBigUint64(ph + 8, BigInt(offsets[i]!), true);
    dv.setBigUint64(ph + 16, seg.vaddr ?? START_KERNEL_MAP + BigInt(seg.paddr), true);
    dv.setBigUint64(ph + 24, BigInt(seg.paddr), true);
    dv.setBigUint64(ph + 32, BigInt(seg.data.length), true);
    dv.setBigUint64(ph + 40, BigInt(seg.memsz ?? seg.data.length), true);
    dv.setBigUint64(ph + 48, 0x20_0000n, true);
    out.set(seg.data, offsets[i]!);
  });
  out.set(trailer, size);
  return out;
}

export interface SyntheticBzImageOptions {
  /** Boot protocol version; 2.15 by default. */
  version?: number;
  /** Value stored in setup_sects (0 means 4, as in the protocol). */
  setupSects?: number;
  loadflags?: number;
  xloadflags?: number;
  relocatable?: boolean;
  kernelAlignment?: number;
  prefAddress?: number;
  initSize?: number;
  cmdlineSize?: number;
  initrdAddrMax?: number;
  /** The compressed vmlinux, placed after `codeSize` bytes of protected-mode code. */
  payload?: Uint8Array;
  /** Protected-mode bytes before the payload (filled with 0x90); 0x400 by default. */
  codeSize?: number;
  /** Stored in the setup code and pointed to by kernel_version. */
  kernelVersion?: string;
}

/**
 * Builds a bzImage: boot sector and setup sectors with the header at
 * 0x1f1, then the protected-mode part (filler code, the payload, and 4
 * bytes standing in for the CRC32 the real build appends).
 */
export function buildBzImage(opts: SyntheticBzImageOptions = {}): Uint8Array {
  const setupSectsField = opts.setupSects ?? 4;
  const setupSize = ((setupSectsField || 4) + 1) * 512;
  const codeSize = opts.codeSize ?? 0x400;
  const payload = opts.payload ?? new Uint8Array(0);
  const pmSize = codeSize + payload.length + 4;
  const out = new Uint8Array(setupSize + pmSize);
  const dv = new DataView(out.buffer);
  out.fill(0x90, setupSize, setupSize + codeSize);
  out.set(payload, setupSize + codeSize);

  dv.setUint8(HDR.SETUP_SECTS, setupSectsField);
  dv.setUint32(HDR.SYSSIZE, Math.ceil(pmSize / 16), true);
  dv.setUint16(HDR.VID_MODE, 0xffff, true);
  dv.setUint16(HDR.BOOT_FLAG, BOOT_FLAG_MAGIC, true);
  dv.setUint8(HDR.JUMP, 0xeb);
  dv.setUint8(HDR.JUMP + 1, SETUP_HEADER_END_2_15 - HDR.HEADER);
  dv.setUint32(HDR.HEADER, HDRS_MAGIC, true);
  dv.setUint16(HDR.VERSION, opts.version ?? PROTOCOL_VERSION_2_15, true);
  dv.setUint8(HDR.LOADFLAGS, opts.loadflags ?? LOADFLAGS.LOADED_HIGH);
  dv.setUint32(HDR.CODE32_START, 0x10_0000, true);
  dv.setUint32(HDR.INITRD_ADDR_MAX, opts.initrdAddrMax ?? 0x7fff_ffff, true);
  dv.setUint32(HDR.KERNEL_ALIGNMENT, opts.kernelAlignment ?? 0x20_0000, true);
  dv.setUint8(HDR.RELOCATABLE_KERNEL, (opts.relocatable ?? true) ? 1 : 0);
  dv.setUint8(HDR.MIN_ALIGNMENT, 21);
  dv.setUint16(HDR.XLOADFLAGS, opts.xloadflags ?? XLF.KERNEL_64 | XLF.CAN_BE_LOADED_ABOVE_4G, true);
  dv.setUint32(HDR.CMDLINE_SIZE, opts.cmdlineSize ?? 2047, true);
  if (payload.length > 0) {
    dv.setUint32(HDR.PAYLOAD_OFFSET, codeSize, true);
    dv.setUint32(HDR.PAYLOAD_LENGTH, payload.length, true);
  }
  dv.setBigUint64(HDR.PREF_ADDRESS, BigInt(opts.prefAddress ?? 0x100_0000), true);
  dv.setUint32(HDR.INIT_SIZE, opts.initSize ?? 0x80_0000, true);
  if (opts.kernelVersion !== undefined) {
    const at = 0x400;
    out.set(new TextEncoder().encode(opts.kernelVersion), at);
    dv.setUint16(HDR.KERNEL_VERSION, at - 0x200, true);
  }
  return out;
}

/** Where {@link buildPrintAndHaltKernel} loads and enters its code. */
export const PRINT_AND_HALT_ENTRY = 0x100_0000;

/**
 * A 64-bit ELF "kernel" of a few instructions that writes `text` (ASCII)
 * to COM1's THR and then halts forever: a guest for tests and benchmarks
 * of VM lifetimes, which need a VM to come up and say so, not Linux.
 */
export function buildPrintAndHaltKernel(text = 'ok\n'): Uint8Array {
  const code: number[] = [0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
  for (const ch of Buffer.from(text, 'latin1')) code.push(0xb0, ch, 0xee); // mov al, ch; out dx, al
  code.push(0xf4, 0xeb, 0xfd); // 1: hlt; jmp 1b
  return buildElfKernel({
    segments: [{ paddr: PRINT_AND_HALT_ENTRY, vaddr: BigInt(PRINT_AND_HALT_ENTRY), data: Uint8Array.from(code) }],
    entry: PRINT_AND_HALT_ENTRY,
  });
}
