/**
 * The bzImage format: a real-mode setup part (boot sector plus setup
 * sectors) carrying the setup header at 0x1f1, followed by the
 * protected-mode kernel, which holds the compressed vmlinux ("payload").
 *
 * Reference: Documentation/x86/boot.rst and
 * arch/x86/include/uapi/asm/bootparam.h (struct setup_header).
 */

import { BootError, hex } from './errors.js';

/**
 * Offsets of the setup header fields. They are the same in the bzImage file
 * and in struct boot_params, because the header sits at 0x1f1 in both.
 */
export const HDR = {
  SETUP_SECTS: 0x1f1,
  ROOT_FLAGS: 0x1f2,
  SYSSIZE: 0x1f4,
  RAM_SIZE: 0x1f8,
  VID_MODE: 0x1fa,
  ROOT_DEV: 0x1fc,
  BOOT_FLAG: 0x1fe,
  JUMP: 0x200,
  HEADER: 0x202,
  VERSION: 0x206,
  REALMODE_SWTCH: 0x208,
  START_SYS_SEG: 0x20c,
  KERNEL_VERSION: 0x20e,
  TYPE_OF_LOADER: 0x210,
  LOADFLAGS: 0x211,
  SETUP_MOVE_SIZE: 0x212,
  CODE32_START: 0x214,
  RAMDISK_IMAGE: 0x218,
  RAMDISK_SIZE: 0x21c,
  BOOTSECT_KLUDGE: 0x220,
  HEAP_END_PTR: 0x224,
  EXT_LOADER_VER: 0x226,
  EXT_LOADER_TYPE: 0x227,
  CMD_LINE_PTR: 0x228,
  INITRD_ADDR_MAX: 0x22c,
  KERNEL_ALIGNMENT: 0x230,
  RELOCATABLE_KERNEL: 0x234,
  MIN_ALIGNMENT: 0x235,
  XLOADFLAGS: 0x236,
  CMDLINE_SIZE: 0x238,
  HARDWARE_SUBARCH: 0x23c,
  HARDWARE_SUBARCH_DATA: 0x240,
  PAYLOAD_OFFSET: 0x248,
  PAYLOAD_LENGTH: 0x24c,
  SETUP_DATA: 0x250,
  PREF_ADDRESS: 0x258,
  INIT_SIZE: 0x260,
  HANDOVER_OFFSET: 0x264,
  KERNEL_INFO_OFFSET: 0x268,
} as const;

/** Where the setup header starts, in the file and in boot_params. */
export const SETUP_HEADER_START = HDR.SETUP_SECTS;
/** End of struct setup_header in protocol 2.15 (sizeof is 0x7b). */
export const SETUP_HEADER_END_2_15 = 0x26c;
/** boot_params reserves up to 0x290 for the header (`_pad7` in bootparam.h). */
export const SETUP_HEADER_MAX_END = 0x290;

/** boot_flag: the boot sector signature. */
export const BOOT_FLAG_MAGIC = 0xaa55;
/** header: "HdrS" read as a little-endian u32. */
export const HDRS_MAGIC = 0x5372_6448;

/** loadflags bits (bootparam.h). */
export const LOADFLAGS = {
  LOADED_HIGH: 1 << 0,
  KASLR_FLAG: 1 << 1,
  QUIET_FLAG: 1 << 5,
  KEEP_SEGMENTS: 1 << 6,
  CAN_USE_HEAP: 1 << 7,
} as const;

/** xloadflags bits (bootparam.h, protocol 2.12+). */
export const XLF = {
  KERNEL_64: 1 << 0,
  CAN_BE_LOADED_ABOVE_4G: 1 << 1,
  EFI_HANDOVER_32: 1 << 2,
  EFI_HANDOVER_64: 1 << 3,
  EFI_KEXEC: 1 << 4,
  FIVE_LEVEL: 1 << 5,
  FIVE_LEVEL_ENABLED: 1 << 6,
} as const;

/** Oldest protocol we boot: 2.06 is the first with cmdline_size. */
export const MIN_PROTOCOL_VERSION = 0x0206;
/** The newest protocol revision we know the fields of. */
export const PROTOCOL_VERSION_2_15 = 0x020f;

