/**
 * virtio-net over a real TAP device in a network namespace the test makes
 * and removes. The VMM runs inside the namespace; the host side of the TAP
 * gets 10.0.2.1, the guest 10.0.2.15. The guest pings the host, sends data
 * over TCP (busybox nc) that the host checksums, and receives data back.
 *
 * How much: 4 MiB each way; 1 MiB on hosts whose KVM emulates guest kernel
 * code, where the guest's TCP stack moves about 45 KB/s (about 24 ms of
 * emulated kernel time per packet: measured here, see bench/).
 */
import { execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { probeHostOnce } from '../../src/kvm/probe.js';
import { fixtures, type Fixtures } from '../../fixtures/index.js';
import { hardwareVirtUnavailable, inEmulatedAmdvHost, retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';
import { CRASH_SIGNALS, PROMPT, kvmUnavailable, describeCli, runCli, testCmdline, until } from '../helpers/guest.js';
import { withTimeout } from '../helpers/assert.js';

const noKvm = kvmUnavailable();
const isRoot = process.getuid?.() === 0;
const skipReason = noKvm ?? (isRoot ? undefined : 'network namespaces and TAP devices need root');

const NS = `tsvmm-net-${process.pid}`;

/** Bytes each way: smaller where guest kernel code is emulated (see above). */
function transferSize(): number {
  if (noKvm !== undefined) return 0;
  return probeHostOnce().emulationGaps.length > 0 ? 1 << 20 : 4 << 20;
}
const HOST_IP = '10.0.2.1';
const GUEST_IP = '10.0.2.15';
const UP_PORT = 5001;
const DOWN_PORT = 5002;
/**
 * A hang guard for each step after the boot, not a speed check: a step
 * takes under 30 s on both hosts. A step that hangs fails the test with
 * its name well before the boot's guard.
 */
const STEP_TIMEOUT_MS = 5 * 60 * 1000;

function ns(...cmd: string[]): string {
  return execFileSync('ip', ['netns', 'exec', NS, ...cmd], { encoding: 'utf8' });
}

/** Sinks still running; stopped when a test ends and before a sink starts, so a failed attempt's cannot hold the port. */
const sinks: import('node:child_process').ChildProcess[] = [];

/** Kills the sinks still running and waits until they have ended (and so freed the port). */
async function stopSinks(): Promise<void> {
  await Promise.all(
    sinks.splice(0).map((child) => {
      if (child.exitCode !== null || child.signalCode !== null) return undefined;
      const ended = new Promise((done) => child.once('close', done));
      child.kill('SIGKILL');
      return ended;
    }),
  );
}

/**
 * How many times the TCP sink is started while it dies of a crash signal
 * ({@link CRASH_SIGNALS}) in the emulated AMD-V host: there, now and then
 * a Node process dies in V8's JIT code before it has done anything (the
 * emulator's fault: bench/README.md, 2026-12-03, and
 * tests/hosts/amdv/README.md).
 */
const SINK_ATTEMPTS = 3;

/**
 * A TCP sink on the host side, inside the namespace: prints "<bytes> <md5>"
 * when the peer closes. A sink that dies before it listens fails the test
 * at once with how it ended and what it said, except that in the emulated
 * AMD-V host one killed by a crash signal is started again (up to
 * {@link SINK_ATTEMPTS} in all, each retry printed).
 */
async function startSink(): Promise<{ result: Promise<string> }> {
  // A sink left by an earlier attempt of the test (retryEmulatorFault) would
  // still hold the port: the new one would exit with EADDRINUSE.
  await stopSinks();
  for (let attempt = 1; ; attempt++) {
    const started = await startSinkOnce();
    if ('result' in started) return started;
    const retry = inEmulatedAmdvHost && started.signal !== null && CRASH_SIGNALS.has(started.signal) && attempt < SINK_ATTEMPTS;
    if (!retry) throw new Error(started.message);
    console.warn(`[amdv] starting the TCP sink again (attempt ${attempt + 1} of ${SINK_ATTEMPTS}): ${started.message}`);
  }
}

function startSinkOnce(): Promise<{ result: Promise<string> } | { signal: NodeJS.Signals | null; message: string }> {
  const script = `
    const net = require('net'), crypto = require('crypto');
    const srv = net.createServer((s) => {
      const h = crypto.createHash('md5'); let n = 0;
      s.on('data', (d) => { h.update(d); n += d.length; });
      s.on('end', () => { console.log(n + ' ' + h.digest('hex')); s.end(); srv.close(); });
    });
    srv.listen(${UP_PORT}, '${HOST_IP}', () => console.log('LISTENING'));
    setTimeout(() => process.exit(2), 600000).unref();`;
  const child = spawn('ip', ['netns', 'exec', NS, process.execPath, '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
  sinks.push(child);
  let out = '';
  let err = '';
  child.stderr.on('data', (d: Buffer) => {
    err += d.toString();
    process.stderr.write(d);
  });
  let listening = false;
  return new Promise((resolve) => {
    // 'close' comes after the last of stdout's data.
    const result = new Promise<string>((done) =>
      child.on('close', (code, signal) => {
        if (listening) {
          done(out.replace('LISTENING\n', '').trim());
          return;
        }
        const how = signal !== null ? `killed by ${signal}` : `exit code ${code}`;
        // Node's uncaught error: the line that names it, not the stack after it.
        const lines = err.trim().split('\n');
        const said = lines.find((l) => /^\w*Error\b/.test(l)) ?? lines.slice(-3).join(' | ');
        resolve({ signal, message: `the TCP sink on ${HOST_IP}:${UP_PORT} exited before listening (${how}${said ? `: ${said}` : ''})` });
      }),
    );
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (!listening && out.includes('LISTENING')) {
        listening = true;
        resolve({ result });
      }
    });
  });
}

/** Connects to the guest from the host side and sends `data`. */
function sendToGuest(data: Buffer): Promise<void> {
  const script = `
    const net = require('net');
    const chunks = [];
    process.stdin.on('data', (d) => chunks.push(d));
    process.stdin.on('end', () => {
      const s = net.connect(${DOWN_PORT}, '${GUEST_IP}', () => s.end(Buffer.concat(chunks)));
      s.on('close', () => process.exit(0));
      s.on('error', (e) => { console.error(e.message); process.exit(1); });
    });`;
  const child = spawn('ip', ['netns', 'exec', NS, process.execPath, '-e', script], { stdio: ['pipe', 'inherit', 'inherit'] });
  child.stdin.end(data);
  return new Promise((resolve, reject) => child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`sender exited ${code}`)))));
}

