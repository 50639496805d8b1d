/**
 * The package a Node user installs: `npm pack` makes a tarball that holds
 * the linux-x64 prebuild of the addon, and installing it where no compiler
 * exists (a mount namespace with the compilers and make hidden) gives a
 * working `npx tsvmm run`.
 *
 * The tarball is made from a copy of the tracked files, so the rebuild
 * that prebuildify does never touches the build/ other tests load from.
 * Not part of the emulated-host suite: packaging is the host's business.
 */
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { promisify } from 'node:util';
import { cpSync, mkdirSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildPrintAndHaltKernel } from '../../src/testing/index.js';
import { kvmUnavailable, REPO } from '../helpers/guest.js';
import { useTempDir } from '../helpers/assert.js';

/** Why the test cannot hide the compilers here, or undefined when it can. */
function noNamespace(): string | undefined {
  const r = spawnSync('unshare', ['--mount', 'true']);
  return r.status === 0
    ? undefined
    : `unshare --mount is not permitted here (${r.stderr.toString().trim() || r.error?.message}): the no-compiler install needs a mount namespace`;
}

const skip = kvmUnavailable() ?? noNamespace();
const run = promisify(execFile);

/** Compilers and build tools a source build of the addon needs: hidden in the namespace. */
const HIDDEN = ['/usr/bin/make', '/usr/bin/cc', '/usr/bin/c++', '/usr/bin/gcc', '/usr/bin/g++'];

describe.skipIf(skip !== undefined)(`npm pack${skip ? ` (skipped: ${skip})` : ''}`, () => {
  const dir = useTempDir('tsvmm-pack-');

  it(
    'makes a tarball with the prebuild, which installs and runs a VM without a compiler',
    async () => {
      // A copy of the tracked files, with the repository's dependencies.
      const src = join(dir.path, 'src');
      for (const f of execFileSync('git', ['ls-files'], { cwd: REPO, encoding: 'utf8' }).split('\n').filter(Boolean)) {
        mkdirSync(dirname(join(src, f)), { recursive: true });
        cpSync(join(REPO, f), join(src, f));
      }
      symlinkSync(join(REPO, 'node_modules'), join(src, 'node_modules'));
      const out = join(dir.path, 'out');
      mkdirSync(out);
      const { stdout: packed } = await run('npm', ['pack', '--json', '--pack-destination', out], { cwd: src, encoding: 'utf8' });
      const info = JSON.parse(packed.slice(packed.indexOf('['))) as Array<{ filename: string; files: Array<{ path: string }> }>;
      const files = info[0]!.files.map((f) => f.path);
      expect(files.some((f) => /^prebuilds\/linux-x64\/.*\.node$/.test(f))).toBe(true);
      expect(files).toContain('dist/index.js');
      expect(files).toContain('dist/testing/index.js');
      expect(files).toContain('bin/tsvmm.js');
      expect(files.filter((f) => f.startsWith('tests/') || f.startsWith('build/'))).toEqual([]);
      const tarball = join(out, info[0]!.filename);

      // A project that depends on the tarball, installed where nothing can compile.
      const project = join(dir.path, 'project');
      mkdirSync(project);
      writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'uses-tsvmm', version: '1.0.0', private: true }));
      const kernel = join(dir.path, 'print-ok.elf');
      writeFileSync(kernel, buildPrintAndHaltKernel('hello from the packed tsvmm\n'));
      const script = [
        'set -e',
        'mount -t tmpfs none /usr/lib/gcc',
        ...HIDDEN.map((f) => `[ -e ${f} ] && mount --bind /dev/null ${f}`),
        // The check that the namespace is what it claims: no compiler, no make.
        'if g++ --version >/dev/null 2>&1 || make --version >/dev/null 2>&1; then echo "a compiler is still reachable" >&2; exit 99; fi',
        `npm install --prefer-offline --no-audit --no-fund ${JSON.stringify(tarball)}`,
        'ls node_modules/tsvmm/build 2>/dev/null && { echo "the install built the addon from source" >&2; exit 98; }',
        'npx tsvmm --version',
        // The kernel prints and halts: --expect-exit ends the run once it printed.
        `npx tsvmm run --kernel ${JSON.stringify(kernel)} --memory 32M --expect 'hello from the packed tsvmm' --expect-exit --timeout 5m`,
      ].join('\n');
      const r = await run('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], {
        cwd: project,
        encoding: 'utf8',
        timeout: 10 * 60_000,
      }).then(
        (o) => ({ ...o, status: 0 }),
        (err: { code?: number; stdout?: string; stderr?: string }) => ({ status: err.code ?? -1, stdout: err.stdout ?? '', stderr: err.stderr ?? String(err) }),
      );
      expect(r.stderr).not.toMatch(/a compiler is still reachable|built the addon from source/);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/^\d+\.\d+\.\d+$/m);
      expect(r.stdout).toContain('hello from the packed tsvmm');
      expect(readdirSync(join(project, 'node_modules', 'tsvmm', 'prebuilds', 'linux-x64')).some((f) => f.endsWith('.node'))).toBe(true);
    },
    15 * 60_000,
  );
});
