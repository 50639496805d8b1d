import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { HDR, XLF } from '../../src/arch/boot/bzimage.js';
import { parseElfKernel } from '../../src/arch/boot/elf.js';
import { BootError, type BootErrorKind } from '../../src/arch/boot/errors.js';
import { loadLinux, type BootInfo, type LoadLinuxOptions } from '../../src/arch/boot/loader.js';
import { BP, readE820Map } from '../../src/arch/boot/params.js';
import { buildBzImage, buildElfKernel, type SyntheticBzImageOptions } from '../../src/testing/index.js';
import { CMDLINE_START, PML4_START, ZERO_PAGE_START } from '../../src/arch/layout.js';
import { GuestMemory } from '../../src/base/memory.js';

const MiB = 1024 * 1024;

function memory(size = 64 * MiB): { mem: GuestMemory; bytes: Uint8Array } {
  const bytes = new Uint8Array(size);
  return { mem: GuestMemory.fromBuffer(bytes), bytes };
}

async function bootError(mem: GuestMemory, opts: LoadLinuxOptions): Promise<BootError> {
  try {
    await loadLinux(mem, opts);
  } catch (err) {
    expect(err).toBeInstanceOf(BootError);
    return err as BootError;
  }
  throw new Error('loadLinux succeeded');
}

function allZero(bytes: Uint8Array): boolean {
  return Buffer.compare(bytes, new Uint8Array(bytes.length)) === 0;
}

function zeroPage(mem: GuestMemory): DataView {
  const zp = mem.slice(ZERO_PAGE_START, 4096);
  return new DataView(zp.buffer, zp.byteOffset, 4096);
}

function cmdlineAt(mem: GuestMemory, addr: number): string {
  const area = mem.slice(addr, 4096);
  return Buffer.from(area.subarray(0, area.indexOf(0))).toString();
}

// A small vmlinux: text at 16 MiB (where LOAD_PHYSICAL_ADDR puts it), data + .bss.
const text = new Uint8Array(0x3000).map((_, i) => (i * 13) & 0xff);
const data = new Uint8Array(0x800).fill(0x5a);
const vmlinux = buildElfKernel({
  entry: 0x100_0000,
  segments: [
    { paddr: 0x100_0000, data: text },
    { paddr: 0x120_0000, data, memsz: 0x4000 },
  ],
});
/** vmlinux.bin as the bzImage build compresses it: the ELF plus relocations. */
const vmlinuxBin = new Uint8Array(Buffer.concat([vmlinux, Buffer.alloc(0x400, 0xee)]));

function withSize(compressed: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(compressed.length + 4);
  out.set(compressed);
  new DataView(out.buffer).setUint32(compressed.length, size, true);
  return out;
}

function compress(format: 'gzip' | 'xz' | 'zstd', input: Uint8Array = vmlinuxBin): Uint8Array {
  const run = (cmd: string, args: string[]) => new Uint8Array(execFileSync(cmd, args, { input }));
  switch (format) {
    case 'gzip':
      return run('gzip', ['-n', '-9']);
    case 'xz':
      return withSize(run('xz', ['--check=crc32', '--x86', '--lzma2=dict=32MiB', '-c']), input.length);
    case 'zstd':
      return withSize(run('zstd', ['-19', '-q', '-c']), input.length);
  }
}

const lz4Payload = Uint8Array.from([0x02, 0x21, 0x4c, 0x18, 1, 2, 3, 4, 5, 6, 7, 8]);

function bzImage(opts: SyntheticBzImageOptions = {}): Uint8Array {
  return buildBzImage({ initSize: 0x80_0000, prefAddress: 0x100_0000, ...opts });
}

