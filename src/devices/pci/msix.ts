/**
 * MSI-X (PCI Local Bus spec 3.0 section 6.8.2): the capability in
 * configuration space, the vector table and the pending bit array (PBA),
 * both of which live in a BAR.
 *
 * The model decides when a message is sent; an injected {@link MsiSink}
 * sends it. The VMM keeps, per vector, a KVM GSI route and an irqfd that
 * follow {@link MsiSink.update}, and {@link MsiSink.fire} writes the irqfd
 * (or does KVM_SIGNAL_MSI). Tests use a recording sink.
 */
import { silentLogger, type Logger } from '../../base/log.js';
import { PCI_CAP_ID_MSIX, type PciConfigSpace } from './config-space.js';
import { PciError } from './errors.js';

/**
 * Capability layout, from the capability's first byte (6.8.2.1 to 6.8.2.5).
 * Table and PBA Offset/BIR: the BAR index in bits 2:0, the 8-byte aligned offset above.
 */
export const MSIX_CAP_MESSAGE_CONTROL = 2;
export const MSIX_CAP_TABLE = 4;
export const MSIX_CAP_PBA = 8;
const MSIX_CAP_LENGTH = 12;

/** Message Control bits. */
export const MSIX_CONTROL_TABLE_SIZE = 0x07ff;
export const MSIX_CONTROL_FUNCTION_MASK = 0x4000;
export const MSIX_CONTROL_ENABLE = 0x8000;

/** Table entry layout (6.8.2.6 to 6.8.2.9). */
export const MSIX_ENTRY_SIZE = 16;
export const MSIX_ENTRY_ADDRESS_LOW = 0;
export const MSIX_ENTRY_ADDRESS_HIGH = 4;
export const MSIX_ENTRY_DATA = 8;
export const MSIX_ENTRY_VECTOR_CONTROL = 12;
export const MSIX_VECTOR_MASKED = 0x1;
/** The most vectors a function may have (Table Size is N - 1 in 11 bits). */
export const MSIX_MAX_VECTORS = 2048;

/** One message: a DWORD write of `data` to `address`. */
export interface MsiMessage {
  readonly address: bigint;
  readonly data: number;
}

/** Where MSI-X messages go: implemented by the VMM (KVM routes and irqfds). */
export interface MsiSink {
  /**
   * The message vector `vector` would send changed: a new address or data
   * while it is deliverable, or it became deliverable (`message`) or not
   * (undefined: masked, or MSI-X disabled).
   */
  update(vector: number, message: MsiMessage | undefined): void;
  /** Sends one message for `vector`; only called while it is deliverable. */
  fire(vector: number, message: MsiMessage): void;
}

export interface MsixOptions {
  /** Table size: 1..2048 vectors. */
  readonly vectors: number;
  /** The BAR index and the offset in it of the table, 8-byte aligned. */
  readonly tableBar: number;
  readonly tableOffset: number;
  /** The BAR index and the offset in it of the PBA, 8-byte aligned. */
  readonly pbaBar: number;
  readonly pbaOffset: number;
  readonly sink: MsiSink;
  /** Called after the driver changed Enable or Function Mask. */
  readonly onControlChange?: () => void;
  readonly logger?: Logger;
}

export interface MsixStats {
  /** Messages sent to the sink. */
  fired: number;
  /** Signals that found the vector masked and set its pending bit. */
  pended: number;
  /** Signals dropped: MSI-X disabled, or no such vector. */
  dropped: number;
  /** Table or PBA accesses that were not aligned DWORDs or QWORDs, and PBA writes. */
  badAccesses: number;
}

/** The MSI-X capability, table and PBA of one PCI function. */
export class Msix {
  /** The capability's offset in configuration space. */
  readonly capabilityOffset: number;
  readonly vectors: number;
  readonly stats: MsixStats = { fired: 0, pended: 0, dropped: 0, badAccesses: 0 };

  private readonly table: Uint8Array;
  private readonly tableView: DataView;
  private readonly pending: Uint8Array;
  /** What the sink was last told for each vector. */
  private readonly routed: Array<MsiMessage | undefined>;
  private readonly sink: MsiSink;
  private readonly onControlChange: (() => void) | undefined;
  private readonly log: Logger;

