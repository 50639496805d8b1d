/**
 * Host-side decompression of a bzImage payload (the compressed vmlinux).
 *
 * Booting with the payload decompressed here skips the kernel's own
 * decompressor, which on an emulated CPU takes minutes (see PLATFORM.md).
 * The kernel's build compresses `vmlinux.bin` (+ relocations) and appends
 * the uncompressed size as 4 little-endian bytes (scripts/Makefile.lib
 * `size_append`); for gzip, the gzip trailer's ISIZE is in the same place.
 *
 * gzip is decoded with node:zlib, xz with liblzma (node-liblzma, whose
 * prebuilt addon includes the x86 BCJ filter the kernel's xz uses:
 * scripts/xz_wrap.sh runs `xz --check=crc32 --x86 --lzma2=...`), zstd with
 * the reference libzstd compiled to WebAssembly (zstddec), which verifies
 * the frame checksum and copes with the 128 MiB window of `zstd -22 --ultra`.
 */

import * as zlib from 'node:zlib';
import { ZSTDDecoder } from 'zstddec';
import { BootError } from './errors.js';

/** Every format the kernel's decompressor knows (lib/decompress.c). */
export type CompressionFormat = 'gzip' | 'bzip2' | 'lzma' | 'xz' | 'lzo' | 'lz4' | 'zstd';

/** Formats this module can decode on the host (if their decoder loads). */
export const HOST_FORMATS: readonly CompressionFormat[] = ['gzip', 'xz', 'zstd'];

/**
 * Magic numbers, longest first where prefixes could collide. The kernel
 * matches only two bytes; we check the full signature where one exists.
 */
const MAGICS: ReadonlyArray<{ format: CompressionFormat; magic: readonly number[] }> = [
  { format: 'xz', magic: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00] },
  { format: 'zstd', magic: [0x28, 0xb5, 0x2f, 0xfd] },
  { format: 'lzo', magic: [0x89, 0x4c, 0x5a, 0x4f] },
  // lz4 legacy frame (what `lz4 -l` writes): 0x184C2102 little-endian.
  { format: 'lz4', magic: [0x02, 0x21, 0x4c, 0x18] },
  // "BZh" followed by the block size digit.
  { format: 'bzip2', magic: [0x42, 0x5a, 0x68] },
  // Deflate only (method 8): zlib reads nothing else. The kernel's table
  // also lists the long-dead 1f 9e magic; such a payload is left to the guest.
  { format: 'gzip', magic: [0x1f, 0x8b, 0x08] },
  // lzma "alone" header: properties byte 0x5d (lc=3, lp=0, pb=2), then dictionary size.
  { format: 'lzma', magic: [0x5d, 0x00, 0x00] },
];

/** The payload's format by its magic number, or undefined when unknown. */
export function detectCompression(data: Uint8Array): CompressionFormat | undefined {
  for (const { format, magic } of MAGICS) {
    if (data.length >= magic.length && magic.every((b, i) => data[i] === b)) return format;
  }
  return undefined;
}

interface XzDecoder {
  unxz(buffer: Buffer, callback: (err: Error | null, result?: Buffer) => void): void;
}

/** zlib's gunzip on the libuv thread pool, so a VM can be built meanwhile. */
function gunzipAsync(data: Uint8Array, maxOutputLength: number): Promise<Buffer> {
  return new Promise((resolve, reject) =>
    // One output chunk of the whole size: the default 16 KiB chunks cost a
    // main-thread turn each.
    // Capped by a generous ratio too: the size a damaged image claims is not worth a 1 GiB allocation.
    zlib.gunzip(data, { maxOutputLength, chunkSize: Math.max(zlib.constants.Z_MIN_CHUNK, Math.min(maxOutputLength, 16 * data.length, 1 << 30)) }, (err, out) =>
      err ? reject(err) : resolve(out),
    ),
  );
}

let xzDecoder: Promise<XzDecoder | Error> | undefined;
let zstdDecoder: Promise<ZSTDDecoder | Error> | undefined;

/**
 * Loads liblzma on first use. A host where the native addon does not load
 * still boots xz kernels, through the in-guest decompressor.
 */
function loadXzDecoder(): Promise<XzDecoder | Error> {
  // node-liblzma is an optional dependency: named through a variable, so
  // that the TypeScript also builds where it is not installed.
  const optional: string = 'node-liblzma';
  xzDecoder ??= import(optional).then(
    (m: XzDecoder): XzDecoder | Error => m,
    (err: unknown): XzDecoder | Error => (err instanceof Error ? err : new Error(String(err))),
  );
  return xzDecoder;
}

/**
 * Why this host cannot decompress `format`, or undefined when it can.
 * Asynchronous because the xz decoder is a native addon loaded on demand.
 */
export async function hostDecompressionUnavailable(format: CompressionFormat): Promise<string | undefined> {
  if (!HOST_FORMATS.includes(format)) return `tsvmm has no ${format} decoder`;
  if (format === 'xz') {
    const decoder = await loadXzDecoder();
    if (decoder instanceof Error) return `the xz decoder (node-liblzma) did not load: ${decoder.message}`;
  }
  if (format === 'zstd') {
    const decoder = await loadZstdDecoder();
    if (decoder instanceof Error) return `the zstd decoder (zstddec) did not start: ${decoder.message}`;
  }
  return undefined;
}

