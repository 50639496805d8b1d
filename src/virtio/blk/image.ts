/**
 * A raw disk image file as a {@link BlockBackend}. I/O goes through
 * Node's fs callbacks, which run the system calls on the libuv thread
 * pool.
 *
 * Sizes: an image must be a non-empty whole number of 512-byte sectors.
 * We refuse other sizes instead of rounding down, because a silently
 * truncated last sector is data the guest can never see; the error says
 * how to pad the file.
 *
 * DISCARD is accepted and does nothing: Node has no fallocate(PUNCH_HOLE),
 * and writing zeros would allocate the very blocks a discard is meant to
 * free (mkfs discards the whole disk). The spec lets a device ignore
 * discards. WRITE_ZEROES really writes zeros.
 */
import fs from 'node:fs';
import { native } from '../../kvm/native.js';
import type { BlockBackend, IoCallback } from './backend.js';
import { BlkError } from './errors.js';

export const SECTOR_SIZE = 512;

/**
 * Takes an advisory lock on an open file: exclusive for a writable disk,
 * shared for a read-only one. Throws an error with `code` EAGAIN or EACCES
 * when another process holds a conflicting lock.
 */
export type FileLocker = (fd: number, exclusive: boolean) => void;

/** The real locker: an OFD lock through the native addon. */
export const nativeFileLocker: FileLocker = (fd, exclusive) => native().lockFile(fd, exclusive);

export interface OpenDiskOptions {
  readonly readonly?: boolean;
  /** Defaults to {@link nativeFileLocker}. */
  readonly locker?: FileLocker;
}

// Write-zeroes chunk: big enough to amortise the syscalls, small enough to share.
const ZERO_CHUNK = new Uint8Array(1 << 20);

function errnoCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** An open raw image file. */
export class DiskImage implements BlockBackend {
  private closed = false;

  constructor(
    readonly fd: number,
    readonly path: string,
    readonly size: number,
    readonly readonly: boolean,
  ) {}

  readv(buffers: readonly Uint8Array[], position: number, done: IoCallback): void {
    this.transfer('read', buffers, position, done);
  }

  writev(buffers: readonly Uint8Array[], position: number, done: IoCallback): void {
    if (this.readonly) {
      done(new Error(`${this.path} is read-only`));
      return;
    }
    this.transfer('write', buffers, position, done);
  }

  flush(done: IoCallback): void {
    fs.fdatasync(this.fd, (err) => done(err));
  }

  writeZeroes(position: number, length: number, done: IoCallback): void {
    if (this.readonly) {
      done(new Error(`${this.path} is read-only`));
      return;
    }
    const step = (at: number, left: number): void => {
      if (left === 0) {
        done(null);
        return;
      }
      const n = Math.min(left, ZERO_CHUNK.length);
      fs.write(this.fd, ZERO_CHUNK, 0, n, at, (err, written) => {
        if (err) done(err);
        else if (written === 0) done(new Error(`${this.path}: write made no progress`));
        else step(at + written, left - written);
      });
    };
    step(position, length);
  }

  discard(_position: number, _length: number, done: IoCallback): void {
    // See the module comment: a hint we cannot act on without fallocate.
    setImmediate(() => done(null));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }

  /** readv/writev until every buffer is done; the kernel may transfer less than asked. */
  private transfer(kind: 'read' | 'write', buffers: readonly Uint8Array[], position: number, done: IoCallback): void {
    let list = buffers.filter((b) => b.length > 0);
    let at = position;
    const step = (): void => {
      if (list.length === 0) {
        done(null);
        return;
      }
      const after = (err: NodeJS.ErrnoException | null, n: number): void => {
        if (err) {
          done(err);
          return;
        }
        if (n === 0) {
          done(new Error(`${this.path}: short ${kind} at byte ${at} (did the file shrink?)`));
          return;
        }
        at += n;
        list = advance(list, n);
        step();
      };
      if (kind === 'read') fs.readv(this.fd, list as Uint8Array[], at, after);
      else fs.writev(this.fd, list as Uint8Array[], at, after);
    };
    step();
  }
}

/** Drops the first `n` bytes from a list of buffers. */
function advance(list: readonly Uint8Array[], n: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let skip = n;
  for (const b of list) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    out.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return out;
}

/**
 * Opens a raw disk image: read-only (O_RDONLY) when asked, otherwise
 * read-write; checks it is a regular file of whole sectors; and locks it
 * (exclusive, or shared when read-only) so two VMs cannot write the same
 * image. Throws a {@link BlkError} with a one-line message naming the
 * problem and the fix.
 */
export function openDiskImage(path: string, options: OpenDiskOptions = {}): DiskImage {
  const readonly = options.readonly ?? false;
  const locker = options.locker ?? nativeFileLocker;
  let fd: number;
  try {
    fd = fs.openSync(path, readonly ? fs.constants.O_RDONLY : fs.constants.O_RDWR);
  } catch (err) {
    throw openError(path, readonly, err);
  }
  try {
    const st = fs.fstatSync(fd);
    if (st.isDirectory()) {
      throw new BlkError('NOT_A_FILE', `disk image ${path} is a directory; give the path of an image file`);
    }
    if (!st.isFile()) {
      throw new BlkError('NOT_A_FILE', `disk image ${path} is not a regular file; only raw image files are supported`);
    }
    if (st.size === 0) {
      throw new BlkError('BAD_SIZE', `disk image ${path} is empty; give it a size with \`truncate -s 64M ${path}\``);
    }
    if (st.size % SECTOR_SIZE !== 0) {
      throw new BlkError(
        'BAD_SIZE',
        `disk image ${path} is ${st.size} bytes, not a multiple of ${SECTOR_SIZE}; pad it with \`truncate -s %${SECTOR_SIZE} ${path}\``,
      );
    }
    try {
      locker(fd, !readonly);
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'EAGAIN' || code === 'EACCES' || code === 'EWOULDBLOCK') {
        throw new BlkError('LOCKED', `disk image ${path} is in use by another process (locked)`, { cause: err });
      }
      throw new BlkError('OPEN_FAILED', `cannot lock disk image ${path}: ${(err as Error).message}`, { cause: err });
    }
    return new DiskImage(fd, path, st.size, readonly);
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

function openError(path: string, readonly: boolean, err: unknown): BlkError {
  const mode = readonly ? 'read-only' : 'read-write';
  switch (errnoCode(err)) {
    case 'ENOENT':
      return new BlkError('NOT_FOUND', `disk image ${path} does not exist; check the path or create one with \`truncate -s 64M ${path}\``, { cause: err });
    case 'EACCES':
    case 'EPERM':
      return new BlkError('PERMISSION', `permission denied opening disk image ${path} ${mode}; fix its permissions${readonly ? '' : ' or add ,readonly'}`, {
        cause: err,
      });
    case 'EROFS':
      return new BlkError('PERMISSION', `disk image ${path} is on a read-only file system; add ,readonly`, { cause: err });
    case 'EISDIR':
      return new BlkError('NOT_A_FILE', `disk image ${path} is a directory; give the path of an image file`, { cause: err });
    default:
      return new BlkError('OPEN_FAILED', `cannot open disk image ${path} ${mode}: ${(err as Error).message}`, { cause: err });
  }
}
