/** Assertions shared by test files (vitest only: bench/ uses the other helpers outside vitest). */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect } from 'vitest';

/** Asserts stderr is exactly one line starting with "tsvmm: ", and returns it. */
export function oneLine(stderr: string): string {
  const lines = stderr.trim().split('\n');
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/^tsvmm: /);
  return lines[0]!;
}

/**
 * `p`, or a rejection with `message()` once `ms` have passed without it: a
 * hang guard that names what hung.
 */
export function withTimeout<T>(p: Promise<T>, ms: number, message: () => string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const guard = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(message())), ms);
  });
  return Promise.race([p, guard]).finally(() => clearTimeout(timer));
}

/**
 * A temporary directory for the test file that calls this at its top
 * level: made before its tests, removed with everything in it after them.
 * `path` is valid inside tests and hooks.
 */
export function useTempDir(prefix: string): { readonly path: string } {
  const dir = { path: '' };
  beforeAll(() => {
    dir.path = mkdtempSync(join(tmpdir(), prefix));
  });
  afterAll(() => {
    rmSync(dir.path, { recursive: true, force: true });
  });
  return dir;
}
