/**
 * The VMM core without KVM: exit decoding and dispatch with made-up exits,
 * register encoding, the bus, guest memory bounds, the MP table, CPUID
 * fix-ups, the console watcher and the initramfs preparation.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import type { NativeLayout } from '../../src/kvm/native.js';
import { Bus, BusError, type BusDevice } from '../../src/base/bus.js';
import { decodeRegs, decodeSregs, encodeMsrs, encodeRegs, encodeSregs } from '../../src/kvm/cpu.js';
import { BRAND_MAX, cpuidForVcpu } from '../../src/arch/cpuid.js';
import { hostCpuModelName } from '../../src/kvm/probe.js';
import { CONSOLE_FLUSH_MS, CONSOLE_INPUT_LIMIT, CONSOLE_OUTPUT_LIMIT, ConsoleStream, ConsoleWatcher } from '../../src/vmm/console.js';
import { FakeIrqLine } from '../../src/testing/index.js';
import { LSR, MCR, Serial16550, UART_LSR, UART_MCR, UART_RBR } from '../../src/devices/serial.js';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { decodeExit, ExitDecoder, ExitReason, handleExit, type ExitContext, type VcpuExit } from '../../src/kvm/exits.js';
import { GuestMemory, GuestMemoryError } from '../../src/base/memory.js';
import { mpTableSize, writeMpTable } from '../../src/arch/mptable.js';
import { parseMemorySize, VmConfigError } from '../../src/vmm/config.js';
import { prepareInitrdAsync } from '../../src/arch/boot/initrd.js';
import type { CpuidEntry } from '../../src/kvm/vcpu.js';

/** The x86-64 kvm_run offsets, as the addon reports them from linux/kvm.h. */
const RUN: NativeLayout['run'] = {
  requestInterruptWindow: 0,
  immediateExit: 1,
  exitReason: 8,
  readyForInterruptInjection: 12,
  ifFlag: 13,
  ioDirection: 32,
  ioSize: 33,
  ioPort: 34,
  ioCount: 36,
  ioDataOffset: 40,
  mmioPhysAddr: 32,
  mmioData: 40,
  mmioLen: 48,
  mmioIsWrite: 52,
  internalSuberror: 32,
  internalNdata: 36,
  internalData: 40,
  emulationFlags: 40,
  emulationInsnSize: 48,
  emulationInsnBytes: 49,
  failEntryReason: 32,
  failEntryCpu: 40,
  systemEventType: 32,
  syncRegs: 304,
  kvmValidRegs: 288,
  kvmDirtyRegs: 296,
};

/** A device that records accesses and answers reads with a fixed byte. */
class Recorder implements BusDevice {
  writes: Array<[number, number[]]> = [];
  reads: number[] = [];
  constructor(private readonly answer = 0x5a) {}
  read(offset: number, data: Uint8Array): void {
    this.reads.push(offset);
    data.fill(this.answer);
  }
  write(offset: number, data: Uint8Array): void {
    this.writes.push([offset, [...data]]);
  }
}

function ctx(): ExitContext & { pioDev: Recorder; mmioDev: Recorder } {
  const pio = new Bus('pio');
  const mmio = new Bus('mmio');
  const pioDev = new Recorder(0x11);
  const mmioDev = new Recorder(0x22);
  pio.insert(pioDev, 0x3f8, 8, 'com1');
  mmio.insert(mmioDev, 0xd0000000, 0x200, 'virtio');
  return { pio, mmio, counts: new Map(), pioDev, mmioDev };
}

