/**
 * The CLI's side of the control socket (src/tools/api.ts): `tsvmm ls`,
 * `info`, `pause`, `resume`, `stop`.
 */
import { lstatSync, readdirSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { apiSocketDir, apiSocketPath } from './tools/api.js';
import { EscapeKeys } from './escape-keys.js';

export interface ApiReply {
  status: number;
  body: Record<string, unknown>;
}

/** A VM's socket: a NAME under the default directory, or a path. */
export function socketFor(nameOrPath: string): string {
  return nameOrPath.includes('/') ? nameOrPath : apiSocketPath(nameOrPath);
}

/**
 * Refuses a socket another user owns: what is typed into `tsvmm console`
 * (passwords too) must reach only one's own VM.
 */
function checkOwner(socketPath: string): void {
  const me = process.getuid?.();
  let uid: number;
  try {
    uid = lstatSync(socketPath).uid;
  } catch {
    return; // connecting says why (ENOENT, EACCES)
  }
  if (me !== undefined && me !== 0 && uid !== me) {
    throw Object.assign(new Error(`${socketPath} belongs to uid ${uid}, not to you: it is not your VM's socket`), { code: 'EREFUSED' });
  }
}

/** One request to the control socket at `socketPath`. */
export function apiRequest(socketPath: string, method: 'GET' | 'PUT', path: string, timeoutMs = 30_000): Promise<ApiReply> {
  return new Promise((resolve, reject) => {
    checkOwner(socketPath);
    const req = request({ socketPath, method, path, timeout: timeoutMs }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => {
        try {
          resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) as Record<string, unknown> });
        } catch (err) {
          reject(new Error(`${socketPath} answered with something that is not JSON`, { cause: err }));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`${socketPath} did not answer within ${timeoutMs / 1000} s`)));
    req.on('error', reject);
    req.end();
  });
}

/**
 * `tsvmm console NAME`: the terminal joined to the VM's console until
 * Ctrl-A x (or the end of stdin), which detaches and leaves the VM
 * running; resolves with the exit code (0 detached, 1 the VM ended or the
 * socket failed).
 */
export function attachConsole(socketPath: string): Promise<number> {
  return new Promise((resolve, reject) => {
    checkOwner(socketPath);
    const req = request({ socketPath, method: 'GET', path: '/vm/console', headers: { connection: 'upgrade', upgrade: 'tsvmm-console' } });
    req.on('error', reject);
    req.on('response', (res) => {
      res.resume();
      reject(
        Object.assign(new Error(res.statusCode === 409 ? `the VM at ${socketPath} has ended` : `${socketPath} refused the console (HTTP ${res.statusCode})`), {
          code: 'EREFUSED',
        }),
      );
    });
    req.on('upgrade', (_res, socket, head) => {
      const stdin = process.stdin;
      const raw = stdin.isTTY === true;
      if (raw) stdin.setRawMode(true);
      let detached = false;
      const finish = (code: number) => {
        stdin.off('data', onData);
        stdin.off('end', onStdinEnd);
        if (raw) stdin.setRawMode(false);
        stdin.pause();
        socket.destroy();
        resolve(code);
      };
      const keys = new EscapeKeys();
      const onData = (chunk: Buffer) => {
        const typed = keys.filter(chunk);
        if (typed.bytes.length > 0) socket.write(typed.bytes);
        if (typed.help) process.stderr.write('\r\ntsvmm: Ctrl-A x detaches, Ctrl-A Ctrl-A sends Ctrl-A\r\n');
        if (typed.quit) {
          detached = true;
          process.stderr.write('\r\ntsvmm: detached; the VM runs on\r\n');
          socket.end(() => finish(0));
        }
      };
      const onStdinEnd = () => {
        detached = true;
        socket.end(() => finish(0));
      };
      if (head.length > 0) process.stdout.write(head);
      socket.on('data', (d: Buffer) => process.stdout.write(d));
      socket.on('close', () => {
        if (!detached) {
          process.stderr.write('\r\ntsvmm: the VM ended\r\n');
          finish(1);
        }
      });
      socket.on('error', () => socket.destroy());
      stdin.on('data', onData);
      stdin.on('end', onStdinEnd);
      stdin.resume();
      if (raw) process.stderr.write('tsvmm: attached; Ctrl-A x detaches\r\n');
    });
    req.end();
  });
}

/** Why a socket could not be reached, in words and with the fix. */
export function unreachable(socketPath: string, err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'EREFUSED':
      return err.message;
    case 'ENOENT':
      return `no VM serves ${socketPath}: check the name with tsvmm ls (a VM has a socket when started with --name or --api-socket)`;
    case 'EACCES':
      return `no permission to use ${socketPath}: only the user who started the VM may`;
    case 'ECONNREFUSED':
      return `${socketPath} is left from a VM that ended: nothing answers there`;
    case 'ECONNRESET':
      return `${socketPath} refused this connection: only the user who started the VM may use it`;
    default:
      return `cannot reach ${socketPath}: ${err.message}`;
  }
}

/** The sockets under the default directory, by VM name. */
export function listSockets(): Array<{ name: string; path: string }> {
  let entries: string[];
  try {
    entries = readdirSync(apiSocketDir());
  } catch {
    return [];
  }
  return entries
    .filter((e) => e.endsWith('.sock'))
    .sort()
    .map((e) => ({ name: e.slice(0, -'.sock'.length), path: join(apiSocketDir(), e) }));
}
