import { describe, expect, it } from 'vitest';
import { FakeIrqLine } from '../../src/testing/index.js';
import {
  FCR,
  IER,
  IIR,
  LCR,
  LSR,
  MCR,
  MSR,
  Serial16550,
  UART_DLL,
  UART_DLM,
  UART_FCR,
  UART_IER,
  UART_IIR,
  UART_LCR,
  UART_LSR,
  UART_MCR,
  UART_MSR,
  UART_RBR,
  UART_SCR,
  UART_THR,
  type Serial16550Options,
} from '../../src/devices/serial.js';

function setup(options: Partial<Serial16550Options> = {}) {
  const irq = new FakeIrqLine();
  const out: number[] = [];
  const outputCalls: Uint8Array[] = [];
  const uart = new Serial16550({
    irq,
    output: (bytes) => {
      outputCalls.push(bytes);
      out.push(...bytes);
    },
    ...options,
  });
  const rd = (offset: number): number => {
    const d = new Uint8Array(1);
    uart.read(offset, d);
    return d[0]!;
  };
  const wr = (offset: number, value: number): void => uart.write(offset, Uint8Array.of(value));
  return { uart, irq, out, outputCalls, rd, wr };
}

type Io = ReturnType<typeof setup>;

/** The interrupt-driven setup Linux ends with after opening the tty. */
function openLikeLinux(io: Io, fcr: number = FCR.ENABLE_FIFO | FCR.TRIGGER_8): void {
  io.wr(UART_LCR, LCR.WORD_LENGTH_8);
  io.wr(UART_FCR, fcr);
  io.wr(UART_MCR, MCR.DTR | MCR.RTS | MCR.OUT2);
  io.wr(UART_IER, IER.ERBFI | IER.ELSI);
}

/**
 * linux/drivers/tty/serial/8250/8250_port.c autoconfig() and
 * autoconfig_16550a(), as the driver runs them against COM1 (with the
 * loopback test, which UPF_SKIP_TEST would skip). Returns the type the
 * driver would settle on.
 */
function linuxAutoconfig(io: Io): string {
  const { rd, wr } = io;
  // "Do a simple existence test first": IER must hold what is written.
  const scratch = rd(UART_IER);
  wr(UART_IER, 0);
  const scratch2 = rd(UART_IER) & 0x0f;
  wr(UART_IER, 0x0f);
  const scratch3 = rd(UART_IER) & 0x0f;
  wr(UART_IER, scratch);
  if (scratch2 !== 0 || scratch3 !== 0x0f) return 'none: IER test failed';

  const saveMcr = rd(UART_MCR);
  const saveLcr = rd(UART_LCR);
  // "Check to see if a UART is really there": loopback with OUT2|RTS must read DCD|CTS.
  wr(UART_MCR, MCR.LOOPBACK | 0x0a);
  const status1 = rd(UART_MSR) & 0xf0;
  wr(UART_MCR, saveMcr);
  if (status1 !== 0x90) return `none: loopback test read 0x${status1.toString(16)}`;

  // EFR cleared under LCR=0xBF (lands in FCR on a 16550A), then FIFO detection.
  wr(UART_LCR, 0xbf);
  wr(2, 0);
  wr(UART_LCR, 0);
  wr(UART_FCR, FCR.ENABLE_FIFO);
  const fifoBits = rd(UART_IIR) >> 6;
  let type: string;
  switch (fifoBits) {
    case 0:
      type = '16450';
      break;
    case 1:
      type = 'unknown';
      break;
    case 2:
      type = '16550';
      break;
    default: {
      type = '16550A';
      // autoconfig_16550a(): EFR under 0xBF / 0x80 must not read 0.
      wr(UART_LCR, 0xbf);
      if (rd(2) === 0) type = '16650 (EFR)';
      wr(UART_LCR, 0x80);
      if (rd(2) === 0) type = '16C850';
      wr(UART_LCR, 0);
      // 16750: 64-byte FIFO bit (IIR bit 5) must stay clear.
      wr(UART_FCR, FCR.ENABLE_FIFO | 0x20);
      const s1 = rd(UART_IIR) >> 5;
      wr(UART_FCR, FCR.ENABLE_FIFO);
      wr(UART_LCR, LCR.DLAB);
      wr(UART_FCR, FCR.ENABLE_FIFO | 0x20);
      const s2 = rd(UART_IIR) >> 5;
      wr(UART_FCR, FCR.ENABLE_FIFO);
      wr(UART_LCR, 0);
      if (s1 === 6 && s2 === 7) type = '16750';
      // XScale: the UUE bit (IER bit 6) must not stick.
      const ierSave = rd(UART_IER);
      wr(UART_IER, ierSave ^ 0x40);
      if ((rd(UART_IER) ^ ierSave) & 0x40) type = 'XScale';
      wr(UART_IER, ierSave);
    }
  }
  wr(UART_LCR, saveLcr);
  // Reset the UART.
  wr(UART_MCR, saveMcr);
  wr(UART_FCR, FCR.ENABLE_FIFO);
  wr(UART_FCR, FCR.ENABLE_FIFO | FCR.CLEAR_RX | FCR.CLEAR_TX);
  wr(UART_FCR, 0);
  rd(UART_RBR);
  wr(UART_IER, 0);
  return type;
}

