/**
 * What the virtio-blk device needs from its storage. Every operation is
 * asynchronous and reports through a callback, so a slow disk stalls
 * neither the vCPU nor the event loop; operations may complete in any
 * order. The real implementation is {@link DiskImage} (a raw file); tests
 * wrap it to delay or reorder completions.
 */
export type IoCallback = (err: Error | null) => void;

export interface BlockBackend {
  /** Size in bytes, a multiple of 512. */
  readonly size: number;
  /** Writes are refused (the device also offers VIRTIO_BLK_F_RO). */
  readonly readonly: boolean;
  /** Fills every buffer, in order, from `position`; a short read is an error. */
  readv(buffers: readonly Uint8Array[], position: number, done: IoCallback): void;
  /** Writes every buffer, in order, at `position`. */
  writev(buffers: readonly Uint8Array[], position: number, done: IoCallback): void;
  /** Makes completed writes durable. */
  flush(done: IoCallback): void;
  /** Makes `[position, position + length)` read as zeros. */
  writeZeroes(position: number, length: number, done: IoCallback): void;
  /** A hint that the range is no longer needed; contents afterwards are unspecified. */
  discard(position: number, length: number, done: IoCallback): void;
  close(): void;
}
