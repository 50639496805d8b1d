// A vitest reporter for the emulated AMD-V host: as each test file ends it
// writes the file's state (passed, failed, skipped) to a file named after
// it in $TSVMM_AMDV_RECORD (run.sh's --results share). suite.sh reads these
// back when L1 itself dies mid-run, to re-run in a fresh L1 only the files
// that had not ended, and prints each failed test's first error line at the
// end of its summary: the part of a long CI log that is kept. It reports
// nothing itself (the default reporter does).
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import type { Reporter, TestModule } from 'vitest/node';

/** How much of a failed test's first error line the record keeps. */
const ERROR_CHARS = 300;

export default class Recorder implements Reporter {
  private readonly dir = process.env.TSVMM_AMDV_RECORD;

  onTestModuleEnd(module: TestModule): void {
    if (!this.dir) return;
    mkdirSync(this.dir, { recursive: true });
    const file = relative(process.cwd(), module.moduleId);
    const lines = [`${module.state()} ${file}`];
    for (const e of module.errors()) lines.push(`  (the file): ${firstLine(e.message)}`);
    for (const test of module.children.allTests()) {
      const r = test.result();
      if (r.state !== 'failed') continue;
      lines.push(`  ${test.fullName}: ${firstLine(r.errors?.[0]?.message)}`);
    }
    writeFileSync(join(this.dir, recordName(file)), `${lines.join('\n')}\n`);
  }
}

function firstLine(message: string | undefined): string {
  const line = (message ?? 'no error message').split('\n', 1)[0] ?? '';
  return line.length > ERROR_CHARS ? `${line.slice(0, ERROR_CHARS)}...` : line;
}

/** The record's name for a test file: its path with '/' as '__'. */
export function recordName(file: string): string {
  return `${file.replaceAll('/', '__')}.state`;
}
