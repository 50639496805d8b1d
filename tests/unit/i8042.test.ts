import { describe, expect, it } from 'vitest';
import { I8042, I8042_CMD, I8042_COMMAND, I8042_CTR, I8042_DATA, I8042_STATUS } from '../../src/devices/i8042.js';
import { DebugPort, IgnoredPorts } from '../../src/devices/legacy.js';
import { Bus } from '../../src/base/bus.js';

function setup() {
  let resets = 0;
  const kbc = new I8042({ onReset: () => resets++ });
  const rd = (offset: number): number => {
    const d = new Uint8Array(1);
    kbc.read(offset, d);
    return d[0]!;
  };
  const wr = (offset: number, value: number): void => kbc.write(offset, Uint8Array.of(value));
  const status = () => rd(I8042_COMMAND);
  const command = (c: number) => wr(I8042_COMMAND, c);
  const data = () => rd(I8042_DATA);
  return { kbc, rd, wr, status, command, data, resets: () => resets };
}

describe('I8042: reset line', () => {
  it('calls onReset on command 0xFE (how reboot=k ends the VM)', () => {
    const io = setup();
    expect(io.resets()).toBe(0);
    io.command(I8042_CMD.RESET);
    expect(io.resets()).toBe(1);
    expect(io.kbc.stats.resets).toBe(1);
  });

  it('resets on any pulse command with bit 0 clear, not on the others', () => {
    const io = setup();
    io.command(0xff); // pulses nothing
    io.command(0xfd);
    expect(io.resets()).toBe(0);
    io.command(0xf0);
    expect(io.resets()).toBe(1);
  });

  it('resets when the output port is written with the reset bit low', () => {
    const io = setup();
    io.command(I8042_CMD.WRITE_OUTPUT_PORT);
    io.wr(I8042_DATA, 0xdf); // A20 on, reset high: Linux's A20 enable
    expect(io.resets()).toBe(0);
    io.command(I8042_CMD.READ_OUTPUT_PORT);
    expect(io.data()).toBe(0xdf);
    io.command(I8042_CMD.WRITE_OUTPUT_PORT);
    io.wr(I8042_DATA, 0xde);
    expect(io.resets()).toBe(1);
  });
});

describe('I8042: Linux probe (i8042.noaux, nomux, nopnp)', () => {
  it('reads as a present controller with an empty buffer', () => {
    const io = setup();
    const s = io.status();
    expect(s).not.toBe(0xff);
    expect(s & I8042_STATUS.OUTPUT_FULL).toBe(0);
    expect(s & I8042_STATUS.INPUT_FULL).toBe(0);
  });

  it('answers self-test with 0x55 and interface test with 0x00 through the output buffer', () => {
    const io = setup();
    io.command(I8042_CMD.SELF_TEST);
    expect(io.status() & I8042_STATUS.OUTPUT_FULL).toBeTruthy();
    expect(io.status() & I8042_STATUS.COMMAND).toBeTruthy();
    expect(io.data()).toBe(0x55);
    expect(io.status() & I8042_STATUS.OUTPUT_FULL).toBe(0);
    expect(io.status() & I8042_STATUS.SYSTEM).toBeTruthy();
    io.command(I8042_CMD.KBD_INTERFACE_TEST);
    expect(io.status() & I8042_STATUS.OUTPUT_FULL).toBeTruthy();
    expect(io.data()).toBe(0x00);
  });

  it('reads and writes the command byte', () => {
    const io = setup();
    io.command(I8042_CMD.READ_COMMAND_BYTE);
    const ctr = io.data();
    expect(ctr & I8042_CTR.SYSTEM).toBeTruthy();
    // i8042_controller_init(): reads it twice and expects the same value.
    io.command(I8042_CMD.READ_COMMAND_BYTE);
    expect(io.data()).toBe(ctr);
    const next = (ctr & ~(I8042_CTR.KBD_INT | I8042_CTR.AUX_INT)) | I8042_CTR.KBD_DISABLE;
    io.command(I8042_CMD.WRITE_COMMAND_BYTE);
    expect(io.status() & I8042_STATUS.OUTPUT_FULL).toBe(0);
    io.wr(I8042_DATA, next);
    expect(io.status() & I8042_STATUS.COMMAND).toBe(0);
    io.command(I8042_CMD.READ_COMMAND_BYTE);
    expect(io.data()).toBe(next);
  });

  it('disables and enables the keyboard through command byte bit 4', () => {
    const io = setup();
    io.command(I8042_CMD.KBD_DISABLE);
    io.command(I8042_CMD.READ_COMMAND_BYTE);
    expect(io.data() & I8042_CTR.KBD_DISABLE).toBeTruthy();
    io.command(I8042_CMD.KBD_ENABLE);
    io.command(I8042_CMD.READ_COMMAND_BYTE);
    expect(io.data() & I8042_CTR.KBD_DISABLE).toBe(0);
  });

  it('can be flushed like i8042_flush() does, and repeats the last byte when empty', () => {
    const io = setup();
    io.command(I8042_CMD.SELF_TEST);
    io.command(I8042_CMD.KBD_INTERFACE_TEST);
    const flushed: number[] = [];
    for (let i = 0; i < 16 && io.status() & I8042_STATUS.OUTPUT_FULL; i++) flushed.push(io.data());
    expect(flushed).toEqual([0x55, 0x00]);
    expect(io.data()).toBe(0x00);
  });

  it('ignores unknown commands and drops bytes for the absent keyboard', () => {
    const io = setup();
    io.command(0xc8);
    io.wr(I8042_DATA, 0xf2); // atkbd GETID
    expect(io.status() & I8042_STATUS.OUTPUT_FULL).toBe(0);
    expect(io.kbc.stats.unknownCommands).toBe(1);
    expect(io.kbc.stats.keyboardBytesDropped).toBe(1);
    expect(io.resets()).toBe(0);
  });
});

