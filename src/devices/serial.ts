/**
 * A 16550A UART as the Linux 8250 driver expects it (COM1 is 0x3f8, IRQ 4,
 * but the device knows only offsets 0..7 and an injected IRQ line).
 *
 * Reference: TI/National PC16550D datasheet (SNLS378C), section 8
 * "Registers" (table 2 register summary; 8.4 IIR, 8.5 FCR, 8.6 LCR, 8.7
 * MCR, 8.8 LSR, 8.9 MSR). The driver behaviour this model satisfies is
 * `autoconfig()`, `serial8250_do_startup()` and `serial8250_handle_irq()` in
 * linux/drivers/tty/serial/8250/8250_port.c.
 *
 * Emulation choices:
 * - Transmission is instantaneous: the byte written to THR goes to the host
 *   `output` callback at once, so LSR.THRE and LSR.TEMT always read 1 and
 *   the THR-empty interrupt comes back right after each THR write (as on a
 *   UART whose FIFO drained), which is what keeps the driver's TX interrupt
 *   loop going.
 * - Reception: host bytes wait in an unbounded host-side queue and move
 *   into the 16-byte RX FIFO as the guest drains it, so host input never
 *   overruns. The character-timeout interrupt is reported as soon as the
 *   FIFO holds fewer bytes than the trigger level, because by then the
 *   host has nothing more to send (the FIFO is refilled eagerly): the
 *   "4 character times" of line idle have, for our purposes, elapsed.
 * - Flow control: host bytes enter the FIFO only while the guest asserts
 *   MCR.RTS (and not in loopback), like a terminal honouring RTS/CTS. Linux
 *   raises RTS when a tty opens the port, after its FIFO resets, so input
 *   typed before the guest is ready waits in the host queue instead of
 *   being flushed by those resets. Option `rtsGatesInput: false` turns this off.
 * - MCR.OUT2 gates the IRQ output, as the PC wiring does (OUT2 enables the
 *   ISA IRQ driver); Linux sets OUT2 whenever it uses the IRQ. In loopback
 *   the chip forces its OUT2 pin inactive, so the line stays low too.
 *   Option `out2GatesIrq: false` ignores MCR for the line (kvmtool and
 *   Firecracker behave that way).
 */
import type { BusDevice, ReadMirror } from '../base/bus.js';
import type { IrqLine } from '../base/irq.js';
import { silentLogger, type Logger } from '../base/log.js';

// Register offsets (PC16550D table 2). Several share an offset; which one is
// meant depends on the direction and on LCR.DLAB.
/** Receiver buffer (read, DLAB=0). */
export const UART_RBR = 0;
/** Transmitter holding register (write, DLAB=0). */
export const UART_THR = 0;
/** Divisor latch low byte (DLAB=1). */
export const UART_DLL = 0;
/** Interrupt enable (DLAB=0). */
export const UART_IER = 1;
/** Divisor latch high byte (DLAB=1). */
export const UART_DLM = 1;
/** Interrupt identification (read). */
export const UART_IIR = 2;
/** FIFO control (write). */
export const UART_FCR = 2;
/** Line control. */
export const UART_LCR = 3;
/** Modem control. */
export const UART_MCR = 4;
/** Line status. */
export const UART_LSR = 5;
/** Modem status. */
export const UART_MSR = 6;
/** Scratch. */
export const UART_SCR = 7;
/** Size of the register window: the length to map on the bus. */
export const UART_REGISTER_COUNT = 8;

/** IER bits (datasheet 8.3). Bits 4-7 are not implemented on a 16550A and read 0. */
export const IER = {
  /** Received data available (and character timeout). */
  ERBFI: 0x01,
  /** Transmitter holding register empty. */
  ETBEI: 0x02,
  /** Receiver line status. */
  ELSI: 0x04,
  /** Modem status. */
  EDSSI: 0x08,
  MASK: 0x0f,
} as const;

/** IIR values (datasheet 8.4, table 4), highest priority first. */
export const IIR = {
  NO_INTERRUPT: 0x01,
  RECEIVER_LINE_STATUS: 0x06,
  RECEIVED_DATA: 0x04,
  CHARACTER_TIMEOUT: 0x0c,
  THR_EMPTY: 0x02,
  MODEM_STATUS: 0x00,
  /** Bits 6-7, set while FIFOs are enabled: how drivers tell a 16550A from a 16450. */
  FIFOS_ENABLED: 0xc0,
} as const;

