/** Disk images for boot tests: real ext4 made by mkfs, read back with debugfs. */
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fixtures } from '../../fixtures/index.js';

/** An ext4 image holding `files`, made with the fixtures' mkfs wrapper (mkfs.ext4 -d). */
export function makeExt4(dir: string, name: string, files: Record<string, Uint8Array>, sizeMiB = 32): string {
  const src = join(dir, `${name}-src`);
  mkdirSync(src, { recursive: true });
  for (const [file, data] of Object.entries(files)) writeFileSync(join(src, file), data);
  const image = join(dir, `${name}.img`);
  execFileSync(fixtures().makeExt4, [src, image, String(sizeMiB)], { stdio: 'pipe' });
  return image;
}

/** A file out of an ext4 image, read on the host with debugfs (no mount, no root). */
export function debugfsCat(image: string, path: string): Buffer {
  return execFileSync('debugfs', ['-R', `cat ${path}`, image], { stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 64 << 20 });
}
