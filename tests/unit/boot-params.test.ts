import { describe, expect, it } from 'vitest';
import { HDR, isBzImage, parseBzImage } from '../../src/arch/boot/bzimage.js';
import { BootError } from '../../src/arch/boot/errors.js';
import {
  BP,
  E820_RAM,
  E820_RESERVED,
  buildBootParams,
  buildE820Map,
  encodeCmdline,
  readE820Map,
  synthesizeSetupHeader,
  writeCmdline,
} from '../../src/arch/boot/params.js';
import { buildBzImage } from '../../src/testing/index.js';
import { CMDLINE_MAX_SIZE, CMDLINE_START } from '../../src/arch/layout.js';
import { GuestMemory } from '../../src/base/memory.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

describe('buildE820Map', () => {
  it('describes low RAM around the legacy hole', () => {
    const mem = GuestMemory.fromBuffer(new Uint8Array(64 * MiB));
    expect(buildE820Map(mem)).toEqual([
      { addr: 0, size: 0x9fc00, type: E820_RAM },
      { addr: 0x9fc00, size: 0x100000 - 0x9fc00, type: E820_RESERVED },
      { addr: 0x100000, size: 63 * MiB, type: E820_RAM },
    ]);
  });

  it('adds RAM above 4 GiB as its own entry', () => {
    // Real layouts have 3 GiB below the gap; a small low region is enough here.
    const mem = new GuestMemory([
      { guestAddr: 0, bytes: new Uint8Array(16 * MiB) },
      { guestAddr: 4 * GiB, bytes: new Uint8Array(2 * MiB) },
    ]);
    expect(buildE820Map(mem)).toEqual([
      { addr: 0, size: 0x9fc00, type: E820_RAM },
      { addr: 0x9fc00, size: 0x60400, type: E820_RESERVED },
      { addr: 0x100000, size: 15 * MiB, type: E820_RAM },
      { addr: 4 * GiB, size: 2 * MiB, type: E820_RAM },
    ]);
  });
});

describe('command line', () => {
  it('is NUL-terminated UTF-8', () => {
    expect(Array.from(encodeCmdline('a=é', 2047))).toEqual([0x61, 0x3d, 0xc3, 0xa9, 0]);
  });

  it('accepts exactly cmdline_size bytes and refuses one more', () => {
    expect(encodeCmdline('x'.repeat(100), 100).length).toBe(101);
    try {
      encodeCmdline('x'.repeat(101), 100);
      throw new Error('accepted');
    } catch (err) {
      expect(err).toBeInstanceOf(BootError);
      expect((err as BootError).kind).toBe('cmdline-too-long');
      expect((err as BootError).message).toBe('kernel command line is 101 bytes but the kernel accepts at most 100: shorten it');
    }
  });

  it('is also limited by the area reserved for it', () => {
    expect(() => encodeCmdline('x'.repeat(CMDLINE_MAX_SIZE), 1 << 20)).toThrow(/at most 4095/);
  });

  it('refuses an embedded NUL', () => {
    expect(() => encodeCmdline('a\0b', 2047)).toThrow(expect.objectContaining({ kind: 'invalid-cmdline' }));
  });

  it('is written at CMDLINE_START with the rest of its area cleared', () => {
    const mem = GuestMemory.fromBuffer(new Uint8Array(1 * MiB));
    mem.fill(CMDLINE_START, CMDLINE_MAX_SIZE, 0x41);
    expect(writeCmdline(mem, encodeCmdline('console=ttyS0', 2047))).toBe(CMDLINE_START);
    const area = mem.slice(CMDLINE_START, CMDLINE_MAX_SIZE);
    expect(Buffer.from(area.subarray(0, 13)).toString()).toBe('console=ttyS0');
    expect(area.subarray(13).every((b) => b === 0)).toBe(true);
  });
});

