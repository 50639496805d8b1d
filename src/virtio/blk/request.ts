/**
 * virtio-blk request parsing (virtio 1.2 section 5.2.6): turns a
 * descriptor chain into an operation on the backing store, or into an
 * immediate error status. A malformed request is the guest's problem and
 * gets IOERR or UNSUPP; it never throws.
 *
 *   struct virtio_blk_req {
 *     le32 type; le32 reserved; le64 sector;   // device-readable header
 *     u8 data[];                                // readable (OUT) or writable (IN)
 *     u8 status;                                // device-writable, last byte
 *   };
 */
import type { GuestMemory } from '../../base/memory.js';
import { QueueError, type ChainReader, type ChainWriter, type DescriptorChain } from '../queue.js';
import { BLK_SERIAL_MAX_BYTES } from './options.js';
import { SECTOR_SIZE } from './image.js';

/** Request types (Linux include/uapi/linux/virtio_blk.h). */
export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_DISCARD = 11;
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;

/** Status byte values. */
export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;

/** virtio_blk_discard_write_zeroes.flags */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

export const BLK_REQUEST_HEADER_SIZE = 16;
export const BLK_ID_BYTES = BLK_SERIAL_MAX_BYTES;
/** struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; } */
export const BLK_DISCARD_SEGMENT_SIZE = 16;

/** What the parser needs to know about the device. */
export interface BlkLimits {
  /** Disk size in bytes. */
  readonly size: number;
  readonly readonly: boolean;
  /** VIRTIO_BLK_F_DISCARD negotiated. */
  readonly discard: boolean;
  /** VIRTIO_BLK_F_WRITE_ZEROES negotiated. */
  readonly writeZeroes: boolean;
  readonly maxDiscardSectors: number;
  readonly maxDiscardSegments: number;
  readonly maxWriteZeroesSectors: number;
  readonly maxWriteZeroesSegments: number;
}

export interface ByteRange {
  readonly offset: number;
  readonly length: number;
}

/** The operation a request asks for. */
export type BlkOperation =
  | { readonly kind: 'read'; readonly offset: number; readonly length: number; readonly target: Uint8Array[] }
  | { readonly kind: 'write'; readonly offset: number; readonly length: number; readonly source: Uint8Array[] }
  | { readonly kind: 'flush' }
  | { readonly kind: 'get-id'; readonly target: ChainWriter }
  | { readonly kind: 'discard'; readonly ranges: readonly ByteRange[] }
  | { readonly kind: 'write-zeroes'; readonly ranges: readonly ByteRange[] }
  /** Answered without touching the disk: an error or an unsupported type. */
  | { readonly kind: 'reject'; readonly status: number; readonly reason: string };

export interface BlkRequest {
  readonly head: number;
  /** The request type field, when the header could be read. */
  readonly type: number | undefined;
  /** The status byte in guest memory; undefined when the chain has none (nothing can be reported). */
  readonly status: Uint8Array | undefined;
  readonly operation: BlkOperation;
  /** Bytes the device writes into the chain on success, status byte included. */
  readonly usedLenOnSuccess: number;
}

function reject(status: number, reason: string): BlkOperation {
  return { kind: 'reject', status, reason };
}

/** Parses `chain`; never throws for anything the guest controls. */
export function parseBlkRequest(mem: GuestMemory, chain: DescriptorChain, limits: BlkLimits): BlkRequest {
  const last = chain.descriptors[chain.descriptors.length - 1];
  const writer = chain.writer(mem);
  let status: Uint8Array | undefined;
  if (last?.writable && last.len > 0) status = writer.takeTail(1)[0];
  const early = (reason: string): BlkRequest => ({
    head: chain.head,
    status,
    type: undefined,
    operation: reject(VIRTIO_BLK_S_IOERR, reason),
    usedLenOnSuccess: status ? 1 : 0,
  });
  if (!status) return early('no device-writable status byte at the end of the chain');
  if (!chain.readablesFirst) return early('device-readable buffer after a device-writable one');
  const reader = chain.reader(mem);
  if (reader.remaining < BLK_REQUEST_HEADER_SIZE) {
    return early(`request header is ${reader.remaining} bytes, not ${BLK_REQUEST_HEADER_SIZE}`);
  }
  const header = reader.readExact(BLK_REQUEST_HEADER_SIZE);
  const view = new DataView(header.buffer);
  const type = view.getUint32(0, true);
  const sector = view.getBigUint64(8, true);
  try {
    return { head: chain.head, status, type, ...parseOperation(type, sector, reader, writer, limits) };
  } catch (err) {
    // A reader/writer asked for more than the chain holds: the request is short.
    if (err instanceof QueueError && !err.fatal) {
      return { head: chain.head, status, type, operation: reject(VIRTIO_BLK_S_IOERR, err.message), usedLenOnSuccess: 1 };
    }
    throw err;
  }
}