/** FCR bits (datasheet 8.5). */
export const FCR = {
  ENABLE_FIFO: 0x01,
  CLEAR_RX: 0x02,
  CLEAR_TX: 0x04,
  DMA_MODE: 0x08,
  TRIGGER_MASK: 0xc0,
  TRIGGER_1: 0x00,
  TRIGGER_4: 0x40,
  TRIGGER_8: 0x80,
  TRIGGER_14: 0xc0,
} as const;

/** LCR bits (datasheet 8.6). */
export const LCR = {
  /** Divisor latch access: offsets 0 and 1 become DLL and DLM. */
  DLAB: 0x80,
  WORD_LENGTH_8: 0x03,
} as const;

/** MCR bits (datasheet 8.7). Bits 5-7 read 0. */
export const MCR = {
  DTR: 0x01,
  RTS: 0x02,
  OUT1: 0x04,
  /** On a PC, enables the IRQ output. */
  OUT2: 0x08,
  LOOPBACK: 0x10,
  MASK: 0x1f,
} as const;

/** LSR bits (datasheet 8.8). */
export const LSR = {
  DATA_READY: 0x01,
  OVERRUN_ERROR: 0x02,
  PARITY_ERROR: 0x04,
  FRAMING_ERROR: 0x08,
  BREAK_INTERRUPT: 0x10,
  THR_EMPTY: 0x20,
  TRANSMITTER_EMPTY: 0x40,
  FIFO_ERROR: 0x80,
  /** The bits that raise a receiver line status interrupt; reading LSR clears them. */
  ERROR_BITS: 0x1e,
} as const;

/** MSR bits (datasheet 8.9). The low nibble holds change flags, cleared by reading MSR. */
export const MSR = {
  DELTA_CTS: 0x01,
  DELTA_DSR: 0x02,
  TRAILING_EDGE_RI: 0x04,
  DELTA_DCD: 0x08,
  CTS: 0x10,
  DSR: 0x20,
  RI: 0x40,
  DCD: 0x80,
  DELTA_MASK: 0x0f,
} as const;

/** FIFO depth of a 16550A. */
export const UART_FIFO_SIZE = 16;

/** Receive trigger levels selected by FCR bits 6-7 (datasheet 8.5). */
const TRIGGER_LEVELS = [1, 4, 8, 14] as const;

export interface Serial16550Options {
  /** The UART's interrupt line (IRQ 4 for COM1). */
  irq: IrqLine;
  /** Called with each byte the guest transmits. The array is never reused. */
  output: (bytes: Uint8Array) => void;
  logger?: Logger;
  /** MCR.OUT2 enables the IRQ output, as on a PC. Default true. */
  out2GatesIrq?: boolean;
  /**
   * Where LSR's value is published while reading it has no side effect
   * (no error bit set, no loopback), so the VMM can answer the driver's
   * poll of it before each byte without calling the device.
   */
  lsrMirror?: ReadMirror;
  /** Host input enters the RX FIFO only while MCR.RTS is set. Default true. */
  rtsGatesInput?: boolean;
  /**
   * Called when the guest took host bytes into the RX FIFO: the host-side
   * queue shrank. A writer that stopped at a limit of
   * {@link Serial16550.pendingInput} resumes here.
   */
  onInputTaken?: () => void;
}

/** Counters; read them, do not write them. */
export interface SerialStats {
  /** Bytes the guest transmitted to the host (loopback excluded). */
  bytesOut: number;
  /** Host bytes moved into the RX FIFO. */
  bytesIn: number;
  /** Bytes lost because the RX FIFO was full (only loopback can do that). */
  overruns: number;
  /** Low-to-high transitions of the IRQ line. */
  irqRaises: number;
  /** Bytes dropped from the RX FIFO by guest FIFO resets. */
  rxDiscarded: number;
  /** Accesses wider than one byte or beyond the register window. */
  oddAccesses: number;
}

/** A byte queue made of chunks, so that shifting is O(1); its writer bounds it. */
class ByteQueue {
  private chunks: Uint8Array[] = [];
  private head = 0;
  private offset = 0;
  length = 0;

  push(bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    this.chunks.push(bytes);
    this.length += bytes.length;
  }

  shift(): number {
    const chunk = this.chunks[this.head]!;
    const byte = chunk[this.offset++]!;
    this.length--;
    if (this.offset === chunk.length) {
      this.head++;
      this.offset = 0;
      // Compact now and then so the array of spent chunks does not grow forever.
      if (this.head > 64 && this.head * 2 > this.chunks.length) {
        this.chunks = this.chunks.slice(this.head);
        this.head = 0;
      }
    }
    return byte;
  }
}

