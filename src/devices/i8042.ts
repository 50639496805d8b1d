/**
 * The 8042 keyboard controller, reduced to what a microVM needs: the reset
 * line (command 0xFE, which `reboot=k` uses to end the VM) and enough of the
 * controller for Linux's i8042 probe (`i8042.noaux i8042.nomux
 * i8042.nopnp`) to find it, test it and move on. No keyboard or mouse is
 * attached: bytes sent to the keyboard are dropped, so the guest's keyboard
 * probe times out and finds nothing.
 *
 * Reference: IBM PC/AT Technical Reference, "Keyboard Controller" (status
 * register, commands); the command numbers Linux uses are in
 * linux/drivers/input/serio/i8042.h.
 *
 * Mapping: the controller answers at 0x60 (data) and 0x64 (status and
 * command). Port 0x61 between them belongs to port B (see pit.ts), and a
 * bus refuses overlapping ranges, so map the two single-port adapters:
 * `bus.insert(kbc.dataPort, 0x60, 1, ...)` and
 * `bus.insert(kbc.commandPort, 0x64, 1, ...)`. The controller itself also
 * implements BusDevice with offsets 0 and 4 (length 5), for a bus with
 * nothing at 0x61-0x63.
 */
import type { BusDevice } from '../base/bus.js';
import { silentLogger, type Logger } from '../base/log.js';

/** Offset of the data port (0x60) within a 0x60-based range. */
export const I8042_DATA = 0;
/** Offset of the status (read) / command (write) port (0x64) within a 0x60-based range. */
export const I8042_COMMAND = 4;
/** Length of a single range covering both ports. */
export const I8042_RANGE_LENGTH = 5;

/** Status register bits (PC/AT Technical Reference, "Status Register"). */
export const I8042_STATUS = {
  /** A byte waits in the output buffer (read it from 0x60). */
  OUTPUT_FULL: 0x01,
  /** The controller has not taken the last byte written: never set here. */
  INPUT_FULL: 0x02,
  /** System flag: mirrors command byte bit 2, set once self-test passed. */
  SYSTEM: 0x04,
  /** The last byte written went to 0x64 (a command), not 0x60. */
  COMMAND: 0x08,
  /** Keyboard not inhibited by the keylock. */
  UNLOCKED: 0x10,
  /** The output byte came from the auxiliary (mouse) port. */
  AUX_DATA: 0x20,
} as const;

/** Controller commands written to 0x64 (i8042.h, I8042_CMD_*). */
export const I8042_CMD = {
  READ_COMMAND_BYTE: 0x20,
  WRITE_COMMAND_BYTE: 0x60,
  AUX_DISABLE: 0xa7,
  AUX_ENABLE: 0xa8,
  SELF_TEST: 0xaa,
  KBD_INTERFACE_TEST: 0xab,
  KBD_DISABLE: 0xad,
  KBD_ENABLE: 0xae,
  READ_OUTPUT_PORT: 0xd0,
  WRITE_OUTPUT_PORT: 0xd1,
  WRITE_KBD_OUTPUT: 0xd2,
  /** 0xF0-0xFF pulse output port bits 0-3 low where the command's bit is 0. */
  PULSE_OUTPUT_FIRST: 0xf0,
  /** Pulse bit 0, the CPU reset line: the command Linux's `reboot=k` sends. */
  RESET: 0xfe,
} as const;

/** Command byte bits (i8042.h, I8042_CTR_*). */
export const I8042_CTR = {
  KBD_INT: 0x01,
  AUX_INT: 0x02,
  SYSTEM: 0x04,
  KBD_DISABLE: 0x10,
  AUX_DISABLE: 0x20,
  TRANSLATE: 0x40,
} as const;

/** Replies (i8042.h). */
export const I8042_REPLY = {
  SELF_TEST_OK: 0x55,
  INTERFACE_TEST_OK: 0x00,
} as const;

