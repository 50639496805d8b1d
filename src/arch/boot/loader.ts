/**
 * Loads a Linux x86-64 kernel, its initrd and command line into guest
 * memory and says how to start it. Three ways in:
 *
 * - `bzimage-guest`: the classic path. The protected-mode kernel goes to
 *   0x100000 and is entered in 64-bit mode at +0x200 (boot.rst, "64-bit
 *   Boot Protocol"); it decompresses itself inside the guest.
 * - `bzimage-host`: the payload (compressed vmlinux) is decompressed here
 *   and its ELF segments loaded at their physical addresses, entered at
 *   startup_64, with the bzImage's setup header in boot_params. This skips
 *   the in-guest decompressor, which is slow on an emulated CPU.
 * - `elf`: a bare vmlinux, loaded like the above with a synthesized header.
 *
 * Everything is checked before the first byte is written, so a failed load
 * leaves guest memory untouched.
 */

import type { GuestMemory } from '../../base/memory.js';
import { HIMEM_START, PAGE_SIZE, ZERO_PAGE_START } from '../layout.js';
import { isBzImage, parseBzImage, type BzImage, type SetupHeader } from './bzimage.js';
import { decompressKernelPayload, detectCompression, hostDecompressionUnavailable, type CompressionFormat, type PayloadCache } from './decompress.js';
import { isElf, loadElfSegments, parseElfKernel, type ElfKernel } from './elf.js';
import { BootError, hex, mib } from './errors.js';
import {
  DEFAULT_CMDLINE_SIZE,
  DEFAULT_INITRD_ADDR_MAX,
  buildBootParams,
  buildE820Map,
  encodeCmdline,
  synthesizeSetupHeader,
  writeCmdline,
  type E820Entry,
} from './params.js';
import { setupLongMode, type LongModeCpuState } from './x86.js';

export { BootError, type BootErrorKind } from './errors.js';

/**
 * How to boot a bzImage: `host` decompresses its payload here, `guest`
 * leaves that to the kernel, `auto` (the default) picks host when this
 * host can decode the payload's format and guest otherwise. A bare ELF
 * vmlinux has nothing to decompress and always loads directly.
 */
export type BootMode = 'auto' | 'host' | 'guest';

/** Which of the three load paths was taken. */
export type BootKind = 'bzimage-guest' | 'bzimage-host' | 'elf';

/** A guest-physical range; `end` is exclusive. */
export interface AddressRange {
  start: number;
  end: number;
}

export interface LoadLinuxOptions {
  /**
   * A bzImage or an ELF vmlinux, or one already {@link prepareKernel}d
   * (whose mode then wins over `mode`).
   */
  kernel: Uint8Array | PreparedKernel;
  /** An initramfs/initrd image, placed as high in low RAM as the kernel allows. */
  initrd?: Uint8Array;
  cmdline: string;
  mode?: BootMode;
  /** The ACPI RSDP's address, passed in the zero page (boot protocol 2.14). */
  acpiRsdpAddr?: number;
}

/** What the vCPU code needs to start the kernel, and where things went. */
export interface BootInfo {
  kind: BootKind;
  /** Guest-physical entry point (also `cpu.regs.rip`). */
  entry: number;
  /** The zero page (also `cpu.regs.rsi`). */
  bootParamsAddr: number;
  cmdlineAddr: number;
  /** Registers to program: long mode, identity-mapped, interrupts off. */
  cpu: LongModeCpuState;
  /**
   * Memory the kernel occupies before it reads the e820 map: for
   * `bzimage-guest` from the load address to the end of its init_size
   * footprint, otherwise the span of its ELF segments.
   */
  kernelRange: AddressRange;
  initrdRange?: AddressRange;
  /** Payload format of a bzImage (whichever path booted it). */
  compression?: CompressionFormat;
  /** The bzImage's setup header (absent for a bare ELF). */
  setupHeader?: SetupHeader;
  /** The memory map handed to the kernel. */
  e820: E820Entry[];
}

/** Offset of the 64-bit entry point in the protected-mode kernel (boot.rst). */
export const ENTRY_64_OFFSET = 0x200;
/** Where a protocol < 2.03 kernel allowed the initrd to end (boot.rst). */
const LEGACY_INITRD_ADDR_MAX = 0x37ff_ffff;

/** The kernel, planned but not yet written. */
interface KernelPlan {
  kind: BootKind;
  entry: number;
  range: AddressRange;
  rawHeader: Uint8Array;
  cmdlineSize: number;
  initrdAddrMax: number;
  write: (mem: GuestMemory) => void;
  code32Start?: number;
  compression?: CompressionFormat;
  setupHeader?: SetupHeader;
}