describe('Serial16550: Linux 8250 probing', () => {
  it('passes the 8250 autoconfig sequence as a 16550A', () => {
    const io = setup();
    expect(linuxAutoconfig(io)).toBe('16550A');
    // Autoconfig leaves the port quiet: no output, no interrupt.
    expect(io.out).toEqual([]);
    expect(io.irq.history).toEqual([]);
    expect(io.rd(UART_IER)).toBe(0);
    expect(io.rd(UART_MCR)).toBe(0);
  });

  it('keeps what is written to the scratch register', () => {
    const { rd, wr } = setup();
    for (const v of [0x00, 0x55, 0xaa, 0xff]) {
      wr(UART_SCR, v);
      expect(rd(UART_SCR)).toBe(v);
    }
  });

  it('implements only IER bits 0-3', () => {
    const { rd, wr } = setup();
    wr(UART_IER, 0xff);
    expect(rd(UART_IER)).toBe(0x0f);
  });

  it('shows the FIFO-enabled bits 0xC0 in IIR only while FIFOs are on', () => {
    const { rd, wr } = setup();
    expect(rd(UART_IIR)).toBe(IIR.NO_INTERRUPT);
    wr(UART_FCR, FCR.ENABLE_FIFO);
    expect(rd(UART_IIR)).toBe(0xc1);
    wr(UART_FCR, 0);
    expect(rd(UART_IIR)).toBe(0x01);
  });

  it('passes serial8250_do_startup: LSR sane, THRE interrupt on ETBEI, re-asserted after IER toggle', () => {
    const io = setup();
    const { rd, wr } = io;
    linuxAutoconfig(io);
    wr(UART_FCR, FCR.ENABLE_FIFO);
    wr(UART_FCR, FCR.ENABLE_FIFO | FCR.CLEAR_RX | FCR.CLEAR_TX);
    wr(UART_FCR, 0);
    rd(UART_LSR);
    rd(UART_RBR);
    rd(UART_IIR);
    rd(UART_MSR);
    expect(rd(UART_LSR)).not.toBe(0xff);
    // The UART_BUG_THRE test.
    wr(UART_IER, IER.ETBEI);
    const iir1 = rd(UART_IIR);
    wr(UART_IER, 0);
    wr(UART_IER, IER.ETBEI);
    const iir = rd(UART_IIR);
    wr(UART_IER, 0);
    expect(iir1 & IIR.NO_INTERRUPT).toBe(0);
    expect(iir & IIR.NO_INTERRUPT).toBe(0);
    // The UART_BUG_TXEN test.
    wr(UART_LCR, LCR.WORD_LENGTH_8);
    wr(UART_MCR, MCR.OUT2);
    wr(UART_IER, IER.ETBEI);
    const lsr = rd(UART_LSR);
    const iir2 = rd(UART_IIR);
    wr(UART_IER, 0);
    expect(lsr & LSR.TRANSMITTER_EMPTY).toBeTruthy();
    expect(iir2 & 0x0f).toBe(IIR.THR_EMPTY);
  });
});

