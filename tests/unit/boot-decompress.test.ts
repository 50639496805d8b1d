import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { BootError } from '../../src/arch/boot/errors.js';
import { decompress, decompressKernelPayload, detectCompression, hostDecompressionUnavailable } from '../../src/arch/boot/decompress.js';

/**
 * Real x86-64 machine code (the node binary), so the xz x86 BCJ filter has
 * call/jmp targets to transform, plus some text.
 */
const sample: Uint8Array = (() => {
  const code = readFileSync(process.execPath).subarray(0x10000, 0x10000 + 768 * 1024);
  const text = Buffer.from('tsvmm boot loader test data. '.repeat(4096));
  return new Uint8Array(Buffer.concat([code, text]));
})();

function run(cmd: string, args: string[], input: Uint8Array): Uint8Array {
  return new Uint8Array(execFileSync(cmd, args, { input, maxBuffer: 64 * 1024 * 1024 }));
}

/** The kernel build's size_append: the uncompressed size as u32 LE. */
function withSize(compressed: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(compressed.length + 4);
  out.set(compressed);
  new DataView(out.buffer).setUint32(compressed.length, size, true);
  return out;
}

/** Runs a compressor once; each call returns a fresh copy (tests may damage it). */
function cached(make: () => Uint8Array): () => Uint8Array {
  let bytes: Uint8Array | undefined;
  return () => (bytes ??= make()).slice();
}

/** Compressed the way scripts/Makefile.lib does for vmlinux.bin. */
const kernelGzip = cached(() => run('gzip', ['-n', '-f', '-9'], sample));
const kernelXz = cached(() => withSize(run('xz', ['--check=crc32', '--x86', '--lzma2=dict=32MiB', '-c'], sample), sample.length));
const kernelZstd = cached(() => withSize(run('zstd', ['-19', '-q', '-c'], sample), sample.length));

async function bootError(p: Promise<unknown>): Promise<BootError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(BootError);
    return err as BootError;
  }
  throw new Error('expected a BootError');
}

describe('detectCompression', () => {
  it('recognises what the real compressors write', () => {
    expect(detectCompression(kernelGzip())).toBe('gzip');
    expect(detectCompression(kernelXz())).toBe('xz');
    expect(detectCompression(kernelZstd())).toBe('zstd');
  });

  it('recognises the formats only the in-guest decompressor handles', () => {
    expect(detectCompression(Uint8Array.from([0x42, 0x5a, 0x68, 0x39, 0x31]))).toBe('bzip2');
    expect(detectCompression(Uint8Array.from([0x5d, 0x00, 0x00, 0x80, 0x00]))).toBe('lzma');
    expect(detectCompression(Uint8Array.from([0x02, 0x21, 0x4c, 0x18, 0x00]))).toBe('lz4');
    expect(detectCompression(Uint8Array.from([0x89, 0x4c, 0x5a, 0x4f, 0x00]))).toBe('lzo');
  });

  it('returns undefined for anything else', () => {
    expect(detectCompression(Uint8Array.from([0x7f, 0x45, 0x4c, 0x46]))).toBeUndefined();
    expect(detectCompression(new Uint8Array(0))).toBeUndefined();
    expect(detectCompression(Uint8Array.from([0x1f]))).toBeUndefined();
  });
});