/**
 * A 16550A UART. Map it with length {@link UART_REGISTER_COUNT}; feed host
 * input with {@link Serial16550.enqueueInput}. Guest accesses never throw.
 */
export class Serial16550 implements BusDevice {
  readonly stats: SerialStats = {
    bytesOut: 0,
    bytesIn: 0,
    overruns: 0,
    irqRaises: 0,
    rxDiscarded: 0,
    oddAccesses: 0,
  };

  private readonly irq: IrqLine;
  private readonly output: (bytes: Uint8Array) => void;
  private readonly log: Logger;
  private readonly out2GatesIrq: boolean;
  private readonly rtsGatesInput: boolean;
  private readonly onInputTaken: (() => void) | undefined;
  private readonly lsrMirror: ReadMirror | undefined;
  /** What lsrMirror was last given (null: nothing yet). */
  private mirroredLsr: number | undefined | null = null;

  private ier = 0;
  private lcr = 0;
  private mcr = 0;
  /** Only the error bits are state; DR, THRE and TEMT are computed. */
  private lsrErrors = 0;
  private msrDeltas = 0;
  private scr = 0;
  // 115200 / 12 = 9600 baud, what PC firmware leaves behind. Only stored.
  private dll = 12;
  private dlm = 0;
  private fifoEnabled = false;
  private triggerLevel = 1;
  /** Raw FCR bits 6-7, kept so a FIFO re-enable without them keeps the level. */
  private fcrTriggerBits = 0;

  private readonly rxFifo = new Uint8Array(UART_FIFO_SIZE);
  private rxHead = 0;
  private rxCount = 0;
  /** What RBR reads when the FIFO is empty: the last byte received, as on the chip. */
  private rbr = 0;

  /** THR-empty interrupt condition; cleared by an IIR read that reports it or a THR write. */
  private thrEmptyPending = false;
  private irqLevel = false;

  private readonly hostInput = new ByteQueue();

  constructor(options: Serial16550Options) {
    this.irq = options.irq;
    this.output = options.output;
    this.log = (options.logger ?? silentLogger).child({ device: 'serial16550' });
    this.out2GatesIrq = options.out2GatesIrq ?? true;
    this.rtsGatesInput = options.rtsGatesInput ?? true;
    this.onInputTaken = options.onInputTaken;
    this.lsrMirror = options.lsrMirror;
    this.mirrorLsr();
  }

  /**
   * Queues bytes typed on the host. They reach the guest in order as it
   * drains the RX FIFO; none are dropped. The bytes are copied. The queue
   * has no limit of its own: the writer watches {@link pendingInput} (the
   * console stream stops taking input above CONSOLE_INPUT_LIMIT).
   */
  enqueueInput(bytes: Uint8Array): void {
    this.hostInput.push(bytes.slice());
    this.fillRxFifo();
    this.updateIrq();
    this.mirrorLsr();
  }

  /** True while the driver wants the THR-empty interrupt (IER.ETBEI): it has output queued. */
  get transmitInterruptEnabled(): boolean {
    return (this.ier & IER.ETBEI) !== 0;
  }

  /** Host bytes waiting to enter the RX FIFO. */
  get pendingInput(): number {
    return this.hostInput.length;
  }

  /** Current level of the IRQ line as this device drives it. */
  get irqAsserted(): boolean {
    return this.irqLevel;
  }

  read(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (!this.inWindow(offset)) {
      this.oddAccess('read', offset, data.length);
      data.fill(0xff);
      return;
    }
    if (data.length !== 1) {
      this.oddAccess('read', offset, data.length);
      data.fill(0);
    }
    data[0] = this.readRegister(offset);
    this.mirrorLsr();
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (!this.inWindow(offset)) {
      this.oddAccess('write', offset, data.length);
      return;
    }
    if (data.length !== 1) this.oddAccess('write', offset, data.length);
    this.writeRegister(offset, data[0]!);
    this.mirrorLsr();
  }

  /**
   * Publishes what an LSR read returns now, or nothing while that read must
   * reach the device: it clears error bits, and in loopback a THR write
   * still waiting in the VMM's coalesced ring would set DR. Called after
   * everything that can change LSR (every register access, host input).
   */
  private mirrorLsr(): void {
    if (!this.lsrMirror) return;
    const value = this.lsrErrors !== 0 || this.loopback ? undefined : this.lsrValue();
    if (value === this.mirroredLsr) return;
    this.mirroredLsr = value;
    this.lsrMirror.publish(value);
  }

