/**
 * The zero page (struct boot_params) and the command line.
 *
 * Offsets: arch/x86/include/uapi/asm/bootparam.h; the setup header part
 * is described in Documentation/x86/boot.rst, the rest in
 * Documentation/x86/zero-page.rst.
 */

import type { GuestMemory } from '../../base/memory.js';
import { CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_SIZE } from '../layout.js';
import {
  BOOT_FLAG_MAGIC,
  HDR,
  HDRS_MAGIC,
  LOADFLAGS,
  PROTOCOL_VERSION_2_15,
  SETUP_HEADER_END_2_15,
  SETUP_HEADER_MAX_END,
  SETUP_HEADER_START,
  XLF,
} from './bzimage.js';
import { BootError } from './errors.js';

/** boot_params fields outside the setup header (bootparam.h). */
export const BP = {
  /** Physical address of the ACPI RSDP (boot protocol 2.14). */
  ACPI_RSDP_ADDR: 0x070,
  EXT_RAMDISK_IMAGE: 0x0c0,
  EXT_RAMDISK_SIZE: 0x0c4,
  EXT_CMD_LINE_PTR: 0x0c8,
  E820_ENTRIES: 0x1e8,
  /** 0xff in the kernel image: a loader that copied too much is caught by it. */
  SENTINEL: 0x1ef,
  HDR: SETUP_HEADER_START,
  E820_TABLE: 0x2d0,
} as const;

/** struct boot_e820_entry: u64 addr, u64 size, u32 type (packed). */
export const E820_ENTRY_SIZE = 20;
/** E820_MAX_ENTRIES_ZEROPAGE. */
export const E820_MAX_ENTRIES = 128;
export const E820_RAM = 1;
export const E820_RESERVED = 2;

/** type_of_loader for a loader without an assigned ID (boot.rst). */
export const LOADER_TYPE_UNDEFINED = 0xff;
/**
 * heap_end_ptr: end of the real-mode setup heap, relative to the setup
 * code, minus 0x200. Only the real-mode setup code reads it; 0xfe00 is the
 * full 64 KiB segment, as kvmtool and QEMU pass.
 */
export const HEAP_END_PTR = 0xfe00;
/**
 * The x86 kernel's COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h) minus
 * the NUL: the cmdline_size of a synthesized header.
 */
export const DEFAULT_CMDLINE_SIZE = 2047;
/** Highest initrd byte for a synthesized header: what 64-bit kernels declare. */
export const DEFAULT_INITRD_ADDR_MAX = 0x7fff_ffff;
/** kernel_alignment for a synthesized header (Firecracker passes 16 MiB). */
export const DEFAULT_KERNEL_ALIGNMENT = 0x100_0000;

/** One e820 map entry. */
export interface E820Entry {
  addr: number;
  size: number;
  type: number;
}

/**
 * A setup header for a kernel that has none (a bare ELF vmlinux): the
 * signatures and the fields the kernel reads, as if from a 2.15 kernel.
 * Returns the bytes from 0x1f1, to copy like a bzImage's header.
 */
export function synthesizeSetupHeader(): Uint8Array {
  const bytes = new Uint8Array(SETUP_HEADER_END_2_15 - SETUP_HEADER_START);
  const dv = new DataView(bytes.buffer);
  const at = (off: number) => off - SETUP_HEADER_START;
  dv.setUint16(at(HDR.BOOT_FLAG), BOOT_FLAG_MAGIC, true);
  // A short jump over the header, as header.S has; its offset byte also
  // says where the header ends (0x202 + offset).
  dv.setUint8(at(HDR.JUMP), 0xeb);
  dv.setUint8(at(HDR.JUMP) + 1, SETUP_HEADER_END_2_15 - HDR.HEADER);
  dv.setUint32(at(HDR.HEADER), HDRS_MAGIC, true);
  dv.setUint16(at(HDR.VERSION), PROTOCOL_VERSION_2_15, true);
  dv.setUint8(at(HDR.LOADFLAGS), LOADFLAGS.LOADED_HIGH);
  dv.setUint32(at(HDR.CODE32_START), HIMEM_START, true);
  dv.setUint32(at(HDR.INITRD_ADDR_MAX), DEFAULT_INITRD_ADDR_MAX, true);
  dv.setUint32(at(HDR.KERNEL_ALIGNMENT), DEFAULT_KERNEL_ALIGNMENT, true);
  dv.setUint16(at(HDR.XLOADFLAGS), XLF.KERNEL_64, true);
  dv.setUint32(at(HDR.CMDLINE_SIZE), DEFAULT_CMDLINE_SIZE, true);
  return bytes;
}

/**
 * The e820 map for guest RAM: the low region minus the legacy hole
 * (RAM below the EBDA, reserved EBDA to 1 MiB, RAM from 1 MiB), and every
 * other region (RAM above 4 GiB) as RAM.
 */
export function buildE820Map(mem: GuestMemory): E820Entry[] {
  const map: E820Entry[] = [];
  for (const region of mem.memoryRegions) {
    const start = region.guestAddr;
    const end = start + region.bytes.length;
    if (start === 0) {
      map.push({ addr: 0, size: Math.min(end, EBDA_START), type: E820_RAM });
      if (end > EBDA_START) {
        map.push({ addr: EBDA_START, size: Math.min(end, HIMEM_START) - EBDA_START, type: E820_RESERVED });
      }
      if (end > HIMEM_START) map.push({ addr: HIMEM_START, size: end - HIMEM_START, type: E820_RAM });
    } else {
      map.push({ addr: start, size: end - start, type: E820_RAM });
    }
  }
  if (map.length > E820_MAX_ENTRIES) {
    throw new BootError('corrupt', `guest memory has ${map.length} e820 entries; the zero page holds ${E820_MAX_ENTRIES}`);
  }
  return map;
}

