/**
 * The control socket through the real CLI: two VMs started with --name,
 * `tsvmm ls` lists them, `info` gives state and counters, `pause` stops a
 * guest's progress (a ticker it runs prints nothing) and `resume` restarts
 * it, `stop` ends a VM with its exit code; another user is refused.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildPrintAndHaltKernel } from '../../src/testing/index.js';
import { fixtures } from '../../fixtures/index.js';
import { BOOT_TIMEOUT_MS, CLI, PROMPT, endingsSeen, kvmUnavailable, runCli, testCmdline, until, type CliResult, type ConsoleOutput } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';

const noKvm = kvmUnavailable();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let runtime: string;
/** The second VM's kernel: prints a line and halts (an idle VM costs nothing; two busy guests at once kill the emulated AMD-V host). */
let idleKernel: string;
beforeAll(() => {
  runtime = mkdtempSync(join(tmpdir(), 'tsvmm-api-'));
  process.env.XDG_RUNTIME_DIR = runtime; // the children's default socket directory
  idleKernel = join(runtime, 'idle.elf');
  writeFileSync(idleKernel, buildPrintAndHaltKernel('@@IDLE up\n'));
});
afterAll(() => {
  rmSync(runtime, { recursive: true, force: true });
});

function tsvmm(...args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** What a VM started with --detach wrote to its log (its stderr: how it ended, when it has). */
function detachedLog(name: string): string {
  const path = join(runtime, 'tsvmm', `${name}.log`);
  return existsSync(path) ? readFileSync(path, 'utf8') : '';
}

/** `tsvmm info NAME` as an object; a failure shows what tsvmm said on stderr, and a detached VM's log. */
function info(name: string): Record<string, unknown> & { state: string } {
  const r = tsvmm('info', name);
  const log = detachedLog(name).trim();
  expect(r.code, `tsvmm info ${name}: ${r.stderr}${log ? `; its log: ${log.split('\n').slice(-5).join(' | ')}` : ''}`).toBe(0);
  return JSON.parse(r.stdout) as Record<string, unknown> & { state: string };
}

function canSwitchUser(): boolean {
  if (process.getuid?.() !== 0) return false;
  try {
    execFileSync('setpriv', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

describe('tsvmm info/pause/stop: no such VM', () => {
  it('names the socket it looked for and what to do', () => {
    const r = tsvmm('info', 'no-such-vm');
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toMatch(/^tsvmm: no VM serves .*tsvmm\/no-such-vm\.sock: check the name with tsvmm ls/);
  });
});

describe.skipIf(noKvm !== undefined)(`the control socket${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it('refuses a socket directory that others could write to', async () => {
    const dir = join(runtime, 'open', 'tsvmm');
    mkdirSync(dir, { recursive: true });
    chmodSync(dir, 0o777);
    const r = await runCli(['run', '--kernel', idleKernel, '--memory', '32M', '--api-socket', join(dir, 'x.sock')]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toMatch(
      /^tsvmm: .*open\/tsvmm must be a directory of this user's with mode 0700 \(it is owned by uid \d+, mode 777\): remove it, or give --api-socket another path$/,
    );
  });

  it(
    'lists two VMs, pauses and resumes one, stops the other, and refuses another user',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const names = [`api-a-${process.pid}`, `api-b-${process.pid}`];
      const outs: ConsoleOutput[] = [];
      // VM a boots Linux and runs a ticker (a line every 100 ms of guest time); VM b is idle.
      const runs: Promise<CliResult>[] = [
        runCli(['run', '--kernel', fx.bzImage, '--initrd', fx.initramfs, '--memory', '128M', '--cmdline', testCmdline(), '--name', names[0]!], {
          drive: (child, out) => {
            outs[0] = out;
            void until(out, PROMPT).then(
              () => child.stdin.write('(i=0; while :; do i=$((i+1)); echo "@@TI""CK $i"; sleep 0.1; done) &\n'),
              () => child.kill('SIGKILL'),
            );
          },
        }),
        runCli(['run', '--kernel', idleKernel, '--memory', '32M', '--name', names[1]!], { drive: (_child, out) => (outs[1] = out) }),
      ];
      try {
        await until(outs[1]!, /@@IDLE up/, BOOT_TIMEOUT_MS);
        await until(outs[0]!, /@@TICK 2\r?\n/, BOOT_TIMEOUT_MS);
        const sock = join(runtime, 'tsvmm', `${names[0]}.sock`);
        expect(statSync(sock).mode & 0o777).toBe(0o600);
        expect(statSync(join(runtime, 'tsvmm')).mode & 0o777).toBe(0o700);

        const ls = tsvmm('ls');
        expect(ls.code, ls.stderr).toBe(0);
        expect(ls.stdout).toMatch(new RegExp(`^${names[0]}\\s+running\\s+\\d+\\s+1\\s+128M\\s`, 'm'));
        expect(ls.stdout).toMatch(new RegExp(`^${names[1]}\\s+running\\s+\\d+\\s+1\\s+32M\\s`, 'm'));

        for (const [n, memory] of [
          [names[0]!, '128M'],
          [names[1]!, '32M'],
        ] as const) {
          const body = info(n) as unknown as {
            name: string;
            state: string;
            config: { memory: string };
            stats: { devices: { serial: { bytesOut: number } } };
          };
          expect(body).toMatchObject({ name: n, state: 'running', config: { memory } });
          // Both printed to their UART (the idle one only its line: its writes never exit, they go through the coalesced ring).
          expect(body.stats.devices.serial.bytesOut).toBeGreaterThanOrEqual('@@IDLE up\n'.length);
        }

        // Pause: the ticker stops; resume: it goes on.
        expect(tsvmm('pause', names[0]!).stdout.trim()).toBe(`${names[0]}: paused`);
        expect(info(names[0]!).state).toBe('paused');
        await sleep(1500); // output the guest made before the pause has arrived
        const atPause = outs[0]!().length;
        await sleep(2000);
        expect(outs[0]!().length, 'the paused guest printed').toBe(atPause);
        expect(tsvmm('pause', names[0]!).stderr.trim()).toMatch(/^tsvmm: api-a-\d+: cannot pause a VM that is paused$/);
        expect(tsvmm('resume', names[0]!).stdout.trim()).toBe(`${names[0]}: running`);
        await until(() => outs[0]!().slice(atPause), /@@TICK \d+\r?\n/, BOOT_TIMEOUT_MS);

        // Another user cannot use the socket.
        if (canSwitchUser()) {
          const other = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, CLI, 'info', sock], {
            encoding: 'utf8',
            env: { ...process.env, HOME: '/nonexistent' },
          });
          expect(other.status).toBe(1);
          expect(other.stderr.trim()).toMatch(/^tsvmm: no permission to use .*: only the user who started the VM may$/);
        }

        // Stop: the VM ends with the exit code of a host stop; its socket goes.
        expect(tsvmm('stop', names[1]!).stdout.trim()).toBe(`${names[1]}: ended, exit code 130 (stopped through the control socket)`);
        const b = await runs[1]!;
        expect(b.code).toBe(130);
        expect(b.stderr).toContain('stopped through the control socket');
        expect(tsvmm('ls').stdout).not.toContain(names[1]);
        expect(tsvmm('stop', names[0]!).code).toBe(0);
        expect((await runs[0]!).code).toBe(130);
      } finally {
        for (const n of names) tsvmm('stop', n);
        await Promise.all(runs);
      }
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    'starts a VM with --detach, attaches to its console, runs a command, and detaches with the VM still running',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const name = `api-det-${process.pid}`;
      // How the detached VM ended, for the retry to recognise an emulator fault.
      endingsSeen.push(() => detachedLog(name));
      const started = tsvmm(
        'run',
        '--detach',
        '--name',
        name,
        '--kernel',
        fx.bzImage,
        '--initrd',
        fx.initramfs,
        '--memory',
        '128M',
        '--cmdline',
        testCmdline(),
      );
      expect(started.code, started.stderr).toBe(0);
      expect(started.stdout.trim()).toBe(name);
      try {
        expect(info(name).state).toBe('running');
        // Typed before the shell is up, the line waits in the guest's tty.
        const attached = await runCli(['console', name], {
          drive: (child, out) => {
            child.stdin.write('echo "@@AT""TACHED $((40+2))"\n');
            void until(out, /@@ATTACHED 42/).then(
              () => child.stdin.write('\x01x'), // Ctrl-A x
              () => child.kill('SIGKILL'),
            );
          },
        });
        expect(attached.code, attached.stderr).toBe(0);
        expect(attached.stdout).toContain('@@ATTACHED 42');
        expect(attached.stderr).toContain('detached; the VM runs on');
        expect(info(name).state).toBe('running');
        expect(tsvmm('stop', name).stdout.trim()).toBe(`${name}: ended, exit code 130 (stopped through the control socket)`);
      } finally {
        tsvmm('stop', name);
      }
      await until(() => tsvmm('ls').stdout, new RegExp(`^(?![\\s\\S]*${name})`), 30_000);
    }),
    RETRY_TIMEOUT_MS,
  );
});
