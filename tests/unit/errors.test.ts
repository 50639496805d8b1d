/**
 * One error type: every error class the library exports is a TsvmmError
 * with a stable `ERR_TSVMM_...` code and its own name, and keeps `cause`.
 */
import { describe, expect, it } from 'vitest';
import * as tsvmm from '../../src/index.js';
import { errorCode, TsvmmError } from '../../src/base/errors.js';

/** One instance of each exported error class, built the way the library builds it. */
const samples: Record<string, () => Error> = {
  TsvmmError: () => new tsvmm.TsvmmError('ERR_TSVMM_X', 'x'),
  TsvmmKindError: () => new tsvmm.TsvmmKindError('X_', 'a-b', 'x'),
  VmConfigError: () => new tsvmm.VmConfigError('bad-memory', 'x'),
  VmStateError: () => new tsvmm.VmStateError('x'),
  ConsoleWaitError: () => new tsvmm.ConsoleWaitError('ERR_TSVMM_WAIT_TIMEOUT', 'x', '/x/', ''),
  SandboxError: () => new tsvmm.SandboxError('unconfinable', 'x'),
  ConfigFileError: () => new tsvmm.ConfigFileError('x'),
  KvmError: () => new tsvmm.KvmError('no-kvm', 'x'),
  BootError: () => new tsvmm.BootError('not-a-kernel', 'x'),
  ProfileError: () => new tsvmm.ProfileError('bad-rate', 'x'),
  BusError: () => new tsvmm.BusError('x'),
  GuestMemoryError: () => new tsvmm.GuestMemoryError(0x1000, 4),
  VcpuError: () => new tsvmm.VcpuError(0, 'x'),
  LayoutError: () => new tsvmm.LayoutError('NO_VIRTIO_SLOT', 'x'),
  AcpiError: () => new tsvmm.AcpiError('TOO_LARGE', 'x'),
  AmlError: () => new tsvmm.AmlError('BAD_NAME', 'x'),
  PciError: () => new tsvmm.PciError('PCI_BUS_FULL', 'x'),
  QueueError: () => new tsvmm.QueueError('nested-indirect', 'x'),
  BlkError: () => new tsvmm.BlkError('LOCKED', 'x'),
  NetError: () => new tsvmm.NetError('NO_TUN', 'x'),
  ApiSocketError: () => new tsvmm.ApiSocketError('x'),
  SerialTargetError: () => new tsvmm.SerialTargetError('in-use', 'x'),
};

describe('errors', () => {
  const exported = Object.entries(tsvmm).filter(([name, v]) => name.endsWith('Error') && typeof v === 'function');

  it('has a sample for every error class the library exports', () => {
    expect(exported.map(([name]) => name).sort()).toEqual(Object.keys(samples).sort());
  });

  it.each(Object.entries(samples))('%s is a TsvmmError with an ERR_TSVMM_ code and its own name', (name, make) => {
    const err = make();
    expect(err).toBeInstanceOf(TsvmmError);
    expect(err.name).toBe(name);
    expect((err as TsvmmError).code).toMatch(/^ERR_TSVMM_[A-Z0-9_]+$/);
  });

  it('derives a code from a kind, and keeps the kind and the cause', () => {
    expect(errorCode('BOOT_', 'not-a-kernel')).toBe('ERR_TSVMM_BOOT_NOT_A_KERNEL');
    const cause = new Error('ENOENT');
    const err = new tsvmm.BlkError('NOT_FOUND', 'no image', { cause });
    expect(err).toMatchObject({ code: 'ERR_TSVMM_BLK_NOT_FOUND', kind: 'NOT_FOUND', cause });
    expect(new tsvmm.KvmError('kvm-permission', 'x').code).toBe('ERR_TSVMM_KVM_PERMISSION');
    expect(new tsvmm.PciError('PCI_BUS_FULL', 'x').code).toBe('ERR_TSVMM_PCI_BUS_FULL');
  });
});
