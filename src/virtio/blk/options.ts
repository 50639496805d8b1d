/** The `--disk <path>[,readonly][,serial=<id>][,transport=pci|mmio]` option. */
import { BlkError } from './errors.js';

/** Length of the GET_ID answer: the serial is at most this many bytes. */
export const BLK_SERIAL_MAX_BYTES = 20;

export interface DiskOptions {
  /** Path of a raw image file. */
  readonly path: string;
  /** Open read-only and offer VIRTIO_BLK_F_RO. */
  readonly readonly: boolean;
  /** Answer to GET_ID (printable ASCII, at most 20 bytes); none means an empty ID. */
  readonly serial?: string;
  /** The virtio transport for this disk; absent means the VM's default. */
  readonly transport?: 'pci' | 'mmio';
}

/**
 * Parses a `--disk` value. Paths containing commas are not supported
 * (the comma separates options). Throws a {@link BlkError} with code
 * BAD_OPTION naming the problem.
 */
export function parseDiskOption(spec: string): DiskOptions {
  const [path = '', ...rest] = spec.split(',');
  if (path === '') {
    throw new BlkError('BAD_OPTION', `--disk ${JSON.stringify(spec)}: the image path is missing (expected <path>[,readonly][,serial=<id>])`);
  }
  let readonly = false;
  let serial: string | undefined;
  let transport: 'pci' | 'mmio' | undefined;
  for (const item of rest) {
    const eq = item.indexOf('=');
    const key = eq < 0 ? item : item.slice(0, eq);
    const value = eq < 0 ? undefined : item.slice(eq + 1);
    switch (key) {
      case 'readonly':
        if (value !== undefined) {
          throw new BlkError('BAD_OPTION', `--disk ${spec}: 'readonly' takes no value`);
        }
        readonly = true;
        break;
      case 'serial':
        if (value === undefined || value === '') {
          throw new BlkError('BAD_OPTION', `--disk ${spec}: 'serial' needs a value (serial=<id>)`);
        }
        if (serial !== undefined) throw new BlkError('BAD_OPTION', `--disk ${spec}: 'serial' given twice`);
        if (!/^[\x20-\x7e]*$/.test(value)) {
          throw new BlkError('BAD_OPTION', `--disk ${spec}: serial must be printable ASCII`);
        }
        if (Buffer.byteLength(value) > BLK_SERIAL_MAX_BYTES) {
          throw new BlkError(
            'BAD_OPTION',
            `--disk ${spec}: serial ${JSON.stringify(value)} is ${Buffer.byteLength(value)} bytes; at most ${BLK_SERIAL_MAX_BYTES}`,
          );
        }
        serial = value;
        break;
      case 'transport':
        if (value !== 'pci' && value !== 'mmio') {
          throw new BlkError('BAD_OPTION', `--disk ${spec}: transport must be pci or mmio`);
        }
        transport = value;
        break;
      default:
        throw new BlkError(
          'BAD_OPTION',
          `--disk ${spec}: unknown option ${JSON.stringify(item)} (expected readonly, serial=<id> or transport=pci|mmio; paths with commas are not supported)`,
        );
    }
  }
  return { path, readonly, ...(serial !== undefined ? { serial } : {}), ...(transport !== undefined ? { transport } : {}) };
}