describe('Serial16550: registers', () => {
  it('switches offsets 0 and 1 to the divisor latch while LCR.DLAB is set', () => {
    const { rd, wr, out } = setup();
    wr(UART_IER, IER.ERBFI | IER.ETBEI);
    wr(UART_LCR, LCR.DLAB | LCR.WORD_LENGTH_8);
    wr(UART_DLL, 0x01);
    wr(UART_DLM, 0x02);
    expect(rd(UART_DLL)).toBe(0x01);
    expect(rd(UART_DLM)).toBe(0x02);
    expect(rd(UART_LCR)).toBe(LCR.DLAB | LCR.WORD_LENGTH_8);
    // Nothing was transmitted and IER is untouched.
    expect(out).toEqual([]);
    wr(UART_LCR, LCR.WORD_LENGTH_8);
    expect(rd(UART_IER)).toBe(IER.ERBFI | IER.ETBEI);
    wr(UART_THR, 0x41);
    expect(out).toEqual([0x41]);
    // The divisor survives DLAB going off and on again.
    wr(UART_LCR, LCR.DLAB);
    expect(rd(UART_DLL)).toBe(0x01);
    expect(rd(UART_DLM)).toBe(0x02);
  });

  it('reads MSR as DCD|DSR|CTS outside loopback, and mirrors MCR in loopback', () => {
    const { rd, wr } = setup();
    expect(rd(UART_MSR)).toBe(MSR.DCD | MSR.DSR | MSR.CTS);
    wr(UART_MCR, MCR.LOOPBACK);
    // All four inputs fell: deltas for CTS, DSR, DCD (RI was already low).
    expect(rd(UART_MSR)).toBe(MSR.DELTA_CTS | MSR.DELTA_DSR | MSR.DELTA_DCD);
    expect(rd(UART_MSR)).toBe(0);
    wr(UART_MCR, MCR.LOOPBACK | MCR.DTR);
    expect(rd(UART_MSR)).toBe(MSR.DSR | MSR.DELTA_DSR);
    wr(UART_MCR, MCR.LOOPBACK | MCR.RTS | MCR.OUT1 | MCR.OUT2);
    expect(rd(UART_MSR) & 0xf0).toBe(MSR.CTS | MSR.RI | MSR.DCD);
    // RI's delta is for its trailing edge only.
    wr(UART_MCR, MCR.LOOPBACK | MCR.RTS | MCR.OUT2);
    expect(rd(UART_MSR)).toBe(MSR.CTS | MSR.DCD | MSR.TRAILING_EDGE_RI);
  });

  it('keeps LSR.THRE and TEMT set: transmission is instantaneous', () => {
    const { rd, wr } = setup();
    expect(rd(UART_LSR)).toBe(LSR.THR_EMPTY | LSR.TRANSMITTER_EMPTY);
    for (let i = 0; i < 40; i++) wr(UART_THR, i);
    expect(rd(UART_LSR)).toBe(LSR.THR_EMPTY | LSR.TRANSMITTER_EMPTY);
  });

  it('calls output once per THR write with that byte, outside loopback only', () => {
    const { wr, out, outputCalls, uart } = setup();
    const text = [...'hello\n'].map((c) => c.charCodeAt(0));
    for (const b of text) wr(UART_THR, b);
    expect(out).toEqual(text);
    expect(outputCalls.every((c) => c.length === 1)).toBe(true);
    // Each call gets its own array: the consumer may keep it.
    expect(new Set(outputCalls).size).toBe(outputCalls.length);
    expect(uart.stats.bytesOut).toBe(text.length);
    wr(UART_MCR, MCR.LOOPBACK);
    wr(UART_THR, 0x7a);
    expect(out).toEqual(text);
    expect(uart.stats.bytesOut).toBe(text.length);
  });

  it('loops TX back into RX in loopback mode and reports overrun past 16 bytes', () => {
    const { rd, wr, uart } = setup();
    wr(UART_FCR, FCR.ENABLE_FIFO);
    wr(UART_MCR, MCR.LOOPBACK);
    for (let i = 0; i < 17; i++) wr(UART_THR, 0x30 + i);
    const lsr = rd(UART_LSR);
    expect(lsr & LSR.DATA_READY).toBeTruthy();
    expect(lsr & LSR.OVERRUN_ERROR).toBeTruthy();
    expect(rd(UART_LSR) & LSR.OVERRUN_ERROR).toBe(0); // cleared by the read
    expect(uart.stats.overruns).toBe(1);
    const got: number[] = [];
    while (rd(UART_LSR) & LSR.DATA_READY) got.push(rd(UART_RBR));
    expect(got).toEqual(Array.from({ length: 16 }, (_, i) => 0x30 + i));
  });

  it('holds a single byte with FIFOs off (16450 mode)', () => {
    const { rd, wr, uart } = setup();
    wr(UART_MCR, MCR.LOOPBACK);
    wr(UART_THR, 1);
    wr(UART_THR, 2);
    expect(uart.stats.overruns).toBe(1);
    expect(rd(UART_RBR)).toBe(1);
    expect(rd(UART_LSR) & LSR.DATA_READY).toBe(0);
  });

  it('discards the RX FIFO on FCR clear and on a FIFO mode change', () => {
    const { rd, wr, uart } = setup();
    wr(UART_FCR, FCR.ENABLE_FIFO);
    wr(UART_MCR, MCR.LOOPBACK);
    for (let i = 0; i < 5; i++) wr(UART_THR, i);
    wr(UART_FCR, FCR.ENABLE_FIFO | FCR.CLEAR_RX);
    expect(rd(UART_LSR) & LSR.DATA_READY).toBe(0);
    expect(uart.stats.rxDiscarded).toBe(5);
    for (let i = 0; i < 3; i++) wr(UART_THR, i);
    wr(UART_FCR, 0);
    expect(rd(UART_LSR) & LSR.DATA_READY).toBe(0);
    expect(uart.stats.rxDiscarded).toBe(8);
  });
});