describe('exit decoding', () => {
  it('decodes a port write and points data into kvm_run', () => {
    const run = new Uint8Array(4096);
    const v = new DataView(run.buffer);
    v.setUint32(RUN.exitReason, ExitReason.IO, true);
    v.setUint8(RUN.ioDirection, 1);
    v.setUint8(RUN.ioSize, 1);
    v.setUint16(RUN.ioPort, 0x3f8, true);
    v.setUint32(RUN.ioCount, 3, true);
    v.setBigUint64(RUN.ioDataOffset, 0x800n, true);
    run.set([0x61, 0x62, 0x63], 0x800);
    const exit = decodeExit(run, RUN);
    expect(exit).toMatchObject({ kind: 'io', write: true, port: 0x3f8, size: 1, count: 3 });
    const c = ctx();
    expect(handleExit(exit, c).kind).toBe('continue');
    // String I/O: three one-byte writes, in order.
    expect(c.pioDev.writes).toEqual([
      [0, [0x61]],
      [0, [0x62]],
      [0, [0x63]],
    ]);
    expect(c.pio.accesses.get('com1')).toBe(3);
  });

  it('answers a port read from the device, in place in kvm_run', () => {
    const run = new Uint8Array(4096);
    const v = new DataView(run.buffer);
    v.setUint32(RUN.exitReason, ExitReason.IO, true);
    v.setUint8(RUN.ioDirection, 0);
    v.setUint8(RUN.ioSize, 1);
    v.setUint16(RUN.ioPort, 0x3fd, true);
    v.setUint32(RUN.ioCount, 1, true);
    v.setBigUint64(RUN.ioDataOffset, 0x800n, true);
    handleExit(decodeExit(run, RUN), ctx());
    expect(run[0x800]).toBe(0x11);
  });

  it('reads unknown ports as all-ones, counts them, and goes on', () => {
    const c = ctx();
    const data = new Uint8Array(2);
    const exit: VcpuExit = { kind: 'io', write: false, port: 0x87, size: 2, count: 1, data };
    expect(handleExit(exit, c).kind).toBe('continue');
    expect([...data]).toEqual([0xff, 0xff]);
    expect(c.pio.unhandled.get(0x87)).toBe(1);
  });

  it('dispatches MMIO by range with the offset inside the device', () => {
    const run = new Uint8Array(4096);
    const v = new DataView(run.buffer);
    v.setUint32(RUN.exitReason, ExitReason.MMIO, true);
    v.setBigUint64(RUN.mmioPhysAddr, 0xd0000070n, true);
    v.setUint32(RUN.mmioLen, 4, true);
    v.setUint8(RUN.mmioIsWrite, 1);
    v.setUint32(RUN.mmioData, 0x0f, true);
    const c = ctx();
    handleExit(decodeExit(run, RUN), c);
    expect(c.mmioDev.writes).toEqual([[0x70, [0x0f, 0, 0, 0]]]);
  });

  it('maps the ends of a guest to outcomes', () => {
    const c = ctx();
    expect(handleExit({ kind: 'shutdown' }, c)).toEqual({ kind: 'stop', stop: { kind: 'triple-fault' } });
    expect(handleExit({ kind: 'system-event', type: 2 }, c)).toEqual({ kind: 'stop', stop: { kind: 'reboot' } });
    expect(handleExit({ kind: 'system-event', type: 1 }, c)).toEqual({ kind: 'stop', stop: { kind: 'poweroff' } });
    const fail = handleExit({ kind: 'fail-entry', hardwareReason: 0x21n, cpu: 1 }, c);
    expect(fail.kind === 'stop' && fail.stop.kind === 'error' && fail.stop.message).toMatch(/could not enter the guest on cpu 1 .*0x21/);
    expect(c.counts.get('shutdown')).toBe(1);
  });

  it('asks the emulation fallback about emulation failures, and stops when it declines', () => {
    const c = ctx();
    const seen: Array<Uint8Array | undefined> = [];
    c.emulationFallback = (exit) => {
      seen.push(exit.insn);
      return exit.insn?.[0] === 0xcc;
    };
    const int3: VcpuExit = { kind: 'internal-error', suberror: 1, data: [], insn: Uint8Array.of(0xcc) };
    const other: VcpuExit = { kind: 'internal-error', suberror: 1, data: [], insn: Uint8Array.of(0x0f, 0x01, 0xd0) };
    expect(handleExit(int3, c).kind).toBe('continue');
    const stop = handleExit(other, c);
    expect(stop.kind === 'stop' && stop.stop.kind === 'error' && stop.stop.message).toMatch(/could not emulate .*0f01d0/);
    expect(seen).toHaveLength(2);
    // Other internal errors never reach the fallback.
    handleExit({ kind: 'internal-error', suberror: 3, data: [] }, c);
    expect(seen).toHaveLength(2);
  });

  it('decodes exit after exit from one kvm_run: the data view follows offset and size, MMIO addresses above 4 GiB', () => {
    const run = new Uint8Array(4096);
    const v = new DataView(run.buffer);
    const decoder = new ExitDecoder(run, RUN);
    const io = (port: number, size: number, offset: number) => {
      v.setUint32(RUN.exitReason, ExitReason.IO, true);
      v.setUint8(RUN.ioDirection, 0);
      v.setUint8(RUN.ioSize, size);
      v.setUint16(RUN.ioPort, port, true);
      v.setUint32(RUN.ioCount, 1, true);
      v.setBigUint64(RUN.ioDataOffset, BigInt(offset), true);
      return decoder.decode();
    };
    const c = ctx();
    handleExit(io(0x3fd, 1, 0x800), c);
    handleExit(io(0x3f8, 2, 0x800), c);
    expect([...run.subarray(0x800, 0x803)]).toEqual([0x11, 0x11, 0]);
    handleExit(io(0x3f9, 1, 0x900), c);
    expect(run[0x900]).toBe(0x11);
    expect(c.pioDev.reads).toEqual([5, 0, 1]);
    // An offset outside kvm_run (its high half set) is not I/O data.
    v.setUint32(RUN.ioDataOffset + 4, 1, true);
    expect(decoder.decode()).toEqual({ kind: 'other', reason: ExitReason.IO });

    v.setUint32(RUN.exitReason, ExitReason.MMIO, true);
    v.setBigUint64(RUN.mmioPhysAddr, 0x1_2345_6780n, true);
    v.setUint32(RUN.mmioLen, 8, true);
    v.setUint8(RUN.mmioIsWrite, 0);
    const mmio = decoder.decode();
    expect(mmio).toMatchObject({ kind: 'mmio', write: false, addr: 0x1_2345_6780 });
    expect(mmio.kind === 'mmio' && mmio.data.length).toBe(8);
  });

  it('decodes the instruction bytes of an emulation failure', () => {
    const run = new Uint8Array(4096);
    const v = new DataView(run.buffer);
    v.setUint32(RUN.exitReason, ExitReason.INTERNAL_ERROR, true);
    v.setUint32(RUN.internalSuberror, 1, true);
    v.setUint32(RUN.internalNdata, 4, true);
    v.setBigUint64(RUN.emulationFlags, 1n, true);
    run[RUN.emulationInsnSize] = 2;
    run.set([0x9b, 0xf4], RUN.emulationInsnBytes);
    const exit = decodeExit(run, RUN);
    expect(exit.kind === 'internal-error' && [...(exit.insn ?? [])]).toEqual([0x9b, 0xf4]);
  });
});