/**
 * Loads `opts.kernel` (+ initrd and command line) into `mem`, writes the
 * zero page, GDT and page tables, and returns the entry state. Throws
 * {@link BootError}; on error nothing has been written to guest memory.
 *
 * Asynchronous because the xz decoder is a native addon loaded on first use.
 */
export async function loadLinux(mem: GuestMemory, opts: LoadLinuxOptions): Promise<BootInfo> {
  const mode = opts.mode ?? 'auto';
  const lowEnd = lowRamEnd(mem);
  if (lowEnd < HIMEM_START) {
    throw memoryTooSmall(HIMEM_START + PAGE_SIZE, mem.size, 'the boot structures need');
  }

  const plan = await (opts.kernel instanceof Uint8Array ? planKernel(opts.kernel, mode) : opts.kernel.plan);
  if (plan.range.start < HIMEM_START) {
    throw new BootError(
      'corrupt',
      `kernel loads at ${hex(plan.range.start)}, below 1 MiB where the boot structures live: pass a kernel linked for a normal PC`,
    );
  }
  const cmdline = encodeCmdline(opts.cmdline, plan.cmdlineSize);

  // Memory: the kernel's footprint, then the initrd above it, all in low RAM.
  const kernelEnd = alignUp(plan.range.end, PAGE_SIZE);
  const initrd = opts.initrd && opts.initrd.length > 0 ? opts.initrd : undefined;
  const initrdSize = initrd ? alignUp(initrd.length, PAGE_SIZE) : 0;
  const needed = kernelEnd + initrdSize;
  const initrdCeiling = plan.initrdAddrMax + 1;
  if (initrd && needed > initrdCeiling) {
    throw new BootError(
      'initrd-too-large',
      `initrd is ${mib(initrd.length)} MiB but only ${Math.max(0, Math.floor((initrdCeiling - kernelEnd) / 2 ** 20))} MiB fit between the kernel's end (${hex(kernelEnd)}) and the highest address the kernel accepts (initrd_addr_max ${hex(plan.initrdAddrMax)}): use a smaller initrd`,
    );
  }
  if (needed > lowEnd) {
    throw memoryTooSmall(needed, mem.size, initrd ? 'kernel and initrd need' : 'kernel needs');
  }

  let initrdRange: AddressRange | undefined;
  if (initrd) {
    const top = Math.min(initrdCeiling, lowEnd);
    const start = alignDown(top - initrd.length, PAGE_SIZE);
    initrdRange = { start, end: start + initrd.length };
  }

  // All checks passed: write.
  plan.write(mem);
  if (initrd && initrdRange) mem.write(initrdRange.start, initrd);
  const cmdlineAddr = writeCmdline(mem, cmdline);
  const e820 = buildE820Map(mem);
  const zeroPage = buildBootParams({
    rawHeader: plan.rawHeader,
    cmdlineAddr,
    ...(plan.code32Start !== undefined ? { code32Start: plan.code32Start } : {}),
    ...(initrdRange ? { initrd: { addr: initrdRange.start, size: initrdRange.end - initrdRange.start } } : {}),
    e820,
    ...(opts.acpiRsdpAddr !== undefined ? { acpiRsdpAddr: opts.acpiRsdpAddr } : {}),
  });
  mem.write(ZERO_PAGE_START, zeroPage);
  const cpu = setupLongMode(mem, plan.entry, ZERO_PAGE_START);

  const info: BootInfo = {
    kind: plan.kind,
    entry: plan.entry,
    bootParamsAddr: ZERO_PAGE_START,
    cmdlineAddr,
    cpu,
    kernelRange: plan.range,
    e820,
  };
  if (initrdRange) info.initrdRange = initrdRange;
  if (plan.compression) info.compression = plan.compression;
  if (plan.setupHeader) info.setupHeader = plan.setupHeader;
  return info;
}

/** A kernel being parsed and, where it boots that way, decompressed: see {@link prepareKernel}. */
export interface PreparedKernel {
  readonly plan: Promise<KernelPlan>;
}

/**
 * Starts the work {@link loadLinux} does on a kernel before it touches
 * guest memory: parsing it and decompressing a bzImage's payload on the
 * host (gzip on the libuv thread pool, xz on liblzma's thread), so the VM
 * can be built meanwhile. With `cache`, a payload decompressed before is
 * read from it instead (and one decompressed now is kept there). An error
 * waits for loadLinux to report it.
 */
export function prepareKernel(kernel: Uint8Array, mode: BootMode = 'auto', cache?: PayloadCache): PreparedKernel {
  const plan = planKernel(kernel, mode, cache);
  plan.catch(() => {}); // reported by loadLinux, which awaits it
  return { plan };
}

