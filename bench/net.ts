/**
 * virtio-net TCP throughput over a real TAP device, each way, with the
 * host's own loopback in the same network namespace as the yardstick.
 *
 * Setup as in tests/boot/net.test.ts: a namespace made and removed here,
 * tap0 in it with 10.0.2.1/24 on the host side, the VMM (`tsvmm run`, the
 * CLI) started inside it with `ip netns exec`, the guest at 10.0.2.15.
 *
 * Each transfer moves N MiB over one TCP connection that busybox nc in the
 * guest opens to a small Node peer on the host (inside the namespace):
 * - guest -> host: `nc 10.0.2.1 PORT < /tmp/up` (an N MiB file made in the
 *   guest's RAM first, not timed); the peer counts bytes;
 * - host -> guest: `nc 10.0.2.1 PORT <&3 > /dev/null` (fd 3 a FIFO held
 *   open, see transferCommand); the peer sends N MiB and half-closes, and
 *   the guest's nc closes when it has read it all.
 * The peer times each transfer from accepting the connection to the last
 * byte (guest -> host) or to the guest's close (host -> guest): host-side
 * timing, in the peer process. The guest's shell also times its nc
 * (/proc/uptime), kept in the JSON.
 *
 * The loopback runs are the same nc commands, by the same static busybox,
 * on the host inside the namespace against 127.0.0.1, with the same peer.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { fixtures } from '../fixtures/index.js';
import { BOOT_TIMEOUT_MS, PROMPT, runCli, testCmdline, type CliResult } from './lib/guest.js';
import type { Benchmark, BenchContext, BenchResult, Row } from './lib/benchmark.js';
import { CliGuest, HOST_BUSYBOX, runTimed, runTimedOnHost, shellQuote } from './lib/guest-shell.js';
import { qemuRow } from './lib/qemu.js';
import { median, round } from './lib/stats.js';

const HOST_IP = '10.0.2.1';
const GUEST_IP = '10.0.2.15';
const UP_PORT = 5101;
const DOWN_PORT = 5102;
const MEMORY = '256M';
const MIB = 1024 * 1024;

type Direction = 'up' | 'down';
type Where = 'guest' | 'loopback';

interface PeerReport {
  bytes: number;
  /** ms from accepting the connection to the end of the transfer, in the peer process. */
  ms: number;
  /** ms from accepting to the first byte received (up only). */
  firstByteMs?: number;
}

interface Transfer {
  where: Where;
  direction: Direction;
  round: number;
  bytes: number;
  peerMs: number;
  /** MB/s (10^6 bytes) from the peer's timing. */
  mbps: number;
  /** The nc command's own elapsed time, timed by the shell that ran it. */
  shellSeconds: number;
  loadAverage: number[];
}

/**
 * A one-connection TCP peer inside the namespace: 'sink' counts what it
 * receives, 'source' sends `bytes` and half-closes. Prints LISTENING, then
 * one JSON line ({@link PeerReport}) when the transfer is over.
 */
export function startPeer(ns: string, mode: 'sink' | 'source', ip: string, port: number, bytes: number): Promise<{ report: Promise<PeerReport> }> {
  const script = `
    const net = require('net');
    const now = () => Number(process.hrtime.bigint()) / 1e6;
    const srv = net.createServer({ allowHalfOpen: true }, (s) => {
      srv.close();
      const t0 = now();
      let n = 0, first;
      const done = () => { console.log(JSON.stringify({ bytes: n, ms: now() - t0, firstByteMs: first })); s.destroy(); };
      if (${JSON.stringify(mode)} === 'sink') {
        s.on('data', (d) => { if (first === undefined) first = now() - t0; n += d.length; });
        s.on('end', done);
      } else {
        const chunk = Buffer.alloc(256 * 1024);
        let left = ${bytes};
        const pump = () => {
          while (left > 0) {
            const k = Math.min(left, chunk.length);
            left -= k; n += k;
            if (!s.write(k === chunk.length ? chunk : chunk.subarray(0, k))) { s.once('drain', pump); return; }
          }
          s.end();
        };
        pump();
        s.resume();
        s.on('end', done);
      }
      s.on('error', (e) => { console.error(e.message); process.exit(1); });
    });
    srv.listen(${port}, ${JSON.stringify(ip)}, () => console.log('LISTENING'));
    setTimeout(() => process.exit(2), ${BOOT_TIMEOUT_MS}).unref();`;
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  const report = new Promise<PeerReport>((resolve, reject) =>
    child.on('close', (code) => {
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (code === 0 && line) resolve(JSON.parse(line) as PeerReport);
      else reject(new Error(`net peer (${mode} on ${ip}:${port}) exited ${code}: ${out}`));
    }),
  );
  return new Promise((resolve, reject) => {
    const t = setInterval(() => {
      if (out.includes('LISTENING')) {
        clearInterval(t);
        resolve({ report });
      }
    }, 20);
    report.catch((err: unknown) => {
      clearInterval(t);
      reject(err as Error);
    });
  });
}