describe('Serial16550: interrupts', () => {
  it('raises THRE when ETBEI is enabled with THR empty; an IIR read clears it', () => {
    const { rd, wr, irq } = setup();
    wr(UART_FCR, FCR.ENABLE_FIFO);
    wr(UART_MCR, MCR.OUT2);
    wr(UART_IER, IER.ETBEI);
    expect(irq.level).toBe(true);
    expect(rd(UART_IIR)).toBe(IIR.FIFOS_ENABLED | IIR.THR_EMPTY);
    expect(irq.level).toBe(false);
    expect(rd(UART_IIR)).toBe(IIR.FIFOS_ENABLED | IIR.NO_INTERRUPT);
    // Re-enabling ETBEI raises it again.
    wr(UART_IER, 0);
    wr(UART_IER, IER.ETBEI);
    expect(irq.level).toBe(true);
    expect(irq.history).toEqual(['high', 'low', 'high']);
  });

  it('does not re-raise THRE on an IER write that leaves ETBEI set', () => {
    const { rd, wr, irq } = setup();
    wr(UART_MCR, MCR.OUT2);
    wr(UART_IER, IER.ETBEI);
    rd(UART_IIR);
    wr(UART_IER, IER.ETBEI | IER.ELSI);
    expect(irq.level).toBe(false);
    expect(rd(UART_IIR)).toBe(IIR.NO_INTERRUPT);
  });

  it('clears THRE on a THR write and raises it again when the byte has gone', () => {
    const { rd, wr, irq, out } = setup();
    wr(UART_MCR, MCR.OUT2);
    wr(UART_IER, IER.ETBEI);
    rd(UART_IIR); // acknowledged: line low
    expect(irq.level).toBe(false);
    wr(UART_THR, 0x61);
    expect(out).toEqual([0x61]);
    expect(irq.level).toBe(true);
    expect(rd(UART_IIR) & 0x0f).toBe(IIR.THR_EMPTY);
    // Disabling ETBEI (the driver's stop_tx) drops the line.
    wr(UART_THR, 0x62);
    wr(UART_IER, 0);
    expect(irq.level).toBe(false);
  });

  it('changes the IRQ level only on transitions', () => {
    const io = setup();
    const { wr, irq, uart } = io;
    openLikeLinux(io);
    wr(UART_IER, IER.ERBFI | IER.ELSI | IER.ETBEI);
    for (let i = 0; i < 200; i++) wr(UART_THR, i & 0xff);
    uart.enqueueInput(new Uint8Array(40).fill(0x41));
    wr(UART_IER, IER.ERBFI | IER.ELSI | IER.ETBEI);
    // The line went high once and stayed there through all of that.
    expect(irq.history).toEqual(['high']);
    expect(uart.stats.irqRaises).toBe(1);
    for (let i = 1; i < irq.history.length; i++) expect(irq.history[i]).not.toBe(irq.history[i - 1]);
  });

  it('keeps the line low without MCR.OUT2, yet IIR still reports', () => {
    const { rd, wr, irq } = setup();
    wr(UART_IER, IER.ETBEI);
    expect(irq.level).toBe(false);
    expect(irq.history).toEqual([]);
    wr(UART_MCR, MCR.OUT2);
    expect(irq.level).toBe(true);
    wr(UART_MCR, 0);
    expect(irq.level).toBe(false);
    expect(rd(UART_IIR)).toBe(IIR.THR_EMPTY);
  });

  it('keeps the line low in loopback even with OUT2', () => {
    const { wr, irq } = setup();
    wr(UART_MCR, MCR.OUT2 | MCR.LOOPBACK);
    wr(UART_IER, IER.ETBEI | IER.ERBFI);
    wr(UART_THR, 1);
    expect(irq.level).toBe(false);
    wr(UART_MCR, MCR.OUT2);
    expect(irq.level).toBe(true);
  });

  it('ignores OUT2 when out2GatesIrq is false', () => {
    const { wr, irq } = setup({ out2GatesIrq: false });
    wr(UART_IER, IER.ETBEI);
    expect(irq.level).toBe(true);
  });

  it.each([
    [FCR.TRIGGER_1, 1],
    [FCR.TRIGGER_4, 4],
    [FCR.TRIGGER_8, 8],
    [FCR.TRIGGER_14, 14],
  ])('FCR trigger bits 0x%s: data interrupt at %i bytes, character timeout below', (bits, level) => {
    const io = setup();
    const { rd, uart, irq } = io;
    openLikeLinux(io, FCR.ENABLE_FIFO | bits);
    expect(irq.level).toBe(false);
    if (level > 1) {
      uart.enqueueInput(new Uint8Array(level - 1).fill(0x61));
      expect(rd(UART_IIR)).toBe(IIR.FIFOS_ENABLED | IIR.CHARACTER_TIMEOUT);
      expect(irq.level).toBe(true);
    }
    uart.enqueueInput(Uint8Array.of(0x62));
    expect(rd(UART_IIR)).toBe(IIR.FIFOS_ENABLED | IIR.RECEIVED_DATA);
    // Reading one byte drops below the trigger level: timeout again, not silence.
    rd(UART_RBR);
    expect(rd(UART_IIR)).toBe(level > 1 ? IIR.FIFOS_ENABLED | IIR.CHARACTER_TIMEOUT : IIR.FIFOS_ENABLED | 1);
    while (rd(UART_LSR) & LSR.DATA_READY) rd(UART_RBR);
    expect(rd(UART_IIR)).toBe(IIR.FIFOS_ENABLED | IIR.NO_INTERRUPT);
    expect(irq.level).toBe(false);
  });

  it('reports received data at one byte with FIFOs off', () => {
    const io = setup();
    openLikeLinux(io, 0);
    io.uart.enqueueInput(Uint8Array.of(0x41, 0x42));
    expect(io.rd(UART_IIR)).toBe(IIR.RECEIVED_DATA);
    expect(io.rd(UART_RBR)).toBe(0x41);
    expect(io.rd(UART_RBR)).toBe(0x42);
    expect(io.rd(UART_IIR)).toBe(IIR.NO_INTERRUPT);
  });

  it('reports sources by priority: line status, data, THR empty, modem status', () => {
    const { rd, wr } = setup();
    wr(UART_FCR, FCR.ENABLE_FIFO);
    // Entering loopback drops CTS/DSR/DCD: modem status deltas.
    wr(UART_MCR, MCR.LOOPBACK);
    for (let i = 0; i < 17; i++) wr(UART_THR, i); // 16 received + overrun; THR empty
    wr(UART_IER, IER.ERBFI | IER.ETBEI | IER.ELSI | IER.EDSSI);
    expect(rd(UART_IIR)).toBe(0xc0 | IIR.RECEIVER_LINE_STATUS);
    expect(rd(UART_IIR)).toBe(0xc0 | IIR.RECEIVER_LINE_STATUS); // until LSR is read
    expect(rd(UART_LSR) & LSR.OVERRUN_ERROR).toBeTruthy();
    expect(rd(UART_IIR)).toBe(0xc0 | IIR.RECEIVED_DATA);
    for (let i = 0; i < 16; i++) expect(rd(UART_RBR)).toBe(i);
    expect(rd(UART_IIR)).toBe(0xc0 | IIR.THR_EMPTY);
    expect(rd(UART_IIR)).toBe(0xc0 | IIR.MODEM_STATUS);
    expect(rd(UART_MSR) & MSR.DELTA_MASK).toBe(MSR.DELTA_CTS | MSR.DELTA_DSR | MSR.DELTA_DCD);
    expect(rd(UART_IIR)).toBe(0xc0 | IIR.NO_INTERRUPT);
  });

  it('does not let a masked source show in IIR', () => {
    const { rd, wr } = setup();
    wr(UART_MCR, MCR.LOOPBACK);
    wr(UART_THR, 1);
    wr(UART_IER, IER.ETBEI);
    expect(rd(UART_IIR)).toBe(IIR.THR_EMPTY); // data is there but ERBFI is off
  });
});