describe('loadLinux: bzImage booted in the guest', () => {
  it('loads the protected-mode kernel at 1 MiB and enters it at +0x200 in 64-bit mode', async () => {
    const { mem } = memory();
    const image = bzImage({ payload: lz4Payload, codeSize: 0x600 });
    const info = await loadLinux(mem, { kernel: image, cmdline: 'console=ttyS0 panic=-1', mode: 'guest' });
    expect(info.kind).toBe('bzimage-guest');
    expect(info.entry).toBe(0x10_0200);
    expect(info.cpu.regs.rip).toBe(0x10_0200);
    expect(info.cpu.regs.rsi).toBe(ZERO_PAGE_START);
    expect(info.bootParamsAddr).toBe(ZERO_PAGE_START);
    expect(info.compression).toBe('lz4');
    expect(info.setupHeader?.versionString).toBe('2.15');
    const setupSize = 5 * 512;
    expect(Buffer.compare(mem.slice(0x10_0000, image.length - setupSize), image.subarray(setupSize))).toBe(0);
    // The page tables the CPU state points at are in place.
    expect(info.cpu.sregs.cr3).toBe(PML4_START);
    expect(mem.readU64(PML4_START)).not.toBe(0n);
  });

  it('reserves the init_size footprint from where the kernel will run', async () => {
    const { mem } = memory();
    // Relocatable: runs at max(align_up(1 MiB, 2 MiB), pref_address) = 16 MiB.
    const reloc = await loadLinux(mem, { kernel: bzImage({ initSize: 0x123_0000 }), cmdline: '', mode: 'guest' });
    expect(reloc.kernelRange).toEqual({ start: 0x10_0000, end: 0x100_0000 + 0x123_0000 });
    // Not relocatable: runs at pref_address.
    const fixed = await loadLinux(memory().mem, {
      kernel: bzImage({ relocatable: false, prefAddress: 0x200_0000, initSize: 0x10_0000 }),
      cmdline: '',
      mode: 'guest',
    });
    expect(fixed.kernelRange).toEqual({ start: 0x10_0000, end: 0x210_0000 });
  });

  it('fills the zero page: header, loader fields, command line, e820', async () => {
    const { mem } = memory();
    const info = await loadLinux(mem, { kernel: bzImage(), cmdline: 'console=ttyS0', mode: 'guest' });
    const zp = zeroPage(mem);
    expect(zp.getUint16(HDR.BOOT_FLAG, true)).toBe(0xaa55);
    expect(zp.getUint32(HDR.HEADER, true)).toBe(0x53726448);
    expect(zp.getUint8(HDR.TYPE_OF_LOADER)).toBe(0xff);
    expect(zp.getUint8(HDR.LOADFLAGS) & 0x81).toBe(0x81);
    expect(zp.getUint32(HDR.CODE32_START, true)).toBe(0x10_0000);
    expect(zp.getUint32(HDR.CMD_LINE_PTR, true)).toBe(CMDLINE_START);
    expect(info.cmdlineAddr).toBe(CMDLINE_START);
    expect(cmdlineAt(mem, CMDLINE_START)).toBe('console=ttyS0');
    expect(zp.getUint32(HDR.RAMDISK_IMAGE, true)).toBe(0);
    expect(readE820Map(mem.slice(ZERO_PAGE_START, 4096))).toEqual(info.e820);
    expect(info.e820.at(-1)).toEqual({ addr: 0x10_0000, size: 63 * MiB, type: 1 });
  });
});

