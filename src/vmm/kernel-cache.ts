/**
 * The kernel cache: bzImage payloads decompressed on the host, kept on disk
 * under the SHA-256 of the compressed payload, so that the next boot of the
 * same kernel reads the result instead of decompressing again (an xz
 * distribution kernel takes hundreds of milliseconds to decompress).
 *
 * A cache never fails a boot: an entry that cannot be read or written is a
 * miss, logged at debug level. Entries are written to a temporary file and
 * renamed into place, so a reader sees a whole entry or none, and several
 * processes may share the directory; an entry whose size is not the size
 * the payload says is ignored. The directory keeps the newest
 * {@link KernelCache.maxEntries} entries (by last use).
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rename, stat, unlink, utimes, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import type { PayloadCache } from '../arch/boot/decompress.js';
import { silentLogger, type Logger } from '../base/log.js';

const SUFFIX = '.vmlinux';
/** A temporary file older than this was left by a process that died while writing. */
const STALE_TMP_MS = 60 * 60 * 1000;

/** `$TSVMM_CACHE/kernels`, else `$XDG_CACHE_HOME/tsvmm/kernels`, else `~/.cache/tsvmm/kernels`. */
export function defaultKernelCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.TSVMM_CACHE) return join(env.TSVMM_CACHE, 'kernels');
  return join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'tsvmm', 'kernels');
}

export class KernelCache implements PayloadCache {
  constructor(
    readonly dir: string,
    private readonly log: Logger = silentLogger,
    readonly maxEntries = 8,
  ) {}

  private path(key: string): string {
    if (!/^[0-9a-f]{64}$/.test(key)) throw new Error(`not a SHA-256 key: ${key}`);
    return join(this.dir, key + SUFFIX);
  }

  async get(key: string, size: number): Promise<Uint8Array | undefined> {
    const path = this.path(key);
    try {
      const st = await stat(path);
      if (st.size % 2 ** 32 !== size) {
        this.log.debug({ path, size: st.size, expected: size }, 'kernel cache: entry of the wrong size, ignored');
        return undefined;
      }
      const data = await readFile(path);
      // Its last use, which pruning goes by.
      const now = new Date();
      await utimes(path, now, now).catch(() => {});
      return data;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.log.debug({ path, err: (err as Error).message }, 'kernel cache: entry unreadable, ignored');
      return undefined;
    }
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    const path = this.path(key);
    const tmp = join(this.dir, `.${key}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
    try {
      await mkdir(this.dir, { recursive: true });
      await writeFile(tmp, data);
      await rename(tmp, path);
    } catch (err) {
      this.log.debug({ dir: this.dir, err: (err as Error).message }, 'kernel cache: entry not written');
      await unlink(tmp).catch(() => {});
      return;
    }
    await this.prune().catch((err: Error) => this.log.debug({ dir: this.dir, err: err.message }, 'kernel cache: not pruned'));
  }

  /** Removes all but the newest maxEntries entries, and temporary files left by dead writers. */
  private async prune(): Promise<void> {
    const names = await readdir(this.dir);
    const entries: Array<{ path: string; mtime: number }> = [];
    const now = Date.now();
    for (const name of names) {
      const path = join(this.dir, name);
      const st = await stat(path).catch(() => undefined);
      if (!st?.isFile()) continue;
      if (name.endsWith('.tmp') && name.startsWith('.')) {
        if (now - st.mtimeMs > STALE_TMP_MS) await unlink(path).catch(() => {});
      } else if (name.endsWith(SUFFIX)) {
        entries.push({ path, mtime: st.mtimeMs });
      }
    }
    entries.sort((a, b) => b.mtime - a.mtime);
    for (const e of entries.slice(this.maxEntries)) await unlink(e.path).catch(() => {});
  }
}