async function planKernel(kernel: Uint8Array, mode: BootMode, cache?: PayloadCache): Promise<KernelPlan> {
  if (isBzImage(kernel)) return planBzImage(parseBzImage(kernel), mode, cache);
  if (isElf(kernel)) {
    const elf = parseElfKernel(kernel, 'vmlinux');
    return {
      kind: 'elf',
      entry: elf.entry,
      range: { start: elf.start, end: elf.end },
      rawHeader: synthesizeSetupHeader(),
      cmdlineSize: DEFAULT_CMDLINE_SIZE,
      initrdAddrMax: DEFAULT_INITRD_ADDR_MAX,
      write: (mem) => loadElfSegments(mem, kernel, elf, 'vmlinux'),
    };
  }
  throw new BootError('not-a-kernel', 'kernel image is neither a bzImage (no "HdrS" boot header) nor an ELF vmlinux: pass arch/x86/boot/bzImage or vmlinux');
}

async function planBzImage(bz: BzImage, mode: BootMode, cache?: PayloadCache): Promise<KernelPlan> {
  const hdr = bz.header;
  const format = bz.payload ? detectCompression(bz.payload) : undefined;
  let host: boolean;
  if (mode === 'guest') host = false;
  else if (mode === 'host') host = true;
  else host = format !== undefined && (await hostDecompressionUnavailable(format)) === undefined;

  const common = {
    rawHeader: bz.rawHeader,
    cmdlineSize: hdr.cmdlineSize,
    initrdAddrMax: hdr.initrdAddrMax || LEGACY_INITRD_ADDR_MAX,
    setupHeader: hdr,
    ...(format ? { compression: format } : {}),
  };

  if (host) {
    if (!bz.payload) {
      throw new BootError(
        'unsupported-compression',
        `kernel (boot protocol ${hdr.versionString}) does not say where its compressed payload is (needs 2.08+): boot it with mode 'guest'`,
      );
    }
    let payload = await decompressKernelPayload(bz.payload, cache);
    const what = `decompressed bzImage payload (${payload.format})`;
    let elf: ElfKernel;
    try {
      try {
        elf = parseElfKernel(payload.data, what);
      } catch (err) {
        if (!payload.cached) throw err;
        // A damaged cache entry: decompress the payload itself, and replace the entry.
        payload = await decompressKernelPayload(bz.payload, cache && { get: async () => undefined, put: (key, data) => cache.put(key, data) });
        elf = parseElfKernel(payload.data, what);
      }
    } catch (err) {
      if (err instanceof BootError && err.kind === 'not-a-kernel') {
        throw new BootError('corrupt', `${what} is not an x86-64 ELF executable: the bzImage is damaged or not a Linux kernel`, { cause: err });
      }
      throw err;
    }
    return {
      ...common,
      kind: 'bzimage-host',
      entry: elf.entry,
      range: { start: elf.start, end: elf.end },
      write: (mem) => loadElfSegments(mem, payload.data, elf, what),
    };
  }

  if (!hdr.kernel64) {
    throw new BootError(
      'not-64-bit',
      `kernel does not have the 64-bit entry point (xloadflags XLF_KERNEL_64 clear, boot protocol ${hdr.versionString}): use an x86-64 kernel, Linux 3.8 or newer`,
    );
  }
  const load = HIMEM_START;
  const image = bz.protectedMode;
  // Where the kernel runs while it decompresses itself, and how much room it
  // needs there: boot.rst (init_size) and compressed/head_64.S, which moves
  // a relocatable kernel up to LOAD_PHYSICAL_ADDR (= pref_address) at least.
  const alignment = hdr.kernelAlignment > 0 ? hdr.kernelAlignment : 1;
  const runtimeStart = hdr.relocatable ? Math.max(alignUp(load, alignment), hdr.prefAddress) : hdr.prefAddress || load;
  const end = Math.max(load + image.length, runtimeStart + hdr.initSize);
  return {
    ...common,
    kind: 'bzimage-guest',
    entry: load + ENTRY_64_OFFSET,
    range: { start: load, end },
    code32Start: load,
    write: (mem) => mem.write(load, image),
  };
}

/** End of the RAM region at guest address 0 (below the MMIO gap). */
function lowRamEnd(mem: GuestMemory): number {
  const low = mem.memoryRegions.find((r) => r.guestAddr === 0);
  return low ? low.bytes.length : 0;
}

function memoryTooSmall(needed: number, got: number, what: string): BootError {
  const step = 16 * 2 ** 20;
  const suggest = Math.ceil(needed / step) * step;
  return new BootError('memory-too-small', `${what} at least ${mib(needed)} MiB of guest RAM (got ${mib(got)} MiB): give the VM ${mib(suggest)} MiB or more`);
}

function alignUp(value: number, align: number): number {
  return Math.ceil(value / align) * align;
}

function alignDown(value: number, align: number): number {
  return Math.floor(value / align) * align;
}