describe('Bus', () => {
  it('refuses overlapping ranges and names both devices', () => {
    const bus = new Bus('pio');
    bus.insert(new Recorder(), 0x60, 1, 'i8042-data');
    expect(() => bus.insert(new Recorder(), 0x5f, 4, 'wide')).toThrow(BusError);
    expect(() => bus.insert(new Recorder(), 0x5f, 4, 'wide')).toThrow(/wide .* overlaps i8042-data/);
    bus.insert(new Recorder(), 0x61, 1, 'port61');
    expect(bus.find(0x61)?.name).toBe('port61');
    expect(bus.find(0x62)).toBeUndefined();
  });
});

describe('GuestMemory', () => {
  it('refuses every access that leaves guest RAM', () => {
    const mem = GuestMemory.fromBuffer(new Uint8Array(0x2000));
    mem.writeU32(0x1ffc, 0xdeadbeef);
    expect(mem.readU32(0x1ffc)).toBe(0xdeadbeef);
    expect(() => mem.readU32(0x1ffd)).toThrow(GuestMemoryError);
    expect(() => mem.slice(-1, 1)).toThrow(GuestMemoryError);
    expect(() => mem.slice(2n ** 64n - 1n, 2)).toThrow(GuestMemoryError);
    expect(() => mem.slice(0, 0x2001)).toThrow(/0x0/);
    expect(mem.checkRange(0x1000, 0x1000)).toBe(true);
    expect(mem.checkRange(0x1000, 0x1001)).toBe(false);
  });

  it('never joins two regions in one access', () => {
    const mem = new GuestMemory([
      { guestAddr: 0, bytes: new Uint8Array(0x1000) },
      { guestAddr: 0x1000, bytes: new Uint8Array(0x1000) },
    ]);
    expect(mem.checkRange(0xffc, 4)).toBe(true);
    expect(mem.checkRange(0xffe, 4)).toBe(false);
  });
});