describe('loadLinux: bzImage decompressed on the host', () => {
  it.each(['gzip', 'xz', 'zstd'] as const)('loads the ELF inside a %s payload at its physical addresses', async (format) => {
    const { mem } = memory();
    mem.fill(0x120_0800, 0x3800, 0xcc); // stale bytes where .bss goes
    const image = bzImage({ payload: compress(format) });
    const info = await loadLinux(mem, { kernel: image, cmdline: 'quiet', mode: 'host' });
    expect(info.kind).toBe('bzimage-host');
    expect(info.compression).toBe(format);
    expect(info.entry).toBe(0x100_0000);
    expect(info.cpu.regs.rip).toBe(0x100_0000);
    expect(info.kernelRange).toEqual({ start: 0x100_0000, end: 0x120_4000 });
    expect(Buffer.compare(mem.slice(0x100_0000, text.length), text)).toBe(0);
    expect(Buffer.compare(mem.slice(0x120_0000, data.length), data)).toBe(0);
    expect(allZero(mem.slice(0x120_0800, 0x3800))).toBe(true);
    // Nothing of the bzImage itself is loaded.
    expect(allZero(mem.slice(0x10_0000, 0x1000))).toBe(true);
    // The bzImage's own header goes to the kernel.
    const zp = zeroPage(mem);
    expect(zp.getUint32(HDR.INIT_SIZE, true)).toBe(0x80_0000);
    expect(zp.getUint16(HDR.XLOADFLAGS, true)).toBe(XLF.KERNEL_64 | XLF.CAN_BE_LOADED_ABOVE_4G);
  });

  it("'auto' decompresses on the host when it can", async () => {
    const info = await loadLinux(memory().mem, { kernel: bzImage({ payload: compress('gzip') }), cmdline: '' });
    expect(info.kind).toBe('bzimage-host');
  });

  it("'auto' leaves formats it cannot decode to the guest", async () => {
    const info = await loadLinux(memory().mem, { kernel: bzImage({ payload: lz4Payload }), cmdline: '' });
    expect(info.kind).toBe('bzimage-guest');
    expect(info.compression).toBe('lz4');
  });
});

describe('loadLinux: ELF vmlinux', () => {
  it('loads the segments and synthesizes a setup header', async () => {
    const { mem } = memory();
    const info = await loadLinux(mem, { kernel: vmlinux, cmdline: 'root=/dev/vda', mode: 'guest' });
    expect(info.kind).toBe('elf');
    expect(info.entry).toBe(0x100_0000);
    expect(info.setupHeader).toBeUndefined();
    expect(info.compression).toBeUndefined();
    expect(Buffer.compare(mem.slice(0x100_0000, text.length), text)).toBe(0);
    const zp = zeroPage(mem);
    expect(zp.getUint16(HDR.BOOT_FLAG, true)).toBe(0xaa55);
    expect(zp.getUint32(HDR.HEADER, true)).toBe(0x53726448);
    expect(zp.getUint16(HDR.VERSION, true)).toBe(0x020f);
    expect(zp.getUint8(HDR.TYPE_OF_LOADER)).toBe(0xff);
    expect(zp.getUint32(HDR.KERNEL_ALIGNMENT, true)).toBe(0x100_0000);
    expect(cmdlineAt(mem, zp.getUint32(HDR.CMD_LINE_PTR, true))).toBe('root=/dev/vda');
  });
});

describe('loadLinux: initrd placement', () => {
  const initrd = new Uint8Array(MiB + 123).fill(0x17);

  it('goes at the highest page-aligned address that fits in RAM', async () => {
    const { mem } = memory(64 * MiB);
    const info = await loadLinux(mem, { kernel: vmlinux, cmdline: '', initrd });
    const start = Math.floor((64 * MiB - initrd.length) / 4096) * 4096;
    expect(info.initrdRange).toEqual({ start, end: start + initrd.length });
    expect(Buffer.compare(mem.slice(start, initrd.length), initrd)).toBe(0);
    const zp = zeroPage(mem);
    expect(zp.getUint32(HDR.RAMDISK_IMAGE, true)).toBe(start);
    expect(zp.getUint32(HDR.RAMDISK_SIZE, true)).toBe(initrd.length);
    expect(zp.getUint32(BP.EXT_RAMDISK_IMAGE, true)).toBe(0);
  });

  it('stays below initrd_addr_max when that is lower than the end of RAM', async () => {
    const info = await loadLinux(memory(64 * MiB).mem, {
      kernel: bzImage({ initrdAddrMax: 0x1ff_ffff }),
      cmdline: '',
      initrd,
      mode: 'guest',
    });
    expect(info.initrdRange!.end).toBeLessThanOrEqual(0x200_0000);
    expect(info.initrdRange!.start).toBe(Math.floor((0x200_0000 - initrd.length) / 4096) * 4096);
  });

  it('stays above the whole kernel footprint', async () => {
    // 16 MiB + 8 MiB init_size = 24 MiB footprint; RAM ends at 26 MiB.
    const info = await loadLinux(memory(26 * MiB).mem, { kernel: bzImage(), cmdline: '', initrd, mode: 'guest' });
    expect(info.initrdRange!.start).toBeGreaterThanOrEqual(info.kernelRange.end);
  });

  it('treats an empty initrd as none', async () => {
    const info = await loadLinux(memory().mem, { kernel: vmlinux, cmdline: '', initrd: new Uint8Array(0) });
    expect(info.initrdRange).toBeUndefined();
  });
});

