#!/usr/bin/env node
// boot-loop.mjs [--runs N] [--cpus N] [--vmm tsvmm|qemu] [--out DIR]
//
// Boots the test kernel and initramfs N times, one after another, to the
// shell, checks /sys/devices/system/cpu/online there and ends the guest;
// prints one line per boot and the count of failures, and keeps each
// failed boot's console in DIR. For measuring how often a host's SMP boots
// fail (tests/hosts/amdv/README.md): run two at once in one L1 to load it,
//   tests/hosts/amdv/run.sh --results /tmp/loop -- bash -c \
//     'node tests/hosts/amdv/boot-loop.mjs --cpus 4 --out /tmp/loop & node tests/hosts/amdv/boot-loop.mjs --cpus 2 --out /tmp/loop; wait'
// With --vmm qemu the same boots run under qemu-system-x86_64 -M pc -enable-kvm.
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '10' },
    cpus: { type: 'string', default: '4' },
    vmm: { type: 'string', default: 'tsvmm' },
    out: { type: 'string', default: '/tmp/boot-loop' },
  },
});
const cache = process.env.TSVMM_CACHE ?? join(homedir(), '.cache', 'tsvmm');
const fx = JSON.parse(readFileSync(join(cache, 'fixtures', 'manifest.json'), 'utf8'));
const cmdline = 'console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd';
const cli = new URL('../../../bin/tsvmm.js', import.meta.url).pathname;
const argv =
  values.vmm === 'qemu'
    ? [
        'qemu-system-x86_64',
        '-M',
        'pc',
        '-enable-kvm',
        '-cpu',
        'host',
        '-m',
        '128M',
        '-smp',
        values.cpus,
        '-nodefaults',
        '-no-user-config',
        '-display',
        'none',
        '-no-reboot',
        '-serial',
        'stdio',
        '-kernel',
        fx.bzImage,
        '-initrd',
        fx.initramfs,
        '-append',
        cmdline,
      ]
    : [process.execPath, cli, 'run', '--kernel', fx.bzImage, '--initrd', fx.initramfs, '--memory', '128M', '--cpus', values.cpus, '--cmdline', cmdline];
mkdirSync(values.out, { recursive: true });
let fails = 0;
const runs = Number(values.runs);
for (let i = 0; i < runs; i++) {
  const t0 = performance.now();
  const child = spawn(argv[0], argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  let typed = false;
  child.stdout.on('data', (d) => {
    out += d;
    if (!typed && /TSVMM-INIT-OK[\s\S]*# /.test(out)) {
      typed = true;
      child.stdin.write('echo "@@ON""LINE $(cat /sys/devices/system/cpu/online)"; reboot -f\n');
    }
  });
  child.stderr.on('data', (d) => (err += d));
  const guard = setTimeout(() => child.kill('SIGKILL'), 180_000);
  const [code, signal] = await new Promise((resolve) => child.on('exit', (c, s) => resolve([c, s])));
  clearTimeout(guard);
  const ok = new RegExp(`@@ONLINE 0-${Number(values.cpus) - 1}\\b`).test(out) && /reboot: Restarting/.test(out);
  if (!ok) {
    fails++;
    writeFileSync(join(values.out, `${values.vmm}-${values.cpus}-${i}.txt`), `exit ${code} signal ${signal}\nstderr:\n${err}\nconsole:\n${out}`);
  }
  const last = err.trim().split('\n').at(-1) ?? '';
  console.log(
    `${values.vmm} boot ${i} (${values.cpus} vCPUs): ${ok ? 'ok' : 'FAILED'} exit ${code} ${((performance.now() - t0) / 1000).toFixed(1)} s ${ok ? '' : last}`,
  );
}
console.log(`${values.vmm}, ${values.cpus} vCPUs: ${fails} of ${runs} boots failed`);
process.exitCode = fails > 0 ? 1 : 0;
