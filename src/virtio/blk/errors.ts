/** Errors of the virtio-blk module: bad `--disk` options and disk images that cannot be used. */
import { TsvmmKindError } from '../../base/errors.js';

export type BlkErrorCode =
  /** The `--disk` option is malformed. */
  | 'BAD_OPTION'
  /** The image file does not exist. */
  | 'NOT_FOUND'
  /** No permission to open the image in the mode asked. */
  | 'PERMISSION'
  /** A directory or a special file. */
  | 'NOT_A_FILE'
  /** Empty, or not a whole number of 512-byte sectors. */
  | 'BAD_SIZE'
  /** Another process holds a conflicting lock on the image. */
  | 'LOCKED'
  /** Any other failure opening or locking the image (see `cause`). */
  | 'OPEN_FAILED';

export class BlkError extends TsvmmKindError<BlkErrorCode> {
  constructor(kind: BlkErrorCode, message: string, options?: { cause?: unknown }) {
    super('BLK_', kind, message, options);
  }
}
