/**
 * The boot-test harness as a user of the package writes it: `await using`
 * a VM from createVm, wait for the shell on its console, run commands and
 * read their output and status, a wait that times out with the console's
 * last lines, a command aborted through an AbortSignal, and the VM
 * released at the end of the block (no thread or fd left).
 */
import { readdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { ConsoleWaitError, createVm, type VirtualMachine } from '../../src/index.js';
import { fixtures } from '../../fixtures/index.js';
import { BOOT_TIMEOUT_MS, PROMPT, consolesSeen, endingsSeen, kvmUnavailable, testCmdline } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';
import { buildPrintAndHaltKernel } from '../../src/testing/index.js';

const noKvm = kvmUnavailable();
const count = (dir: string) => readdirSync(dir).length;

/** Polls until `f()` equals `want` (threads end a moment after the VM does); gives the last value. */
async function settle(f: () => number, want: number): Promise<number> {
  for (let i = 0; i < 50 && f() !== want; i++) await new Promise((r) => setTimeout(r, 100));
  return f();
}

describe.skipIf(noKvm !== undefined)(`boot-test harness${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it("refuses vm.run on a VM built with console 'off', at once", async () => {
    await using vm = await createVm({ kernel: buildPrintAndHaltKernel('@@NO CONSOLE\n'), memory: '32M', console: 'off' });
    await expect(vm.run('true')).rejects.toThrow(/^vm\.run: this VM has no console \(console 'off'\); give it console 'serial' or 'virtio'$/);
  });

  it(
    'waits for the shell, runs commands, times out and aborts with the console in the error, and await using releases the VM',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      await readFile(fx.initramfs); // libuv's thread pool exists before the count
      const before = { fds: count('/proc/self/fd'), threads: count('/proc/self/task') };
      let disposed: VirtualMachine | undefined;
      {
        await using vm = await createVm({ kernel: fx.bzImage, initrd: fx.initramfs, memory: '128M', cmdline: testCmdline() });
        disposed = vm;
        consolesSeen.push(() => vm.console.text());
        let ending = '';
        vm.once('exit', (o) => (ending = o.message));
        endingsSeen.push(() => ending);
        vm.start();
        const init = await vm.console.waitFor(/TSVMM-INIT-OK/, { timeout: BOOT_TIMEOUT_MS });
        expect(init.index).toBeGreaterThan(0);
        await vm.console.waitFor(PROMPT, { timeout: BOOT_TIMEOUT_MS });

        expect(await vm.run('echo harness $((6*7))', { timeout: BOOT_TIMEOUT_MS })).toEqual({ output: 'harness 42\n', status: 0 });
        const missing = await vm.run('ls /no-such-file', { timeout: BOOT_TIMEOUT_MS });
        expect(missing.status).not.toBe(0);
        expect(missing.output).toMatch(/no-such-file/);

        // A wait that runs out names the pattern and carries the console's last lines.
        const late = await vm.console.waitFor(/never printed/, { timeout: 1000 }).catch((e: unknown) => e);
        expect(late).toBeInstanceOf(ConsoleWaitError);
        expect((late as ConsoleWaitError).code).toBe('ERR_TSVMM_WAIT_TIMEOUT');
        expect((late as ConsoleWaitError).tail).toContain('harness 42');

        // An abort ends the wait; the guest's shell is still there afterwards.
        const ac = new AbortController();
        const sleeping = vm.run('sleep 3', { signal: ac.signal });
        setTimeout(() => ac.abort(new Error('test abort')), 200);
        const aborted = await sleeping.catch((e: unknown) => e);
        expect((aborted as ConsoleWaitError).code).toBe('ERR_TSVMM_WAIT_ABORTED');
        expect(((aborted as ConsoleWaitError).cause as Error).message).toBe('test abort');
        expect((await vm.run('echo after', { timeout: BOOT_TIMEOUT_MS })).output).toBe('after\n');
      }
      // The end of the block stopped the VM and released it.
      expect((await disposed.wait()).kind).toBe('stopped');
      expect(await settle(() => count('/proc/self/task'), before.threads)).toBe(before.threads);
      expect(await settle(() => count('/proc/self/fd'), before.fds)).toBe(before.fds);
    }),
    RETRY_TIMEOUT_MS,
  );
});