describe('register encoding', () => {
  const layout = {
    regsSize: 144,
    sregs: {
      size: 312,
      cs: 0,
      ds: 24,
      es: 48,
      fs: 72,
      gs: 96,
      ss: 120,
      tr: 144,
      ldt: 168,
      gdt: 192,
      idt: 208,
      cr0: 224,
      cr2: 232,
      cr3: 240,
      cr4: 248,
      cr8: 256,
      efer: 264,
      apicBase: 272,
    },
    segment: { size: 24, base: 0, limit: 8, selector: 12, type: 14, present: 15, dpl: 16, db: 17, s: 18, l: 19, g: 20, avl: 21, unusable: 22 },
    dtable: { size: 16, base: 0, limit: 8 },
    msrsHeaderSize: 8,
    msrEntrySize: 16,
  } as unknown as NativeLayout;

  it('round-trips general registers and leaves the others alone', () => {
    const buf = new Uint8Array(144);
    encodeRegs(buf, { rax: 1, rsi: 0x7000, rip: 0xffffffff81000000n, rflags: 2 });
    encodeRegs(buf, { rbx: 5 });
    const r = decodeRegs(buf);
    expect(r).toMatchObject({ rax: 1n, rbx: 5n, rsi: 0x7000n, rip: 0xffffffff81000000n, rflags: 2n });
  });

  it('round-trips special registers', () => {
    const buf = new Uint8Array(312);
    const cs = { base: 0, limit: 0xffffffff, selector: 0x10, type: 11, present: 1, dpl: 0, db: 0, s: 1, l: 1, g: 1, avl: 0 };
    encodeSregs(buf, layout, { cs, gdt: { base: 0x500, limit: 0x2f }, cr0: 0x80000011, efer: 0x500 });
    const s = decodeSregs(buf, layout);
    expect(s.cs).toMatchObject({ ...cs, base: 0n, unusable: 0 });
    expect(s.gdt).toEqual({ base: 0x500n, limit: 0x2f });
    expect(s.cr0).toBe(0x80000011n);
    expect(s.efer).toBe(0x500n);
  });

  it('encodes kvm_msrs with its count', () => {
    const buf = encodeMsrs(layout, [
      [0x1a0, 1n],
      [0x2ff, 0xc06n],
    ]);
    const v = new DataView(buf.buffer);
    expect(buf.length).toBe(8 + 2 * 16);
    expect(v.getUint32(0, true)).toBe(2);
    expect(v.getUint32(8 + 16, true)).toBe(0x2ff);
    expect(v.getBigUint64(8 + 16 + 8, true)).toBe(0xc06n);
  });
});