/** Sector size of the real-mode part. */
const SECTOR = 512;

/** The setup header, decoded. Fields the kernel's protocol lacks read as 0. */
export interface SetupHeader {
  /** Boot protocol version, e.g. 0x020f. */
  version: number;
  /** The same as "2.15". */
  versionString: string;
  /** Setup sectors after the boot sector (0 in the file means 4). */
  setupSects: number;
  /** Bytes of the real-mode part: boot sector plus setup sectors. */
  setupSize: number;
  /** Size of the protected-mode code in 16-byte paragraphs. */
  syssize: number;
  loadflags: number;
  /** LOADED_HIGH: the protected-mode code goes at 0x100000 (a bzImage). */
  loadedHigh: boolean;
  xloadflags: number;
  /** XLF_KERNEL_64: the protected-mode code has a 64-bit entry at +0x200. */
  kernel64: boolean;
  code32Start: number;
  /** Highest address the initrd may occupy (inclusive). */
  initrdAddrMax: number;
  kernelAlignment: number;
  relocatable: boolean;
  minAlignment: number;
  /** Longest command line the kernel accepts, without the NUL. */
  cmdlineSize: number;
  /** Offset of the compressed vmlinux from the start of the protected-mode code. */
  payloadOffset: number;
  payloadLength: number;
  /** Where the kernel wants to run (LOAD_PHYSICAL_ADDR). */
  prefAddress: number;
  /** Memory the kernel needs from its runtime start before it reads the memory map. */
  initSize: number;
  /** The kernel's version string, when the header points to one. */
  kernelVersion?: string;
}

/** A parsed bzImage. The byte arrays are views into the input, not copies. */
export interface BzImage {
  header: SetupHeader;
  /**
   * The setup header bytes as they appear in the file, from 0x1f1 up to the
   * end the header declares (0x202 + the byte at 0x201): what a loader
   * copies into boot_params at the same offset.
   */
  rawHeader: Uint8Array;
  /** The protected-mode kernel: everything after the real-mode part. */
  protectedMode: Uint8Array;
  /** The compressed vmlinux inside the protected-mode kernel (protocol 2.08+). */
  payload?: Uint8Array;
}

/** True when `bytes` carries the bzImage boot sector and "HdrS" signatures. */
export function isBzImage(bytes: Uint8Array): boolean {
  if (bytes.length < HDR.HEADER + 4) return false;
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return dv.getUint16(HDR.BOOT_FLAG, true) === BOOT_FLAG_MAGIC && dv.getUint32(HDR.HEADER, true) === HDRS_MAGIC;
}

export function protocolVersionString(version: number): string {
  return `${version >> 8}.${(version & 0xff).toString().padStart(2, '0')}`;
}

/**
 * Parses and validates a bzImage. Throws {@link BootError}: `not-a-kernel`
 * (no boot header, or a zImage), `protocol-too-old` (below 2.06), `corrupt`
 * (sizes and offsets that do not fit in the file).
 */
