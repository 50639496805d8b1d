/**
 * The boot-test harness without KVM: waiting on the console (cursor,
 * timeout, abort, the VM's end, the transcript bound) and commands run on
 * a shell behind it. The shell is a real `sh` whose output is the
 * "guest's", with the tty's echo of each typed line in front, as a guest
 * console gives it.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { CONSOLE_TRANSCRIPT_LIMIT, ConsoleStream, ConsoleWaitError } from '../../src/vmm/console.js';
import { runOnConsole } from '../../src/vmm/shell.js';
import { EscapeKeys } from '../../src/escape-keys.js';
import { describeCli, endingsSeen, processCrash, runCli } from '../../fixtures/guest.js';
import { L1_PROCESS_CRASH } from '../helpers/host.js';
import { threadReport } from '../../fixtures/proc.js';

function rejection(p: Promise<unknown>): Promise<ConsoleWaitError> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (err: unknown) => {
      expect(err).toBeInstanceOf(ConsoleWaitError);
      return err as ConsoleWaitError;
    },
  );
}

describe('console waitFor', () => {
  it('matches across chunks, then reads on from the cursor; from: 0 searches everything', async () => {
    const c = new ConsoleStream(() => {});
    const first = c.waitFor(/login: (\w+)/);
    c.guestOutput(Buffer.from('boot...\nlog'));
    c.guestOutput(Buffer.from('in: root\nlogin: admin\n'));
    const m = await first;
    expect(m.text).toBe('login: root');
    expect(m.groups[1]).toBe('root');
    expect(m.index).toBe('boot...\n'.length);
    expect(m.end).toBe(m.index + m.text.length);
    // The next wait starts after the first match: it finds the second login.
    expect((await c.waitFor(/login: (\w+)/)).groups[1]).toBe('admin');
    expect((await c.waitFor(/login: (\w+)/, { from: 0 })).groups[1]).toBe('root');
    expect((await c.waitFor(/(?<what>\w+)\.\.\./, { from: 0 })).named).toEqual({ what: 'boot' });
  });

  it('matches a string literally, and ignores a g or y flag', async () => {
    const c = new ConsoleStream(() => {});
    c.guestOutput(Buffer.from('axb a.b (x)\n'));
    expect((await c.waitFor('a.b')).index).toBe(4);
    expect((await c.waitFor('(x)', { from: 0 })).index).toBe(8);
    const g = /b/g;
    expect((await c.waitFor(g, { from: 0 })).index).toBe(2);
    expect((await c.waitFor(g, { from: 0 })).index).toBe(2);
  });

  it("times out with the console's last lines", async () => {
    const c = new ConsoleStream(() => {});
    for (let i = 1; i <= 30; i++) c.guestOutput(Buffer.from(`line ${i}\r\n`));
    const err = await rejection(c.waitFor(/never/, { timeout: 20 }));
    expect(err.code).toBe('ERR_TSVMM_WAIT_TIMEOUT');
    expect(err.pattern).toBe('/never/');
    expect(err.tail.split('\n')).toHaveLength(20);
    expect(err.tail.endsWith('line 30')).toBe(true);
    expect(err.tail).not.toContain('\r');
    expect(err.message).toMatch(/^timed out after 20 ms waiting for \/never\/ on the guest console; its last lines:\nline 11\n/);
  });

  it('fails when the VM ends first, but not when the last output matches', async () => {
    const c = new ConsoleStream(() => {});
    c.resume();
    const seen = c.waitFor('bye');
    const missed = c.waitFor('never');
    c.guestOutput(Buffer.from('bye\n')); // still batched when the VM ends
    c.finish('guest triple fault (the CPU reset itself)');
    expect((await seen).text).toBe('bye');
    const err = await rejection(missed);
    expect(err.code).toBe('ERR_TSVMM_WAIT_VM_ENDED');
    // How the VM ended is in the message.
    expect(err.message).toMatch(
      /^the VM ended \(guest triple fault \(the CPU reset itself\)\) waiting for "never" on the guest console; its last lines:\nbye$/,
    );
    expect((await rejection(c.waitFor('again'))).code).toBe('ERR_TSVMM_WAIT_VM_ENDED');
    expect((await c.waitFor('bye', { from: 0 })).index).toBe(0);
  });

  it('ends on an AbortSignal, with its reason as the cause, and leaves no listener behind', async () => {
    const c = new ConsoleStream(() => {});
    const ac = new AbortController();
    const waiting = c.waitFor(/x/, { signal: ac.signal });
    ac.abort(new Error('test over'));
    const err = await rejection(waiting);
    expect(err.code).toBe('ERR_TSVMM_WAIT_ABORTED');
    expect((err.cause as Error).message).toBe('test over');
    expect((await rejection(c.waitFor(/x/, { signal: AbortSignal.abort() }))).code).toBe('ERR_TSVMM_WAIT_ABORTED');
    // A wait that succeeded removed its abort listener: aborting later does nothing.
    const later = new AbortController();
    const ok = c.waitFor(/y/, { signal: later.signal });
    c.guestOutput(Buffer.from('y'));
    await ok;
    later.abort();
    expect(c.outputLength).toBe(1);
  });

  it('refuses a bad timeout', async () => {
    const c = new ConsoleStream(() => {});
    await expect(c.waitFor(/x/, { timeout: -1 })).rejects.toThrow(RangeError);
    await expect(c.waitFor(/x/, { timeout: Number.NaN })).rejects.toThrow(/timeout must be/);
  });

  it("keeps the newest CONSOLE_TRANSCRIPT_LIMIT bytes, counting offsets from the VM's start", async () => {
    const c = new ConsoleStream(() => {});
    c.resume();
    const chunk = Buffer.alloc(64 * 1024, 0x2e);
    const total = 3 * CONSOLE_TRANSCRIPT_LIMIT;
    for (let at = 0; at < total; at += chunk.length) c.guestOutput(chunk);
    c.guestOutput(Buffer.from('END'));
    c.flush();
    expect(c.outputLength).toBe(total + 3);
    expect(c.text()).toHaveLength(CONSOLE_TRANSCRIPT_LIMIT);
    expect(c.text(total)).toBe('END');
    const m = await c.waitFor('END', { from: 0 });
    expect(m.index).toBe(total);
  });
});

/** A console in front of a real sh: typed lines are echoed (as a tty does), then run. */
function shellConsole(): { console: ConsoleStream; sh: ChildProcessWithoutNullStreams } {
  // One stream for stdout and stderr, as a tty is.
  const sh = spawn('sh', ['-c', 'exec sh 2>&1'], { stdio: 'pipe' });
  const c = new ConsoleStream((bytes) => {
    c.guestOutput(Buffer.from(Buffer.from(bytes).toString('latin1').replace(/\n/g, '\r\n'), 'latin1'));
    sh.stdin.write(bytes);
  });
  const out = (d: Buffer) => c.guestOutput(Buffer.from(d.toString('latin1').replace(/\n/g, '\r\n'), 'latin1'));
  sh.stdout.on('data', out);
  c.resume();
  return { console: c, sh };
}