describe('loadLinux errors', () => {
  async function expectKind(kind: BootErrorKind, opts: LoadLinuxOptions, size = 64 * MiB, message?: RegExp): Promise<void> {
    const { mem, bytes } = memory(size);
    const err = await bootError(mem, opts);
    expect(err.kind).toBe(kind);
    if (message) expect(err.message).toMatch(message);
    expect(err.message).not.toContain('\n');
    // Nothing was written to guest memory.
    expect(allZero(bytes)).toBe(true);
  }

  it('not-a-kernel', async () => {
    await expectKind('not-a-kernel', { kernel: new Uint8Array(8192).fill(7), cmdline: '' }, 64 * MiB, /neither a bzImage/);
  });

  it('protocol-too-old', async () => {
    await expectKind('protocol-too-old', { kernel: bzImage({ version: 0x0205 }), cmdline: '' }, 64 * MiB, /2\.05/);
  });

  it('not-64-bit: a bzImage without the 64-bit entry point', async () => {
    await expectKind('not-64-bit', { kernel: bzImage({ xloadflags: 0 }), cmdline: '', mode: 'guest' }, 64 * MiB, /XLF_KERNEL_64/);
  });

  it('not-64-bit: a 32-bit ELF', async () => {
    const elf32 = vmlinux.slice();
    elf32[4] = 1;
    await expectKind('not-64-bit', { kernel: elf32, cmdline: '' });
  });

  it('memory-too-small: the kernel footprint, with a fix that works', async () => {
    const kernel = bzImage({ initSize: 36 * MiB });
    await expectKind(
      'memory-too-small',
      { kernel, cmdline: '', mode: 'guest' },
      16 * MiB,
      /^kernel needs at least 52 MiB of guest RAM \(got 16 MiB\): give the VM 64 MiB or more$/,
    );
    // The suggested size works.
    await loadLinux(memory(64 * MiB).mem, { kernel, cmdline: '', mode: 'guest' });
  });

  it('memory-too-small: kernel plus initrd', async () => {
    await expectKind(
      'memory-too-small',
      { kernel: vmlinux, cmdline: '', initrd: new Uint8Array(20 * MiB) },
      32 * MiB,
      /^kernel and initrd need at least 39 MiB of guest RAM \(got 32 MiB\): give the VM 48 MiB or more$/,
    );
  });

  it('unsupported-compression: host decompression of a format there is no decoder for', async () => {
    await expectKind('unsupported-compression', { kernel: bzImage({ payload: lz4Payload }), cmdline: '', mode: 'host' }, 64 * MiB, /lz4.*mode 'guest'/);
  });

  it('corrupt: a payload that is not an ELF', async () => {
    const payload = compress('gzip', new Uint8Array(4096).fill(1));
    await expectKind('corrupt', { kernel: bzImage({ payload }), cmdline: '', mode: 'host' }, 64 * MiB, /not an x86-64 ELF/);
  });

  it('corrupt: a payload that does not decompress', async () => {
    const payload = compress('xz');
    payload.fill(0x33, 40, 80);
    await expectKind('corrupt', { kernel: bzImage({ payload }), cmdline: '', mode: 'host' });
  });

  it('cmdline-too-long', async () => {
    await expectKind(
      'cmdline-too-long',
      { kernel: bzImage({ cmdlineSize: 255 }), cmdline: 'x'.repeat(256), mode: 'guest' },
      64 * MiB,
      /256 bytes but the kernel accepts at most 255/,
    );
  });

  it('invalid-cmdline', async () => {
    await expectKind('invalid-cmdline', { kernel: vmlinux, cmdline: 'a\0b' });
  });

  it('initrd-too-large: more memory would not help', async () => {
    await expectKind(
      'initrd-too-large',
      { kernel: bzImage({ initrdAddrMax: 0x1ff_ffff }), cmdline: '', initrd: new Uint8Array(9 * MiB), mode: 'guest' },
      64 * MiB,
      /initrd_addr_max 0x1ffffff/,
    );
  });

  it('memory-too-small: guest RAM that does not even cover the boot structures', async () => {
    await expectKind('memory-too-small', { kernel: vmlinux, cmdline: '' }, 512 * 1024);
  });
});

