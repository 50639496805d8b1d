/**
 * Locates the test fixtures built by `npm run fixtures` (fixtures/build-all.sh).
 *
 * The build writes everything outside the repository, in
 * `${TSVMM_CACHE:-~/.cache/tsvmm}/fixtures`, and lists the results in
 * `manifest.json` there. See fixtures/README.md for what each file is.
 */
import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Absolute paths (and a few facts) from `fixtures/manifest.json`. */
export interface Fixtures {
  /** Test kernel, bzImage with a gzip payload (the default build). */
  readonly bzImage: string;
  /** The same kernel, bzImage with an xz payload. */
  readonly bzImageXz: string;
  /** The same kernel, bzImage with a zstd payload. */
  readonly bzImageZstd: string;
  /** The same kernel as an uncompressed ELF with symbols and a PVH entry note. */
  readonly vmlinux: string;
  /**
   * The same configuration built from unpatched Linux (no stranded-SYSCALL
   * patch), gzip bzImage: boots only on hardware-virtualised KVM.
   */
  readonly stockBzImage: string;
  /** System.map of the stock kernel. */
  readonly stockSystemMap: string;
  /** System.map of that kernel (symbol addresses, for RIP sampling). */
  readonly systemMap: string;
  /** The kernel's full .config. */
  readonly kernelConfig: string;
  /** `make kernelrelease` of that kernel, for example "6.1.192". */
  readonly kernelRelease: string;
  /** initramfs.cpio.gz: busybox and an /init that prints TSVMM-INIT-OK. */
  readonly initramfs: string;
  /** rootfs.ext4: 64 MiB ext4 with busybox and an /sbin/init that prints TSVMM-ROOTFS-OK. */
  readonly rootfs: string;
  /** The static busybox binary packed into both. */
  readonly busybox: string;
  /** fixtures/make-ext4.sh: `make-ext4.sh SRC_DIR IMAGE SIZE_MIB` makes a disk at test time. */
  readonly makeExt4: string;
  /**
   * Debian's own distribution kernel (linux-image-6.1.0-*-amd64), the
   * unmodified bzImage (xz payload, virtio drivers as modules). Boots only on
   * hardware-virtualised KVM (tests/hosts/amdv/run.sh gives one).
   */
  readonly distroKernel: string;
  /**
   * initramfs.cpio.gz for `distroKernel`: busybox, the package's virtio and
   * pvpanic modules, and an /init that insmods them (printing
   * `insmod FAIL <name>` per failure and
   * `TSVMM-DISTRO-MODULES loaded=<n> failed=<n>`), prints
   * TSVMM-DISTRO-INIT-OK and starts the shell as `initramfs` does.
   */
  readonly distroInitramfs: string;
  /** `uname -r` of `distroKernel`, for example "6.1.0-57-amd64". */
  readonly distroRelease: string;
}

const REQUIRED_PATHS = [
  'bzImage',
  'bzImageXz',
  'bzImageZstd',
  'vmlinux',
  'stockBzImage',
  'stockSystemMap',
  'systemMap',
  'kernelConfig',
  'initramfs',
  'rootfs',
  'busybox',
  'makeExt4',
  'distroKernel',
  'distroInitramfs',
] as const satisfies readonly (keyof Fixtures)[];

/** The tsvmm cache directory: `$TSVMM_CACHE`, or `~/.cache/tsvmm`. */
export function cacheDir(): string {
  const fromEnv = process.env['TSVMM_CACHE'];
  return fromEnv !== undefined && fromEnv !== '' ? fromEnv : join(homedir(), '.cache', 'tsvmm');
}

/** Path of the manifest written by fixtures/build-all.sh. */
export function manifestPath(): string {
  return join(cacheDir(), 'fixtures', 'manifest.json');
}

let cached: { path: string; fixtures: Fixtures } | undefined;

/**
 * Reads the fixture manifest.
 *
 * @throws Error when the manifest is missing or names a file that is gone:
 *   run `npm run fixtures` to build them.
 */
export function fixtures(): Fixtures {
  const path = manifestPath();
  if (cached?.path === path) return cached.fixtures;
  if (!existsSync(path)) {
    throw new Error(`test fixtures not built: ${path} is missing; run \`npm run fixtures\``);
  }
  const raw = JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
  for (const key of [...REQUIRED_PATHS, 'kernelRelease', 'distroRelease'] as const) {
    if (typeof raw[key] !== 'string') {
      throw new Error(`${path}: "${key}" is missing or not a string; run \`npm run fixtures\``);
    }
  }
  // The mkfs wrapper is this checkout's own script, not the one of whichever
  // checkout last wrote the shared manifest.
  const result = { ...(raw as unknown as Fixtures), makeExt4: join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'fixtures', 'make-ext4.sh') };
  // A cleaned cache with a stale manifest would otherwise fail far from here.
  for (const key of REQUIRED_PATHS) {
    if (!existsSync(result[key])) {
      throw new Error(`${path}: ${key} ${result[key]} does not exist; run \`npm run fixtures\``);
    }
  }
  cached = { path, fixtures: result };
  return result;
}
