/**
 * `tsvmm/testing`: test doubles for people writing device models and boot
 * tests, kept out of the product modules. A fake IRQ line, clock and
 * scheduler; a miniature virtio driver that builds rings in guest memory;
 * tiny kernel images built in memory.
 *
 * ```ts
 * import { FakeIrqLine, FakeVirtqueue, buildPrintAndHaltKernel } from 'tsvmm/testing';
 * ```
 */
export { FakeIrqLine, FakeClock, FakeScheduler } from './fakes.js';
export {
  GuestAllocator,
  FakeVirtqueue,
  FakeMmioDriver,
  startDevice,
  type QueueLayout,
  type FakeBuffer,
  type RawDescriptor,
  type UsedEntry,
  type TestRig,
} from './virtio.js';
export {
  buildElfKernel,
  buildBzImage,
  buildPrintAndHaltKernel,
  PRINT_AND_HALT_ENTRY,
  type SyntheticSegment,
  type SyntheticElfOptions,
  type SyntheticBzImageOptions,
} from './synthetic.js';