/** The kernels a colleague's fixture script builds (fixtures/build-all.sh). */
const manifestPath = join(process.env.TSVMM_CACHE ?? join(homedir(), '.cache', 'tsvmm'), 'fixtures', 'manifest.json');
const manifest = existsSync(manifestPath) ? (JSON.parse(readFileSync(manifestPath, 'utf8')) as Record<string, string>) : undefined;

describe.skipIf(!manifest)(`loadLinux (fixture kernels; skipped when ${manifestPath} is missing: run npm run fixtures)`, () => {
  const file = (key: string) => {
    const path = manifest![key];
    expect(path, `manifest has no ${key}`).toBeTruthy();
    return new Uint8Array(readFileSync(path!));
  };

  /** The segment contents of the unstripped vmlinux: what host decompression must reproduce. */
  function expectVmlinuxLoaded(mem: GuestMemory, info: BootInfo): void {
    const bytes = file('vmlinux');
    const elf = parseElfKernel(bytes);
    expect(info.entry).toBe(elf.entry);
    expect(info.kernelRange).toEqual({ start: elf.start, end: elf.end });
    for (const seg of elf.segments) {
      const loaded = mem.slice(seg.paddr, seg.filesz);
      expect(Buffer.compare(loaded, bytes.subarray(seg.offset, seg.offset + seg.filesz)), `segment at ${seg.paddr.toString(16)}`).toBe(0);
    }
  }

  it.each([
    ['bzImage', 'gzip'],
    ['bzImageXz', 'xz'],
    ['bzImageZstd', 'zstd'],
  ] as const)('decompresses %s (%s) on the host to the same vmlinux', async (key, format) => {
    const mem = GuestMemory.fromBuffer(new Uint8Array(128 * MiB));
    const info = await loadLinux(mem, { kernel: file(key), cmdline: 'console=ttyS0', mode: 'host' });
    expect(info.kind).toBe('bzimage-host');
    expect(info.compression).toBe(format);
    expectVmlinuxLoaded(mem, info);
  });

  it('loads the bzImage for in-guest decompression', async () => {
    const kernel = file('bzImage');
    const mem = GuestMemory.fromBuffer(new Uint8Array(128 * MiB));
    const info = await loadLinux(mem, { kernel, cmdline: 'console=ttyS0', initrd: new Uint8Array(4096), mode: 'guest' });
    expect(info.kind).toBe('bzimage-guest');
    expect(info.entry).toBe(0x10_0200);
    const hdr = info.setupHeader!;
    expect(info.kernelRange.end).toBeGreaterThanOrEqual(hdr.prefAddress + hdr.initSize);
    expect(info.initrdRange!.start).toBeGreaterThanOrEqual(info.kernelRange.end);
  });

  it('loads the bare vmlinux', async () => {
    const mem = GuestMemory.fromBuffer(new Uint8Array(128 * MiB));
    const info = await loadLinux(mem, { kernel: file('vmlinux'), cmdline: 'console=ttyS0' });
    expect(info.kind).toBe('elf');
    expectVmlinuxLoaded(mem, info);
  });

  it('says how much memory the real kernel needs', async () => {
    const err = await bootError(GuestMemory.fromBuffer(new Uint8Array(16 * MiB)), {
      kernel: file('bzImage'),
      cmdline: '',
      mode: 'guest',
    });
    expect(err.kind).toBe('memory-too-small');
    expect(err.message).toMatch(/^kernel needs at least \d+ MiB of guest RAM \(got 16 MiB\): give the VM \d+ MiB or more$/);
  });
});