describe('decompressKernelPayload', () => {
  it('decompresses gzip (gzip -n -9)', async () => {
    const out = await decompressKernelPayload(kernelGzip());
    expect(out.format).toBe('gzip');
    expect(Buffer.compare(out.data, sample)).toBe(0);
  });

  it('decompresses xz with the x86 BCJ filter, as the kernel build writes it', async () => {
    const payload = kernelXz();
    // Block header after the 12-byte stream header: flags say two filters,
    // the first being 0x04 (x86 BCJ), so the test really covers BCJ.
    expect(payload[13]! & 3).toBe(1);
    expect(payload[14]).toBe(0x04);
    const out = await decompressKernelPayload(payload);
    expect(out.format).toBe('xz');
    expect(Buffer.compare(out.data, sample)).toBe(0);
  });

  it('decompresses zstd', async () => {
    const out = await decompressKernelPayload(kernelZstd());
    expect(out.format).toBe('zstd');
    expect(Buffer.compare(out.data, sample)).toBe(0);
  });

  it('decompresses zstd at the kernel build level (-22 --ultra)', async () => {
    const small = sample.subarray(0, 64 * 1024);
    const payload = withSize(run('zstd', ['-22', '--ultra', '-q', '-c'], small), small.length);
    const out = await decompressKernelPayload(payload);
    expect(Buffer.compare(out.data, small)).toBe(0);
  });

  it('reports truncated xz as corrupt, even though liblzma returns partial output', async () => {
    const payload = kernelXz();
    const cut = payload.subarray(0, payload.length >> 1);
    // Put a plausible size suffix on the cut stream.
    const err = await bootError(decompressKernelPayload(withSize(cut.subarray(0, cut.length - 4), sample.length)));
    expect(err.kind).toBe('corrupt');
  });

  it('reports damaged data as corrupt', async () => {
    const payload = kernelXz();
    const at = payload.length >> 1;
    payload[at] = payload[at]! ^ 0xff;
    const err = await bootError(decompressKernelPayload(payload));
    expect(err.kind).toBe('corrupt');
    expect(err.message).toMatch(/xz/);
  });

  it('reports damaged zstd data as corrupt: the frame checksum is verified', async () => {
    const payload = kernelZstd();
    const at = payload.length >> 1;
    payload[at] = payload[at]! ^ 0x01;
    const err = await bootError(decompressKernelPayload(payload));
    expect(err.kind).toBe('corrupt');
    expect(err.message).toMatch(/zstd/);
  });

  it('reports truncated zstd and gzip as corrupt', async () => {
    const zst = kernelZstd();
    const cutZst = withSize(zst.subarray(0, zst.length >> 1), sample.length);
    expect((await bootError(decompressKernelPayload(cutZst))).kind).toBe('corrupt');
    const gz = kernelGzip();
    expect((await bootError(decompressKernelPayload(gz.subarray(0, gz.length >> 1)))).kind).toBe('corrupt');
  });

  it('checks the output against the size the kernel build appended', async () => {
    const payload = kernelZstd();
    new DataView(payload.buffer).setUint32(payload.length - 4, sample.length + 1, true);
    const err = await bootError(decompressKernelPayload(payload));
    expect(err.kind).toBe('corrupt');
    expect(err.message).toContain(`${sample.length} bytes but the image says ${sample.length + 1}`);
  });

  it('refuses formats it has no decoder for, pointing to the in-guest path', async () => {
    for (const [format, magic] of [
      ['lz4', [0x02, 0x21, 0x4c, 0x18]],
      ['lzma', [0x5d, 0x00, 0x00, 0x80]],
      ['bzip2', [0x42, 0x5a, 0x68, 0x39]],
      ['lzo', [0x89, 0x4c, 0x5a, 0x4f]],
    ] as const) {
      const err = await bootError(decompressKernelPayload(Uint8Array.from([...magic, 0, 0, 0, 0, 1, 0, 0, 0])));
      expect(err.kind).toBe('unsupported-compression');
      expect(err.message).toContain(format);
      expect(err.message).toContain("mode 'guest'");
    }
  });

  it('refuses an unknown format', async () => {
    const err = await bootError(decompressKernelPayload(Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8])));
    expect(err.kind).toBe('unsupported-compression');
    expect(err.message).toContain('01 02 03 04');
  });
});

describe('host decoders', () => {
  it('has gzip, xz and zstd available on this host', async () => {
    expect(await hostDecompressionUnavailable('gzip')).toBeUndefined();
    expect(await hostDecompressionUnavailable('xz')).toBeUndefined();
    expect(await hostDecompressionUnavailable('zstd')).toBeUndefined();
    expect(await hostDecompressionUnavailable('lz4')).toMatch(/no lz4 decoder/);
  });

  it('decompresses a plain stream without the size suffix', async () => {
    const out = await decompress(run('xz', ['--x86', '--lzma2', '-c'], sample), 'xz', sample.length);
    expect(Buffer.compare(out, sample)).toBe(0);
  });
});
