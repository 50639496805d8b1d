/**
 * Teardown is total: a close that throws is logged, everything after it
 * still closes (no fd of the VM left), and wait() settles; a wait with an
 * AbortSignal ends on the abort.
 */
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { createVm } from '../../src/index.js';
import { buildPrintAndHaltKernel } from '../../src/testing/index.js';
import { kvmUnavailable } from '../helpers/guest.js';

const noKvm = kvmUnavailable();

describe.skipIf(noKvm !== undefined)(`VM teardown${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-teardown-'));
  const kernel = join(dir, 'print-ok.elf');
  writeFileSync(kernel, buildPrintAndHaltKernel('ok\n'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('logs a close that throws, closes the rest, and settles wait()', async () => {
    const lines: string[] = [];
    const logger = pino({ level: 'error' }, new Writable({ write: (c: Buffer, _e, cb) => (lines.push(c.toString()), cb()) }));
    const fds = readdirSync('/proc/self/fd').length;
    const vm = await createVm({ kernel, memory: '32M', logger });
    expect(readdirSync('/proc/self/fd').length).toBeGreaterThan(fds);
    // A device whose close fails.
    (vm as unknown as { virtio: { close(): void } }).virtio.close = () => {
      throw new Error('close failed on purpose');
    };
    vm.start();
    // A wait with a signal ends on the abort; the VM runs on.
    const ac = new AbortController();
    const waiting = vm.wait({ signal: ac.signal });
    ac.abort(new Error('enough waiting'));
    await expect(waiting).rejects.toMatchObject({ name: 'AbortError', cause: { message: 'enough waiting' } });
    expect(vm.state).toBe('running');
    // The aborted wait left nothing behind on the running VM.
    expect((vm as unknown as { waiters: Set<unknown> }).waiters.size).toBe(0);
    const outcome = await vm.stop('test over');
    expect(outcome.kind).toBe('stopped');
    // A wait with a signal after the end resolves at once.
    await expect(vm.wait({ signal: new AbortController().signal })).resolves.toMatchObject({ kind: 'stopped' });
    expect(lines.join('')).toMatch(/"step":"close virtio devices".*vm teardown step failed|vm teardown step failed.*"step":"close virtio devices"/);
    expect(lines.join('')).toContain('close failed on purpose');
    // Every fd the VM had (/dev/kvm, the VM, its vCPU, eventfds) is closed all the same.
    for (let i = 0; i < 50 && readdirSync('/proc/self/fd').length !== fds; i++) await new Promise((r) => setTimeout(r, 100));
    expect(readdirSync('/proc/self/fd').length).toBe(fds);
  }, 60_000);
});
