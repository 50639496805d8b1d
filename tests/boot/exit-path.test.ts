/**
 * The exit path of a vCPU on the event loop's thread (Vcpu.start, on:
 * 'loop'), against a real /dev/kvm: while the guest runs without exits,
 * or after its exit handler asked the loop for work, the loop still serves
 * timers, promise jobs and I/O, and a stop from the host ends the vCPU.
 * The guest is TinyGuest's real-mode code: `out` to port 0x511 once, then
 * `jmp $` forever (no exits at all).
 *
 * And on both paths (a vCPU thread's hand-off polls, and the main thread
 * takes exits directly for a while after each answer): while a guest exits
 * without a pause (`out` in a loop), the loop serves the same.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { CONTINUE, STOP } from '../../src/kvm/exits.js';
import { Kvm } from '../../src/kvm/kvm.js';
import { FAST_READ_SLOTS, FastReadTable } from '../../src/kvm/fast-reads.js';
import { native } from '../../src/kvm/native.js';
import { TinyGuest } from '../../src/kvm/probe.js';
import { withTimeout } from '../helpers/assert.js';
import { kvmUnavailable } from '../helpers/guest.js';

const noKvm = kvmUnavailable();
/** A hang guard, not a speed check. */
const GUARD_MS = 60_000;

/** mov dx, 0x511; out dx, al; jmp $ */
const OUT_THEN_SPIN = Uint8Array.from([0xba, 0x11, 0x05, 0xee, 0xeb, 0xfe]);
/** mov dx, 0x511; l: out dx, al; jmp l */
const OUT_FOREVER = Uint8Array.from([0xba, 0x11, 0x05, 0xee, 0xeb, 0xfd]);

function withGuard<T>(p: Promise<T>, what: string): Promise<T> {
  return withTimeout(p, GUARD_MS, () => `${what}: no answer after ${GUARD_MS / 1000} s`);
}

/** A TCP round trip on loopback, started now: a server that says hello, and a client that reads it to the end. */
async function tcpRoundTrip(): Promise<string> {
  const server = createServer((s) => s.end('hello'));
  try {
    const port = await withGuard(
      new Promise<number>((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port))),
      'listen',
    );
    return await withGuard(
      new Promise<string>((resolve, reject) => {
        const c = connect(port, '127.0.0.1');
        let got = '';
        c.on('data', (d) => (got += d.toString()));
        c.on('end', () => resolve(got));
        c.on('error', reject);
      }),
      'TCP round trip',
    );
  } finally {
    server.close();
  }
}

/** A TinyGuest per test (in a describe block): stopped and closed after each test. */
function guestPerTest(): { create(code: Uint8Array): TinyGuest } {
  let kvm: Kvm | undefined;
  let guest: TinyGuest | undefined;
  afterEach(async () => {
    await guest?.vcpu.stop();
    guest?.close();
    kvm?.close();
    guest = kvm = undefined;
  });
  return {
    create(code) {
      kvm = Kvm.open();
      guest = TinyGuest.create(kvm, code);
      return guest;
    },
  };
}

