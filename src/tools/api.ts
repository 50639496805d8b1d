/**
 * The control socket: JSON over HTTP on a Unix socket, for operators and
 * scripts outside the VMM's process (`tsvmm ls`, `info`, `pause`,
 * `resume`, `stop`). Only the socket's owner may use it: the socket is
 * created mode 0600 in a directory of mode 0700, and every connection's
 * peer uid (SO_PEERCRED) must be this process's uid.
 *
 *   GET  /vm          {"name","pid","state","startedAt","config"}
 *   GET  /vm/stats    the VM's stats()
 *   PUT  /vm/pause    {"state":"paused"}
 *   PUT  /vm/resume   {"state":"running"}
 *   PUT  /vm/stop     {"state":"ended","outcome":{...}} once the VM has ended
 *   GET  /vm/console  with `Upgrade: tsvmm-console`: after 101, the raw
 *                     console both ways (guest output out, input in)
 *
 * Errors: 400 (the VM's state does not allow it: {"error","code"}), 404,
 * 405.
 */
import { lstatSync, mkdirSync, unlinkSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { TsvmmError } from '../base/errors.js';
import { claimSocketPath, listenPrivate } from '../base/unix-socket.js';
import { VmStateError, type VirtualMachine } from '../vmm/machine.js';
import type { VmConfig } from '../vm.js';

/** How long close() lets unfinished requests run before it cuts them. */
const CLOSE_GRACE_MS = 2000;

/** A control socket that cannot be set up. */
export class ApiSocketError extends TsvmmError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_TSVMM_API_SOCKET', message, options);
  }
}

/** Where VMs started with a name put their sockets: $XDG_RUNTIME_DIR/tsvmm, else /tmp/tsvmm-<uid>. */
export function apiSocketDir(): string {
  const runtime = process.env.XDG_RUNTIME_DIR;
  return runtime ? join(runtime, 'tsvmm') : join('/tmp', `tsvmm-${process.getuid?.() ?? 0}`);
}

/** The default socket of a VM named `name`. */
export function apiSocketPath(name: string): string {
  return join(apiSocketDir(), `${name}.sock`);
}

export interface ApiServerOptions {
  /** The uid of the peer at the other end of a connection (SO_PEERCRED); undefined when it cannot be told. */
  peerUid: (socket: Socket) => number | undefined;
}

/** Serves `vm` on a Unix socket at `path` until {@link ApiServer.close} (which removes the socket). */
export class ApiServer {
  private constructor(
    private readonly server: Server,
    readonly path: string,
    private readonly attached: Set<Socket>,
  ) {}

  static async listen(vm: VirtualMachine, path: string, options: ApiServerOptions): Promise<ApiServer> {
    const dir = dirname(path);
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 });
    } catch (err) {
      throw new ApiSocketError(`cannot create the directory ${dir} for the control socket (${(err as NodeJS.ErrnoException).code})`, { cause: err });
    }
    // A directory someone else made (another user can create /tmp/tsvmm-<uid> first) could hold their socket.
    const d = lstatSync(dir);
    const me = process.getuid?.();
    if (!d.isDirectory() || (me !== undefined && d.uid !== me) || (d.mode & 0o077) !== 0) {
      throw new ApiSocketError(
        `${dir} must be a directory of this user's with mode 0700 (it is ${d.isSymbolicLink() ? 'a symbolic link' : `owned by uid ${d.uid}, mode ${(d.mode & 0o777).toString(8)}`}): remove it, or give --api-socket another path`,
      );
    }
    const claimed = await claimSocketPath(path);
    if (claimed === 'not-a-socket') throw new ApiSocketError(`${path} exists and is not a socket: choose another --api-socket path`);
    if (claimed === 'in-use') throw new ApiSocketError(`a VM already serves ${path}: give this one another --name or --api-socket`);
    if (claimed !== 'free') throw new ApiSocketError(`cannot take over the socket ${path} (${claimed.cannot}): remove it, or give --api-socket another path`);
    const started = new Date().toISOString();
    const attached = new Set<Socket>();
    const server = createServer((req, res) => {
      void handle(vm, req, res, started).catch((err: unknown) => send(res, 500, { error: String((err as Error).message ?? err) }));
    });
    server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
      attached.add(socket);
      socket.once('close', () => attached.delete(socket));
      attachConsole(vm, req, socket, head);
    });
    server.on('connection', (socket: Socket) => {
      const uid = options.peerUid(socket);
      if (me !== undefined && uid !== me) socket.destroy();
    });
    try {
      await listenPrivate(server, path);
    } catch (err) {
      throw new ApiSocketError(`cannot listen on ${path} (${(err as NodeJS.ErrnoException).code})`, { cause: err });
    }
    server.unref();
    return new ApiServer(server, path, attached);
  }

  /** Stops serving (ending every connection, attached consoles too) and removes the socket. */
  async close(): Promise<void> {
    // A request the VM's end answers (PUT /vm/stop) gets its answer out first.
    await new Promise((r) => setImmediate(r));
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server.closeIdleConnections();
    for (const s of this.attached) s.destroy();
    // A client that keeps a request open does not hold the VMM for long.
    const grace = setTimeout(() => this.server.closeAllConnections(), CLOSE_GRACE_MS);
    await closed;
    clearTimeout(grace);
    try {
      unlinkSync(this.path);
    } catch {
      // already gone
    }
  }
}