/** Instantiates the zstd WebAssembly module on first use. */
function loadZstdDecoder(): Promise<ZSTDDecoder | Error> {
  zstdDecoder ??= (async () => {
    const decoder = new ZSTDDecoder();
    await decoder.init();
    return decoder;
  })().catch((err: unknown) => (err instanceof Error ? err : new Error(String(err))));
  return zstdDecoder;
}

/**
 * Decompresses one stream of `format` whose uncompressed size is
 * `expectedSize` (the kernel build records it; zstd's one-shot decoder
 * needs it). Throws {@link BootError} `unsupported-compression` for formats
 * this host cannot decode and `corrupt` when the data does not decode to
 * exactly `expectedSize` bytes (modulo 2^32, as the kernel stores it).
 */
export async function decompress(data: Uint8Array, format: CompressionFormat, expectedSize: number): Promise<Uint8Array> {
  const unavailable = await hostDecompressionUnavailable(format);
  if (unavailable !== undefined) {
    throw new BootError(
      'unsupported-compression',
      `kernel payload is ${format}-compressed and ${unavailable}: boot it with mode 'guest' (the kernel decompresses itself) or use a gzip, xz or zstd kernel`,
    );
  }
  let out: Uint8Array;
  try {
    out = await decode(data, format, expectedSize);
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new BootError('corrupt', `kernel payload (${format}) does not decompress: ${reason}`, {
      cause: err,
    });
  }
  if (out.length % 2 ** 32 !== expectedSize) {
    throw new BootError(
      'corrupt',
      `kernel payload (${format}) decompressed to ${out.length} bytes but the image says ${expectedSize}: the bzImage is truncated or damaged`,
    );
  }
  return out;
}

async function decode(data: Uint8Array, format: CompressionFormat, expectedSize: number): Promise<Uint8Array> {
  switch (format) {
    case 'gzip':
      // Capped, so a damaged or hostile stream cannot inflate without bound.
      return gunzipAsync(data, expectedSize + 1);
    case 'xz': {
      // On liblzma's own worker thread, like gzip on the thread pool.
      const decoder = (await loadXzDecoder()) as XzDecoder;
      const input = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
      return new Promise((resolve, reject) => decoder.unxz(input, (err, out) => (err || !out ? reject(err ?? new Error('no output')) : resolve(out))));
    }
    case 'zstd': {
      // One-shot ZSTD_decompress into a buffer of exactly the expected size:
      // on any error (bad data, checksum mismatch, too small) zstddec
      // returns an empty array, which the size check then reports.
      const decoder = (await loadZstdDecoder()) as ZSTDDecoder;
      return expectedSize === 0 ? new Uint8Array(0) : decoder.decode(data, expectedSize);
    }
    default:
      throw new Error(`no decoder for ${format}`);
  }
}

/** A decompressed kernel payload. */
export interface DecompressedPayload {
  format: CompressionFormat;
  /** The uncompressed `vmlinux.bin` (an ELF), possibly followed by relocations. */
  data: Uint8Array;
  /** Read from a {@link PayloadCache} rather than decompressed. */
  cached?: boolean;
}

/**
 * Where decompressed payloads are kept between boots, by `key`: the SHA-256
 * (hex) of the compressed payload. `get` answers undefined for a miss or an
 * entry that is not `size` bytes (modulo 2^32); neither call throws.
 */
export interface PayloadCache {
  get(key: string, size: number): Promise<Uint8Array | undefined>;
  put(key: string, data: Uint8Array): Promise<void>;
}

/** The cache key of a compressed payload: its SHA-256, computed off the main thread. */
export async function payloadKey(payload: Uint8Array): Promise<string> {
  const digest = await globalThis.crypto.subtle.digest('SHA-256', payload);
  return Buffer.from(digest).toString('hex');
}

/**
 * Decompresses a bzImage payload: detects the format, strips the 4-byte
 * size the kernel build appends (gzip keeps it: it is the gzip ISIZE),
 * and checks the output against that size, which also catches truncated
 * input that a decoder would otherwise return partially. With `cache`, a
 * payload decompressed before is read from it, and one decompressed now is
 * written to it.
 */
export async function decompressKernelPayload(payload: Uint8Array, cache?: PayloadCache): Promise<DecompressedPayload> {
  const format = detectCompression(payload);
  if (format === undefined) {
    const head = Array.from(payload.subarray(0, 4), (b) => b.toString(16).padStart(2, '0')).join(' ');
    throw new BootError(
      'unsupported-compression',
      `kernel payload has an unknown format (first bytes ${head || 'none'}): boot it with mode 'guest' (the kernel decompresses itself)`,
    );
  }
  if (payload.length < 8) {
    throw new BootError('corrupt', `kernel payload is only ${payload.length} bytes long`);
  }
  const sizeAt = payload.length - 4;
  const expected = new DataView(payload.buffer, payload.byteOffset + sizeAt, 4).getUint32(0, true);
  const stream = format === 'gzip' ? payload : payload.subarray(0, sizeAt);
  if (!cache) return { format, data: await decompress(stream, format, expected) };
  const key = await payloadKey(payload);
  const hit = await cache.get(key, expected);
  if (hit) return { format, data: hit, cached: true };
  const data = await decompress(stream, format, expected);
  await cache.put(key, data);
  return { format, data };
}
