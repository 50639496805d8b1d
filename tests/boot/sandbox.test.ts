/**
 * The sandbox, tried for real: a VMM process is made to attempt what its
 * confinement forbids, and the kernel refuses.
 *
 * - seccomp: a thread under a vCPU thread's filter makes the calls a vCPU
 *   thread makes and then a forbidden one; the process ends with status 159
 *   and names the call. Run in a child process, since that is the point.
 * - Landlock (where the kernel offers it): a program that embeds tsvmm
 *   starts a sandboxed VM, then tries to read a file (on the main thread,
 *   through the thread pool and from a worker thread), to create a file,
 *   and to connect over TCP; everything is refused while a directory it
 *   allowed stays writable and the guest runs on.
 * - the CLI sandboxes by default and `--no-sandbox` turns it off.
 *
 * The guest is a few instructions (print, halt): what is checked is the
 * VMM's process, not what Linux does.
 */
import { spawnSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { buildPrintAndHaltKernel } from '../../src/testing/index.js';
import { kvmUnavailable, REPO, describeCli, runCli, until } from '../helpers/guest.js';

const noKvm = kvmUnavailable();
/** A hang guard, not a speed check. */
const GUARD_MS = 120_000;

describe.skipIf(noKvm !== undefined)(`the sandbox${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-sandbox-'));
  const kernel = join(dir, 'print-ok.elf');
  writeFileSync(kernel, buildPrintAndHaltKernel('sandboxed guest says hello\n'));
  const secret = join(dir, 'secret.txt');
  writeFileSync(secret, 'not for the VMM\n');
  const allowed = join(dir, 'allowed');
  mkdirSync(allowed);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it.each([
    ['openat', 257],
    ['ioctl', 16],
  ] as const)(
    'a vCPU thread that calls %s ends the process, naming the call',
    (forbidden, nr) => {
      const script = `
        const addon = require(${JSON.stringify(join(REPO, 'build/Release/tsvmm.node'))});
        const { vcpuSeccompFilter } = await import(${JSON.stringify(join(REPO, 'dist/kvm/sandbox.js'))});
        const kvm = addon.open('/dev/kvm');
        const vm = addon.createVm(kvm);
        const vcpu = addon.createVcpu(vm, 0);
        const errno = addon.seccompSelfTest(vcpuSeccompFilter(addon.constants, vcpu), vcpu, ${JSON.stringify(forbidden)});
        console.log('the filter let ${forbidden} through, errno ' + errno);`;
      const r = spawnSync(
        process.execPath,
        ['--input-type=module', '-e', `import { createRequire } from 'node:module'; const require = createRequire(import.meta.url);\n${script}`],
        {
          encoding: 'utf8',
          timeout: GUARD_MS,
        },
      );
      expect(r.stdout).toBe('');
      expect(r.stderr).toContain(`a vCPU thread made a system call its seccomp filter forbids (number ${nr}): stopping`);
      expect(r.status).toBe(159);
    },
    GUARD_MS,
  );

  it(
    'a sandboxed VM confines the process that embeds it, and the guest runs on',
    async () => {
      const server = createServer((s) => s.end());
      const port = await new Promise<number>((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port)));
      const program = `
        import fs from 'node:fs';
        import net from 'node:net';
        import { Worker } from 'node:worker_threads';
        import { createVm } from ${JSON.stringify(join(REPO, 'dist/index.js'))};
        const [kernel, secret, dir, allowed, port] = process.argv.slice(1);
        const vm = await createVm({ kernel, memory: '32M', sandbox: { allow: [{ path: allowed, access: 'write' }] } });
        let out = '';
        const said = new Promise((resolve) => vm.console.on('data', (d) => { out += d; if (out.includes('hello')) resolve(); }));
        vm.start();
        const attempt = async (f) => { try { await f(); return 'ok'; } catch (e) { return e.code ?? e.message; } };
        const result = { sandbox: vm.sandbox };
        result.readOnMainThread = await attempt(() => fs.readFileSync(secret));
        result.readInThreadPool = await attempt(() => fs.promises.readFile(secret));
        result.readInWorker = await new Promise((resolve) => {
          const w = new Worker("const fs = await import('node:fs'); const { parentPort, workerData } = await import('node:worker_threads'); try { fs.readFileSync(workerData); parentPort.postMessage('ok'); } catch (e) { parentPort.postMessage(e.code); }", { eval: true, workerData: secret });
          w.once('message', resolve);
          w.once('error', (e) => resolve(e.message));
        });
        result.createFile = await attempt(() => fs.writeFileSync(dir + '/created.txt', 'x'));
        result.writeAllowed = await attempt(() => fs.writeFileSync(allowed + '/created.txt', 'x'));
        result.tcpConnect = await new Promise((resolve) => {
          const s = net.connect(Number(port), '127.0.0.1');
          s.once('connect', () => { s.destroy(); resolve('ok'); });
          s.once('error', (e) => resolve(e.code));
        });
        // Threads under a filter, but for KVM's own workers (kvm-nx-lpage-recovery), which a vCPU thread's first KVM_RUN creates in the process and which inherit it.
        const status = fs.readdirSync('/proc/self/task').map((t) => fs.readFileSync('/proc/self/task/' + t + '/status', 'utf8'));
        result.seccompThreads = status.filter((s) => /Seccomp:\\s+2/.test(s) && !/Name:\\s+kvm-/.test(s)).length;
        await said;
        result.console = out;
        await vm.stop('test over');
        process.stdout.write(JSON.stringify(result));`;
      const child = spawn(process.execPath, ['--input-type=module', '-e', program, kernel, secret, dir, allowed, String(port)], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
      server.close();
      expect(code, stderr).toBe(0);
      const r = JSON.parse(stdout) as Record<string, unknown> & {
        sandbox: { files: { confined: boolean; abi?: number; reason?: string }; vcpuThreads: { filtered: boolean } };
      };
      expect(r.console).toContain('sandboxed guest says hello');
      // The one vCPU runs on a thread of its own (the default exit path), under its filter.
      expect(r.sandbox.vcpuThreads.filtered).toBe(true);
      expect(r.seccompThreads).toBe(1);
      const abi = spawnSync(process.execPath, ['-e', `console.log(require(${JSON.stringify(join(REPO, 'build/Release/tsvmm.node'))}).landlockAbi())`], {
        encoding: 'utf8',
      });
      if (Number(abi.stdout) < 1) {
        // This kernel offers no Landlock: the VM says so, and why.
        expect(r.sandbox.files).toMatchObject({ confined: false, reason: expect.stringMatching(/Landlock/) });
        return;
      }
      expect(r.sandbox.files).toMatchObject({ confined: true, abi: Number(abi.stdout) });
      expect(r).toMatchObject({ readOnMainThread: 'EACCES', readInThreadPool: 'EACCES', readInWorker: 'EACCES', createFile: 'EACCES', writeAllowed: 'ok' });
      // TCP is handled from ABI 4 on.
      expect(r.tcpConnect).toBe(Number(abi.stdout) >= 4 ? 'EACCES' : 'ok');
    },
    GUARD_MS,
  );

  it(
    "a second sandboxed VM in the same process starts under the first one's confinement, and both guests run",
    () => {
      const program = `
        import { createVm } from ${JSON.stringify(join(REPO, 'dist/index.js'))};
        const [kernel] = process.argv.slice(1);
        const vms = [await createVm({ kernel, memory: '32M', sandbox: true }), await createVm({ kernel, memory: '32M', sandbox: true })];
        const said = vms.map((vm) => new Promise((resolve) => { let out = ''; vm.console.on('data', (d) => { out += d; if (out.includes('hello')) resolve(); }); }));
        for (const vm of vms) vm.start();
        await Promise.all(said);
        const [a, b] = vms.map((vm) => vm.sandbox);
        await Promise.all(vms.map((vm) => vm.stop('test over')));
        process.stdout.write(JSON.stringify({ same: JSON.stringify(a.files) === JSON.stringify(b.files), filtered: [a.vcpuThreads.filtered, b.vcpuThreads.filtered] }));`;
      const r = spawnSync(process.execPath, ['--input-type=module', '-e', program, kernel], { encoding: 'utf8', timeout: GUARD_MS });
      expect(r.status, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toEqual({ same: true, filtered: [true, true] });
    },
    GUARD_MS,
  );

  it.each([
    ['sandboxes by default', [], true],
    ['does not with --no-sandbox', ['--no-sandbox'], false],
  ] as const)(
    'the CLI %s',
    async (_name, flags, sandboxed) => {
      const r = await runCli(['run', '--kernel', kernel, '--memory', '32M', '--log-level', 'info', ...flags], {
        timeoutMs: GUARD_MS - 10_000,
        drive: (child, out) => {
          void until(out, /hello/, GUARD_MS - 20_000).then(
            () => child.kill('SIGTERM'),
            () => child.kill('SIGKILL'),
          );
        },
      });
      expect(r.stdout, describeCli(r)).toContain('sandboxed guest says hello');
      expect(r.code).toBe(143);
      expect(/"msg":"sandbox: (process confined with Landlock|files not confined)"/.test(r.stderr)).toBe(sandboxed);
    },
    GUARD_MS,
  );
});