describe('Serial16550: host input', () => {
  it('delivers everything enqueued, in order, through the 16-byte FIFO', () => {
    const io = setup();
    const { rd, uart, irq } = io;
    openLikeLinux(io);
    const sent: number[] = [];
    const got: number[] = [];
    let seed = 7;
    const rand = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
    for (let round = 0; round < 50; round++) {
      const chunk = Uint8Array.from({ length: rand() % 100 }, () => rand() & 0xff);
      sent.push(...chunk);
      uart.enqueueInput(chunk);
      // What the driver's interrupt handler does, for a while.
      let handled = 0;
      while (irq.level && handled++ < (rand() % 3) + 1) {
        const iir = rd(UART_IIR);
        expect(iir & IIR.NO_INTERRUPT).toBe(0);
        for (let n = 0; n < 256 && rd(UART_LSR) & LSR.DATA_READY; n++) got.push(rd(UART_RBR));
      }
      // Nothing lost: every byte is either host-side, in the FIFO (at most 16) or read.
      expect(uart.stats.bytesIn + uart.pendingInput).toBe(sent.length);
      expect(uart.stats.bytesIn - got.length).toBeGreaterThanOrEqual(0);
      expect(uart.stats.bytesIn - got.length).toBeLessThanOrEqual(16);
    }
    while (irq.level) {
      rd(UART_IIR);
      while (rd(UART_LSR) & LSR.DATA_READY) got.push(rd(UART_RBR));
    }
    expect(got).toEqual(sent);
    expect(uart.pendingInput).toBe(0);
    expect(uart.stats.bytesIn).toBe(sent.length);
    expect(uart.stats.overruns).toBe(0);
  });

  it('keeps at most 16 bytes in the FIFO and the rest host-side', () => {
    const io = setup();
    openLikeLinux(io);
    io.uart.enqueueInput(new Uint8Array(100));
    expect(io.uart.pendingInput).toBe(84);
    io.rd(UART_RBR);
    expect(io.uart.pendingInput).toBe(83);
  });

  it('copies the input: the caller may reuse its buffer', () => {
    const io = setup();
    openLikeLinux(io, 0);
    const buf = Uint8Array.of(1, 2, 3);
    io.uart.enqueueInput(buf);
    buf.fill(9);
    expect([io.rd(UART_RBR), io.rd(UART_RBR), io.rd(UART_RBR)]).toEqual([1, 2, 3]);
  });

  it('holds host input while RTS is low and while in loopback', () => {
    const { rd, wr, uart } = setup();
    wr(UART_FCR, FCR.ENABLE_FIFO);
    uart.enqueueInput(Uint8Array.of(1, 2, 3));
    expect(rd(UART_LSR) & LSR.DATA_READY).toBe(0);
    // The driver's FIFO reset while the port is closed loses nothing.
    wr(UART_FCR, FCR.ENABLE_FIFO | FCR.CLEAR_RX);
    rd(UART_RBR);
    expect(uart.pendingInput).toBe(3);
    wr(UART_MCR, MCR.LOOPBACK | MCR.RTS);
    expect(rd(UART_LSR) & LSR.DATA_READY).toBe(0);
    wr(UART_MCR, MCR.RTS);
    expect(uart.pendingInput).toBe(0);
    expect([rd(UART_RBR), rd(UART_RBR), rd(UART_RBR)]).toEqual([1, 2, 3]);
    expect(uart.stats.rxDiscarded).toBe(0);
  });

  it('delivers without RTS when rtsGatesInput is false', () => {
    const { rd, uart } = setup({ rtsGatesInput: false });
    uart.enqueueInput(Uint8Array.of(0x5a));
    expect(rd(UART_LSR) & LSR.DATA_READY).toBeTruthy();
    expect(rd(UART_RBR)).toBe(0x5a);
  });
});

