/**
 * /dev/kvm and the VM file descriptor: opening KVM with errors a person can
 * act on, checking the capabilities tsvmm relies on, and the VM-wide
 * ioctls (memory slots, irqchip, IRQ lines, eventfds).
 */
import { isNativeError, native, type NativeAddon } from './native.js';
import type { GuestMemory } from '../base/memory.js';
import { TsvmmKindError } from '../base/errors.js';

export type KvmErrorKind = 'no-kvm' | 'kvm-permission' | 'kvm-api' | 'kvm-capability' | 'no-addon';

export class KvmError extends TsvmmKindError<KvmErrorKind> {
  constructor(kind: KvmErrorKind, message: string, options?: { cause?: unknown }) {
    super('', kind, message, options);
  }
}

export const KVM_DEVICE = '/dev/kvm';

/** Capabilities without which tsvmm cannot run a guest. */
const REQUIRED_CAPS = ['KVM_CAP_IRQCHIP', 'KVM_CAP_USER_MEMORY', 'KVM_CAP_SET_TSS_ADDR', 'KVM_CAP_EXT_CPUID', 'KVM_CAP_IMMEDIATE_EXIT'];

function loadAddon(): NativeAddon {
  try {
    return native();
  } catch (err) {
    throw new KvmError('no-addon', (err as Error).message, { cause: err });
  }
}

/** An open /dev/kvm. */
export class Kvm {
  readonly addon: NativeAddon;
  readonly fd: number;
  readonly vcpuMmapSize: number;

  private constructor(addon: NativeAddon, fd: number) {
    this.addon = addon;
    this.fd = fd;
    this.vcpuMmapSize = addon.getVcpuMmapSize(fd);
  }

  /**
   * Opens KVM and checks it can run tsvmm's guests. Every failure is a
   * {@link KvmError} whose message says what to do.
   */
  static open(path = KVM_DEVICE): Kvm {
    const addon = loadAddon();
    let fd: number;
    try {
      fd = addon.open(path);
    } catch (err) {
      if (isNativeError(err, 'ENOENT') || isNativeError(err, 'ENODEV') || isNativeError(err, 'ENXIO')) {
        throw new KvmError('no-kvm', `${path} not found: this host has no KVM; enable VT-x/AMD-V (or nested virtualization) and load kvm_intel or kvm_amd`, {
          cause: err,
        });
      }
      if (isNativeError(err, 'EACCES') || isNativeError(err, 'EPERM')) {
        throw new KvmError(
          'kvm-permission',
          `no permission to open ${path}: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again) or run as root`,
          { cause: err },
        );
      }
      throw new KvmError('no-kvm', `cannot open ${path}: ${(err as Error).message}`, { cause: err });
    }
    const version = addon.getApiVersion(fd);
    if (version !== addon.constants.KVM_API_VERSION) {
      addon.close(fd);
      throw new KvmError('kvm-api', `${path} speaks KVM API ${version}, tsvmm needs ${addon.constants.KVM_API_VERSION}: upgrade the host kernel`);
    }
    for (const cap of REQUIRED_CAPS) {
      if (addon.checkExtension(fd, addon.constants[cap]!) <= 0) {
        addon.close(fd);
        throw new KvmError('kvm-capability', `${path} lacks ${cap}, which tsvmm needs: upgrade the host kernel`);
      }
    }
    return new Kvm(addon, fd);
  }

  hasCap(name: string): boolean {
    const cap = this.addon.constants[name];
    return cap !== undefined && this.addon.checkExtension(this.fd, cap) > 0;
  }

  capValue(name: string): number {
    const cap = this.addon.constants[name];
    return cap === undefined ? 0 : this.addon.checkExtension(this.fd, cap);
  }

  createVm(): VmFd {
    return new VmFd(this, this.addon.createVm(this.fd));
  }

  close(): void {
    this.addon.close(this.fd);
  }
}

/** A VM file descriptor and the VM-wide ioctls. */
export class VmFd {
  /** Keeps the guest RAM mappings alive as long as KVM may use them. */
  private readonly backing: ArrayBuffer[] = [];
  private nextSlot = 0;

  constructor(
    readonly kvm: Kvm,
    readonly fd: number,
  ) {}

  get addon(): NativeAddon {
    return this.kvm.addon;
  }

  /**
   * Allocates host memory for each guest RAM region, registers each as a
   * KVM memory slot, and returns the guest memory view.
   */
  static allocateRam(vm: VmFd, regions: ReadonlyArray<{ guestAddr: number; size: number }>, options: { mergeable?: boolean } = {}): GuestMemoryInit {
    const out: GuestMemoryInit = [];
    for (const r of regions) {
      const ab = vm.addon.allocGuestMemory(r.size, options.mergeable === true);
      vm.backing.push(ab);
      vm.addon.setUserMemoryRegion(vm.fd, vm.nextSlot++, 0, r.guestAddr, ab, 0, r.size);
      out.push({ guestAddr: r.guestAddr, bytes: new Uint8Array(ab) });
    }
    return out;
  }

  irqLine(irq: number, level: boolean): void {
    this.addon.irqLine(this.fd, irq, level ? 1 : 0);
  }

  close(): void {
    this.addon.close(this.fd);
  }
}

export type GuestMemoryInit = ConstructorParameters<typeof GuestMemory>[0] extends readonly (infer R)[] ? R[] : never;
