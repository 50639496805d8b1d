/** virtio-net: a TAP interface as a guest network card. */
import type { Logger } from '../../base/log.js';
import { NetDevice } from './device.js';
import { macFromSeed, parseMac, type NetOptions } from './options.js';
import { openTap, type TapBackend } from './tap.js';

export * from './device.js';
export * from './errors.js';
export * from './options.js';
export * from './tap.js';

export interface CreateNetDeviceDeps {
  /** Seed of the default MAC address when the option has none (the VM name, say). */
  readonly macSeed: string;
  readonly logger?: Logger;
  /** Defaults to the native TAP; tests pass a fake. */
  readonly openTap?: (name: string) => TapBackend;
  readonly queueSize?: number;
}

/**
 * Opens the TAP named by a parsed `--net` option and builds the device.
 * Throws a NetError with a one-line message when the TAP cannot be used.
 * Call `device.close()` after the VM stops.
 */
export function createNetDevice(options: NetOptions, deps: CreateNetDeviceDeps): NetDevice {
  const mac = options.mac !== undefined ? parseMac(options.mac) : macFromSeed(deps.macSeed);
  const tap = (deps.openTap ?? openTap)(options.tap);
  try {
    return new NetDevice({
      tap,
      mac,
      ...(deps.queueSize !== undefined ? { queueSize: deps.queueSize } : {}),
      ...(deps.logger ? { logger: deps.logger } : {}),
    });
  } catch (err) {
    tap.close();
    throw err;
  }
}
