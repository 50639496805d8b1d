/**
 * The host side of virtio-net: a TAP interface opened with IFF_VNET_HDR,
 * so every frame read or written carries a virtio_net_hdr in front of it
 * and checksum/segmentation offloads pass through untouched. The system
 * calls are in the native addon; this module adds names, state and errors.
 */
import { constants as osConstants } from 'node:os';
import { native, type NativeAddon } from '../../kvm/native.js';
import { NetError } from './errors.js';

/** TUNSETOFFLOAD flags (Linux include/uapi/linux/if_tun.h). */
export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;
export const TUN_F_TSO_ECN = 0x08;

/** The errno `read`/`writev` return (negated) when the TAP has nothing or is full. */
export const EAGAIN = osConstants.errno.EAGAIN;
export const EBADF = osConstants.errno.EBADF;

/** What the virtio-net device needs from its TAP; tests use a fake. */
export interface TapBackend {
  /** The kernel's interface name. */
  readonly name: string;
  /** Reads one frame (vnet header included) into `buf`: its length, or -EAGAIN when none is queued. */
  read(buf: Uint8Array): number;
  /** Writes one frame made of `pieces`: bytes written, or -EAGAIN when the TAP queue is full. */
  writev(pieces: Uint8Array[]): number;
  /** Calls `onReadable` on the main thread while frames are waiting, until stopReadable(). */
  startReadable(onReadable: () => void): void;
  stopReadable(): void;
  /** TUNSETOFFLOAD: which offloads frames read from the TAP may use (TUN_F_*). */
  setOffload(flags: number): void;
  /** TUNSETVNETHDRSZ. */
  setVnetHdrSize(size: number): void;
  close(): void;
}

/** The part of the native addon a TAP uses; injectable for tests. */
export type TapNative = Pick<NativeAddon, 'tapOpen' | 'tapSetOffload' | 'tapSetVnetHdrSize' | 'read' | 'writev' | 'pollStart' | 'pollClose' | 'close'>;

/** A TAP device over the native addon. */
export class Tap implements TapBackend {
  private watch: number | undefined;
  private closed = false;

  private constructor(
    private readonly addon: TapNative,
    readonly fd: number,
    readonly name: string,
  ) {}

  /**
   * Opens (attaches to) TAP interface `name`. Throws a {@link NetError}
   * whose one-line message says how to fix the usual causes.
   */
  static open(name: string, addon: TapNative = native()): Tap {
    let opened: { fd: number; name: string };
    try {
      opened = addon.tapOpen(name);
    } catch (err) {
      throw tapOpenError(name, err);
    }
    return new Tap(addon, opened.fd, opened.name);
  }

  read(buf: Uint8Array): number {
    // Once closed, the fd number may belong to someone else.
    return this.closed ? -EBADF : this.addon.read(this.fd, buf);
  }

  writev(pieces: Uint8Array[]): number {
    return this.closed ? -EBADF : this.addon.writev(this.fd, pieces);
  }

  startReadable(onReadable: () => void): void {
    if (this.watch !== undefined || this.closed) return;
    this.watch = this.addon.pollStart(this.fd, onReadable);
  }

  stopReadable(): void {
    if (this.watch === undefined) return;
    // The addon has no "restart": a stopped watch is freed, and the next
    // startReadable() creates a new one on the same fd.
    this.addon.pollClose(this.watch);
    this.watch = undefined;
  }

  setOffload(flags: number): void {
    this.addon.tapSetOffload(this.fd, flags);
  }

  setVnetHdrSize(size: number): void {
    this.addon.tapSetVnetHdrSize(this.fd, size);
  }

  close(): void {
    if (this.closed) return;
    this.stopReadable();
    this.closed = true;
    this.addon.close(this.fd);
  }
}

/** Opens TAP interface `name` (see {@link Tap.open}). */
export function openTap(name: string, addon?: TapNative): TapBackend {
  return Tap.open(name, addon);
}

function tapOpenError(name: string, err: unknown): NetError {
  const code = (err as { code?: unknown } | null)?.code;
  const syscall = (err as { syscall?: unknown } | null)?.syscall;
  const options = { cause: err };
  if ((code === 'EACCES' || code === 'EPERM') && syscall === 'open /dev/net/tun') {
    // Debian makes it 0666; some hosts keep it root-only.
    return new NetError(
      'PERMISSION',
      `cannot open TAP ${name}: no permission on /dev/net/tun; give your user read-write access to it (\`sudo chmod 0666 /dev/net/tun\`, its usual mode), or run as root`,
      options,
    );
  }
  switch (code) {
    case 'ENOENT':
    case 'ENODEV':
      return new NetError('NO_TUN', `cannot open TAP ${name}: /dev/net/tun is missing; load the tun module (\`modprobe tun\`)`, options);
    case 'EPERM':
    case 'EACCES':
      return new NetError(
        'PERMISSION',
        `cannot open TAP ${name}: permission denied; create it for your user with \`sudo ip tuntap add dev ${name} mode tap user $(id -un)\`, or run as root`,
        options,
      );
    case 'EBUSY':
      return new NetError('BUSY', `TAP ${name} is in use by another process; stop it or pick another interface`, options);
    case 'EINVAL':
      return new NetError(
        'NOT_TAP',
        `cannot attach to ${name}: it exists but is not a TAP device (a TUN device or another interface?); pick another name or recreate it with \`ip tuntap add dev ${name} mode tap\``,
        options,
      );
    default:
      return new NetError('TAP_FAILED', `cannot open TAP ${name}: ${(err as Error)?.message ?? String(err)}`, options);
  }
}
