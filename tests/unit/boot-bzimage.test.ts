import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { HDR, SETUP_HEADER_START, XLF, isBzImage, parseBzImage, protocolVersionString } from '../../src/arch/boot/bzimage.js';
import { BootError, type BootErrorKind } from '../../src/arch/boot/errors.js';
import { buildBzImage } from '../../src/testing/index.js';

function expectBootError(fn: () => unknown, kind: BootErrorKind, message?: RegExp): void {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(BootError);
    expect((err as BootError).kind).toBe(kind);
    if (message) expect((err as BootError).message).toMatch(message);
    return;
  }
  throw new Error(`expected BootError ${kind}`);
}

describe('parseBzImage (synthetic image)', () => {
  const payload = Uint8Array.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 1, 2, 3, 4]);
  const image = buildBzImage({
    setupSects: 6,
    payload,
    codeSize: 0x300,
    initSize: 0x123_4000,
    prefAddress: 0x100_0000,
    kernelAlignment: 0x20_0000,
    cmdlineSize: 2047,
    initrdAddrMax: 0x7fff_ffff,
    kernelVersion: '6.1.0-test (tsvmm)',
  });

  it('recognises the boot sector and HdrS signatures', () => {
    expect(isBzImage(image)).toBe(true);
    expect(isBzImage(image.subarray(0, 0x200))).toBe(false);
    expect(isBzImage(new Uint8Array(4096))).toBe(false);
  });

  it('decodes every field the loader uses', () => {
    const { header } = parseBzImage(image);
    expect(header).toMatchObject({
      version: 0x020f,
      versionString: '2.15',
      setupSects: 6,
      setupSize: 7 * 512,
      loadedHigh: true,
      kernel64: true,
      xloadflags: XLF.KERNEL_64 | XLF.CAN_BE_LOADED_ABOVE_4G,
      code32Start: 0x10_0000,
      initrdAddrMax: 0x7fff_ffff,
      kernelAlignment: 0x20_0000,
      relocatable: true,
      minAlignment: 21,
      cmdlineSize: 2047,
      payloadOffset: 0x300,
      payloadLength: payload.length,
      prefAddress: 0x100_0000,
      initSize: 0x123_4000,
      kernelVersion: '6.1.0-test (tsvmm)',
    });
    expect(header.syssize).toBe(Math.ceil((0x300 + payload.length + 4) / 16));
  });

  it('returns the raw header up to the end it declares, and the payload', () => {
    const bz = parseBzImage(image);
    expect(bz.rawHeader.length).toBe(0x26c - SETUP_HEADER_START);
    expect(Buffer.compare(bz.rawHeader, image.subarray(0x1f1, 0x26c))).toBe(0);
    expect(bz.protectedMode.length).toBe(image.length - 7 * 512);
    expect(Array.from(bz.payload!)).toEqual(Array.from(payload));
  });

  it('treats setup_sects = 0 as 4', () => {
    const bz = parseBzImage(buildBzImage({ setupSects: 0 }));
    expect(bz.header.setupSects).toBe(4);
    expect(bz.header.setupSize).toBe(5 * 512);
  });

  it('reads fields past the declared header end as zero', () => {
    const old = buildBzImage({ version: 0x0206, initSize: 0x55_0000 });
    // A 2.06 header ends at 0x23c: jump offset 0x3a.
    old[HDR.JUMP + 1] = 0x23c - 0x202;
    const bz = parseBzImage(old);
    expect(bz.header.versionString).toBe('2.06');
    expect(bz.header.initSize).toBe(0);
    expect(bz.header.payloadLength).toBe(0);
    expect(bz.payload).toBeUndefined();
    expect(bz.rawHeader.length).toBe(0x23c - 0x1f1);
  });

  it('formats protocol versions as boot.rst does', () => {
    expect(protocolVersionString(0x020f)).toBe('2.15');
    expect(protocolVersionString(0x0206)).toBe('2.06');
  });
});

describe('parseBzImage errors', () => {
  it('not-a-kernel: no boot signature', () => {
    const image = buildBzImage();
    image[HDR.BOOT_FLAG] = 0;
    expectBootError(() => parseBzImage(image), 'not-a-kernel', /0xAA55/);
    expectBootError(() => parseBzImage(new Uint8Array(100)), 'not-a-kernel');
  });

  it('not-a-kernel: a zImage (not loaded high)', () => {
    expectBootError(() => parseBzImage(buildBzImage({ loadflags: 0 })), 'not-a-kernel', /zImage/);
  });

  it('protocol-too-old: names the version found and the one needed', () => {
    expectBootError(() => parseBzImage(buildBzImage({ version: 0x0204 })), 'protocol-too-old', /protocol 2\.04; tsvmm needs 2\.06/);
  });

  it('corrupt: file shorter than its setup code', () => {
    const image = buildBzImage({ setupSects: 30 }).subarray(0, 0x1000);
    expectBootError(() => parseBzImage(image), 'corrupt', /setup code alone needs 15872 bytes/);
  });

  it('corrupt: protected-mode code shorter than syssize', () => {
    const image = buildBzImage({ codeSize: 0x1000 });
    expectBootError(() => parseBzImage(image.subarray(0, image.length - 0x100)), 'corrupt', /truncated/);
  });

  it('corrupt: payload past the end of the image', () => {
    const image = buildBzImage({ payload: new Uint8Array(64).fill(1) });
    new DataView(image.buffer).setUint32(HDR.PAYLOAD_LENGTH, 0x10000, true);
    expectBootError(() => parseBzImage(image), 'corrupt', /payload/);
  });
});

/** The kernel a colleague's fixture script builds (fixtures/build-all.sh). */
const manifestPath = join(process.env.TSVMM_CACHE ?? join(homedir(), '.cache', 'tsvmm'), 'fixtures', 'manifest.json');
const manifest = existsSync(manifestPath) ? (JSON.parse(readFileSync(manifestPath, 'utf8')) as Record<string, string>) : undefined;

describe.skipIf(!manifest)(`parseBzImage (fixture kernel; skipped when ${manifestPath} is missing: run npm run fixtures)`, () => {
  it.each([
    ['bzImage', 'gzip', [0x1f, 0x8b]],
    ['bzImageXz', 'xz', [0xfd, 0x37]],
    ['bzImageZstd', 'zstd', [0x28, 0xb5]],
  ] as const)('parses %s (%s payload)', (key, _format, magic) => {
    const path = manifest![key];
    expect(path, `manifest has no ${key}`).toBeTruthy();
    const bz = parseBzImage(readFileSync(path!));
    expect(bz.header.version).toBeGreaterThanOrEqual(0x020f);
    expect(bz.header.kernel64).toBe(true);
    expect(bz.header.cmdlineSize).toBe(2047);
    expect(bz.header.prefAddress).toBe(0x100_0000);
    expect(bz.header.initSize).toBeGreaterThan(0);
    expect(bz.header.kernelVersion).toMatch(/^6\.1\./);
    expect(Array.from(bz.payload!.subarray(0, 2))).toEqual(magic);
  });
});