describe.skipIf(skipReason !== undefined)(`virtio-net over TAP${skipReason ? ` (skipped: ${skipReason})` : ''}`, () => {
  beforeAll(() => {
    execFileSync('ip', ['netns', 'add', NS]);
    ns('ip', 'link', 'set', 'lo', 'up');
    ns('ip', 'tuntap', 'add', 'dev', 'tap0', 'mode', 'tap');
    ns('ip', 'addr', 'add', `${HOST_IP}/24`, 'dev', 'tap0');
    ns('ip', 'link', 'set', 'tap0', 'up');
  });
  afterEach(stopSinks);
  afterAll(() => {
    execFileSync('ip', ['netns', 'del', NS]);
  });

  // The test kernel everywhere; Debian's distribution kernel (virtio_net
  // loaded from its initramfs) where KVM is hardware-virtualised.
  const kernels = [
    { name: 'the test kernel', memory: '128M', marker: /TSVMM-INIT-OK/, pick: (fx: Fixtures) => ({ kernel: fx.bzImage, initrd: fx.initramfs }) },
    ...(hardwareVirtUnavailable() === undefined
      ? [
          {
            name: "Debian's kernel",
            memory: '512M',
            marker: /TSVMM-DISTRO-INIT-OK/,
            pick: (fx: Fixtures) => ({ kernel: fx.distroKernel, initrd: fx.distroInitramfs }),
          },
        ]
      : []),
  ];

  it.each(kernels)(
    'pings the host and moves data each way over TCP ($name)',
    retryEmulatorFault(async ({ memory, marker, pick }) => {
      const fx = fixtures();
      const { kernel, initrd } = pick(fx);
      const size = transferSize();
      const down = randomBytes(size);
      const downSum = createHash('md5').update(down).digest('hex');
      const sink = await startSink();
      let upResult = '';
      let guestUpSum = '';
      let driverError: string | undefined;
      const r = await runCli(['run', '--kernel', kernel, '--initrd', initrd, '--memory', memory, '--net', 'tap=tap0', '--stats', '--cmdline', testCmdline()], {
        wrap: ['ip', 'netns', 'exec', NS],
        drive: (child, out) => {
          const type = (line: string) => child.stdin.write(`${line}\n`);
          let step = 'boot';
          const within = <T>(what: string, p: Promise<T>): Promise<T> => {
            step = what;
            return withTimeout(p, STEP_TIMEOUT_MS, () => `timed out after ${STEP_TIMEOUT_MS} ms; output so far:\n${out().slice(-2000)}`);
          };
          void (async () => {
            await until(out, marker);
            await until(out, PROMPT);
            type(`ip addr add ${GUEST_IP}/24 dev eth0 && ip link set eth0 up && cat /sys/class/net/eth0/address && ping -c 3 ${HOST_IP}; echo "@@PI""NG $?"`);
            await within('ping', until(out, /@@PING \d/));
            type(`dd if=/dev/urandom of=/tmp/up bs=64k count=${size >> 16} 2>/dev/null; md5sum /tmp/up; nc ${HOST_IP} ${UP_PORT} < /tmp/up; echo "@@U""P $?"`);
            await within('the guest sending', until(out, /@@UP \d/));
            guestUpSum = /([0-9a-f]{32})\s+\/tmp\/up/.exec(out())?.[1] ?? '';
            upResult = await within("the host sink's result", sink.result);
            type(`nc -l -p ${DOWN_PORT} > /tmp/down & sleep 1; echo "@@LI""STEN"`);
            await within('the guest listening', until(out, /@@LISTEN/));
            await within('the host sending', sendToGuest(down));
            type(`wait; md5sum /tmp/down; echo "@@DO""WN $?"`);
            await within('the guest receiving', until(out, /@@DOWN \d/));
            step = 'reboot';
            type('reboot -f');
          })().catch((err: Error) => {
            driverError = `${step}: ${err.message}`;
            process.stderr.write(`net test driver: ${driverError}\n`);
            child.kill('SIGTERM');
          });
        },
      });
      expect(driverError, 'the test driver').toBeUndefined();
      expect(r.stdout, describeCli(r)).toMatch(/@@PING 0/);
      expect(r.stdout, describeCli(r)).toMatch(/3 packets transmitted, 3 packets received/);
      // A stable, locally administered MAC derived from the VM and TAP names.
      expect(r.stdout, describeCli(r)).toMatch(/^[0-9a-f]{2}:([0-9a-f]{2}:){4}[0-9a-f]{2}\s*$/m);
      expect(guestUpSum).toMatch(/^[0-9a-f]{32}$/);
      expect(upResult).toBe(`${size} ${guestUpSum}`);
      expect(r.stdout, describeCli(r)).toContain(`${downSum}  /tmp/down`);
      expect(r.code).toBe(0);
      const stats = JSON.parse(r.stderr.slice(r.stderr.indexOf('{'))) as { devices: { net0: { txBytes: number; rxBytes: number } } };
      expect(stats.devices.net0.txBytes).toBeGreaterThan(size);
      expect(stats.devices.net0.rxBytes).toBeGreaterThan(size);
    }),
    RETRY_TIMEOUT_MS,
  );
});
