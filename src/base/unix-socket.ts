/**
 * Unix sockets a VMM serves (the control socket, a serial port): a path
 * claimed from a process that died, and a socket only its owner can
 * connect to.
 */
import { existsSync, lstatSync, unlinkSync } from 'node:fs';
import { connect, type Server } from 'node:net';

/**
 * Makes `path` free for a new socket: a socket nobody answers on (left by
 * a process that died) is removed. Says 'not-a-socket' or 'in-use' when
 * the path cannot be taken.
 */
export async function claimSocketPath(path: string): Promise<'free' | 'not-a-socket' | 'in-use'> {
  if (!existsSync(path)) return 'free';
  if (!lstatSync(path).isSocket()) return 'not-a-socket';
  if (await answers(path)) return 'in-use';
  unlinkSync(path);
  return 'free';
}

/** `server` listening on `path`, a socket born mode 0600 (connecting needs write permission on it). Rejects with the listen error. */
export async function listenPrivate(server: Server, path: string): Promise<void> {
  const umask = process.umask(0o177);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => {
        server.off('error', reject);
        resolve();
      });
    });
  } finally {
    process.umask(umask);
  }
}

/** Whether something answers on the socket at `path`. */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