  constructor(
    private readonly config: PciConfigSpace,
    options: MsixOptions,
  ) {
    const { vectors } = options;
    if (!Number.isInteger(vectors) || vectors < 1 || vectors > MSIX_MAX_VECTORS) {
      throw new PciError('PCI_BAD_CAPABILITY', `MSI-X table of ${vectors} vectors: 1..${MSIX_MAX_VECTORS} allowed`);
    }
    for (const [what, bar, offset] of [
      ['table', options.tableBar, options.tableOffset],
      ['PBA', options.pbaBar, options.pbaOffset],
    ] as const) {
      if (!(bar >= 0 && bar <= 5) || offset % 8 !== 0) {
        throw new PciError('PCI_BAD_CAPABILITY', `MSI-X ${what} at BAR ${bar} offset 0x${offset.toString(16)}: BAR 0..5, 8-byte aligned`);
      }
    }
    this.vectors = vectors;
    this.sink = options.sink;
    this.onControlChange = options.onControlChange;
    this.log = (options.logger ?? silentLogger).child({ msix: true });
    this.table = new Uint8Array(Msix.tableSize(vectors));
    this.tableView = new DataView(this.table.buffer);
    // Every vector starts masked (6.8.2.9).
    for (let v = 0; v < vectors; v++) this.tableView.setUint32(v * MSIX_ENTRY_SIZE + MSIX_ENTRY_VECTOR_CONTROL, MSIX_VECTOR_MASKED, true);
    this.pending = new Uint8Array(Msix.pbaSize(vectors));
    this.routed = new Array<MsiMessage | undefined>(vectors).fill(undefined);

    const body = new Uint8Array(MSIX_CAP_LENGTH - 2);
    const view = new DataView(body.buffer);
    view.setUint16(MSIX_CAP_MESSAGE_CONTROL - 2, vectors - 1, true);
    view.setUint32(MSIX_CAP_TABLE - 2, options.tableOffset | options.tableBar, true);
    view.setUint32(MSIX_CAP_PBA - 2, options.pbaOffset | options.pbaBar, true);
    this.capabilityOffset = config.addCapability(PCI_CAP_ID_MSIX, body, {
      // Only Enable and Function Mask, in the top byte of Message Control, are writable.
      writable: [[MSIX_CAP_MESSAGE_CONTROL + 1, MSIX_CAP_MESSAGE_CONTROL + 2, (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) >> 8]],
      onWrite: () => this.controlWritten(),
    });
  }

  /** Bytes the table of `vectors` entries takes in its BAR. */
  static tableSize(vectors: number): number {
    return vectors * MSIX_ENTRY_SIZE;
  }

  /** Bytes the PBA for `vectors` takes in its BAR: whole QWORDs. */
  static pbaSize(vectors: number): number {
    return Math.ceil(vectors / 64) * 8;
  }

  /** MSI-X Enable: the function signals by MSI-X instead of INTx. */
  get enabled(): boolean {
    return (this.control & MSIX_CONTROL_ENABLE) !== 0;
  }

  /** Function Mask: every vector is masked whatever its own mask bit says. */
  get functionMasked(): boolean {
    return (this.control & MSIX_CONTROL_FUNCTION_MASK) !== 0;
  }

  /** The vector's own mask bit. */
  isMasked(vector: number): boolean {
    return (this.tableView.getUint32(vector * MSIX_ENTRY_SIZE + MSIX_ENTRY_VECTOR_CONTROL, true) & MSIX_VECTOR_MASKED) !== 0;
  }

  isPending(vector: number): boolean {
    return (this.pending[vector >> 3]! & (1 << (vector & 7))) !== 0;
  }

  /** The message of table entry `vector`, as programmed. */
  message(vector: number): MsiMessage {
    const at = vector * MSIX_ENTRY_SIZE;
    const low = this.tableView.getUint32(at + MSIX_ENTRY_ADDRESS_LOW, true);
    const high = this.tableView.getUint32(at + MSIX_ENTRY_ADDRESS_HIGH, true);
    return { address: (BigInt(high) << 32n) | BigInt(low), data: this.tableView.getUint32(at + MSIX_ENTRY_DATA, true) };
  }

