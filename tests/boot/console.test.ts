/**
 * The virtio console: `--console virtio` gives the guest hvc0 (virtio-
 * console) as its console. The kernel's messages from the driver's start
 * on and the shell reach stdout through it, typed input comes back, and
 * the UART carries none of it (the byte-per-exit path that makes a verbose
 * boot slow).
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { consolesSeen, GuestSession, PROMPT, kvmUnavailable, describeCli, runCli, testCmdline, until } from '../helpers/guest.js';
import { RETRY_TIMEOUT_MS, retryEmulatorFault } from '../helpers/host.js';

const noKvm = kvmUnavailable();

interface Stats {
  outcome: string;
  devices: { serial: { bytesOut: number }; console0: { txBytes: number; rxBytes: number; transport: { kind: string } } };
}

describe.skipIf(noKvm !== undefined)(`virtio console${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it.each(['pci', 'mmio'] as const)(
    'boots with hvc0 as the console over virtio-%s: boot log, shell, input answered, poweroff exit 0',
    retryEmulatorFault(async (transport: 'pci' | 'mmio') => {
      const fx = fixtures();
      const r = await runCli(
        [
          'run',
          '--kernel',
          fx.bzImage,
          '--initrd',
          fx.initramfs,
          '--memory',
          '128M',
          '--console',
          'virtio',
          '--transport',
          transport,
          '--stats',
          '--cmdline',
          testCmdline('tsvmm.mode=shell').replace('console=ttyS0', 'console=hvc0'),
        ],
        {
          drive: (child, out) => {
            void (async () => {
              await until(out, PROMPT);
              child.stdin.write('echo "answer-$((6 * 7)) on $(cat /sys/class/tty/console/active)"\n');
              await until(out, /answer-42 on/);
              child.stdin.write('poweroff -f\n');
            })().catch(() => child.kill('SIGTERM'));
          },
        },
      );
      // hvc0 prints from the moment the virtio-console driver is up (what Linux printed before is not replayed there).
      expect(r.stdout, describeCli(r)).toContain('Run /init as init process');
      expect(r.stdout, describeCli(r)).toContain('TSVMM-INIT-OK');
      expect(r.stdout, describeCli(r)).toMatch(/answer-42 on hvc0/);
      expect(r.code, r.stderr).toBe(0);
      const stats = JSON.parse(r.stderr.slice(r.stderr.indexOf('{'), r.stderr.lastIndexOf('}') + 1)) as Stats;
      const hvc = stats.devices.console0;
      expect(hvc.transport.kind).toBe(transport);
      expect(hvc.txBytes).toBeGreaterThan(500);
      expect(hvc.rxBytes).toBeGreaterThan(0);
      // Nothing went through the UART.
      expect(stats.devices.serial.bytesOut).toBe(0);
    }),
    RETRY_TIMEOUT_MS,
  );

  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-serial-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it(
    '--serial file=: with the virtio console, the UART (console=ttyS0 too) goes to the file, from the first kernel message, and not to stdout',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const file = join(dir, 'ttyS0.log');
      const r = await runCli([
        'run',
        '--kernel',
        fx.bzImage,
        '--initrd',
        fx.initramfs,
        '--memory',
        '128M',
        '--console',
        'virtio',
        '--serial',
        `file=${file}`,
        '--cmdline',
        testCmdline('tsvmm.mode=poweroff').replace('console=ttyS0', 'console=ttyS0 console=hvc0'),
      ]);
      expect(r.code, r.stderr).toBe(0);
      const serial = readFileSync(file, 'latin1');
      consolesSeen.push(() => serial);
      // The UART had the kernel's messages from the start; stdout (hvc0) only from its driver on.
      expect(serial).toContain('] Linux version ');
      expect(serial).toContain('Run /init as init process');
      expect(r.stdout, describeCli(r)).toContain('TSVMM-INIT-OK');
      expect(r.stdout, describeCli(r)).not.toContain('Linux version ');
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    "--console off --serial socket=: a client of the socket gets the guest's output from when it connects and the shell on ttyS0, and types into it; stdout stays empty",
    retryEmulatorFault(async () => {
      const fx = fixtures();
      const path = join(dir, 'ttyS0.sock');
      let seen = '';
      const r = await runCli(
        [
          'run',
          '--kernel',
          fx.bzImage,
          '--initrd',
          fx.initramfs,
          '--memory',
          '128M',
          '--console',
          'off',
          '--serial',
          `socket=${path}`,
          '--cmdline',
          testCmdline('tsvmm.mode=shell'),
        ],
        {
          drive: (child) => {
            void (async () => {
              const got = () => seen;
              await until(() => (existsSync(path) ? 'up' : ''), /up/);
              // Only its owner may connect: a client types into the guest.
              expect(statSync(path).mode & 0o777).toBe(0o600);
              const client = connect(path);
              client.on('error', (err) => (seen += `\n[test] client: ${String(err)}`));
              client.on('data', (d: Buffer) => (seen += d.toString('latin1')));
              await until(got, PROMPT);
              client.write('echo "answer-$((6 * 7)) on $(cat /sys/class/tty/console/active)"\n');
              await until(got, /answer-42 on ttyS0/);
              client.write('poweroff -f\n');
            })().catch((err) => {
              seen += `\n[test] ${String(err)}`;
              child.kill('SIGTERM');
            });
          },
        },
      );
      consolesSeen.push(() => seen);
      expect(r.code, `${r.stderr}\n${seen.slice(-2000)}`).toBe(0);
      expect(seen).toContain('TSVMM-INIT-OK');
      expect(seen).toMatch(/answer-42 on ttyS0/);
      expect(r.stdout, describeCli(r)).toBe('');
      // Nothing serves the socket after the VM (the sandboxed CLI may not remove it: the next claim replaces it).
      const after = await new Promise<string>((resolve) => {
        const s = connect(path);
        s.once('connect', () => {
          s.destroy();
          resolve('answers');
        });
        s.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? String(err)));
      });
      expect(['ENOENT', 'ECONNREFUSED']).toContain(after);
    }),
    RETRY_TIMEOUT_MS,
  );

  it.each(['thread', 'loop'] as const)(
    'answers what is typed while the guest prints without a pause (exit path %s): input is not starved by output',
    retryEmulatorFault(async (exitPath: 'thread' | 'loop') => {
      const fx = fixtures();
      const guest = await GuestSession.boot({ kernel: fx.bzImage, initrd: fx.initramfs, cmdline: testCmdline(), exitPath });
      await guest.waitFor(/TSVMM-INIT-OK/);
      await guest.waitFor(PROMPT);
      // A writer that never stops, on the serial console the shell reads.
      await guest.run('(while :; do echo flood-0123456789abcdefghijklmnopqrstuvwxyz; done) & echo $! > /tmp/flood');
      const before = guest.vm.console.outputLength;
      await guest.vm.console.waitFor(/(flood-0123456789abcdefghijklmnopqrstuvwxyz\r?\n){50}/, { from: before, timeout: 600_000 });
      const flooding = guest.vm.console.outputLength;
      // Typed into the flood: each command is answered, with its status.
      for (let i = 1; i <= 3; i++) {
        const r = await guest.run(`echo "answer-$((${i} * 42))"`);
        expect(r.status).toBe(0);
        expect(r.output).toContain(`answer-${i * 42}`);
      }
      // The guest printed all the while, and prints on.
      expect(guest.vm.console.text(flooding).split('flood-0123456789abcdefghijklmnopqrstuvwxyz').length).toBeGreaterThan(10);
      await guest.vm.console.waitFor(/(flood-0123456789abcdefghijklmnopqrstuvwxyz\r?\n){10}/, { from: guest.vm.console.outputLength, timeout: 600_000 });
      await guest.run('kill $(cat /tmp/flood)');
      const outcome = await guest.finish('reboot -f');
      expect(outcome.kind).toBe('reboot');
    }),
    RETRY_TIMEOUT_MS,
  );
});