describe('Serial16550: robustness', () => {
  it('handles the first byte of a wide access', () => {
    const { uart, wr } = setup();
    wr(UART_SCR, 0x5a);
    const d = new Uint8Array(4).fill(0xee);
    uart.read(UART_SCR, d);
    expect([...d]).toEqual([0x5a, 0, 0, 0]);
    uart.write(UART_SCR, Uint8Array.of(0x11, 0x22));
    uart.read(UART_SCR, d.subarray(0, 1));
    expect(d[0]).toBe(0x11);
    expect(uart.stats.oddAccesses).toBe(2);
  });

  it('never throws on any access at any offset and size', () => {
    const io = setup();
    let seed = 12345;
    const rand = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
    for (let i = 0; i < 20000; i++) {
      const offset = (rand() % 14) - 3;
      const size = [0, 1, 2, 4, 8][rand() % 5]!;
      const data = Uint8Array.from({ length: size }, () => rand() & 0xff);
      if (rand() % 100 === 0) io.uart.enqueueInput(Uint8Array.of(rand() & 0xff));
      if (rand() & 1) io.uart.read(offset, data);
      else io.uart.write(offset, data);
    }
    for (let i = 1; i < io.irq.history.length; i++) expect(io.irq.history[i]).not.toBe(io.irq.history[i - 1]);
  });
});

