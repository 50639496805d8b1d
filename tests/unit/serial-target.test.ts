/**
 * Where the UART goes when it is not the console: the configuration's
 * checks, a file that gets every byte, and a Unix socket that serves it
 * both ways to its owner.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync, existsSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/base/log.js';
import { validateConfig } from '../../src/vmm/config.js';
import { CONSOLE_INPUT_LIMIT } from '../../src/vmm/console.js';
import { openSerialTarget, SerialTargetError, type SerialTarget } from '../../src/vmm/serial-target.js';

const dir = mkdtempSync(join(tmpdir(), 'tsvmm-serial-unit-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const until = async (f: () => boolean, what: string): Promise<void> => {
  const deadline = performance.now() + 5000;
  while (!f()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
};

const connected = (path: string): Promise<Socket> =>
  new Promise((resolve, reject) => {
    const s = connect(path);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });

describe('serial in the configuration', () => {
  const base = { kernel: 'k' };
  const serialOf = (console: 'serial' | 'virtio' | 'off' | undefined, serial?: SerialTarget) => validateConfig({ ...base, console, serial }).serial;

  it('defaults to the console with serial and virtio consoles, and to off with no console', () => {
    expect(serialOf(undefined)).toBe('console');
    expect(serialOf('virtio')).toBe('console');
    expect(serialOf('off')).toBe('off');
    expect(serialOf('virtio', { file: '/x' })).toEqual({ file: '/x' });
    expect(serialOf('off', { socket: '/y' })).toEqual({ socket: '/y' });
  });

  it('refuses what cannot be: the UART elsewhere while it is the console, joined to a console that is off, and malformed targets', () => {
    expect(() => serialOf('serial', 'off')).toThrow(
      /^the UART is the console \(console 'serial'\): serial must be 'console', not off; choose console 'virtio' or 'off'/,
    );
    expect(() => serialOf(undefined, { file: '/x' })).toThrow(/serial must be 'console', not file \/x/);
    expect(() => serialOf('off', 'console')).toThrow(/there is no console \(console 'off'\) to join the UART to/);
    for (const bad of [{ file: '' }, { pipe: '/x' }, { file: '/x', socket: '/y' }, 'tty', null]) {
      expect(() => serialOf('virtio', bad as unknown as SerialTarget), JSON.stringify(bad)).toThrow(
        /^serial must be 'console', 'off', \{ file: path \} or \{ socket: path \}/,
      );
    }
    expect(() => validateConfig({ ...base, console: 'hvc' as 'virtio' })).toThrow(/console must be 'serial', 'virtio' or 'off'/);
  });
});

describe('serial to a file', () => {
  it('gets every byte written, in order, by the time it is closed', async () => {
    const path = join(dir, 'out.log');
    const sink = await openSerialTarget({ file: path }, { send: () => {}, pending: () => 0 }, silentLogger);
    const expected: number[] = [];
    for (let i = 0; i < 10_000; i++) {
      sink.write(Uint8Array.of(i & 0xff));
      expected.push(i & 0xff);
    }
    sink.write(new Uint8Array(9000).fill(7)); // more than one batch at once
    sink.close();
    sink.write(Uint8Array.of(1)); // after the end: nowhere
    expect([...readFileSync(path)]).toEqual([...expected, ...new Array(9000).fill(7)]);
  });

  it('writes a small output on its own after a short delay, without a close', async () => {
    const path = join(dir, 'late.log');
    const sink = await openSerialTarget({ file: path }, { send: () => {}, pending: () => 0 }, silentLogger);
    sink.write(Buffer.from('hello\n'));
    await until(() => readFileSync(path, 'utf8') === 'hello\n', 'the batch to be written');
    sink.close();
  });

  it('refuses a file it cannot create, naming it and the fix', async () => {
    const err = await openSerialTarget({ file: join(dir, 'no', 'such', 'dir', 'x.log') }, { send: () => {}, pending: () => 0 }, silentLogger).catch(
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SerialTargetError);
    expect((err as SerialTargetError).code).toBe('ERR_TSVMM_SERIAL_CANNOT_OPEN');
    expect((err as Error).message).toMatch(/^cannot write the serial output file .*x\.log \(ENOENT\): give serial a file in a writable directory$/);
  });
});

describe('serial on a Unix socket', () => {
  it('serves output to every client from when it connects, and their input to the UART; mode 0600; removed at close', async () => {
    const path = join(dir, 'a.sock');
    const typed: string[] = [];
    const sink = await openSerialTarget({ socket: path }, { send: (b) => typed.push(Buffer.from(b).toString()), pending: () => 0 }, silentLogger);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    sink.write(Buffer.from('before anyone\n'));
    await new Promise((r) => setTimeout(r, 100)); // its batch leaves, to nobody
    const a = await connected(path);
    const b = await connected(path);
    await until(() => sink.clients === 2, 'two clients');
    let gotA = '';
    let gotB = '';
    a.on('data', (d: Buffer) => (gotA += d));
    b.on('data', (d: Buffer) => (gotB += d));
    sink.write(Buffer.from('to both\n'));
    await until(() => gotA === 'to both\n' && gotB === 'to both\n', 'the output at both clients');
    a.write('ls\n');
    await until(() => typed.join('') === 'ls\n', 'the input at the UART');
    const ended = new Promise((r) => b.once('end', r));
    sink.close();
    await ended;
    expect(existsSync(path)).toBe(false);
    a.destroy();
    b.destroy();
  });

  it('sends output printed a byte at a time in batches, whole and in order, the last of it at close', async () => {
    const path = join(dir, 'batch.sock');
    const sink = await openSerialTarget({ socket: path }, { send: () => {}, pending: () => 0 }, silentLogger);
    const c = await connected(path);
    await until(() => sink.clients === 1, 'the client');
    const chunks: Buffer[] = [];
    c.on('data', (d: Buffer) => chunks.push(d));
    const ended = new Promise((r) => c.once('end', r));
    const expected = Buffer.alloc(10_000);
    for (let i = 0; i < expected.length; i++) {
      expected[i] = i & 0xff;
      sink.write(expected.subarray(i, i + 1));
    }
    sink.close(); // flushes what is still batched
    await ended;
    expect(Buffer.concat(chunks).equals(expected)).toBe(true);
    expect(chunks.length).toBeLessThan(20); // not a write per byte
    c.destroy();
  });

  it('after close, takes nothing more from a client: what it types does not reach the UART', async () => {
    const path = join(dir, 'after.sock');
    const typed: string[] = [];
    const sink = await openSerialTarget({ socket: path }, { send: (b) => typed.push(Buffer.from(b).toString()), pending: () => 0 }, silentLogger);
    const c = await connected(path);
    c.on('error', () => {});
    await until(() => sink.clients === 1, 'the client');
    c.write('before\n');
    await until(() => typed.join('') === 'before\n', 'the input before the close');
    sink.close();
    c.write('after\n');
    await new Promise((r) => setTimeout(r, 100));
    expect(typed.join('')).toBe('before\n');
    c.destroy();
  });

  it('holds a client back while the guest has not taken its input, and lets it go on once it has', async () => {
    const path = join(dir, 'flow.sock');
    let pending = 0;
    const sink = await openSerialTarget({ socket: path }, { send: (bytes) => (pending += bytes.length), pending: () => pending }, silentLogger);
    const c = await connected(path);
    c.write(Buffer.alloc(CONSOLE_INPUT_LIMIT + 1));
    await until(() => pending >= CONSOLE_INPUT_LIMIT, 'the input up to the limit');
    const atLimit = pending;
    c.write(Buffer.alloc(4096));
    await new Promise((r) => setTimeout(r, 100));
    expect(pending, 'read on while the guest was behind').toBe(atLimit);
    pending = 0; // the guest read it all
    sink.inputTaken();
    const rest = CONSOLE_INPUT_LIMIT + 1 + 4096 - atLimit;
    await until(() => pending === rest, 'the held input');
    c.destroy();
    sink.close();
  });

  it('replaces a socket left by a VMM that died, and refuses one in use and a path that is not a socket', async () => {
    const stale = join(dir, 'stale.sock');
    // A process that dies listening leaves its socket behind.
    spawnSync(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(stale)}, () => process.kill(process.pid, 'SIGKILL'))`]);
    expect(statSync(stale).isSocket()).toBe(true);
    const sink = await openSerialTarget({ socket: stale }, { send: () => {}, pending: () => 0 }, silentLogger);
    sink.close();

    const busy = join(dir, 'busy.sock');
    const other = createServer();
    await new Promise<void>((r) => other.listen(busy, r));
    const inUse = await openSerialTarget({ socket: busy }, { send: () => {}, pending: () => 0 }, silentLogger).catch((e: unknown) => e);
    expect((inUse as SerialTargetError).code).toBe('ERR_TSVMM_SERIAL_IN_USE');
    expect((inUse as Error).message).toMatch(/^something already listens on .*busy\.sock: give serial another socket path$/);
    await new Promise((r) => other.close(r));

    const plain = join(dir, 'plain');
    writeFileSync(plain, '');
    const notSocket = await openSerialTarget({ socket: plain }, { send: () => {}, pending: () => 0 }, silentLogger).catch((e: unknown) => e);
    expect((notSocket as SerialTargetError).code).toBe('ERR_TSVMM_SERIAL_NOT_A_SOCKET');
  });
});