  private lsrValue(): number {
    return this.lsrErrors | (this.rxCount > 0 ? LSR.DATA_READY : 0) | LSR.THR_EMPTY | LSR.TRANSMITTER_EMPTY;
  }

  private inWindow(offset: number): boolean {
    return Number.isInteger(offset) && offset >= 0 && offset < UART_REGISTER_COUNT;
  }

  private oddAccess(kind: 'read' | 'write', offset: number, size: number): void {
    this.stats.oddAccesses++;
    this.log.debug({ kind, offset, size }, 'access wider than a byte or outside the registers: first byte only');
  }

  private get dlab(): boolean {
    return (this.lcr & LCR.DLAB) !== 0;
  }

  private get loopback(): boolean {
    return (this.mcr & MCR.LOOPBACK) !== 0;
  }

  private readRegister(offset: number): number {
    switch (offset) {
      case UART_RBR:
        return this.dlab ? this.dll : this.readRbr();
      case UART_IER:
        return this.dlab ? this.dlm : this.ier;
      case UART_IIR:
        return this.readIir();
      case UART_LCR:
        return this.lcr;
      case UART_MCR:
        return this.mcr;
      case UART_LSR:
        return this.readLsr();
      case UART_MSR:
        return this.readMsr();
      case UART_SCR:
        return this.scr;
      default:
        return 0xff;
    }
  }

  private writeRegister(offset: number, value: number): void {
    switch (offset) {
      case UART_THR:
        if (this.dlab) this.dll = value;
        else this.writeThr(value);
        return;
      case UART_IER:
        if (this.dlab) this.dlm = value;
        else this.writeIer(value);
        return;
      case UART_FCR:
        this.writeFcr(value);
        return;
      case UART_LCR:
        this.lcr = value;
        return;
      case UART_MCR:
        this.writeMcr(value);
        return;
      case UART_LSR:
      case UART_MSR:
        // Factory-test writes on real parts; meaningless here.
        this.log.debug({ offset, value }, 'write to a read-only status register ignored');
        return;
      case UART_SCR:
        this.scr = value;
        return;
    }
  }

  private readRbr(): number {
    if (this.rxCount > 0) {
      this.rbr = this.rxFifo[this.rxHead]!;
      this.rxHead = (this.rxHead + 1) % UART_FIFO_SIZE;
      this.rxCount--;
      this.fillRxFifo();
      this.updateIrq();
    }
    return this.rbr;
  }

  private readIir(): number {
    const id = this.pendingInterrupt();
    // Reading IIR acknowledges a THR-empty interrupt, but only when it is the
    // one reported (datasheet table 4, "reset control").
    if (id === IIR.THR_EMPTY) {
      this.thrEmptyPending = false;
      this.updateIrq();
    }
    return id | (this.fifoEnabled ? IIR.FIFOS_ENABLED : 0);
  }

  private readLsr(): number {
    const value = this.lsrValue();
    if (this.lsrErrors !== 0) {
      this.lsrErrors = 0;
      this.updateIrq();
    }
    return value;
  }

  private readMsr(): number {
    const value = this.msrDeltas | this.modemInputs();
    if (this.msrDeltas !== 0) {
      this.msrDeltas = 0;
      this.updateIrq();
    }
    return value;
  }

  private writeThr(value: number): void {
    this.thrEmptyPending = false;
    if (this.loopback) {
      // Loopback: the serial output is wired to the serial input inside the chip.
      this.receive(value);
    } else {
      this.stats.bytesOut++;
      this.output(Uint8Array.of(value));
    }
    // The byte left at once, so THR is empty again: the interrupt is due anew.
    this.thrEmptyPending = true;
    this.updateIrq();
  }

  private writeIer(value: number): void {
    const old = this.ier;
    this.ier = value & IER.MASK;
    // Enabling ETBEI while THR is empty raises the interrupt even if an IIR
    // read had acknowledged it: Linux's startup THRE test depends on it.
    if ((old ^ this.ier) & IER.ETBEI) this.thrEmptyPending = (this.ier & IER.ETBEI) !== 0;
    this.updateIrq();
  }