/**
 * The nc command of one transfer, the same in the guest and on the host.
 * Receiving, nc's stdin is a FIFO held open read-write (it never gives data
 * nor EOF): with stdin at EOF, busybox nc half-closes at once, and the peer
 * could no longer tell when the receiver has read everything. This way nc
 * closes the connection only once it has read the sender's EOF, and the
 * peer times up to that close.
 */
export function transferCommand(direction: Direction, nc: string, ip: string, port: number, file: string, fifo: string): string {
  return direction === 'up' ? `${nc} ${ip} ${port} < ${file}` : `exec 3<>${fifo}; ${nc} ${ip} ${port} <&3 > /dev/null`;
}

/** Four significant digits: guest MB/s here is a few hundredths. */
const sig4 = (x: number) => Number(x.toPrecision(4));

const load = () => os.loadavg().map((x) => round(x, 2));

export const netThroughput: Benchmark = {
  name: 'net',
  description: 'virtio-net TCP MB/s over a TAP device, guest->host and host->guest (busybox nc), against the host loopback in the same namespace',
  slow: true,
  options: [
    { name: 'net-mib', env: 'TSVMM_BENCH_NET_MIB', default: 1, description: 'MiB moved per transfer, each way' },
    { name: 'net-rounds', env: 'TSVMM_BENCH_NET_ROUNDS', default: 3, description: 'transfers each way (and loopback), interleaved' },
  ],

  async run(bc: BenchContext): Promise<BenchResult> {
    if (process.getuid?.() !== 0) throw new Error('the net benchmark makes a network namespace and a TAP device: it needs root');
    const mib = bc.numberOption('net-mib');
    const rounds = bc.numberOption('net-rounds');
    for (const [name, v] of [
      ['net-mib', mib],
      ['net-rounds', rounds],
    ] as const) {
      if (!Number.isInteger(v) || v < 1) throw new Error(`--${name} must be a positive integer (got ${v})`);
    }
    const bytes = mib * MIB;
    const fx = fixtures();
    const ns = `tsvmm-bench-net-${process.pid}`;
    const ran: string[] = [];
    const sh = (...argv: string[]) => {
      ran.push(shellQuote(argv));
      return execFileSync(argv[0]!, argv.slice(1), { encoding: 'utf8' });
    };
    const inNs = (...argv: string[]) => sh('ip', 'netns', 'exec', ns, ...argv);
    const dir = mkdtempSync(join(bc.outDir, 'net-'));
    const hostFile = join(dir, 'up');
    writeFileSync(hostFile, Buffer.alloc(bytes));
    const hostFifo = join(dir, 'hold');
    sh('mkfifo', hostFifo);

    const transfers: Transfer[] = [];
    let cli: CliResult | undefined;
    let guestFacts: Record<string, unknown> = {};
    sh('ip', 'netns', 'add', ns);
    try {
      inNs('ip', 'link', 'set', 'lo', 'up');
      inNs('ip', 'tuntap', 'add', 'dev', 'tap0', 'mode', 'tap');
      inNs('ip', 'addr', 'add', `${HOST_IP}/24`, 'dev', 'tap0');
      inNs('ip', 'link', 'set', 'tap0', 'up');

      const loopback = async (direction: Direction, r: number) => {
        const port = direction === 'up' ? UP_PORT : DOWN_PORT;
        const peer = await startPeer(ns, direction === 'up' ? 'sink' : 'source', '127.0.0.1', port, bytes);
        const cmd = transferCommand(direction, `${HOST_BUSYBOX} nc`, '127.0.0.1', port, hostFile, hostFifo);
        const t = runTimedOnHost(cmd, { wrap: ['ip', 'netns', 'exec', ns] });
        if (r === 0) ran.push(t.commandLine);
        const rep = await peer.report;
        if (rep.bytes !== bytes) throw new Error(`loopback ${direction}: the peer counted ${rep.bytes} bytes, expected ${bytes}`);
        transfers.push({
          where: 'loopback',
          direction,
          round: r,
          bytes,
          peerMs: round(rep.ms, 2),
          mbps: sig4(bytes / 1e6 / (rep.ms / 1e3)),
          shellSeconds: t.seconds,
          loadAverage: load(),
        });
      };

      const args = [
        'run',
        '--kernel',
        fx.bzImage,
        '--initrd',
        fx.initramfs,
        '--memory',
        MEMORY,
        '--net',
        'tap=tap0',
        '--stats',
        '--name',
        'bench-net',
        '--cmdline',
        testCmdline(),
      ];
      ran.push(shellQuote(['ip', 'netns', 'exec', ns, process.execPath, 'bin/tsvmm.js', ...args]));
      const holder: { guest?: CliGuest } = {};
      bc.progress('net: booting the guest inside the namespace, this takes minutes...');
      const done = runCli(args, {
        wrap: ['ip', 'netns', 'exec', ns],
        drive: (child) => {
          holder.guest = new CliGuest(child);
        },
      });
      const g = holder.guest!;
      try {
        await g.waitFor(/TSVMM-INIT-OK/);
        await g.waitFor(PROMPT);
        const setup = await runTimed(g, `ip addr add ${GUEST_IP}/24 dev eth0 && ip link set eth0 up && ping -c 2 ${HOST_IP}`, { allowFailure: true });
        if (setup.status !== 0) throw new Error(`the guest cannot reach the host over tap0:\n${setup.out}`);
        const prep = await runTimed(g, `dd if=/dev/zero of=/tmp/up bs=1M count=${mib} 2>/dev/null && mkfifo /tmp/hold`);
        guestFacts = { makeUpFileSeconds: prep.seconds };

        const viaGuest = async (direction: Direction, r: number) => {
          const port = direction === 'up' ? UP_PORT : DOWN_PORT;
          const peer = await startPeer(ns, direction === 'up' ? 'sink' : 'source', HOST_IP, port, bytes);
          const cmd = transferCommand(direction, 'nc', HOST_IP, port, '/tmp/up', '/tmp/hold');
          const t = await runTimed(g, cmd);
          const rep = await peer.report;
          if (rep.bytes !== bytes) throw new Error(`guest ${direction}: the peer counted ${rep.bytes} bytes, expected ${bytes}`);
          transfers.push({
            where: 'guest',
            direction,
            round: r,
            bytes,
            peerMs: round(rep.ms, 2),
            mbps: sig4(bytes / 1e6 / (rep.ms / 1e3)),
            shellSeconds: t.seconds,
            loadAverage: load(),
          });
        };

        // Interleaved, so load from elsewhere hits every kind alike. The
        // loopback runs take well under a second; the guest waits at its prompt.
        for (let r = 0; r < rounds; r++) {
          for (const direction of ['up', 'down'] as const) {
            bc.progress(`net: round ${r + 1}/${rounds}, ${direction === 'up' ? 'guest -> host' : 'host -> guest'}...`);
            await viaGuest(direction, r);
            await loopback(direction, r);
            const last = transfers.filter((t) => t.round === r && t.direction === direction);
            bc.progress(`net: ${direction}: ${last.map((t) => `${t.where} ${t.mbps} MB/s`).join(', ')}`);
          }
        }
        g.type('reboot -f');
      } catch (err) {
        g.child.kill('SIGTERM');
        await done;
        throw err;
      }
      cli = await done;
      if (cli.code !== 0) throw new Error(`tsvmm exited ${cli.code ?? cli.signal}: ${cli.stderr.slice(-1500)}`);
    } finally {
      try {
        sh('ip', 'netns', 'del', ns);
      } catch (err) {
        bc.progress(`net: could not remove namespace ${ns}: ${(err as Error).message}`);
      }
      rmSync(dir, { recursive: true, force: true });
    }

    let vmStats: unknown;
    try {
      vmStats = JSON.parse(cli.stderr.slice(cli.stderr.indexOf('{')));
    } catch {
      vmStats = { unparsed: cli.stderr.slice(-2000) };
    }

    const pick = (where: Where, direction: Direction) => transfers.filter((t) => t.where === where && t.direction === direction).map((t) => t.mbps);
    const rows: Row[] = [];
    const label: Record<Direction, string> = { up: 'guest -> host', down: 'host -> guest' };
    for (const direction of ['up', 'down'] as const) {
      const gs = pick('guest', direction);
      const ls = pick('loopback', direction);
      const gShell = median(transfers.filter((t) => t.where === 'guest' && t.direction === direction).map((t) => t.shellSeconds));
      rows.push({
        label: `${label[direction]}, virtio-net over tap0`,
        value: sig4(median(gs)),
        unit: 'MB/s',
        samples: gs,
        note: `${mib} MiB; guest nc ran ${gShell} s (median)`,
      });
      rows.push({ label: `${label[direction]} counterpart, host loopback (busybox nc)`, value: round(median(ls), 1), unit: 'MB/s', samples: ls });
      rows.push({
        label: `${label[direction]}: loopback / virtio-net`,
        value: round(median(ls) / median(gs), 2),
        unit: 'x',
        note: `ratio of medians; virtio-net / loopback ${(median(gs) / median(ls)).toPrecision(3)}`,
      });
    }
    rows.push(qemuRow('the same nc transfers'));

    return {
      rows,
      raw: { mib, rounds, memory: MEMORY, hostIp: HOST_IP, guestIp: GUEST_IP, namespace: ns, guestFacts, transfers, vmStats },
      commands: ran,
    };
  },
};
