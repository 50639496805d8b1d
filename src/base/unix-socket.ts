/**
 * Unix sockets a VMM serves (the control socket, a serial port): a path
 * claimed from a process that died, and a socket only its owner can
 * connect to.
 */
import { chmodSync, existsSync, lstatSync, unlinkSync } from 'node:fs';
import { connect, type Server } from 'node:net';
import { isMainThread } from 'node:worker_threads';

/** What {@link claimSocketPath} found: free now, or why the path cannot be taken (`cannot`: the errno). */
export type SocketClaim = 'free' | 'not-a-socket' | 'in-use' | { cannot: string };

/**
 * Makes `path` free for a new socket: a socket that refuses connections
 * (left by a process that died) is removed. Says 'not-a-socket', 'in-use'
 * (something answers there), or `{ cannot }` when the socket could not be
 * tried (another user's: EACCES) or removed.
 */
export async function claimSocketPath(path: string): Promise<SocketClaim> {
  if (!existsSync(path)) return 'free';
  if (!lstatSync(path).isSocket()) return 'not-a-socket';
  const tried = await tryConnect(path);
  if (tried === 'answers') return 'in-use';
  if (tried !== 'ECONNREFUSED') return { cannot: tried };
  try {
    unlinkSync(path);
  } catch (err) {
    return { cannot: (err as NodeJS.ErrnoException).code ?? String(err) };
  }
  return 'free';
}

/**
 * `server` listening on `path`, a socket of mode 0600 (connecting needs
 * write permission on it). The socket is bound with umask 0177 where the
 * process may set its umask (the main thread: the bind happens inside
 * listen(), so the umask is back at once), and made 0600 in any case.
 * Rejects with the listen error.
 */
export async function listenPrivate(server: Server, path: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    const umask = isMainThread ? process.umask(0o177) : undefined;
    try {
      server.listen(path, () => {
        server.off('error', reject);
        resolve();
      });
    } finally {
      if (umask !== undefined) process.umask(umask);
    }
  });
  chmodSync(path, 0o600);
}

/** 'answers', or the errno of the failed connect. */
function tryConnect(path: string): Promise<'answers' | string> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve('answers');
    });
    s.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? String(err)));
  });
}
