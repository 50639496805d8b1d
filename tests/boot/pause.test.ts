/**
 * Pause and resume: every vCPU leaves guest mode and the guest's progress
 * stops (a ticker it runs prints nothing while paused), then goes on from
 * where it was; a paused VM can be stopped; the state rules hold.
 */
import { describe, expect, it } from 'vitest';
import { createVm, VmStateError } from '../../src/index.js';
import { fixtures } from '../../fixtures/index.js';
import { BOOT_TIMEOUT_MS, PROMPT, consolesSeen, endingsSeen, kvmUnavailable, testCmdline } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';

const noKvm = kvmUnavailable();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** Longer than the coalesced ring's slowest drain (1 s), so output made before the pause has arrived. */
const SETTLE_MS = 1500;

describe.skipIf(noKvm !== undefined)(`pause and resume${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it(
    'stops a 2-vCPU guest where it is and lets it go on; a paused VM stops cleanly',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      await using vm = await createVm({ kernel: fx.bzImage, initrd: fx.initramfs, memory: '128M', cpus: 2, cmdline: testCmdline() });
      consolesSeen.push(() => vm.console.text());
      let ending = '';
      vm.once('exit', (o) => (ending = o.message));
      endingsSeen.push(() => ending);
      expect(vm.state).toBe('created');
      await expect(vm.pause()).rejects.toThrow(VmStateError);
      vm.start();
      expect(vm.state).toBe('running');
      expect(() => vm.resume()).toThrow(/cannot resume a VM that is running/);
      await vm.console.waitFor(PROMPT, { timeout: BOOT_TIMEOUT_MS });
      const up1 = Number((await vm.run('cat /proc/uptime', { timeout: BOOT_TIMEOUT_MS })).output.split(' ')[0]);
      // A ticker in the guest: a line every 100 ms of guest time.
      vm.console.write('(i=0; while :; do i=$((i+1)); echo "@@TI""CK $i"; sleep 0.1; done) &\n');
      await vm.console.waitFor(/@@TICK 3\r?\n/, { timeout: BOOT_TIMEOUT_MS });

      await vm.pause();
      expect(vm.state).toBe('paused');
      await expect(vm.pause()).rejects.toThrow(/cannot pause a VM that is paused/);
      await sleep(SETTLE_MS);
      const atPause = vm.console.outputLength;
      const lastTick = Math.max(...[...vm.console.text().matchAll(/@@TICK (\d+)/g)].map((m) => Number(m[1])));
      await sleep(2000);
      expect(vm.console.outputLength, 'the guest printed while paused').toBe(atPause);

      vm.resume();
      expect(vm.state).toBe('running');
      // The ticker goes on from where it stopped.
      const next = await vm.console.waitFor(new RegExp(`@@TICK ${lastTick + 2}\\r?\\n`), { from: atPause, timeout: BOOT_TIMEOUT_MS });
      expect(next.index).toBeGreaterThanOrEqual(atPause);
      vm.console.write('kill %1\n');
      const up2 = Number((await vm.run('cat /proc/uptime', { timeout: BOOT_TIMEOUT_MS })).output.trim().split('\n').at(-1)!.split(' ')[0]);
      expect(up2).toBeGreaterThan(up1); // the guest's clock went on, forwards

      // A pause right after a resume (the vCPU threads may still be parked) completes too.
      await vm.pause();
      vm.resume();
      await vm.pause();
      expect(vm.state).toBe('paused');
      vm.resume();

      // Stopping a paused VM ends it, and its threads.
      await vm.pause();
      const outcome = await vm.stop('stopped while paused');
      expect(outcome.kind).toBe('stopped');
      expect(vm.state).toBe('ended');
      expect(() => vm.resume()).toThrow(VmStateError);
    }),
    RETRY_TIMEOUT_MS,
  );
});
