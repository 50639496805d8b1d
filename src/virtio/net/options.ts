/** The `--net tap=<name>[,mac=<aa:bb:cc:dd:ee:ff>][,transport=pci|mmio]` option and MAC address helpers. */
import { createHash } from 'node:crypto';
import { NetError } from './errors.js';

export const MAC_LENGTH = 6;
/** IFNAMSIZ - 1: the longest Linux interface name. */
export const MAX_IFNAME_LENGTH = 15;

export interface NetOptions {
  /** TAP interface name. */
  readonly tap: string;
  /** MAC address as lower-case `aa:bb:cc:dd:ee:ff`; absent means "derive one". */
  readonly mac?: string;
  /** The virtio transport for this card; absent means the VM's default. */
  readonly transport?: 'pci' | 'mmio';
}

/**
 * Parses a `--net` value. Throws a {@link NetError} with code BAD_OPTION
 * naming the problem.
 */
export function parseNetOption(spec: string): NetOptions {
  let tap: string | undefined;
  let mac: string | undefined;
  let transport: 'pci' | 'mmio' | undefined;
  for (const item of spec.split(',')) {
    const eq = item.indexOf('=');
    const key = eq < 0 ? item : item.slice(0, eq);
    const value = eq < 0 ? undefined : item.slice(eq + 1);
    switch (key) {
      case 'tap':
        if (tap !== undefined) throw new NetError('BAD_OPTION', `--net ${spec}: 'tap' given twice`);
        tap = checkIfName(spec, value);
        break;
      case 'mac':
        if (mac !== undefined) throw new NetError('BAD_OPTION', `--net ${spec}: 'mac' given twice`);
        if (!value) throw new NetError('BAD_OPTION', `--net ${spec}: 'mac' needs a value (mac=aa:bb:cc:dd:ee:ff)`);
        mac = formatMac(parseMac(value, `--net ${spec}: `));
        break;
      case 'transport':
        if (value !== 'pci' && value !== 'mmio') throw new NetError('BAD_OPTION', `--net ${spec}: transport must be pci or mmio`);
        transport = value;
        break;
      default:
        throw new NetError(
          'BAD_OPTION',
          `--net ${spec}: unknown option ${JSON.stringify(item)} (expected tap=<name>[,mac=<aa:bb:cc:dd:ee:ff>][,transport=pci|mmio])`,
        );
    }
  }
  if (tap === undefined) {
    throw new NetError('BAD_OPTION', `--net ${spec}: 'tap=<name>' is required (a TAP interface, e.g. tap=tap0)`);
  }
  return { tap, ...(mac !== undefined ? { mac } : {}), ...(transport !== undefined ? { transport } : {}) };
}

function checkIfName(spec: string, value: string | undefined): string {
  if (!value) throw new NetError('BAD_OPTION', `--net ${spec}: 'tap' needs an interface name (tap=tap0)`);
  if (value.length > MAX_IFNAME_LENGTH) {
    throw new NetError('BAD_OPTION', `--net ${spec}: interface name ${JSON.stringify(value)} is longer than ${MAX_IFNAME_LENGTH} characters`);
  }
  if (value === '.' || value === '..' || !/^[\x21-\x7e]+$/.test(value) || value.includes('/') || value.includes(':')) {
    throw new NetError('BAD_OPTION', `--net ${spec}: ${JSON.stringify(value)} is not a valid interface name`);
  }
  return value;
}

/**
 * Parses `aa:bb:cc:dd:ee:ff` (or with `-`). Refuses multicast addresses
 * (a NIC cannot own one) and the all-zero address.
 */
export function parseMac(text: string, context = ''): Uint8Array {
  const parts = text.split(/[:-]/);
  if (parts.length !== MAC_LENGTH || !parts.every((p) => /^[0-9a-fA-F]{2}$/.test(p))) {
    throw new NetError('BAD_OPTION', `${context}MAC address ${JSON.stringify(text)} is not of the form aa:bb:cc:dd:ee:ff`);
  }
  const mac = Uint8Array.from(parts.map((p) => parseInt(p, 16)));
  if (mac[0]! & 0x01) {
    throw new NetError('BAD_OPTION', `${context}MAC address ${text} is a multicast address; the first byte must be even`);
  }
  if (mac.every((b) => b === 0)) throw new NetError('BAD_OPTION', `${context}MAC address ${text} is all zeros`);
  return mac;
}

export function formatMac(mac: Uint8Array): string {
  return Array.from(mac, (b) => b.toString(16).padStart(2, '0')).join(':');
}

/**
 * A stable MAC address derived from `seed` (a VM name, say): a locally
 * administered (bit 1 set), unicast (bit 0 clear) address, so it cannot
 * clash with a vendor-assigned one.
 */
export function macFromSeed(seed: string): Uint8Array {
  const mac = Uint8Array.from(createHash('sha256').update(`tsvmm-mac:${seed}`).digest().subarray(0, MAC_LENGTH));
  mac[0] = (mac[0]! & 0xfc) | 0x02;
  return mac;
}