describe('buildBootParams', () => {
  const bz = parseBzImage(buildBzImage({ initrdAddrMax: 0x37ff_ffff, cmdlineSize: 1000 }));
  const e820 = [
    { addr: 0, size: 0x9fc00, type: 1 },
    { addr: 0x100000, size: 0x1f00000, type: 1 },
  ];

  it('copies the kernel setup header at 0x1f1 into a zeroed page', () => {
    const zp = buildBootParams({ rawHeader: bz.rawHeader, cmdlineAddr: 0x20000, e820 });
    expect(zp.length).toBe(4096);
    const dv = new DataView(zp.buffer);
    expect(dv.getUint16(HDR.BOOT_FLAG, true)).toBe(0xaa55);
    expect(dv.getUint32(HDR.HEADER, true)).toBe(0x53726448);
    expect(dv.getUint16(HDR.VERSION, true)).toBe(0x020f);
    expect(dv.getUint32(HDR.INITRD_ADDR_MAX, true)).toBe(0x37ff_ffff);
    expect(dv.getUint32(HDR.CMDLINE_SIZE, true)).toBe(1000);
    // Everything before the header is zero: the sentinel in particular.
    expect(zp.subarray(0, 0x1e8).every((b) => b === 0)).toBe(true);
    expect(zp[BP.SENTINEL]).toBe(0);
  });

  it('fills in the loader fields', () => {
    const zp = buildBootParams({
      rawHeader: bz.rawHeader,
      cmdlineAddr: 0x20000,
      code32Start: 0x100000,
      initrd: { addr: 0x7f00000, size: 0x123456 },
      e820,
    });
    const dv = new DataView(zp.buffer);
    expect(dv.getUint8(HDR.TYPE_OF_LOADER)).toBe(0xff);
    expect(dv.getUint8(HDR.LOADFLAGS)).toBe(0x81); // LOADED_HIGH | CAN_USE_HEAP
    expect(dv.getUint16(HDR.HEAP_END_PTR, true)).toBe(0xfe00);
    expect(dv.getUint32(HDR.CODE32_START, true)).toBe(0x100000);
    expect(dv.getUint32(HDR.CMD_LINE_PTR, true)).toBe(0x20000);
    expect(dv.getUint32(BP.EXT_CMD_LINE_PTR, true)).toBe(0);
    expect(dv.getUint32(HDR.RAMDISK_IMAGE, true)).toBe(0x7f00000);
    expect(dv.getUint32(HDR.RAMDISK_SIZE, true)).toBe(0x123456);
    expect(dv.getUint32(BP.EXT_RAMDISK_IMAGE, true)).toBe(0);
    expect(dv.getUint32(BP.EXT_RAMDISK_SIZE, true)).toBe(0);
  });

  it('splits 64-bit addresses into the field and its ext_ field', () => {
    const zp = buildBootParams({
      rawHeader: bz.rawHeader,
      cmdlineAddr: 0x1_2000_0000,
      initrd: { addr: 0x2_0000_1000, size: 0x1000 },
      e820,
    });
    const dv = new DataView(zp.buffer);
    expect(dv.getUint32(HDR.CMD_LINE_PTR, true)).toBe(0x2000_0000);
    expect(dv.getUint32(BP.EXT_CMD_LINE_PTR, true)).toBe(1);
    expect(dv.getUint32(HDR.RAMDISK_IMAGE, true)).toBe(0x1000);
    expect(dv.getUint32(BP.EXT_RAMDISK_IMAGE, true)).toBe(2);
  });

  it('writes the e820 table at 0x2d0 with its count at 0x1e8', () => {
    const zp = buildBootParams({ rawHeader: bz.rawHeader, cmdlineAddr: 0x20000, e820 });
    expect(zp[0x1e8]).toBe(2);
    const dv = new DataView(zp.buffer);
    expect(dv.getBigUint64(0x2d0 + 20, true)).toBe(0x100000n);
    expect(dv.getBigUint64(0x2d0 + 28, true)).toBe(0x1f00000n);
    expect(dv.getUint32(0x2d0 + 36, true)).toBe(1);
    expect(readE820Map(zp)).toEqual(e820);
  });

  it('refuses more than 128 e820 entries', () => {
    const many = Array.from({ length: 129 }, (_, i) => ({ addr: i * 0x1000, size: 0x1000, type: 1 }));
    expect(() => buildBootParams({ rawHeader: bz.rawHeader, cmdlineAddr: 0, e820: many })).toThrow(/128/);
  });
});

describe('synthesizeSetupHeader', () => {
  it('looks like a protocol 2.15 header from a 64-bit kernel', () => {
    const raw = synthesizeSetupHeader();
    const page = new Uint8Array(0x1000);
    page.set(raw, 0x1f1);
    expect(isBzImage(page)).toBe(true);
    const dv = new DataView(page.buffer);
    expect(dv.getUint16(HDR.VERSION, true)).toBe(0x020f);
    expect(0x202 + page[0x201]!).toBe(0x1f1 + raw.length);
    expect(dv.getUint32(HDR.KERNEL_ALIGNMENT, true)).toBe(0x100_0000);
    expect(dv.getUint32(HDR.CMDLINE_SIZE, true)).toBe(2047);
    expect(dv.getUint32(HDR.INITRD_ADDR_MAX, true)).toBe(0x7fff_ffff);
    expect(dv.getUint16(HDR.XLOADFLAGS, true) & 1).toBe(1);
  });
});
