/**
 * A CI-sized run of the virtio fuzz targets (tests/fuzz/harness.ts); the
 * long run is `npm run fuzz`. Seeds differ from the long run's so the two
 * cover different cases; a failure names the seed that replays it.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { fuzzImage, runFuzz } from '../fuzz/harness.js';

const image = fuzzImage();
afterAll(() => image.remove());

describe('virtio fuzzing (hostile model driver)', () => {
  it('split queue: 20,000 cases', async () => {
    const r = await runFuzz('queue', 20_000, 1_000_001);
    expect(r.cases).toBe(20_000);
  }, 120_000);

  it('virtio-blk over virtio-mmio on a real raw image: 1,000 cases', async () => {
    const r = await runFuzz('blk', 1_000, 1_000_001, image.path);
    expect(r.cases).toBe(1_000);
  }, 120_000);

  it('the virtio-pci transport (configuration space, BAR 0, MSI-X) with virtio-blk or virtio-net: 1,000 cases', async () => {
    const r = await runFuzz('pci', 1_000, 1_000_001, image.path);
    expect(r.cases).toBe(1_000);
  }, 120_000);

  it('virtio-net over virtio-mmio on a TAP fake: 1,000 cases', async () => {
    const r = await runFuzz('net', 1_000, 1_000_001);
    expect(r.cases).toBe(1_000);
  }, 120_000);
});