describe.skipIf(noKvm !== undefined)(`a vCPU on the event loop${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  const open: Array<{ kvm: Kvm; guest: TinyGuest }> = [];
  afterEach(async () => {
    for (const { kvm, guest } of open.splice(0)) {
      await guest.vcpu.stop();
      guest.close();
      kvm.close();
    }
  });

  function spinningGuest(onPortWrite: () => void): TinyGuest {
    const kvm = Kvm.open();
    const guest = TinyGuest.create(kvm, OUT_THEN_SPIN);
    open.push({ kvm, guest });
    guest.vcpu.start({
      onExit: (exit) => {
        if (exit.kind === 'io' && exit.port === 0x511) {
          onPortWrite();
          return CONTINUE;
        }
        return STOP;
      },
      onError: (err) => {
        throw err;
      },
      on: 'loop',
    });
    return guest;
  }

  it('fires a timer, runs a promise job and accepts a connection set up by the exit handler while the guest spins', async () => {
    let timerFired!: () => void;
    let jobRan!: () => void;
    const timer = new Promise<void>((r) => (timerFired = r));
    const job = new Promise<void>((r) => (jobRan = r));
    let writes = 0;
    spinningGuest(() => {
      writes++;
      // Set up from inside the exit handler: a timer due sooner than any
      // the loop had, and a promise job.
      setTimeout(timerFired, 20);
      void Promise.resolve().then(jobRan);
    });
    await withGuard(job, 'promise job');
    await withGuard(timer, 'timer set in the exit handler');
    expect(writes).toBe(1);
    // I/O the loop starts while the guest spins: a TCP round trip.
    expect(await tcpRoundTrip()).toBe('hello');
  });

  it('stops on the host’s request while the guest spins, and samples it between bursts', async () => {
    let wrote!: () => void;
    const firstExit = new Promise<void>((r) => (wrote = r));
    const guest = spinningGuest(() => wrote());
    const ring = guest.vcpu.sampleRing(7);
    // Past its port write, the guest spins on the jmp (a fixed 50 ms was not enough in the emulated AMD-V host).
    await withGuard(firstExit, 'the port write');
    await new Promise((r) => setTimeout(r, 50));
    guest.vcpu.sample();
    // The sample is the spinning jmp at 0x1004 (CODE_ADDR 0x1000 + 4).
    expect(ring[0]).toBe(1n);
    expect(ring[1]).toBe(0x1004n);
    await withGuard(guest.vcpu.stop(), 'stop');
    expect(guest.vcpu.running).toBe(false);
  });
});

describe.skipIf(noKvm !== undefined).each(['thread', 'loop'] as const)(
  `a guest that exits without a pause, its vCPU on the %s${noKvm ? ` (skipped: ${noKvm})` : ''}`,
  (on) => {
    const guests = guestPerTest();

    it('lets the loop run a promise job and a nextTick callback, fire a timer and serve a TCP round trip set up by exit handlers, then stops', async () => {
      let timerFired!: () => void;
      let jobRan!: () => void;
      let tickRan!: () => void;
      const timer = new Promise<void>((r) => (timerFired = r));
      const job = new Promise<void>((r) => (jobRan = r));
      const tick = new Promise<void>((r) => (tickRan = r));
      let exits = 0;
      let exitsAtJob: number | undefined;
      let tickDone = false;
      let timerSet = false;
      let failed: Error | undefined;
      const guest = guests.create(OUT_FOREVER);
      guest.vcpu.start({
        onExit: (exit) => {
          if (exit.kind !== 'io' || exit.port !== 0x511) return STOP;
          if (++exits === 1) {
            void Promise.resolve().then(() => {
              exitsAtJob = exits;
              jobRan();
            });
            // With no timer due and no I/O, the loop gets its turn (and runs
            // promise jobs and nextTick callbacks) because a burst, or the
            // thread path's run of direct exits, is bounded in time.
            process.nextTick(() => {
              tickDone = true;
              tickRan();
            });
          } else if (tickDone && !timerSet) {
            timerSet = true;
            setTimeout(timerFired, 20);
          }
          return CONTINUE;
        },
        onError: (err) => {
          failed = err;
        },
        on,
      });
      await withGuard(job, 'promise job');
      expect(exitsAtJob).toBeGreaterThanOrEqual(1);
      await withGuard(tick, 'nextTick callback');
      await withGuard(timer, 'timer set in the exit handler');
      const seenAtTimer = exits;
      expect(await tcpRoundTrip()).toBe('hello');
      // The guest goes on exiting (it is not the loop's turns that were
      // served by stopping it). On a loaded host the vCPU thread may not have
      // been scheduled during the loop's work: wait for its next exit.
      expect(seenAtTimer).toBeGreaterThan(1);
      await withGuard(
        (async () => {
          while (exits <= seenAtTimer) await new Promise((r) => setTimeout(r, 1));
        })(),
        'the next exit',
      );
      await withGuard(guest.vcpu.stop(), 'stop');
      expect(guest.vcpu.running).toBe(false);
      expect(failed).toBeUndefined();
    });
  },
);

/**
 * mov dx, 0x3fd; mov cx, 1000; xor bx, bx; l: in al, dx; add bl, al; loop l;
 * mov al, bl; mov dx, 0x511; out dx, al; jmp $: 1000 reads of port 0x3fd,
 * their sum (mod 256) written to port 0x511.
 */
const READ_1000_THEN_OUT = Uint8Array.from([
  0xba, 0xfd, 0x03, 0xb9, 0xe8, 0x03, 0x31, 0xdb, 0xec, 0x00, 0xc3, 0xe2, 0xfb, 0x88, 0xd8, 0xba, 0x11, 0x05, 0xee, 0xeb, 0xfe,
]);

describe.skipIf(noKvm !== undefined).each(['thread', 'loop'] as const)(
  `port reads the addon answers (the fast-read table), its vCPU on the %s${noKvm ? ` (skipped: ${noKvm})` : ''}`,
  (on) => {
    const guests = guestPerTest();

    /** Runs the guest until its port 0x511 write; returns what it wrote and the reads of 0x3fd TypeScript saw. */
    async function run(table: FastReadTable, valueInTs: (readsSeen: number) => number): Promise<{ sum: number; readsSeen: number }> {
      const guest = guests.create(READ_1000_THEN_OUT);
      let readsSeen = 0;
      let done!: (sum: number) => void;
      let failed!: (err: Error) => void;
      const wrote = new Promise<number>((resolve, reject) => {
        done = resolve;
        failed = reject;
      });
      guest.vcpu.start({
        onExit: (exit) => {
          if (exit.kind === 'io' && !exit.write && exit.port === 0x3fd) {
            exit.data[0] = valueInTs(++readsSeen);
            return CONTINUE;
          }
          if (exit.kind === 'io' && exit.write && exit.port === 0x511) done(exit.data[0]!);
          else failed(new Error(`unexpected exit ${JSON.stringify(exit)}`));
          return STOP;
        },
        onError: failed,
        on,
      });
      guest.vcpu.setFastReads(table);
      return { sum: await withGuard(wrote, 'the sum of the reads'), readsSeen };
    }

    it('answers every read from the published value, without an exit', async () => {
      const table = FastReadTable.shared(native());
      table.add(0x3fd).publish(7);
      // setFastReads comes just after start: on a vCPU thread the first
      // reads may still exit, and TypeScript answers them with the same 7.
      const { sum, readsSeen } = await run(table, () => 7);
      expect(readsSeen + table.hits(0x3fd)).toBe(1000);
      expect(table.hits(0x3fd)).toBeGreaterThan(900);
      expect(sum).toBe((7 * 1000) % 256);
    });

    it('lets the reads reach TypeScript while no value is published, and follows the value as it changes', async () => {
      const table = FastReadTable.shared(native());
      const mirror = table.add(0x3fd);
      // TypeScript answers 1; from its 100th read on it publishes 3, and the rest never exit.
      const { sum, readsSeen } = await run(table, (n) => {
        if (n === 100) mirror.publish(3);
        return 1;
      });
      expect(readsSeen).toBe(100);
      expect(table.hits(0x3fd)).toBe(900);
      expect(sum).toBe((100 + 900 * 3) % 256);
    });
  },
);

/** The names of this process's threads (/proc/self/task/*\/comm). */
function threadNames(): string[] {
  return readdirSync('/proc/self/task').map((tid) => {
    try {
      return readFileSync(`/proc/self/task/${tid}/comm`, 'latin1').trim();
    } catch {
      return ''; // the thread ended while listed
    }
  });
}

describe.skipIf(noKvm !== undefined).each(['thread', 'loop'] as const)(`the addon's threads, a vCPU on the %s${noKvm ? ` (skipped: ${noKvm})` : ''}`, (on) => {
  const guests = guestPerTest();

  it('are named for ps and top -H: tsvmm-vcpuN on a thread, tsvmm-watcher beside a vCPU on the loop', async () => {
    const guest = guests.create(OUT_THEN_SPIN);
    let wrote!: () => void;
    const written = new Promise<void>((r) => (wrote = r));
    guest.vcpu.start({
      onExit: (exit) => {
        if (exit.kind === 'io' && exit.port === 0x511) wrote();
        return CONTINUE;
      },
      onError: (err) => {
        throw err;
      },
      on,
    });
    await withGuard(written, 'the first exit');
    const names = threadNames();
    if (on === 'thread') {
      expect(names.filter((n) => n === 'tsvmm-vcpu0')).toHaveLength(1);
    } else {
      expect(names).not.toContain('tsvmm-vcpu0'); // vCPU 0 runs on the main thread
      expect(names.filter((n) => n === 'tsvmm-watcher')).toHaveLength(1);
    }
  });
});

