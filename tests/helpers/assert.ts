/** Assertions shared by test files (vitest only: bench/ uses the other helpers outside vitest). */
import { expect } from 'vitest';

/** Asserts stderr is exactly one line starting with "tsvmm: ", and returns it. */
export function oneLine(stderr: string): string {
  const lines = stderr.trim().split('\n');
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/^tsvmm: /);
  return lines[0]!;
}
