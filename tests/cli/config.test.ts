/**
 * `tsvmm run --config vm.json` and `tsvmm config --print`: the file's
 * fields checked with errors that name the field, paths relative to the
 * file, flags given on the command line overriding the file; and one boot
 * from a config file.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { BOOT_TIMEOUT_MS, kvmUnavailable, describeCli, runCli, testCmdline } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';
import { oneLine, useTempDir } from '../helpers/assert.js';

const noKvm = kvmUnavailable();
const dir = useTempDir('tsvmm-config-');

function configFile(name: string, value: unknown): string {
  const path = join(dir.path, name);
  writeFileSync(path, typeof value === 'string' ? value : JSON.stringify(value));
  return path;
}

describe('tsvmm config --print', () => {
  it('shows the file with paths made absolute, and the flags given on the command line in place of its fields', async () => {
    const file = configFile('vm.json', {
      kernel: 'k/bzImage',
      memory: '512M',
      cpus: 2,
      disks: [{ path: 'a.img', readonly: true }],
      acpi: true,
      name: 'from-file',
    });
    const r = await runCli(['config', '--print', '--config', file, '--cpus', '3', '--disk', '/srv/b.img,serial=b', '--no-acpi']);
    expect(r.code, r.stderr).toBe(0);
    const c = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(c).toMatchObject({
      kernel: join(dir.path, 'k/bzImage'),
      memory: '512M', // from the file
      cpus: 3, // the flag
      disks: [{ path: '/srv/b.img', serial: 'b' }], // a repeatable flag replaces the file's list
      acpi: false,
      name: 'from-file',
      console: 'serial', // a flag's default fills what the file leaves out
    });
  });

  it("merges profile flags into the file's profile field by field", async () => {
    const file = configFile('profiled.json', { kernel: 'k/bzImage', profile: { path: 'p.txt', rateHz: 50, systemMap: 'k/System.map' } });
    let r = await runCli(['config', '--print', '--config', file, '--profile-format', 'json']);
    expect(r.code, r.stderr).toBe(0);
    expect((JSON.parse(r.stdout) as { profile: unknown }).profile).toEqual({
      path: join(dir.path, 'p.txt'),
      rateHz: 50, // kept from the file
      systemMap: join(dir.path, 'k/System.map'),
      format: 'json', // the flag
    });
    r = await runCli(['config', '--print', '--config', file, '--profile', '/tmp/other.txt', '--profile-rate', '200']);
    expect((JSON.parse(r.stdout) as { profile: unknown }).profile).toEqual({ path: '/tmp/other.txt', rateHz: 200, systemMap: join(dir.path, 'k/System.map') });
    // Without a profile in the file or on the command line, a profile flag alone is a usage error.
    r = await runCli(['config', '--print', '--config', configFile('plain.json', { kernel: 'k' }), '--profile-rate', '200']);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/only apply to a profile: add --profile <file>/);
  });

  it('takes the kernel cache from the file (relative to it) or the flags, and --no-kernel-cache turns it off', async () => {
    const file = configFile('cached.json', { kernel: 'k/bzImage', kernelCache: 'kc' });
    let r = await runCli(['config', '--print', '--config', file]);
    expect(r.code, r.stderr).toBe(0);
    expect((JSON.parse(r.stdout) as { kernelCache: unknown }).kernelCache).toBe(join(dir.path, 'kc'));
    r = await runCli(['config', '--print', '--config', file, '--no-kernel-cache']);
    expect((JSON.parse(r.stdout) as { kernelCache: unknown }).kernelCache).toBe(false);
    r = await runCli(['config', '--print', '--kernel', 'k', '--kernel-cache', '/var/cache/k']);
    expect((JSON.parse(r.stdout) as { kernelCache: unknown }).kernelCache).toBe('/var/cache/k');
    // Not given anywhere: the default directory, chosen when the VM is built.
    r = await runCli(['config', '--print', '--kernel', 'k']);
    expect(JSON.parse(r.stdout)).not.toHaveProperty('kernelCache');
  });

  it('without a file is the command line alone', async () => {
    const r = await runCli(['config', '--kernel', '/boot/bzImage', '--memory', '1G']);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ kernel: '/boot/bzImage', memory: '1G', cpus: 1, sandbox: true });
  });

  it('names the field at fault, an unknown field, a file that is not JSON, and a missing kernel', async () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ kernel: 'k', disks: [{ path: 7 }] }, /bad1\.json: "disks\[0\]\.path": Invalid input: expected string, received number$/],
      [{ kernel: 'k', memroy: '1G' }, /bad2\.json: unknown field "memroy"$/],
      [{ kernel: 'k', memory: '1Q' }, /bad3\.json: "memory": invalid memory size "1Q"/],
      [{ kernel: 'k', nets: [{ tap: 'tap0', mac: 'nope' }] }, /bad4\.json: "nets\[0\]\.mac": a MAC address such as 52:54:00:12:34:56$/],
      [{ kernel: 'k', cpus: 99 }, /bad5\.json: "cpus": Too big: expected number to be <=8$/],
      ['{"kernel": ', /bad6\.json is not JSON \(.*\): write the VM's configuration as one JSON object$/],
      ['[1]', /bad7\.json must hold one JSON object \(the VM's configuration\), not an array$/],
    ];
    for (const [i, [value, message]] of cases.entries()) {
      const r = await runCli(['run', '--config', configFile(`bad${i + 1}.json`, value)]);
      expect(r.code, r.stderr).toBe(1);
      expect(oneLine(r.stderr)).toMatch(message);
    }
    const missing = await runCli(['run', '--config', join(dir.path, 'none.json')]);
    expect(oneLine(missing.stderr)).toMatch(/cannot read the config file .*none\.json \(ENOENT\): give --config the path of a JSON file$/);
    const noKernel = await runCli(['run', '--config', configFile('nokernel.json', { memory: '1G' })]);
    expect(noKernel.code).toBe(2);
    expect(oneLine(noKernel.stderr)).toMatch(/no kernel to boot: pass --kernel <path>, or set "kernel" in the --config file$/);
    // The kernel may come from the command line alone.
    const flagKernel = await runCli(['config', '--config', configFile('nokernel2.json', { memory: '1G' }), '--kernel', '/boot/k']);
    expect(flagKernel.code, flagKernel.stderr).toBe(0);
    expect(JSON.parse(flagKernel.stdout)).toMatchObject({ kernel: '/boot/k', memory: '1G' });
    const none = await runCli(['run']);
    expect(none.code).toBe(2);
    expect(oneLine(none.stderr)).toMatch(/no kernel to boot: pass --kernel <path>, or set "kernel" in the --config file$/);
  });
});

describe.skipIf(noKvm !== undefined)(`tsvmm run --config${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it(
    'boots the VM a config file describes, with a flag overriding one of its fields',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const file = configFile('boot.json', { kernel: fx.bzImage, memory: '64M', cpus: 2, cmdline: testCmdline('tsvmm.from=config') });
      const r = await runCli(['run', '--config', file, '--memory', '128M', '--expect', 'Memory: \\d+K/(\\d+)K available', '--expect-exit'], {
        timeoutMs: BOOT_TIMEOUT_MS,
      });
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout, describeCli(r)).toMatch(/Command line: .*tsvmm\.from=config/);
      // 128M from the flag, not the file's 64M: the kernel sees more than 100 MiB.
      const total = Number(/Memory: \d+K\/(\d+)K available/.exec(r.stdout)?.[1]);
      expect(total).toBeGreaterThan(100 * 1024);
    }),
    RETRY_TIMEOUT_MS,
  );
});
