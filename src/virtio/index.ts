/**
 * Virtio: the split virtqueue, the virtio-mmio transport, and the blk and
 * net devices. Device-specific names live in './blk/index.js' and
 * './net/index.js' (re-exported here as namespaces to keep names apart).
 */
export * from './device.js';
export * from './features.js';
export * from './mmio.js';
export * from './queue.js';
export * as blk from './blk/index.js';
export * as net from './net/index.js';
