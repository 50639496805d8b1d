// A vitest reporter for the emulated AMD-V host: as each test file ends it
// writes the file's state (passed, failed, skipped) to a file named after
// it in $TSVMM_AMDV_RECORD (run.sh's --results share). suite.sh reads these
// back when L1 itself dies mid-run, to re-run in a fresh L1 only the files
// that had not ended. It reports nothing itself (the default reporter does).
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import type { Reporter, TestModule } from 'vitest/node';

export default class Recorder implements Reporter {
  private readonly dir = process.env.TSVMM_AMDV_RECORD;

  onTestModuleEnd(module: TestModule): void {
    if (!this.dir) return;
    mkdirSync(this.dir, { recursive: true });
    const file = relative(process.cwd(), module.moduleId);
    writeFileSync(join(this.dir, recordName(file)), `${module.state()} ${file}\n`);
  }
}

/** The record's name for a test file: its path with '/' as '__'. */
export function recordName(file: string): string {
  return `${file.replaceAll('/', '__')}.state`;
}
