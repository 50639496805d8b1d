/**
 * Host-side initramfs decompression. Linux accepts an uncompressed cpio as
 * initramfs, and inflating a gzip archive costs the guest kernel tens of
 * seconds where its code is emulated (about 1M instructions per second on
 * a pagetable-based KVM) and milliseconds here. So a gzip-compressed
 * initramfs is inflated on the host when the result is a plain cpio
 * archive; anything else is passed through unchanged.
 */
import { crc32, gunzip } from 'node:zlib';

const GZIP_MAGIC = [0x1f, 0x8b];
/** cpio "newc" and "crc" magics (Documentation/driver-api/early-userspace/buffer-format.rst). */
const CPIO_MAGICS = ['070701', '070702'];

export interface PreparedInitrd {
  data: Uint8Array;
  /** True when the host inflated it. */
  inflated: boolean;
}

function isCpio(data: Uint8Array): boolean {
  const head = Buffer.from(data.subarray(0, 6)).toString('latin1');
  return CPIO_MAGICS.includes(head);
}

/**
 * Returns the initramfs as the guest should get it. Only a whole-file gzip
 * stream that inflates to a cpio archive is inflated: concatenated
 * archives that start uncompressed (early microcode), other compressors and
 * initrd disk images go to the kernel as they are. The inflation runs on
 * the libuv thread pool, so a VM can be built meanwhile.
 */
export function prepareInitrdAsync(data: Uint8Array): Promise<PreparedInitrd> {
  if (!isGzip(data)) return Promise.resolve({ data, inflated: false });
  return new Promise((resolve) =>
    // Not a clean gzip stream (trailing data, corruption): the kernel's own
    // unpacker decides what to make of it.
    // 4 MiB output chunks: the default 16 KiB ones cost a main-thread turn each.
    gunzip(data, { chunkSize: 4 << 20 }, (err, out) => resolve(err ? { data, inflated: false } : accept(data, out))),
  );
}

function isGzip(data: Uint8Array): boolean {
  return data[0] === GZIP_MAGIC[0] && data[1] === GZIP_MAGIC[1];
}

/** The inflated archive, when the gzip trailer vouches for it and it is a cpio archive. */
function accept(data: Uint8Array, out: Buffer): PreparedInitrd {
  // gunzip returns what it could for a truncated stream: trust the result
  // only when the trailer (CRC32, then size mod 2^32) vouches for it.
  if (data.length < 18) return { data, inflated: false };
  const trailer = new DataView(data.buffer, data.byteOffset + data.length - 8, 8);
  if (trailer.getUint32(4, true) !== out.length % 2 ** 32 || trailer.getUint32(0, true) !== crc32(out)) {
    return { data, inflated: false };
  }
  if (!isCpio(out)) return { data, inflated: false };
  return { data: out, inflated: true };
}