/** Output port bit 0: low holds the CPU in reset. */
const OUTPUT_PORT_RESET_HIGH = 0x01;
/** Output port bit 1: the A20 gate. */
const OUTPUT_PORT_A20 = 0x02;
/** Replies waiting to be read; more than the guest could ever leave unread. */
const OUTPUT_QUEUE_LIMIT = 16;

export interface I8042Options {
  /** Called when the guest pulses the CPU reset line. */
  onReset: () => void;
  logger?: Logger;
}

/** Counters; read them, do not write them. */
export interface I8042Stats {
  resets: number;
  /** Commands this model does not implement (answered with silence). */
  unknownCommands: number;
  /** Bytes written to the (absent) keyboard. */
  keyboardBytesDropped: number;
  oddAccesses: number;
}

/** A single-port view of the controller, for mapping at 0x60 or 0x64 with length 1. */
class PortView implements BusDevice {
  constructor(
    private readonly kbc: I8042,
    private readonly offset: number,
  ) {}

  read(offset: number, data: Uint8Array): void {
    this.kbc.read(offset === 0 ? this.offset : -1, data);
  }

  write(offset: number, data: Uint8Array): void {
    this.kbc.write(offset === 0 ? this.offset : -1, data);
  }
}

/** The keyboard controller. Guest accesses never throw. */
export class I8042 implements BusDevice {
  readonly stats: I8042Stats = { resets: 0, unknownCommands: 0, keyboardBytesDropped: 0, oddAccesses: 0 };
  /** Port 0x60 alone: map with length 1. */
  readonly dataPort: BusDevice = new PortView(this, I8042_DATA);
  /** Port 0x64 alone: map with length 1. */
  readonly commandPort: BusDevice = new PortView(this, I8042_COMMAND);

  private readonly onReset: () => void;
  private readonly log: Logger;
  // What PC firmware leaves: translation on, system flag, keyboard IRQ on.
  private commandByte = I8042_CTR.TRANSLATE | I8042_CTR.SYSTEM | I8042_CTR.KBD_INT;
  private outputPort = OUTPUT_PORT_RESET_HIGH | OUTPUT_PORT_A20;
  private readonly output: Array<{ byte: number; aux: boolean }> = [];
  /** The last byte read from 0x60: what the port shows when the buffer is empty. */
  private lastData = 0;
  /** A command waiting for its parameter byte on 0x60. */
  private pendingCommand: number | null = null;
  private lastWriteWasCommand = false;

  constructor(options: I8042Options) {
    this.onReset = options.onReset;
    this.log = (options.logger ?? silentLogger).child({ device: 'i8042' });
  }

  read(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (offset !== I8042_DATA && offset !== I8042_COMMAND) {
      this.oddAccess('read', offset, data.length);
      data.fill(0xff);
      return;
    }
    if (data.length !== 1) {
      this.oddAccess('read', offset, data.length);
      data.fill(0);
    }
    data[0] = offset === I8042_DATA ? this.readData() : this.readStatus();
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (offset !== I8042_DATA && offset !== I8042_COMMAND) {
      this.oddAccess('write', offset, data.length);
      return;
    }
    if (data.length !== 1) this.oddAccess('write', offset, data.length);
    const value = data[0]!;
    if (offset === I8042_DATA) this.writeData(value);
    else this.writeCommand(value);
  }

  private oddAccess(kind: 'read' | 'write', offset: number, size: number): void {
    this.stats.oddAccesses++;
    this.log.debug({ kind, offset, size }, 'access wider than a byte or outside the ports: first byte only');
  }

  private readStatus(): number {
    const head = this.output[0];
    return (
      (head ? I8042_STATUS.OUTPUT_FULL : 0) |
      (head?.aux ? I8042_STATUS.AUX_DATA : 0) |
      (this.commandByte & I8042_CTR.SYSTEM ? I8042_STATUS.SYSTEM : 0) |
      (this.lastWriteWasCommand ? I8042_STATUS.COMMAND : 0) |
      I8042_STATUS.UNLOCKED
    );
  }

