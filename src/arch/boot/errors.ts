/**
 * The one error type of the boot loader. Each message is a single line that
 * names the problem and how to fix it, so the CLI can print it as is.
 */
import { TsvmmKindError } from '../../base/errors.js';

export type BootErrorKind =
  /** The file is neither a bzImage nor an x86-64 ELF vmlinux. */
  | 'not-a-kernel'
  /** A bzImage whose boot protocol predates 2.06. */
  | 'protocol-too-old'
  /** A 32-bit kernel, or one that does not advertise the 64-bit entry point. */
  | 'not-64-bit'
  /** Guest RAM cannot hold the kernel's footprint plus the initrd. */
  | 'memory-too-small'
  /** A payload this host cannot decompress, booted with mode 'host'. */
  | 'unsupported-compression'
  /** The image claims to be a kernel but its contents are inconsistent. */
  | 'corrupt'
  /** The command line is longer than the kernel accepts. */
  | 'cmdline-too-long'
  /** The command line cannot be passed as a C string (it contains NUL). */
  | 'invalid-cmdline'
  /** The initrd does not fit below the highest address the kernel allows. */
  | 'initrd-too-large';

export class BootError extends TsvmmKindError<BootErrorKind> {
  constructor(kind: BootErrorKind, message: string, options?: { cause?: unknown }) {
    super('BOOT_', kind, message, options);
  }
}

/** `0x1234` formatting for messages. */
export function hex(n: number | bigint): string {
  return `0x${n.toString(16)}`;
}

/** Bytes as MiB for messages, rounded up. */
export function mib(bytes: number): number {
  return Math.ceil(bytes / (1024 * 1024));
}