function parseOperation(
  type: number,
  sector: bigint,
  reader: ChainReader,
  writer: ChainWriter,
  limits: BlkLimits,
): { operation: BlkOperation; usedLenOnSuccess: number } {
  const op = (operation: BlkOperation, usedLenOnSuccess = 1) => ({ operation, usedLenOnSuccess });
  switch (type) {
    case VIRTIO_BLK_T_IN: {
      if (reader.remaining > 0) return op(reject(VIRTIO_BLK_S_IOERR, 'read request with device-readable data buffers'));
      const length = writer.remaining;
      const range = checkRange(sector, length, limits);
      if (typeof range === 'string') return op(reject(VIRTIO_BLK_S_IOERR, range));
      return op({ kind: 'read', offset: range.offset, length, target: writer.views(length) }, length + 1);
    }
    case VIRTIO_BLK_T_OUT: {
      if (limits.readonly) return op(reject(VIRTIO_BLK_S_IOERR, 'write to a read-only disk'));
      if (writer.remaining > 0) return op(reject(VIRTIO_BLK_S_IOERR, 'write request with device-writable data buffers'));
      const length = reader.remaining;
      const range = checkRange(sector, length, limits);
      if (typeof range === 'string') return op(reject(VIRTIO_BLK_S_IOERR, range));
      return op({ kind: 'write', offset: range.offset, length, source: reader.views(length) });
    }
    case VIRTIO_BLK_T_FLUSH:
      return op({ kind: 'flush' });
    case VIRTIO_BLK_T_GET_ID:
      if (writer.remaining < BLK_ID_BYTES) {
        return op(reject(VIRTIO_BLK_S_IOERR, `GET_ID buffer is ${writer.remaining} bytes, not ${BLK_ID_BYTES}`));
      }
      return op({ kind: 'get-id', target: writer }, BLK_ID_BYTES + 1);
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
      const discard = type === VIRTIO_BLK_T_DISCARD;
      const name = discard ? 'discard' : 'write zeroes';
      if (!(discard ? limits.discard : limits.writeZeroes)) {
        return op(reject(VIRTIO_BLK_S_UNSUPP, `${name} was not negotiated`));
      }
      if (limits.readonly) return op(reject(VIRTIO_BLK_S_IOERR, `${name} on a read-only disk`));
      if (writer.remaining > 0) return op(reject(VIRTIO_BLK_S_IOERR, `${name} request with device-writable data buffers`));
      const ranges = parseSegments(reader, discard, limits);
      if (!Array.isArray(ranges)) return op(ranges);
      return op({ kind: discard ? 'discard' : 'write-zeroes', ranges });
    }
    default:
      return op(reject(VIRTIO_BLK_S_UNSUPP, `unsupported request type ${type}`));
  }
}

function parseSegments(reader: ChainReader, discard: boolean, limits: BlkLimits): ByteRange[] | BlkOperation {
  const bytes = reader.remaining;
  const maxSegments = discard ? limits.maxDiscardSegments : limits.maxWriteZeroesSegments;
  const maxSectors = discard ? limits.maxDiscardSectors : limits.maxWriteZeroesSectors;
  if (bytes === 0 || bytes % BLK_DISCARD_SEGMENT_SIZE !== 0) {
    return reject(VIRTIO_BLK_S_IOERR, `segment data is ${bytes} bytes, not a non-zero multiple of ${BLK_DISCARD_SEGMENT_SIZE}`);
  }
  const count = bytes / BLK_DISCARD_SEGMENT_SIZE;
  if (count > maxSegments) return reject(VIRTIO_BLK_S_IOERR, `${count} segments, at most ${maxSegments}`);
  const ranges: ByteRange[] = [];
  for (let i = 0; i < count; i++) {
    const seg = reader.readExact(BLK_DISCARD_SEGMENT_SIZE);
    const view = new DataView(seg.buffer);
    const sector = view.getBigUint64(0, true);
    const numSectors = view.getUint32(8, true);
    const flags = view.getUint32(12, true);
    // 5.2.6.2: unknown flags, and unmap on a discard, are UNSUPP.
    if (flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP || (discard && flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)) {
      return reject(VIRTIO_BLK_S_UNSUPP, `segment flags 0x${flags.toString(16)} not supported`);
    }
    if (numSectors > maxSectors) return reject(VIRTIO_BLK_S_IOERR, `segment of ${numSectors} sectors, at most ${maxSectors}`);
    const range = checkRange(sector, numSectors * SECTOR_SIZE, limits);
    if (typeof range === 'string') return reject(VIRTIO_BLK_S_IOERR, range);
    ranges.push(range);
  }
  return ranges;
}

/** The byte range of `length` bytes at `sector`, or why it is not on the disk. */
function checkRange(sector: bigint, length: number, limits: BlkLimits): ByteRange | string {
  if (length % SECTOR_SIZE !== 0) return `data length ${length} is not a multiple of ${SECTOR_SIZE}`;
  const offset = sector * BigInt(SECTOR_SIZE);
  if (offset + BigInt(length) > BigInt(limits.size)) {
    return `sectors ${sector}+${length / SECTOR_SIZE} are beyond the end of the disk (${limits.size / SECTOR_SIZE} sectors)`;
  }
  return { offset: Number(offset), length };
}
