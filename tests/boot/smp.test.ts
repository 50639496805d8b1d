/**
 * SMP: the guest finds every vCPU through the MP table, runs a job on each,
 * and the VM ends cleanly whether its CPUs are busy or idle, by the guest's
 * reboot or by the host's SIGTERM.
 */
import { describe, expect, it } from 'vitest';
import { fixtures } from '../../fixtures/index.js';
import { PROMPT, kvmUnavailable, describeCli, runCli, testCmdline, until } from '../helpers/guest.js';
import { retryEmulatorFault, RETRY_TIMEOUT_MS } from '../helpers/host.js';

const noKvm = kvmUnavailable();
/** A hang guard for shutdown, not a speed check: stopping must not hang. */
const STOP_GUARD_MS = 60_000;

describe.skipIf(noKvm !== undefined)(`SMP${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  it(
    'runs 2 vCPUs, a job on each, and reboots while both are busy',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      let stopAsked = 0;
      const r = await runCli(['run', '--kernel', fx.bzImage, '--initrd', fx.initramfs, '--memory', '128M', '--cpus', '2', '--cmdline', testCmdline()], {
        drive: (child, out) => {
          const type = (line: string) => child.stdin.write(`${line}\n`);
          void (async () => {
            await until(out, /TSVMM-INIT-OK/);
            await until(out, PROMPT);
            type('echo "@@ON""LINE $(cat /sys/devices/system/cpu/online) $(nproc)"');
            await until(out, /@@ONLINE \S+ \d+/);
            // Each job pinned to one CPU reports the CPU it ran on (field 39 of /proc/self/stat).
            type(
              `for c in 0 1; do taskset -c $c sh -c 'i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; echo "@@JOB $0 ran-on $(cut -d" " -f39 /proc/self/stat)"' $c & done; wait`,
            );
            await until(out, /@@JOB 0 ran-on \d[\s\S]*@@JOB 1 ran-on \d|@@JOB 1 ran-on \d[\s\S]*@@JOB 0 ran-on \d/);
            type('for c in 0 1; do taskset -c $c sh -c "while :; do :; done" & done; echo "@@BU""SY"');
            await until(out, /@@BUSY/);
            stopAsked = performance.now();
            type('reboot -f');
            // A reboot that did not happen (its busybox died) fails now, not at the hang guard.
            setTimeout(() => child.kill('SIGKILL'), STOP_GUARD_MS).unref();
          })().catch((err: unknown) => {
            console.error(String(err)); // the console so far: what the guest did instead
            child.kill('SIGKILL');
          });
        },
      });
      // How tsvmm ended, in every failure message below.
      const how = `exit ${r.code} signal ${r.signal}; stderr: ${r.stderr.slice(-1500)}; console tail: ${r.stdout.slice(-1500)}`;
      expect(r.stdout, how).toMatch(/@@ONLINE 0-1 2/);
      expect(r.stdout, how).toMatch(/@@JOB 0 ran-on 0/);
      expect(r.stdout, how).toMatch(/@@JOB 1 ran-on 1/);
      expect(r.stdout, how).toContain('smpboot: Total of 2 processors activated');
      expect(r.code, how).toBe(0);
      expect(stopAsked).toBeGreaterThan(0);
      expect(performance.now() - stopAsked).toBeLessThan(STOP_GUARD_MS);
    }),
    RETRY_TIMEOUT_MS,
  );

  it(
    'boots 4 vCPUs on a 2-core host and stops on SIGTERM while idle',
    retryEmulatorFault(async () => {
      const fx = fixtures();
      let killedAt = 0;
      const r = await runCli(['run', '--kernel', fx.bzImage, '--initrd', fx.initramfs, '--memory', '128M', '--cpus', '4', '--cmdline', testCmdline()], {
        drive: (child, out) => {
          void (async () => {
            await until(out, /TSVMM-INIT-OK/);
            await until(out, PROMPT);
            child.stdin.write('echo "@@ON""LINE $(cat /sys/devices/system/cpu/online) $(nproc)"\n');
            await until(out, /@@ONLINE \S+ \d+/);
            child.stdin.write('echo "@@CLOCK""SOURCE $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"\n');
            await until(out, /@@CLOCKSOURCE \S+/);
            // Let the guest go idle: every vCPU halts in the kernel, inside KVM_RUN.
            await new Promise((resolve) => setTimeout(resolve, 3000));
            killedAt = performance.now();
            child.kill('SIGTERM');
            setTimeout(() => child.kill('SIGKILL'), STOP_GUARD_MS).unref();
          })().catch((err: unknown) => {
            console.error(String(err)); // the console so far: what the guest did instead
            child.kill('SIGKILL');
          });
        },
      });
      const how = `exit ${r.code} signal ${r.signal}; stderr: ${r.stderr.slice(-1500)}`;
      expect(r.stdout, how).toMatch(/@@ONLINE 0-3 4/);
      // A clock that is not the jiffies: without one, an idle guest cannot stop its tick (on the PVM host, where
      // tsvmm adds nopv, it comes from tsc_early_khz=; elsewhere it is kvm-clock).
      expect(r.stdout, describeCli(r)).toMatch(/@@CLOCKSOURCE (tsc|kvm-clock)\r?\n/);
      expect(r.signal).toBeNull();
      expect(r.code).toBe(143);
      expect(r.stderr).toContain('stopped by SIGTERM');
      expect(performance.now() - killedAt).toBeLessThan(STOP_GUARD_MS);
    }),
    RETRY_TIMEOUT_MS,
  );
});