  private readData(): number {
    const head = this.output.shift();
    if (head) this.lastData = head.byte;
    return this.lastData;
  }

  private reply(byte: number, aux = false): void {
    if (this.output.length >= OUTPUT_QUEUE_LIMIT) {
      this.log.debug({ byte }, 'output buffer full: reply dropped');
      return;
    }
    this.output.push({ byte, aux });
  }

  private writeData(value: number): void {
    this.lastWriteWasCommand = false;
    const command = this.pendingCommand;
    this.pendingCommand = null;
    switch (command) {
      case I8042_CMD.WRITE_COMMAND_BYTE:
        this.commandByte = value;
        return;
      case I8042_CMD.WRITE_OUTPUT_PORT:
        this.outputPort = value;
        // The reset line is active low: writing bit 0 clear resets the CPU.
        if (!(value & OUTPUT_PORT_RESET_HIGH)) this.reset('output port write');
        return;
      case I8042_CMD.WRITE_KBD_OUTPUT:
        this.reply(value);
        return;
      default:
        if (command !== null && command > I8042_CMD.WRITE_COMMAND_BYTE && command < 0x80) return; // controller RAM write: not kept
        this.stats.keyboardBytesDropped++;
        this.log.debug({ value }, 'byte for the keyboard dropped: no keyboard attached');
        return;
    }
  }

  private writeCommand(command: number): void {
    this.lastWriteWasCommand = true;
    this.pendingCommand = null;
    switch (command) {
      case I8042_CMD.READ_COMMAND_BYTE:
        this.reply(this.commandByte);
        return;
      case I8042_CMD.WRITE_COMMAND_BYTE:
      case I8042_CMD.WRITE_OUTPUT_PORT:
      case I8042_CMD.WRITE_KBD_OUTPUT:
        this.pendingCommand = command;
        return;
      case I8042_CMD.AUX_DISABLE:
        this.commandByte |= I8042_CTR.AUX_DISABLE;
        return;
      case I8042_CMD.AUX_ENABLE:
        this.commandByte &= ~I8042_CTR.AUX_DISABLE;
        return;
      case I8042_CMD.SELF_TEST:
        this.commandByte |= I8042_CTR.SYSTEM;
        this.reply(I8042_REPLY.SELF_TEST_OK);
        return;
      case I8042_CMD.KBD_INTERFACE_TEST:
        this.reply(I8042_REPLY.INTERFACE_TEST_OK);
        return;
      case I8042_CMD.KBD_DISABLE:
        this.commandByte |= I8042_CTR.KBD_DISABLE;
        return;
      case I8042_CMD.KBD_ENABLE:
        this.commandByte &= ~I8042_CTR.KBD_DISABLE;
        return;
      case I8042_CMD.READ_OUTPUT_PORT:
        this.reply(this.outputPort);
        return;
    }
    // 0x21-0x3F read controller RAM: nothing is stored there but the command byte.
    if (command > I8042_CMD.READ_COMMAND_BYTE && command < I8042_CMD.WRITE_COMMAND_BYTE) {
      this.reply(0);
      return;
    }
    // 0x61-0x7F write controller RAM: the next data byte is swallowed.
    if (command > I8042_CMD.WRITE_COMMAND_BYTE && command < 0x80) {
      this.pendingCommand = command;
      return;
    }
    if (command >= I8042_CMD.PULSE_OUTPUT_FIRST) {
      // Bit 0 clear in the low nibble pulses the reset line (0xFE is the usual one).
      if (!(command & OUTPUT_PORT_RESET_HIGH)) this.reset(`command 0x${command.toString(16)}`);
      return;
    }
    this.stats.unknownCommands++;
    this.log.debug({ command }, 'unimplemented controller command ignored');
  }

  private reset(why: string): void {
    this.stats.resets++;
    this.log.info({ why }, 'guest pulsed the CPU reset line');
    this.onReset();
  }
}
