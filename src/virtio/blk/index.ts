/** virtio-blk: a raw image file as a guest block device. */
import type { Logger } from '../../base/log.js';
import { BlkDevice } from './device.js';
import { openDiskImage, type FileLocker } from './image.js';
import type { DiskOptions } from './options.js';

export * from './backend.js';
export * from './device.js';
export * from './errors.js';
export * from './image.js';
export * from './options.js';
export * from './request.js';

export interface CreateBlkDeviceDeps {
  readonly logger?: Logger;
  /** Defaults to the native OFD lock; tests pass a fake. */
  readonly locker?: FileLocker;
  readonly queueSize?: number;
}

/**
 * Opens the image named by a parsed `--disk` option (locking it) and
 * builds the device. Throws a BlkError with a one-line message when the
 * image cannot be used. Call `device.close()` after the VM stops.
 */
export function createBlkDevice(options: DiskOptions, deps: CreateBlkDeviceDeps = {}): BlkDevice {
  const image = openDiskImage(options.path, {
    readonly: options.readonly,
    ...(deps.locker ? { locker: deps.locker } : {}),
  });
  try {
    return new BlkDevice({
      backend: image,
      ...(options.serial !== undefined ? { serial: options.serial } : {}),
      ...(deps.queueSize !== undefined ? { queueSize: deps.queueSize } : {}),
      ...(deps.logger ? { logger: deps.logger } : {}),
    });
  } catch (err) {
    image.close();
    throw err;
  }
}