export function parseBzImage(bytes: Uint8Array): BzImage {
  if (!isBzImage(bytes)) {
    throw new BootError('not-a-kernel', 'kernel image has no Linux boot header (0xAA55 at 0x1fe and "HdrS" at 0x202): pass a bzImage or an ELF vmlinux');
  }
  // Bytes past the header end the kernel declares belong to the setup code,
  // not the header: read them as zero, as the protocol version implies.
  const declaredEnd = HDR.HEADER + bytes[HDR.JUMP + 1]!;
  const headerEnd = Math.min(declaredEnd, SETUP_HEADER_MAX_END, bytes.length);
  const padded = new Uint8Array(SETUP_HEADER_MAX_END);
  padded.set(bytes.subarray(0, headerEnd));
  const dv = new DataView(padded.buffer);
  const u8 = (o: number) => dv.getUint8(o);
  const u16 = (o: number) => dv.getUint16(o, true);
  const u32 = (o: number) => dv.getUint32(o, true);

  const version = u16(HDR.VERSION);
  const versionString = protocolVersionString(version);
  if (version < MIN_PROTOCOL_VERSION) {
    throw new BootError('protocol-too-old', `kernel uses boot protocol ${versionString}; tsvmm needs 2.06 or newer (Linux 2.6.22+): use a newer kernel`);
  }
  const loadflags = u8(HDR.LOADFLAGS);
  if ((loadflags & LOADFLAGS.LOADED_HIGH) === 0) {
    throw new BootError('not-a-kernel', 'kernel is a zImage (loaded low), not a bzImage: rebuild it with "make bzImage"');
  }

  const setupSects = u8(HDR.SETUP_SECTS) || 4;
  const setupSize = (setupSects + 1) * SECTOR;
  if (setupSize >= bytes.length) {
    throw new BootError('corrupt', `bzImage is truncated: its setup code alone needs ${setupSize} bytes but the file has ${bytes.length}`);
  }
  const protectedMode = bytes.subarray(setupSize);
  const syssize = u32(HDR.SYSSIZE);
  // syssize is rounded up to 16 bytes (and counts the trailing CRC32), so
  // allow one paragraph of slack.
  if (syssize * 16 > protectedMode.length + 15) {
    throw new BootError(
      'corrupt',
      `bzImage is truncated: the header says ${syssize * 16} bytes of protected-mode code but the file has ${protectedMode.length}`,
    );
  }

  const prefAddress64 = dv.getBigUint64(HDR.PREF_ADDRESS, true);
  if (prefAddress64 > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BootError('corrupt', `bzImage header has an impossible pref_address ${hex(prefAddress64)}`);
  }

  const xloadflags = u16(HDR.XLOADFLAGS);
  const header: SetupHeader = {
    version,
    versionString,
    setupSects,
    setupSize,
    syssize,
    loadflags,
    loadedHigh: true,
    xloadflags,
    kernel64: (xloadflags & XLF.KERNEL_64) !== 0,
    code32Start: u32(HDR.CODE32_START),
    initrdAddrMax: u32(HDR.INITRD_ADDR_MAX),
    kernelAlignment: u32(HDR.KERNEL_ALIGNMENT),
    relocatable: u8(HDR.RELOCATABLE_KERNEL) !== 0,
    minAlignment: u8(HDR.MIN_ALIGNMENT),
    cmdlineSize: u32(HDR.CMDLINE_SIZE),
    payloadOffset: u32(HDR.PAYLOAD_OFFSET),
    payloadLength: u32(HDR.PAYLOAD_LENGTH),
    prefAddress: Number(prefAddress64),
    initSize: u32(HDR.INIT_SIZE),
  };
  const kernelVersion = readKernelVersion(bytes, u16(HDR.KERNEL_VERSION), setupSize);
  if (kernelVersion !== undefined) header.kernelVersion = kernelVersion;

  let payload: Uint8Array | undefined;
  if (header.payloadLength > 0) {
    const end = header.payloadOffset + header.payloadLength;
    if (end > protectedMode.length) {
      throw new BootError(
        'corrupt',
        `bzImage payload (${header.payloadLength} bytes at offset ${hex(header.payloadOffset)}) runs past the end of the protected-mode code (${protectedMode.length} bytes)`,
      );
    }
    payload = protectedMode.subarray(header.payloadOffset, end);
  }

  const result: BzImage = {
    header,
    rawHeader: bytes.subarray(SETUP_HEADER_START, headerEnd),
    protectedMode,
  };
  if (payload) result.payload = payload;
  return result;
}

/**
 * kernel_version points (minus 0x200) to a NUL-terminated string inside the
 * setup code. It is only informational, so anything odd yields undefined.
 */
function readKernelVersion(bytes: Uint8Array, pointer: number, setupSize: number): string | undefined {
  if (pointer === 0) return undefined;
  const start = pointer + 0x200;
  if (start >= setupSize) return undefined;
  const end = bytes.indexOf(0, start);
  if (end < 0 || end > setupSize || end - start > 256) return undefined;
  const text = new TextDecoder('latin1').decode(bytes.subarray(start, end));
  return /^[\x20-\x7e]+$/.test(text) ? text : undefined;
}