/** Output an attached client has not taken beyond which it is dropped: a stuck client must not grow the VMM. */
const ATTACH_BACKLOG_LIMIT = 1024 * 1024;

/** `GET /vm/console` with `Upgrade: tsvmm-console`: the console as a raw byte stream until either side closes. */
function attachConsole(vm: VirtualMachine, req: IncomingMessage, socket: Socket, head: Buffer): void {
  if (req.url !== '/vm/console' || req.headers.upgrade?.toLowerCase() !== 'tsvmm-console') {
    socket.end('HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
    return;
  }
  if (vm.state === 'ended') {
    socket.end('HTTP/1.1 409 Conflict\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
    return;
  }
  socket.write('HTTP/1.1 101 Switching Protocols\r\nupgrade: tsvmm-console\r\nconnection: upgrade\r\n\r\n');
  const onOutput = (chunk: Buffer) => {
    if (socket.writableLength > ATTACH_BACKLOG_LIMIT) socket.destroy();
    else socket.write(chunk);
  };
  const onEnd = () => socket.end();
  vm.console.on('data', onOutput);
  vm.console.once('end', onEnd);
  if (head.length > 0) vm.console.write(head);
  // Input waits while the guest is behind (the console holds a write until it reads below its limit).
  socket.on('data', (d: Buffer) => {
    if (!vm.console.write(d)) {
      socket.pause();
      vm.console.once('drain', () => socket.resume());
    }
  });
  socket.on('error', () => socket.destroy());
  socket.once('close', () => {
    vm.console.off('data', onOutput);
    vm.console.off('end', onEnd);
  });
}

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = `${JSON.stringify(body, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}\n`;
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

/** The VM's configuration as JSON can carry it: no logger or observers, and bytes given for a kernel or initrd named by their size. */
export function plainConfig(c: VirtualMachine['config']): Record<string, unknown> {
  const { logger: _logger, observers: _observers, ...rest } = c as VmConfig;
  const bytes = (v: string | Uint8Array | undefined) => (v === undefined || typeof v === 'string' ? v : `(${v.length} bytes)`);
  return { ...rest, kernel: bytes(rest.kernel), ...(rest.initrd !== undefined ? { initrd: bytes(rest.initrd) } : {}) };
}

async function handle(vm: VirtualMachine, req: IncomingMessage, res: ServerResponse, startedAt: string): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://tsvmm');
  const route = `${req.method} ${url.pathname}`;
  const config = plainConfig(vm.config);
  try {
    switch (route) {
      case 'GET /vm':
        return send(res, 200, { name: vm.config.name ?? 'tsvmm', pid: process.pid, state: vm.state, startedAt, config });
      case 'GET /vm/stats':
        return send(res, 200, vm.stats());
      case 'PUT /vm/pause':
        await vm.pause();
        return send(res, 200, { state: vm.state });
      case 'PUT /vm/resume':
        vm.resume();
        return send(res, 200, { state: vm.state });
      case 'PUT /vm/stop': {
        const outcome = await vm.stop('stopped through the control socket');
        const { error: _error, ...plain } = outcome;
        return send(res, 200, { state: vm.state, outcome: plain });
      }
      default:
        if (['/vm', '/vm/stats', '/vm/pause', '/vm/resume', '/vm/stop'].includes(url.pathname))
          return send(res, 405, { error: `${req.method} is not allowed on ${url.pathname}` });
        return send(res, 404, { error: `no such endpoint: ${url.pathname}` });
    }
  } catch (err) {
    if (err instanceof VmStateError) return send(res, 400, { error: err.message, code: err.code });
    throw err;
  }
}