  /**
   * The function wants to interrupt with `vector`: sends the message if it
   * is deliverable, else (masked) sets its pending bit, sent on unmask.
   * Returns false when MSI-X is disabled or the vector does not exist: the
   * caller then uses INTx or drops the interrupt.
   */
  signal(vector: number): boolean {
    if (!this.enabled || !(Number.isInteger(vector) && vector >= 0 && vector < this.vectors)) {
      this.stats.dropped++;
      return false;
    }
    const message = this.deliverable(vector);
    if (message) {
      this.send(vector, message);
    } else {
      this.stats.pended++;
      this.pending[vector >> 3]! |= 1 << (vector & 7);
    }
    return true;
  }

  /** A driver read of the table, `offset` from the table's start. */
  readTable(offset: number, data: Uint8Array): void {
    if (!this.checkAccess('table read', offset, data, this.table.length)) return;
    data.set(this.table.subarray(offset, offset + data.length));
  }

  /** A driver write to the table: DWORD or QWORD, aligned. */
  writeTable(offset: number, data: Uint8Array): void {
    if (!this.checkAccess('table write', offset, data, this.table.length)) return;
    const view = new DataView(data.buffer, data.byteOffset, data.length);
    for (let i = 0; i < data.length; i += 4) this.writeTableDword(offset + i, view.getUint32(i, true));
    this.refresh(Math.floor(offset / MSIX_ENTRY_SIZE));
  }

  /** A driver read of the PBA, `offset` from the PBA's start. */
  readPba(offset: number, data: Uint8Array): void {
    if (!this.checkAccess('PBA read', offset, data, this.pending.length)) return;
    data.set(this.pending.subarray(offset, offset + data.length));
  }

  /** The PBA is read-only (6.8.2.10): writes are dropped. */
  writePba(offset: number, data: Uint8Array): void {
    this.stats.badAccesses++;
    this.log.debug({ offset, length: data.length }, 'write to the read-only MSI-X PBA dropped');
  }

  private get control(): number {
    return this.config.getU16(this.capabilityOffset + MSIX_CAP_MESSAGE_CONTROL);
  }

  private controlWritten(): void {
    for (let v = 0; v < this.vectors; v++) this.refresh(v);
    this.onControlChange?.();
  }

  private writeTableDword(offset: number, value: number): void {
    switch (offset % MSIX_ENTRY_SIZE) {
      case MSIX_ENTRY_ADDRESS_LOW:
        // Bits 1:0 of the address are read-only zero: messages are DWORD writes.
        value &= ~0x3;
        break;
      case MSIX_ENTRY_VECTOR_CONTROL:
        // Bits 31:1 are reserved, read-only zero.
        value &= MSIX_VECTOR_MASKED;
        break;
    }
    this.tableView.setUint32(offset, value >>> 0, true);
  }

  private checkAccess(what: string, offset: number, data: Uint8Array, size: number): boolean {
    // 6.8.2: software must use aligned DWORD or QWORD accesses; others are undefined.
    if ((data.length === 4 || data.length === 8) && offset % data.length === 0 && offset >= 0 && offset + data.length <= size) {
      return true;
    }
    this.stats.badAccesses++;
    this.log.debug({ offset, length: data.length }, `MSI-X ${what} not an aligned DWORD/QWORD in range`);
    data.fill(0);
    return false;
  }

  private deliverable(vector: number): MsiMessage | undefined {
    return this.enabled && !this.functionMasked && !this.isMasked(vector) ? this.message(vector) : undefined;
  }

  /** Tells the sink if vector's deliverable message changed; sends its pending message once unmasked. */
  private refresh(vector: number): void {
    const message = this.deliverable(vector);
    const before = this.routed[vector];
    if (message?.address !== before?.address || message?.data !== before?.data) {
      this.routed[vector] = message;
      this.sink.update(vector, message);
    }
    if (message && this.isPending(vector)) {
      this.pending[vector >> 3]! &= ~(1 << (vector & 7));
      this.send(vector, message);
    }
  }

  private send(vector: number, message: MsiMessage): void {
    this.stats.fired++;
    this.sink.fire(vector, message);
  }
}