describe('I8042: mapping', () => {
  it('works as two single-port devices beside port B', () => {
    const { kbc, resets } = setup();
    const bus = new Bus('pio');
    bus.insert(kbc.dataPort, 0x60, 1, 'i8042-data');
    bus.insert(new IgnoredPorts(), 0x61, 1, 'port-b');
    bus.insert(kbc.commandPort, 0x64, 1, 'i8042-command');
    bus.write(0x64, Uint8Array.of(I8042_CMD.SELF_TEST));
    const d = new Uint8Array(1);
    bus.read(0x64, d);
    expect(d[0]! & I8042_STATUS.OUTPUT_FULL).toBeTruthy();
    bus.read(0x60, d);
    expect(d[0]).toBe(0x55);
    bus.write(0x64, Uint8Array.of(I8042_CMD.RESET));
    expect(resets()).toBe(1);
  });

  it('never throws, whatever the offset and size', () => {
    const { kbc } = setup();
    let seed = 3;
    const rand = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
    for (let i = 0; i < 10000; i++) {
      const offset = (rand() % 9) - 2;
      const data = Uint8Array.from({ length: [0, 1, 2, 4][rand() % 4]! }, () => rand() & 0xff);
      if (rand() & 1) kbc.read(offset, data);
      else kbc.write(offset, data);
      kbc.dataPort.read(rand() % 3, data);
      kbc.commandPort.write(rand() % 3, data);
    }
  });
});

describe('legacy port stubs', () => {
  it('DebugPort reads 0, counts writes and keeps the last POST code', () => {
    const post = new DebugPort();
    const d = Uint8Array.of(0xaa, 0xbb);
    post.read(0, d);
    expect([...d]).toEqual([0, 0]);
    expect(post.lastValue).toBeNull();
    post.write(0, Uint8Array.of(0x12));
    post.write(0, Uint8Array.of(0x34, 0x56));
    expect(post.writes).toBe(2);
    expect(post.lastValue).toBe(0x34);
  });

  it('IgnoredPorts reads the configured byte, drops writes and counts both', () => {
    const open = new IgnoredPorts();
    const zero = new IgnoredPorts({ readValue: 0 });
    const d = new Uint8Array(4);
    open.read(3, d);
    expect([...d]).toEqual([0xff, 0xff, 0xff, 0xff]);
    zero.read(0, d);
    expect([...d]).toEqual([0, 0, 0, 0]);
    zero.write(1, Uint8Array.of(7));
    expect(zero.stats).toEqual({ reads: 1, writes: 1 });
    expect(open.stats).toEqual({ reads: 1, writes: 0 });
  });
});
