/**
 * Where the UART (ttyS0) goes when it is not the guest's console, in the
 * spirit of cloud-hypervisor's `--serial`: discarded, written to a file,
 * or served on a Unix socket whose clients read its output and type into
 * it. The console (`console: 'virtio'` or `'off'`) is then hvc0 or nothing,
 * and the UART carries early boot messages, a second getty, or a kernel
 * debugger.
 *
 * A file is created (or truncated) mode 0644 and written in batches; what
 * the guest printed is all there once the VM has ended. A socket is
 * created mode 0600 (only its owner may connect: a client types into the
 * guest), a stale socket left by a VMM that died is replaced, and every
 * client gets the output from the moment it connects; what any client
 * writes goes to the UART's receive FIFO.
 */
import { closeSync, openSync, unlinkSync, writeSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { TsvmmKindError } from '../base/errors.js';
import type { Logger } from '../base/log.js';
import { ByteBatcher } from '../base/batcher.js';
import { claimSocketPath, listenPrivate } from '../base/unix-socket.js';
import { CONSOLE_INPUT_LIMIT } from './console.js';

/** `'console'`: joined to `vm.console`; `'off'`: discarded; a file; a Unix socket. */
export type SerialTarget = 'console' | 'off' | { file: string } | { socket: string };

/** Output bytes gathered before a write to the file or the socket's clients. */
const BATCH_BYTES = 4096;
/** The longest a byte waits in the batch. */
const FLUSH_MS = 20;

export type SerialTargetErrorKind = 'cannot-open' | 'in-use' | 'not-a-socket';

/** A serial file or socket that cannot be set up. */
export class SerialTargetError extends TsvmmKindError<SerialTargetErrorKind> {
  constructor(kind: SerialTargetErrorKind, message: string, options?: { cause?: unknown }) {
    super('SERIAL_', kind, message, options);
  }
}

/** The UART's output goes in; close() flushes and releases the file or socket. */
export interface SerialSink {
  write(bytes: Uint8Array): void;
  /** The guest took input from the UART: clients held back may send again. */
  inputTaken(): void;
  close(): void;
  /** Clients connected now (a socket; 0 for a file). */
  readonly clients: number;
}

/** A readable description: `file /x`, `socket /y`. */
export function describeSerialTarget(target: SerialTarget): string {
  if (typeof target === 'string') return target;
  return 'file' in target ? `file ${target.file}` : `socket ${target.socket}`;
}

/** The UART's receive side, for what a socket's clients type. */
export interface SerialInput {
  /** Queues bytes for the guest. */
  send(bytes: Uint8Array): void;
  /** Bytes queued that the guest has not taken yet. */
  pending(): number;
}

/** Opens `target` (a file or socket: the other choices need no sink). */
export async function openSerialTarget(target: { file: string } | { socket: string }, input: SerialInput, log: Logger): Promise<SerialSink> {
  return 'file' in target ? fileSink(target.file, log) : await socketSink(target.socket, input, log);
}

function fileSink(path: string, log: Logger): SerialSink {
  let fd: number;
  try {
    fd = openSync(path, 'w', 0o644);
  } catch (err) {
    throw new SerialTargetError(
      'cannot-open',
      `cannot write the serial output file ${path} (${(err as NodeJS.ErrnoException).code}): give serial a file in a writable directory`,
      { cause: err },
    );
  }
  let open = true;
  let failed = false;
  const batcher = new ByteBatcher(
    BATCH_BYTES,
    FLUSH_MS,
    (bytes) => {
      // A file that cannot take more (a full disk) loses the rest, said once; the guest never sees it.
      try {
        let off = 0;
        while (!failed && off < bytes.length) off += writeSync(fd, bytes, off, bytes.length - off);
      } catch (err) {
        failed = true;
        log.warn({ err, path }, 'cannot write the serial output file: the rest of the output is dropped');
      }
    },
    false,
  );
  return {
    clients: 0,
    inputTaken() {},
    write(bytes) {
      if (open) batcher.add(bytes);
    },
    close() {
      if (!open) return;
      open = false;
      try {
        batcher.flush();
      } finally {
        closeSync(fd);
      }
    },
  };
}

/** Output a client has not taken beyond which it gets no more: a client that stops reading must not grow the VMM. */
const CLIENT_BACKLOG_LIMIT = 1024 * 1024;
/** How long a client that does not take the last output keeps its connection after the end. */
const CLOSE_GRACE_MS = 2000;

async function socketSink(path: string, input: SerialInput, log: Logger): Promise<SerialSink> {
  const claimed = await claimSocketPath(path);
  if (claimed === 'not-a-socket') throw new SerialTargetError('not-a-socket', `${path} exists and is not a socket: give serial another socket path`);
  if (claimed === 'in-use') throw new SerialTargetError('in-use', `something already listens on ${path}: give serial another socket path`);
  if (claimed !== 'free') {
    throw new SerialTargetError('cannot-open', `cannot take over the socket ${path} (${claimed.cannot}): remove it, or give serial another socket path`);
  }
  let open = true;
  const clients = new Set<Socket>();
  const server: Server = createServer((socket) => {
    if (!open) {
      socket.destroy();
      return;
    }
    clients.add(socket);
    log.info({ clients: clients.size }, 'serial socket: client connected');
    socket.on('data', (d: Buffer) => {
      if (!open) return; // the UART is gone
      input.send(d);
      // A client that types faster than the guest reads waits (as the console's writers do).
      if (input.pending() >= CONSOLE_INPUT_LIMIT) for (const c of clients) c.pause();
    });
    socket.on('error', () => socket.destroy());
    socket.once('close', () => clients.delete(socket));
  });
  try {
    await listenPrivate(server, path);
  } catch (err) {
    throw new SerialTargetError(
      'cannot-open',
      `cannot listen on ${path} for the serial port (${(err as NodeJS.ErrnoException).code}): give serial a socket path in a writable directory`,
      { cause: err },
    );
  }
  server.on('error', (err) => log.warn({ err, path }, 'serial socket error'));
  server.unref();
  // A client that does not read loses output, as one that is not connected does: the guest never waits for it.
  const batcher = new ByteBatcher(
    BATCH_BYTES,
    FLUSH_MS,
    (bytes) => {
      const chunk = Buffer.from(bytes); // one copy for every client
      for (const c of clients) if (c.writableLength < CLIENT_BACKLOG_LIMIT) c.write(chunk);
    },
    false,
  );
  return {
    get clients() {
      return clients.size;
    },
    inputTaken() {
      if (input.pending() < CONSOLE_INPUT_LIMIT) for (const c of clients) if (c.isPaused()) c.resume();
    },
    write(bytes) {
      if (open) batcher.add(bytes);
    },
    close() {
      if (!open) return;
      batcher.flush();
      open = false;
      // Each client gets the last output, then nothing more: what it types from now on goes nowhere.
      for (const c of clients) {
        c.removeAllListeners('data');
        c.end(() => c.destroy());
        c.unref(); // a client that never reads must not hold the process
        setTimeout(() => c.destroy(), CLOSE_GRACE_MS).unref();
      }
      server.close();
      // Under tsvmm's sandbox the process may not remove files any more: the socket then stays, and the next claim replaces it.
      try {
        unlinkSync(path);
      } catch (err) {
        log.debug({ err, path }, 'serial socket not removed');
      }
    },
  };
}