describe('Serial16550: the LSR mirror (LSR reads answered without the device)', () => {
  function mirrored(options: Partial<Serial16550Options> = {}) {
    const published: Array<number | undefined> = [];
    const io = setup({ lsrMirror: { publish: (v) => published.push(v) }, ...options });
    return { ...io, published, current: () => published.at(-1) };
  }

  it('publishes THRE|TEMT at once, and DR while received bytes wait', () => {
    const io = mirrored();
    expect(io.current()).toBe(LSR.THR_EMPTY | LSR.TRANSMITTER_EMPTY);
    openLikeLinux(io);
    io.uart.enqueueInput(Uint8Array.of(0x41));
    expect(io.current()).toBe(LSR.DATA_READY | LSR.THR_EMPTY | LSR.TRANSMITTER_EMPTY);
    expect(io.rd(UART_RBR)).toBe(0x41);
    expect(io.current()).toBe(LSR.THR_EMPTY | LSR.TRANSMITTER_EMPTY);
    // Printing changes nothing: only a change is published.
    const before = io.published.length;
    for (const b of Buffer.from('hello')) io.wr(UART_THR, b);
    expect(io.published.length).toBe(before);
  });

  it('publishes nothing while an LSR read would clear an error, or in loopback', () => {
    const io = mirrored();
    io.wr(UART_MCR, MCR.LOOPBACK);
    expect(io.current()).toBeUndefined();
    for (let i = 0; i < 3; i++) io.wr(UART_THR, i); // FIFOs off: one byte held, the next ones overrun
    io.wr(UART_MCR, 0);
    expect(io.current()).toBeUndefined(); // the overrun bit waits for an LSR read
    expect(io.rd(UART_LSR) & LSR.OVERRUN_ERROR).toBe(LSR.OVERRUN_ERROR);
    expect(io.current()).toBe(LSR.DATA_READY | LSR.THR_EMPTY | LSR.TRANSMITTER_EMPTY);
  });

  it('always publishes what a read of LSR returns, and a read it publishes changes nothing', () => {
    const io = mirrored();
    let seed = 4242;
    const rand = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
    let checked = 0;
    for (let i = 0; i < 20000; i++) {
      const offset = rand() % 8;
      const value = rand() & 0xff;
      if (rand() % 20 === 0) io.uart.enqueueInput(Uint8Array.of(value));
      else if (rand() & 1) io.rd(offset);
      else if (offset !== UART_MCR || rand() % 4 === 0) io.wr(offset, value); // loopback not too often
      const published = io.current();
      if (published === undefined) continue;
      const irqBefore = io.irq.history.length;
      const count = io.published.length;
      expect(io.rd(UART_LSR)).toBe(published);
      expect(io.published.length).toBe(count);
      expect(io.irq.history.length).toBe(irqBefore);
      checked++;
    }
    expect(checked).toBeGreaterThan(5000);
  });
});
