/**
 * The layers of src/ (README, "Design"): each module imports only from its
 * own layer and those below it. Type-only imports count too: a type from a
 * layer above is a dependency on that layer all the same.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const SRC = resolve(dirname(fileURLToPath(import.meta.url)), '../../src');

/** Lowest first. A module's layer is the first whose prefix its path (relative to src/) starts with. */
const LAYERS: ReadonlyArray<{ name: string; paths: string[] }> = [
  { name: 'base', paths: ['base/'] },
  { name: 'kvm', paths: ['kvm/'] },
  { name: 'arch', paths: ['arch/'] },
  { name: 'devices', paths: ['devices/', 'virtio/'] },
  { name: 'vmm', paths: ['vmm/'] },
  { name: 'entry', paths: ['tools/', 'vm.ts', 'index.ts', 'cli.ts', 'config-file.ts', 'api-client.ts', 'escape-keys.ts'] },
  { name: 'testing', paths: ['testing/'] },
];

function layerOf(path: string): number {
  const i = LAYERS.findIndex((l) => l.paths.some((p) => (p.endsWith('/') ? path.startsWith(p) : path === p)));
  if (i < 0) throw new Error(`src/${path} is in no layer: add its folder to LAYERS in tests/unit/layers.test.ts and to the README's map`);
  return i;
}

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((e) => {
    const p = join(dir, e);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

/** Every relative import and re-export of a file, static or dynamic, as paths relative to src/. */
function importsOf(file: string, text = readFileSync(file, 'utf8')): string[] {
  const specs = [...text.matchAll(/(?:^|[\s;])(?:import|export)\b[^'"`;]*?\bfrom\s*['"]([^'"]+)['"]|\bimport\s*\(\s*['"]([^'"]+)['"]\s*\)/gm)];
  return specs
    .map((m) => m[1] ?? m[2]!)
    .filter((s) => s.startsWith('.'))
    .map((s) => relative(SRC, resolve(dirname(file), s.replace(/\.js$/, '.ts'))));
}

describe('layers', () => {
  const files = sources(SRC);

  it('finds the modules and their imports', () => {
    expect(files.length).toBeGreaterThan(50);
    expect(
      importsOf(join(SRC, 'vmm/x.ts'), "import { a } from '../base/bus.js';\nexport type { B } from './y.js';\nconst c = await import('../kvm/z.js');"),
    ).toEqual(['base/bus.ts', 'vmm/y.ts', 'kvm/z.ts']);
  });

  it('puts every module in a layer', () => {
    for (const f of files) expect(() => layerOf(relative(SRC, f))).not.toThrow();
  });

  it('never imports from a layer above', () => {
    const violations: string[] = [];
    for (const f of files) {
      const from = relative(SRC, f);
      for (const to of importsOf(f)) {
        if (layerOf(to) > layerOf(from)) violations.push(`${from} (${LAYERS[layerOf(from)]!.name}) imports ${to} (${LAYERS[layerOf(to)]!.name})`);
      }
    }
    expect(violations).toEqual([]);
  });
});
