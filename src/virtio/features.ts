/**
 * Constants shared by every virtio device and transport: device IDs,
 * device status bits and the transport-level feature bits (virtio 1.2
 * sections 2.1, 5 and 6; Linux include/uapi/linux/virtio_config.h).
 */

/** Device IDs (virtio 1.2 section 5). */
export const VIRTIO_ID_NET = 1;
export const VIRTIO_ID_BLOCK = 2;
export const VIRTIO_ID_CONSOLE = 3;

/** Device status bits (virtio 1.2 section 2.1). */
export const STATUS_ACKNOWLEDGE = 0x01;
export const STATUS_DRIVER = 0x02;
export const STATUS_DRIVER_OK = 0x04;
export const STATUS_FEATURES_OK = 0x08;
export const STATUS_DEVICE_NEEDS_RESET = 0x40;
export const STATUS_FAILED = 0x80;

/** Transport and ring feature bit numbers (virtio 1.2 section 6). */
export const VIRTIO_F_INDIRECT_DESC = 28;
export const VIRTIO_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;
export const VIRTIO_F_ACCESS_PLATFORM = 33;
export const VIRTIO_F_RING_PACKED = 34;
export const VIRTIO_F_RING_RESET = 40;

/** The feature mask for bit number `n`. */
export function featureBit(n: number): bigint {
  return 1n << BigInt(n);
}

/** A feature mask with every listed bit number set. */
export function featureMask(...bits: number[]): bigint {
  return bits.reduce((mask, n) => mask | featureBit(n), 0n);
}

/** True when bit number `n` is set in `features`. */
export function hasFeature(features: bigint, n: number): boolean {
  return (features & featureBit(n)) !== 0n;
}