describe('MP table', () => {
  function sum(bytes: Uint8Array): number {
    return bytes.reduce((a, b) => (a + b) & 0xff, 0);
  }

  it('writes a floating pointer and a table with valid checksums and one entry per CPU', () => {
    const mem = GuestMemory.fromBuffer(new Uint8Array(0x100000));
    const at = writeMpTable(mem, 4);
    const mpf = mem.slice(at, 16);
    expect(Buffer.from(mpf.subarray(0, 4)).toString()).toBe('_MP_');
    expect(sum(mpf)).toBe(0);
    const tableAddr = new DataView(mpf.buffer, mpf.byteOffset).getUint32(4, true);
    const header = mem.slice(tableAddr, 44);
    const hv = new DataView(header.buffer, header.byteOffset);
    expect(Buffer.from(header.subarray(0, 4)).toString()).toBe('PCMP');
    const length = hv.getUint16(4, true);
    expect(sum(mem.slice(tableAddr, length))).toBe(0);
    expect(hv.getUint32(36, true)).toBe(0xfee00000);
    // Processor entries come first: APIC IDs 0..3, only CPU 0 the BSP.
    const cpus = [0, 1, 2, 3].map((i) => mem.slice(tableAddr + 44 + i * 20, 20));
    expect(cpus.map((e) => e[0])).toEqual([0, 0, 0, 0]);
    expect(cpus.map((e) => e[1])).toEqual([0, 1, 2, 3]);
    expect(cpus.map((e) => e[3])).toEqual([3, 1, 1, 1]);
    expect(16 + length).toBe(mpTableSize(4));
    // It must fit the EBDA (1 KiB) for the largest machine.
    expect(mpTableSize(8)).toBeLessThanOrEqual(1024);
  });
});