  private writeFcr(value: number): void {
    const enable = (value & FCR.ENABLE_FIFO) !== 0;
    let clearRx = (value & FCR.CLEAR_RX) !== 0;
    // Changing the FIFO mode resets both FIFOs (datasheet 8.5, FCR0).
    if (enable !== this.fifoEnabled) clearRx = true;
    this.fifoEnabled = enable;
    if (enable) {
      // The other FCR bits are writable only together with FCR0.
      this.fcrTriggerBits = value & FCR.TRIGGER_MASK;
      this.triggerLevel = TRIGGER_LEVELS[this.fcrTriggerBits >> 6]!;
    }
    if (clearRx && this.rxCount > 0) {
      this.stats.rxDiscarded += this.rxCount;
      this.log.debug({ discarded: this.rxCount }, 'RX FIFO reset by the guest');
      this.rxCount = 0;
      this.rxHead = 0;
    }
    // The TX FIFO is always empty (instant transmission): CLEAR_TX needs nothing.
    this.fillRxFifo();
    this.updateIrq();
  }

  private writeMcr(value: number): void {
    const before = this.modemInputs();
    this.mcr = value & MCR.MASK;
    const after = this.modemInputs();
    const changed = before ^ after;
    if (changed & MSR.CTS) this.msrDeltas |= MSR.DELTA_CTS;
    if (changed & MSR.DSR) this.msrDeltas |= MSR.DELTA_DSR;
    if (changed & MSR.DCD) this.msrDeltas |= MSR.DELTA_DCD;
    if (before & MSR.RI && !(after & MSR.RI)) this.msrDeltas |= MSR.TRAILING_EDGE_RI;
    // Leaving loopback or raising RTS lets held host input in.
    this.fillRxFifo();
    this.updateIrq();
  }

  /**
   * MSR bits 4-7. Outside loopback the host side is a terminal that is
   * always there (DCD, DSR, CTS). In loopback they follow MCR (datasheet
   * 8.7: RTS to CTS, DTR to DSR, OUT1 to RI, OUT2 to DCD): the 8250
   * driver's autoconfig writes LOOP|OUT2|RTS and expects DCD|CTS (0x90).
   */
  private modemInputs(): number {
    if (!this.loopback) return MSR.DCD | MSR.DSR | MSR.CTS;
    let v = 0;
    if (this.mcr & MCR.RTS) v |= MSR.CTS;
    if (this.mcr & MCR.DTR) v |= MSR.DSR;
    if (this.mcr & MCR.OUT1) v |= MSR.RI;
    if (this.mcr & MCR.OUT2) v |= MSR.DCD;
    return v;
  }

  private get rxCapacity(): number {
    return this.fifoEnabled ? UART_FIFO_SIZE : 1;
  }

  /** A byte arriving at the receiver: FIFO or, when full, an overrun. */
  private receive(byte: number): void {
    if (this.rxCount >= this.rxCapacity) {
      this.lsrErrors |= LSR.OVERRUN_ERROR;
      this.stats.overruns++;
      return;
    }
    this.rxFifo[(this.rxHead + this.rxCount) % UART_FIFO_SIZE] = byte;
    this.rxCount++;
  }

  /** Moves host bytes into the RX FIFO while the line is open and there is room. */
  private fillRxFifo(): void {
    if (this.loopback) return;
    if (this.rtsGatesInput && !(this.mcr & MCR.RTS)) return;
    const capacity = this.rxCapacity;
    const before = this.hostInput.length;
    while (this.rxCount < capacity && this.hostInput.length > 0) {
      this.receive(this.hostInput.shift());
      this.stats.bytesIn++;
    }
    if (this.hostInput.length !== before) this.onInputTaken?.();
  }

  /** The highest-priority pending, enabled interrupt as an IIR id (datasheet table 4). */
  private pendingInterrupt(): number {
    if (this.ier & IER.ELSI && this.lsrErrors & LSR.ERROR_BITS) return IIR.RECEIVER_LINE_STATUS;
    if (this.ier & IER.ERBFI && this.rxCount > 0) {
      if (!this.fifoEnabled || this.rxCount >= this.triggerLevel) return IIR.RECEIVED_DATA;
      return IIR.CHARACTER_TIMEOUT;
    }
    if (this.ier & IER.ETBEI && this.thrEmptyPending) return IIR.THR_EMPTY;
    if (this.ier & IER.EDSSI && this.msrDeltas) return IIR.MODEM_STATUS;
    return IIR.NO_INTERRUPT;
  }

  /** Drives the IRQ line from the interrupt state, touching it only on a change. */
  private updateIrq(): void {
    let level = this.pendingInterrupt() !== IIR.NO_INTERRUPT;
    if (this.out2GatesIrq && (!(this.mcr & MCR.OUT2) || this.loopback)) level = false;
    if (level === this.irqLevel) return;
    this.irqLevel = level;
    if (level) this.stats.irqRaises++;
    this.irq.setLevel(level);
  }
}