describe('vm.run on a shell', () => {
  const shells: ChildProcessWithoutNullStreams[] = [];
  afterEach(() => {
    for (const sh of shells.splice(0)) sh.kill();
  });
  const open = () => {
    const s = shellConsole();
    shells.push(s.sh);
    return s.console;
  };

  it("gives each command's output and exit status", async () => {
    const c = open();
    expect(await runOnConsole(c, 'echo hello $((6*7))')).toEqual({ output: 'hello 42\n', status: 0 });
    expect(await runOnConsole(c, 'false')).toEqual({ output: '', status: 1 });
    expect(await runOnConsole(c, 'echo one; echo two >&2; exit_code() { return 7; }; exit_code')).toEqual({ output: 'one\ntwo\n', status: 7 });
    // Output that looks like a marker of another call is only output.
    expect((await runOnConsole(c, 'echo __tsvmm_end_x 0')).output).toBe('__tsvmm_end_x 0\n');
  });

  it('refuses a command of several lines, or one that ends with &', async () => {
    const c = open();
    await expect(runOnConsole(c, 'echo a\necho b')).rejects.toThrow(/one line/);
    await expect(runOnConsole(c, 'sleep 1 &')).rejects.toThrow(/must not end with &/);
  });

  it("fails after its timeout with the console's last lines, and on abort", async () => {
    const c = open();
    const err = await rejection(runOnConsole(c, 'echo started; sleep 5', { timeout: 300 }));
    expect(err.code).toBe('ERR_TSVMM_WAIT_TIMEOUT');
    expect(err.message).toMatch(/running "echo started; sleep 5" on the guest shell/);
    expect(err.tail).toContain('started');
    const ac = new AbortController();
    const running = runOnConsole(c, 'sleep 5', { signal: ac.signal });
    setTimeout(() => ac.abort(), 50);
    expect((await rejection(running)).code).toBe('ERR_TSVMM_WAIT_ABORTED');
  });
});