/**
 * The command line as the kernel receives it: UTF-8, NUL-terminated, at
 * most `cmdlineSize` bytes before the NUL (the header's cmdline_size) and
 * within the CMDLINE_MAX_SIZE area.
 */
export function encodeCmdline(cmdline: string, cmdlineSize: number): Uint8Array {
  const text = new TextEncoder().encode(cmdline);
  if (text.includes(0)) {
    throw new BootError('invalid-cmdline', 'kernel command line contains a NUL character, which would cut it short: remove it');
  }
  const limit = Math.min(cmdlineSize, CMDLINE_MAX_SIZE - 1);
  if (text.length > limit) {
    throw new BootError('cmdline-too-long', `kernel command line is ${text.length} bytes but the kernel accepts at most ${limit}: shorten it`);
  }
  const out = new Uint8Array(text.length + 1);
  out.set(text);
  return out;
}

/** Writes the (already encoded) command line into its area, zeroing the rest. */
export function writeCmdline(mem: GuestMemory, encoded: Uint8Array): number {
  mem.fill(CMDLINE_START, CMDLINE_MAX_SIZE, 0);
  mem.write(CMDLINE_START, encoded);
  return CMDLINE_START;
}

/** What goes into the zero page besides the kernel's own header. */
export interface BootParamsOptions {
  /** Setup header bytes from 0x1f1: a bzImage's, or {@link synthesizeSetupHeader}'s. */
  rawHeader: Uint8Array;
  cmdlineAddr: number;
  /** Load address of the protected-mode kernel, for code32_start (bzImage booted in the guest). */
  code32Start?: number;
  initrd?: { addr: number; size: number };
  e820: readonly E820Entry[];
  /** Where the ACPI RSDP is, so the kernel need not scan for it. */
  acpiRsdpAddr?: number;
}

/**
 * Builds the 4 KiB zero page: everything zero (so the sentinel reads 0 and
 * the kernel trusts the rest), the kernel's setup header copied in at
 * 0x1f1, then the loader's fields filled in.
 */
export function buildBootParams(opts: BootParamsOptions): Uint8Array {
  const zp = new Uint8Array(ZERO_PAGE_SIZE);
  const dv = new DataView(zp.buffer);
  const maxHeader = SETUP_HEADER_MAX_END - SETUP_HEADER_START;
  zp.set(opts.rawHeader.subarray(0, maxHeader), SETUP_HEADER_START);

  dv.setUint8(HDR.TYPE_OF_LOADER, LOADER_TYPE_UNDEFINED);
  dv.setUint8(HDR.LOADFLAGS, dv.getUint8(HDR.LOADFLAGS) | LOADFLAGS.CAN_USE_HEAP);
  dv.setUint16(HDR.HEAP_END_PTR, HEAP_END_PTR, true);
  if (opts.code32Start !== undefined) dv.setUint32(HDR.CODE32_START, opts.code32Start, true);

  setSplit(dv, HDR.CMD_LINE_PTR, BP.EXT_CMD_LINE_PTR, opts.cmdlineAddr);
  // cmdline_size is a read-only field for the loader: the kernel's value stays.
  if (opts.initrd) {
    setSplit(dv, HDR.RAMDISK_IMAGE, BP.EXT_RAMDISK_IMAGE, opts.initrd.addr);
    setSplit(dv, HDR.RAMDISK_SIZE, BP.EXT_RAMDISK_SIZE, opts.initrd.size);
  }

  if (opts.acpiRsdpAddr !== undefined) dv.setBigUint64(BP.ACPI_RSDP_ADDR, BigInt(opts.acpiRsdpAddr), true);

  if (opts.e820.length > E820_MAX_ENTRIES) {
    throw new BootError('corrupt', `e820 map has ${opts.e820.length} entries; the zero page holds ${E820_MAX_ENTRIES}`);
  }
  dv.setUint8(BP.E820_ENTRIES, opts.e820.length);
  opts.e820.forEach((e, i) => {
    const at = BP.E820_TABLE + i * E820_ENTRY_SIZE;
    dv.setBigUint64(at, BigInt(e.addr), true);
    dv.setBigUint64(at + 8, BigInt(e.size), true);
    dv.setUint32(at + 16, e.type, true);
  });
  return zp;
}

/** Writes a 64-bit value split into a 32-bit header field and its ext_ field. */
function setSplit(dv: DataView, lowOffset: number, highOffset: number, value: number): void {
  dv.setUint32(lowOffset, value % 2 ** 32, true);
  dv.setUint32(highOffset, Math.floor(value / 2 ** 32), true);
}

/** Reads back the e820 map of a zero page (for tests and debugging). */
export function readE820Map(zeroPage: Uint8Array): E820Entry[] {
  const dv = new DataView(zeroPage.buffer, zeroPage.byteOffset, zeroPage.byteLength);
  const n = dv.getUint8(BP.E820_ENTRIES);
  const out: E820Entry[] = [];
  for (let i = 0; i < n; i++) {
    const at = BP.E820_TABLE + i * E820_ENTRY_SIZE;
    out.push({
      addr: Number(dv.getBigUint64(at, true)),
      size: Number(dv.getBigUint64(at + 8, true)),
      type: dv.getUint32(at + 16, true),
    });
  }
  return out;
}