describe('CPUID per vCPU', () => {
  const supported: CpuidEntry[] = [
    { function: 1, index: 0, flags: 0, eax: 0xa10f11, ebx: 0x00020800, ecx: 0x01202000, edx: 0x178bfbff },
    { function: 0xb, index: 0, flags: 1, eax: 1, ebx: 2, ecx: 0x100, edx: 7 },
    { function: 0xb, index: 1, flags: 1, eax: 4, ebx: 16, ecx: 0x201, edx: 7 },
  ];

  it('gives each vCPU its APIC ID and the machine topology', () => {
    const e = cpuidForVcpu(supported, 3, 4);
    const leaf1 = e.find((x) => x.function === 1)!;
    expect(leaf1.ebx >>> 24).toBe(3);
    expect((leaf1.ebx >>> 16) & 0xff).toBe(4);
    expect(leaf1.ecx >>> 31).toBe(1);
    const core = e.find((x) => x.function === 0xb && x.index === 1)!;
    expect(core).toMatchObject({ eax: 2, ebx: 4, edx: 3 });
    // The input is not changed.
    expect(supported[0]!.ebx).toBe(0x00020800);
  });

  it('adds the TSC-deadline timer (leaf 1 ECX bit 24) only when asked, as KVM leaves it to the VMM', () => {
    const withoutBit = supported.map((x) => (x.function === 1 ? { ...x, ecx: x.ecx & ~(1 << 24) } : x));
    const leaf1 = (options?: { tscDeadline?: boolean }) => cpuidForVcpu(withoutBit, 0, 1, options).find((x) => x.function === 1)!;
    expect((leaf1().ecx >>> 24) & 1).toBe(0);
    expect((leaf1({ tscDeadline: false }).ecx >>> 24) & 1).toBe(0);
    expect((leaf1({ tscDeadline: true }).ecx >>> 24) & 1).toBe(1);
    expect((leaf1({ tscDeadline: true }).ecx & ~(1 << 24)) >>> 0).toBe(leaf1().ecx);
  });

  it('fills the brand leaves KVM leaves zero with the name given, NUL-padded and cut at 47 characters', () => {
    const zeroed = [0x80000002, 0x80000003, 0x80000004].map((f) => ({ function: f, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0 }));
    // What a guest does with them (Linux's get_model_name): 48 bytes, little-endian, up to the first NUL.
    const read = (entries: CpuidEntry[]) => {
      const bytes = Buffer.alloc(48);
      for (const e of entries.filter((x) => x.function >= 0x80000002 && x.function <= 0x80000004)) {
        for (const [i, v] of [e.eax, e.ebx, e.ecx, e.edx].entries()) bytes.writeUInt32LE(v, (e.function - 0x80000002) * 16 + i * 4);
      }
      const end = bytes.indexOf(0);
      return { text: bytes.subarray(0, end < 0 ? 48 : end).toString('latin1'), terminated: end >= 0 };
    };
    expect(read(cpuidForVcpu([...supported, ...zeroed], 0, 1, { brand: 'AMD EPYC 7B13 64-Core Processor' }))).toEqual({
      text: 'AMD EPYC 7B13 64-Core Processor',
      terminated: true,
    });
    const long = 'x'.repeat(60);
    expect(read(cpuidForVcpu(zeroed, 0, 1, { brand: long }))).toEqual({ text: 'x'.repeat(BRAND_MAX), terminated: true });
    // Not ASCII: replaced, so the guest's string stays one byte per character.
    expect(read(cpuidForVcpu(zeroed, 0, 1, { brand: 'Ünïcode™' })).text).toBe('?n?code?');
    // Without a name the leaves stay as KVM gave them.
    expect(read(cpuidForVcpu(zeroed, 0, 1))).toEqual({ text: '', terminated: true });
  });

  it("reads the host's processor name from /proc/cpuinfo, and none from a file without one", () => {
    const dir = mkdtempSync(join(tmpdir(), 'tsvmm-cpuinfo-'));
    try {
      writeFileSync(join(dir, 'with'), 'processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC Processor  \nflags\t\t: fpu\n');
      writeFileSync(join(dir, 'without'), 'processor\t: 0\nflags\t\t: fpu\n');
      expect(hostCpuModelName(join(dir, 'with'))).toBe('AMD EPYC Processor');
      expect(hostCpuModelName(join(dir, 'without'))).toBeUndefined();
      expect(hostCpuModelName(join(dir, 'missing'))).toBeUndefined();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('ConsoleWatcher', () => {
  it('reports panic and power-off lines, even split across writes', () => {
    const events: string[] = [];
    const w = new ConsoleWatcher((e) => events.push(e));
    const text = '[ 1.0] Kernel pa';
    w.feed(Buffer.from(text));
    w.feed(Buffer.from('nic - not syncing: Attempted to kill init!\r\n[ 2.0] reboot: Power down\n'));
    expect(events).toEqual(['panic', 'power-down']);
    expect(w.panicLine).toBe('Kernel panic - not syncing: Attempted to kill init!');
  });

  it('batches guest output and sends writes to the guest', async () => {
    const sent: string[] = [];
    const c = new ConsoleStream((b) => sent.push(Buffer.from(b).toString()));
    const chunks: string[] = [];
    c.on('data', (d: Buffer) => chunks.push(d.toString()));
    for (const ch of 'hello') c.guestOutput(Buffer.from(ch));
    await new Promise((r) => setImmediate(r));
    expect(chunks).toEqual([]);
    await new Promise((r) => setTimeout(r, CONSOLE_FLUSH_MS + 5));
    expect(chunks).toEqual(['hello']);
    // 4 KiB leave at once, in order, without waiting for the timer.
    const big = Buffer.alloc(5000, 0x61);
    c.guestOutput(big);
    expect(chunks.slice(1).join('')).toHaveLength(4096);
    c.flush();
    expect(chunks.slice(1).join('')).toBe(big.toString());
    c.write('ls\n');
    expect(sent).toEqual(['ls\n']);
  });

  it('lets a held console writer go when the VM ends', async () => {
    const c = new ConsoleStream(
      () => {},
      () => CONSOLE_INPUT_LIMIT,
    );
    const written = new Promise<void>((resolve) => c.write(Buffer.from('x'), () => resolve()));
    let done = false;
    void written.then(() => (done = true));
    await new Promise((r) => setImmediate(r));
    expect(done).toBe(false);
    c.finish();
    await written;
  });

  it('holds guest output for a reader that stopped, up to a bound, and counts what it drops beyond', () => {
    const c = new ConsoleStream(() => {});
    const chunk = Buffer.alloc(1 << 20, 0x41);
    for (let i = 0; i < 20; i++) c.guestOutput(chunk);
    c.flush();
    expect(c.readableLength).toBeLessThanOrEqual(CONSOLE_OUTPUT_LIMIT);
    expect(c.readableLength + c.droppedOutput).toBe(20 << 20);
    expect(c.droppedOutput).toBeGreaterThan(0);
  });

  it('holds a writer while the guest is behind on console input, and lets it go as the guest reads', async () => {
    let c: ConsoleStream | undefined;
    const uart = new Serial16550({ irq: new FakeIrqLine(), output: () => {}, onInputTaken: () => c?.inputTaken() });
    c = new ConsoleStream(
      (b) => uart.enqueueInput(b),
      () => uart.pendingInput,
    );
    uart.write(UART_MCR, Uint8Array.of(MCR.RTS | MCR.DTR));
    // 512 KiB through a pipeline that respects back-pressure, into a guest that is not reading.
    const total = 512 << 10;
    const done = pipeline(
      Readable.from(
        (function* () {
          for (let i = 0; i < total / 4096; i++) yield Buffer.alloc(4096, i & 0xff);
        })(),
      ),
      c,
    );
    await new Promise((r) => setTimeout(r, 50));
    expect(uart.pendingInput).toBeLessThanOrEqual(CONSOLE_INPUT_LIMIT + 4096);
    // The guest reads everything, byte by byte from RBR, as its driver does.
    const byte = new Uint8Array(1);
    let read = 0;
    while (read < total) {
      const lsr = new Uint8Array(1);
      uart.read(UART_LSR, lsr);
      if (lsr[0]! & LSR.DATA_READY) {
        uart.read(UART_RBR, byte);
        if (byte[0] !== (Math.floor(read / 4096) & 0xff)) throw new Error(`byte ${read} is ${byte[0]}: out of order`);
        read++;
      } else {
        expect(uart.pendingInput).toBeLessThanOrEqual(CONSOLE_INPUT_LIMIT + 4096);
        await new Promise((r) => setImmediate(r));
      }
    }
    await done;
    expect(uart.stats.bytesIn).toBe(total);
  });
});

describe('memory sizes', () => {
  it('parses sizes with units, and plain numbers as MiB', () => {
    expect(parseMemorySize('256M')).toBe(256 << 20);
    expect(parseMemorySize('1G')).toBe(1 << 30);
    expect(parseMemorySize('512k')).toBe(512 << 10);
    expect(parseMemorySize('64')).toBe(64 << 20);
    expect(parseMemorySize('2GiB')).toBe(2 * 1024 ** 3);
    expect(() => parseMemorySize('lots')).toThrow(VmConfigError);
    expect(() => parseMemorySize('0M')).toThrow(/invalid memory size/);
  });
});

describe('initramfs preparation', () => {
  const cpio = Buffer.concat([Buffer.from('070701'), randomBytes(4000)]);

  it('inflates a gzip cpio archive on the host', async () => {
    const r = await prepareInitrdAsync(gzipSync(cpio));
    expect(r.inflated).toBe(true);
    expect(Buffer.from(r.data).equals(cpio)).toBe(true);
  });

  it('passes through what is not a whole gzip cpio', async () => {
    expect((await prepareInitrdAsync(cpio)).inflated).toBe(false);
    const notCpio = gzipSync(Buffer.from('an ext2 image, say'));
    expect((await prepareInitrdAsync(notCpio)).data).toBe(notCpio);
    const whole = gzipSync(cpio);
    const damaged = whole.subarray(0, whole.length - 100);
    expect((await prepareInitrdAsync(damaged)).inflated).toBe(false);
  });
});