describe('console escape keys (Ctrl-A)', () => {
  it('passes typed bytes, turns Ctrl-A Ctrl-A into one Ctrl-A, and stops at Ctrl-A x, also across chunks', () => {
    const keys = new EscapeKeys();
    expect(keys.filter(Buffer.from('ls\n'))).toEqual({ bytes: Buffer.from('ls\n'), quit: false, help: false });
    expect(keys.filter(Buffer.from('a\x01\x01b\x01h\x01zc'))).toEqual({ bytes: Buffer.from('a\x01bc'), quit: false, help: true });
    expect(keys.filter(Buffer.from('de\x01'))).toEqual({ bytes: Buffer.from('de'), quit: false, help: false });
    expect(keys.filter(Buffer.from('xignored'))).toEqual({ bytes: Buffer.alloc(0), quit: true, help: false });
  });
});

describe('the control socket', () => {
  it("gives GET /vm the VM's configuration as JSON can carry it", async () => {
    const { plainConfig } = await import('../../src/tools/api.js');
    const timer = setTimeout(() => undefined, 1000); // an observer's state JSON cannot hold (a Timeout is circular)
    const observer = { timer, outputs: ['p.txt'] };
    const c = plainConfig({
      kernel: new Uint8Array(4096),
      initrd: '/boot/initrd.gz',
      memory: '64M',
      observers: [observer],
      profile: { path: 'p.txt' },
    } as never);
    clearTimeout(timer);
    expect(JSON.parse(JSON.stringify(c))).toEqual({ kernel: '(4096 bytes)', initrd: '/boot/initrd.gz', memory: '64M', profile: { path: 'p.txt' } });
  });
});

describe('the hang report of a CLI child', () => {
  it("names each thread with its state and the CPU it used: a busy loop's thread runs, a sleeper's sleeps", async () => {
    const busy = spawn(process.execPath, ['-e', 'for (;;);']);
    const sleeper = spawn('sleep', ['30']);
    try {
      await new Promise((r) => setTimeout(r, 300));
      const b = await threadReport(busy.pid!, 500);
      const main = b.split('\n').find((l) => l.includes(`${busy.pid} node:`));
      expect(main, b).toMatch(/state R, cpu (\d{2,3})% \(guest 0%\)/);
      expect(Number(/cpu (\d+)%/.exec(main!)![1])).toBeGreaterThan(30);
      const s = await threadReport(sleeper.pid!, 200);
      expect(s).toMatch(new RegExp(`${sleeper.pid} sleep: state S.*, cpu 0% \\(guest 0%\\)`));
    } finally {
      busy.kill('SIGKILL');
      sleeper.kill('SIGKILL');
    }
    await new Promise((r) => sleeper.once('close', r));
    expect(await threadReport(sleeper.pid!, 10)).toBe(`process ${sleeper.pid} has ended`);
  });

  it('describeCli gives the end of a long console, which the diff leaves out, and the end of stderr', () => {
    const stdout = `${'early boot line\n'.repeat(2000)}the last line`;
    const d = describeCli({ code: null, signal: 'SIGKILL', stdout, stderr: 'tsvmm: stopped', ms: 840_000, hang: 'threads of 7 over 1.0 s' });
    expect(d).toMatch(/^tsvmm was killed by SIGKILL after 840\.0 s; the hang guard killed it, and before that threads of 7/);
    expect(d).toContain('tsvmm: stopped');
    expect(d).toContain('the last line\n---');
    expect(d.length).toBeLessThan(6000);
  });
});

describe('how runCli records a CLI child that crashed', () => {
  it('a child that dies of SIGSEGV is recorded as a crash, which the L1 retry recognises; one killed by SIGKILL is not', async () => {
    const crashed = await runCli([], { wrap: ['sh', '-c', 'kill -SEGV $$', '--'] });
    expect(crashed.signal).toBe('SIGSEGV');
    const crashEnding = endingsSeen.at(-1)!();
    expect(crashEnding).toContain(processCrash('SIGSEGV'));
    expect(crashEnding).toMatch(L1_PROCESS_CRASH);
    const killed = await runCli([], { wrap: ['sh', '-c', 'kill -KILL $$', '--'] });
    expect(killed.signal).toBe('SIGKILL');
    expect(endingsSeen.at(-1)!()).not.toMatch(L1_PROCESS_CRASH);
  });
});
