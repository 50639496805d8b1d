/** Errors of the virtio-net module: bad `--net` options and TAP devices that cannot be used. */
import { TsvmmKindError } from '../../base/errors.js';

export type NetErrorCode =
  /** The `--net` option or a MAC address is malformed. */
  | 'BAD_OPTION'
  /** /dev/net/tun is missing (the tun module is not loaded). */
  | 'NO_TUN'
  /** Not allowed to open or create the TAP device. */
  | 'PERMISSION'
  /** The TAP device is attached to another process. */
  | 'BUSY'
  /** A network interface of that name exists but is not a TAP device. */
  | 'NOT_TAP'
  /** Any other failure (see `cause`). */
  | 'TAP_FAILED';

export class NetError extends TsvmmKindError<NetErrorCode> {
  constructor(kind: NetErrorCode, message: string, options?: { cause?: unknown }) {
    super('NET_', kind, message, options);
  }
}