describe.skipIf(noKvm !== undefined)(`memory the addon shares with JavaScript${noKvm ? ` (skipped: ${noKvm})` : ''}`, () => {
  const guests = guestPerTest();

  it('is refused when JavaScript allocated it, for a fast-read table, a sample ring and guest RAM', () => {
    const addon = native();
    const guest = guests.create(OUT_THEN_SPIN);
    guest.vcpu.start({ onExit: () => STOP, onError: () => {}, on: 'thread' });
    const handle = (guest.vcpu as unknown as { handle: number }).handle;
    // A plain array could be transferred away and collected while the vCPU thread writes it.
    expect(() => addon.setFastReads(handle, new Int32Array(FAST_READ_SLOTS))).toThrow(/fast-read table must be a view of memory from allocShared/);
    expect(() => addon.setSampleBuffer(handle, new BigUint64Array(8))).toThrow(/sample buffer must be a view of memory from allocShared/);
    // A view too short for the table, even of shared memory.
    expect(() => addon.setFastReads(handle, new Int32Array(addon.allocShared(FAST_READ_SLOTS * 4), 8, FAST_READ_SLOTS - 2))).toThrow(
      `fast-read table needs ${FAST_READ_SLOTS} slots`,
    );
    // A memory slot over a buffer the collector may free, or over a vCPU's kvm_run.
    const vm = guest.vm;
    expect(() => addon.setUserMemoryRegion(vm.fd, 9, 0, 0x100000, new ArrayBuffer(4096), 0, 4096)).toThrow(
      /memory must be an ArrayBuffer from allocGuestMemory/,
    );
    const run = addon.mapVcpuRun(guest.vcpu.fd, 4096);
    expect(() => addon.setUserMemoryRegion(vm.fd, 9, 0, 0x100000, run, 0, 4096)).toThrow(/memory must be an ArrayBuffer from allocGuestMemory/);
    addon.unmap(run);
    const ram = addon.allocGuestMemory(4096);
    addon.unmap(ram);
    expect(() => addon.setUserMemoryRegion(vm.fd, 9, 0, 0x100000, ram, 0, 4096)).toThrow(
      'memory region must be a non-empty page-aligned range inside the buffer',
    ); // unmapped: detached, 0 bytes
  });

  it('stays with its owner when JavaScript transfers it: a transfer copies it, or is refused', () => {
    const table = FastReadTable.shared(native());
    table.add(0x3fd).publish(0x60);
    let copy: Int32Array | undefined;
    try {
      copy = structuredClone(table.slots, { transfer: [table.slots.buffer as ArrayBuffer] });
    } catch (err) {
      expect((err as Error).name).toBe('DataCloneError'); // Node 21 and later refuse the transfer
    }
    expect(table.slots.length).toBe(FAST_READ_SLOTS);
    expect(table.slots.buffer.byteLength).toBe(FAST_READ_SLOTS * 4);
    if (copy) {
      expect(copy.buffer).not.toBe(table.slots.buffer);
      expect(Array.from(copy)).toEqual(Array.from(table.slots));
    }
  });
});
