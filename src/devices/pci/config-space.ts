/**
 * A PCI function's configuration space: the 256-byte type-0 header of the
 * PCI Local Bus spec 3.0 (section 6.1), with a write mask per byte so that
 * read-only fields stay read-only, BARs that answer the sizing sequence
 * (6.2.5.1), and a capability list builder (6.7).
 *
 * The guest reads and writes it through {@link PciConfigSpace.read} and
 * {@link PciConfigSpace.write} (configuration mechanism #1 or ECAM); the
 * device model itself uses the get/set accessors, which bypass the masks.
 */
import { PciError } from './errors.js';

/** Header register offsets (PCI 3.0 section 6.1, figure 6-1). */
export const PCI_VENDOR_ID = 0x00;
export const PCI_DEVICE_ID = 0x02;
export const PCI_COMMAND = 0x04;
export const PCI_STATUS = 0x06;
export const PCI_REVISION_ID = 0x08;
/** Class code: programming interface at 0x09, subclass at 0x0a, base class at 0x0b. */
export const PCI_CLASS_CODE = 0x09;
export const PCI_CLASS_DEVICE = 0x0a;
export const PCI_CACHE_LINE_SIZE = 0x0c;
export const PCI_LATENCY_TIMER = 0x0d;
export const PCI_HEADER_TYPE = 0x0e;
export const PCI_BAR0 = 0x10;
export const PCI_SUBSYSTEM_VENDOR_ID = 0x2c;
export const PCI_SUBSYSTEM_ID = 0x2e;
export const PCI_EXPANSION_ROM = 0x30;
export const PCI_CAPABILITY_LIST = 0x34;
export const PCI_INTERRUPT_LINE = 0x3c;
export const PCI_INTERRUPT_PIN = 0x3d;
/** Conventional configuration space size. */
export const PCI_CONFIG_SPACE_SIZE = 256;
/** Where capabilities may start: the first byte after the header. */
export const PCI_CAPABILITY_START = 0x40;
export const PCI_BAR_COUNT = 6;

/** Command register bits (6.2.2). */
export const PCI_COMMAND_IO = 0x0001;
export const PCI_COMMAND_MEMORY = 0x0002;
export const PCI_COMMAND_MASTER = 0x0004;
export const PCI_COMMAND_INTX_DISABLE = 0x0400;

/** Status register bits (6.2.3). */
export const PCI_STATUS_INTERRUPT = 0x0008;
export const PCI_STATUS_CAP_LIST = 0x0010;

/** BAR low bits (6.2.5.1). */
export const PCI_BAR_SPACE_IO = 0x1;
export const PCI_BAR_MEM_TYPE_64 = 0x4;
export const PCI_BAR_MEM_PREFETCH = 0x8;
const PCI_BAR_MEM_FLAGS = 0xf;
const PCI_BAR_IO_FLAGS = 0x3;
/** x86 has a 64 KiB port space: the upper 16 bits of an I/O BAR are hardwired to 0 (allowed by 6.2.5.1). */
const PCI_BAR_IO_LIMIT = 0x1_0000;

/** Interrupt Pin values. */
export const PCI_INTERRUPT_PIN_NONE = 0;
export const PCI_INTERRUPT_PIN_INTA = 1;

/** Capability IDs (PCI Code and ID Assignment spec). */
export const PCI_CAP_ID_VENDOR = 0x09;
export const PCI_CAP_ID_MSIX = 0x11;

const U32 = 0x1_0000_0000;

export type PciBarKind = 'mem32' | 'mem64' | 'io';

export interface PciBarDefinition {
  readonly kind: PciBarKind;
  /** A power of two: at least 16 bytes for memory, 4 for I/O. */
  readonly size: number;
  /** Memory BARs only: reads have no side effects. */
  readonly prefetchable?: boolean;
}

export interface PciConfigSpaceOptions {
  readonly vendorId: number;
  readonly deviceId: number;
  /** 24 bits: base class << 16 | subclass << 8 | programming interface. */
  readonly classCode: number;
  readonly revisionId?: number;
  readonly subsystemVendorId?: number;
  readonly subsystemId?: number;
  /** 0 (none) or 1..4 for INTA..INTD. */
  readonly interruptPin?: number;
  /** The Interrupt Line value firmware would leave: the GSI the pin is routed to. */
  readonly interruptLine?: number;
}

export interface PciCapabilityOptions {
  /**
   * Byte ranges `[start, end)`, from the capability's first byte, that the
   * driver may write: every bit, or the bits of `mask` in each byte.
   */
  readonly writable?: ReadonlyArray<readonly [start: number, end: number, mask?: number]>;
  /**
   * Called before a driver read that overlaps the capability, with the
   * overlapping range from the capability's first byte, so the model can
   * refresh those bytes with the set accessors.
   */
  readonly onRead?: (offset: number, length: number) => void;
  /** Called after a driver write that overlaps the capability went through the write mask. */
  readonly onWrite?: (offset: number, length: number) => void;
}

/**
 * Told when a BAR's decoded address changes: the new base address, or
 * undefined when the BAR stops decoding (its space is disabled in the
 * Command register, it is unprogrammed, or it is being sized).
 */
export type BarRemapListener = (barIndex: number, address: number | undefined) => void;

interface Bar extends PciBarDefinition {
  readonly index: number;
  /** The writable address bits of the BAR's low dword and, for 64-bit BARs, its high dword. */
  readonly lowMask: number;
  readonly highMask: number;
}

interface Capability extends PciCapabilityOptions {
  readonly offset: number;
  readonly length: number;
}

/** A type-0 configuration header with BARs and capabilities. */
export class PciConfigSpace {
  private readonly bytes = new Uint8Array(PCI_CONFIG_SPACE_SIZE);
  private readonly view = new DataView(this.bytes.buffer);
  private readonly writeMask = new Uint8Array(PCI_CONFIG_SPACE_SIZE);
  private readonly barSlots: Array<Bar | undefined> = new Array<Bar | undefined>(PCI_BAR_COUNT).fill(undefined);
  private readonly decoded: Array<number | undefined> = new Array<number | undefined>(PCI_BAR_COUNT).fill(undefined);
  private readonly capabilities: Capability[] = [];
  private nextCapability = PCI_CAPABILITY_START;
  private lastCapability: number | undefined;
  private readonly remapListeners: BarRemapListener[] = [];
  private readonly commandListeners: Array<(command: number) => void> = [];

  constructor(options: PciConfigSpaceOptions) {
    this.setU16(PCI_VENDOR_ID, options.vendorId);
    this.setU16(PCI_DEVICE_ID, options.deviceId);
    this.setU8(PCI_REVISION_ID, options.revisionId ?? 0);
    this.setU8(PCI_CLASS_CODE, options.classCode & 0xff);
    this.setU16(PCI_CLASS_DEVICE, (options.classCode >>> 8) & 0xffff);
    this.setU16(PCI_SUBSYSTEM_VENDOR_ID, options.subsystemVendorId ?? 0);
    this.setU16(PCI_SUBSYSTEM_ID, options.subsystemId ?? 0);
    this.setU8(PCI_INTERRUPT_PIN, options.interruptPin ?? PCI_INTERRUPT_PIN_NONE);
    this.setU8(PCI_INTERRUPT_LINE, options.interruptLine ?? 0xff);
    // Header type 0, single function: the byte stays 0.
    this.setWriteMask(PCI_COMMAND, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE);
    this.setWriteMask(PCI_CACHE_LINE_SIZE, 1, 0xff);
    this.setWriteMask(PCI_LATENCY_TIMER, 1, 0xff);
    this.setWriteMask(PCI_INTERRUPT_LINE, 1, 0xff);
    // The expansion ROM BAR has no writable bits: it sizes as 0, not implemented.
  }

  /** The Command register. */
  get command(): number {
    return this.getU16(PCI_COMMAND);
  }

  /** The BARs defined with {@link defineBar}, by index. */
  get bars(): ReadonlyArray<Readonly<PciBarDefinition & { index: number }>> {
    return this.barSlots.filter((b): b is Bar => b !== undefined);
  }

  /**
   * Defines BAR `index` (a 64-bit BAR also takes `index + 1`). Its address
   * bits below `size` are read-only zero, which is what makes the sizing
   * sequence (write all-ones, read back) report the size.
   */
  defineBar(index: number, bar: PciBarDefinition): void {
    const dwords = bar.kind === 'mem64' ? 2 : 1;
    if (!Number.isInteger(index) || index < 0 || index + dwords > PCI_BAR_COUNT) {
      throw new PciError('PCI_BAD_BAR', `BAR ${index} (${bar.kind}) does not fit in BARs 0..5`);
    }
    for (let i = index; i < index + dwords; i++) {
      if (this.barSlots[i] || this.barSlots.some((b) => b?.kind === 'mem64' && b.index + 1 === i)) {
        throw new PciError('PCI_BAD_BAR', `BAR ${i} is already defined`);
      }
    }
    const minimum = bar.kind === 'io' ? 4 : 16;
    const limit = bar.kind === 'io' ? PCI_BAR_IO_LIMIT / 2 : bar.kind === 'mem32' ? U32 / 2 : 2 ** 52;
    if (!(bar.size >= minimum && bar.size <= limit && isPowerOfTwo(bar.size))) {
      throw new PciError('PCI_BAD_BAR', `BAR ${index} (${bar.kind}): size ${bar.size} is not a power of two in ${minimum}..${limit}`);
    }
    if (bar.kind === 'io' && bar.prefetchable) {
      throw new PciError('PCI_BAD_BAR', `BAR ${index}: an I/O BAR cannot be prefetchable`);
    }
    const offset = PCI_BAR0 + 4 * index;
    let lowMask: number;
    let highMask = 0;
    if (bar.kind === 'io') {
      lowMask = (PCI_BAR_IO_LIMIT - bar.size) & ~PCI_BAR_IO_FLAGS;
      this.setU32(offset, PCI_BAR_SPACE_IO);
    } else {
      // The address bits at and above the size: 2^32 - size (or, for 64-bit, 2^64 - size).
      lowMask = bar.size >= U32 ? 0 : (U32 - bar.size) & ~PCI_BAR_MEM_FLAGS;
      if (bar.kind === 'mem64') highMask = bar.size > U32 ? (U32 - bar.size / U32) >>> 0 : 0xffff_ffff;
      this.setU32(offset, (bar.kind === 'mem64' ? PCI_BAR_MEM_TYPE_64 : 0) | (bar.prefetchable ? PCI_BAR_MEM_PREFETCH : 0));
    }
    this.setWriteMask(offset, 4, lowMask >>> 0);
    if (bar.kind === 'mem64') this.setWriteMask(offset + 4, 4, highMask);
    this.barSlots[index] = { ...bar, index, lowMask: lowMask >>> 0, highMask };
  }

  /** The address BAR `index` decodes at now, or undefined (see {@link BarRemapListener}). */
  barAddress(index: number): number | undefined {
    return this.decoded[index];
  }

  /**
   * Appends a capability: `body` is everything after the ID and next
   * pointer bytes, which the list maintains. Returns the capability's
   * offset. The driver may write only the `writable` ranges.
   */
  addCapability(id: number, body: Uint8Array, options: PciCapabilityOptions = {}): number {
    const offset = this.nextCapability;
    const length = 2 + body.length;
    if (offset + length > PCI_CONFIG_SPACE_SIZE) {
      throw new PciError('PCI_CONFIG_FULL', `capability 0x${id.toString(16)} (${length} bytes) does not fit at 0x${offset.toString(16)}`);
    }
    this.setU8(offset, id);
    this.setU8(offset + 1, 0);
    this.bytes.set(body, offset + 2);
    for (const [start, end, mask = 0xff] of options.writable ?? []) {
      if (start < 2 || end > length || start >= end) {
        throw new PciError('PCI_BAD_CAPABILITY', `capability 0x${id.toString(16)}: writable range ${start}..${end} is outside its body`);
      }
      this.writeMask.fill(mask, offset + start, offset + end);
    }
    if (this.lastCapability === undefined) {
      this.setU8(PCI_CAPABILITY_LIST, offset);
      this.setU16(PCI_STATUS, this.getU16(PCI_STATUS) | PCI_STATUS_CAP_LIST);
    } else {
      this.setU8(this.lastCapability + 1, offset);
    }
    this.lastCapability = offset;
    // Capabilities are dword aligned (6.7).
    this.nextCapability = (offset + length + 3) & ~3;
    this.capabilities.push({ ...options, offset, length });
    return offset;
  }

  /** Calls `listener` whenever a BAR's decoded address changes. */
  onBarRemap(listener: BarRemapListener): void {
    this.remapListeners.push(listener);
  }

  /** Calls `listener` after every driver write to the Command register. */
  onCommand(listener: (command: number) => void): void {
    this.commandListeners.push(listener);
  }

  /** A driver read: any width; bytes beyond the space read as zero. */
  read(offset: number, data: Uint8Array): void {
    data.fill(0);
    const end = Math.min(offset + data.length, PCI_CONFIG_SPACE_SIZE);
    if (!(offset >= 0 && offset < end)) return;
    for (const cap of this.capabilities) {
      const from = Math.max(offset, cap.offset);
      const to = Math.min(end, cap.offset + cap.length);
      if (cap.onRead && from < to) cap.onRead(from - cap.offset, to - from);
    }
    data.set(this.bytes.subarray(offset, end));
  }

  /** A driver write: any width, through the write masks; bytes beyond the space are dropped. */
  write(offset: number, data: Uint8Array): void {
    const end = Math.min(offset + data.length, PCI_CONFIG_SPACE_SIZE);
    if (!(offset >= 0 && offset < end)) return;
    for (let i = offset; i < end; i++) {
      const mask = this.writeMask[i]!;
      this.bytes[i] = (this.bytes[i]! & ~mask) | (data[i - offset]! & mask);
    }
    const touchesCommand = offset < PCI_COMMAND + 2 && end > PCI_COMMAND;
    if (touchesCommand) for (const listener of this.commandListeners) listener(this.command);
    if (touchesCommand || (offset < PCI_BAR0 + 4 * PCI_BAR_COUNT && end > PCI_BAR0)) this.updateDecoding();
    for (const cap of this.capabilities) {
      const from = Math.max(offset, cap.offset);
      const to = Math.min(end, cap.offset + cap.length);
      if (cap.onWrite && from < to) cap.onWrite(from - cap.offset, to - from);
    }
  }

  /** Driver-style dword access, for firmware-like code (the BAR allocator) and tests. */
  readU32(offset: number): number {
    const b = new Uint8Array(4);
    this.read(offset, b);
    return new DataView(b.buffer).getUint32(0, true);
  }

  writeU32(offset: number, value: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, value >>> 0, true);
    this.write(offset, b);
  }

  // Device-side accessors: no masks, no hooks, no listeners.

  getU8(offset: number): number {
    return this.view.getUint8(offset);
  }
  getU16(offset: number): number {
    return this.view.getUint16(offset, true);
  }
  getU32(offset: number): number {
    return this.view.getUint32(offset, true);
  }
  getBytes(offset: number, length: number): Uint8Array {
    return this.bytes.slice(offset, offset + length);
  }
  setU8(offset: number, value: number): void {
    this.view.setUint8(offset, value);
  }
  setU16(offset: number, value: number): void {
    this.view.setUint16(offset, value, true);
  }
  setU32(offset: number, value: number): void {
    this.view.setUint32(offset, value >>> 0, true);
  }
  setBytes(offset: number, bytes: Uint8Array): void {
    this.bytes.set(bytes, offset);
  }

  private setWriteMask(offset: number, length: number, mask: number): void {
    for (let i = 0; i < length; i++) this.writeMask[offset + i] = (mask >>> (8 * i)) & 0xff;
  }

  private updateDecoding(): void {
    for (const bar of this.barSlots) {
      if (!bar) continue;
      const address = this.decodedAddress(bar);
      if (address === this.decoded[bar.index]) continue;
      this.decoded[bar.index] = address;
      for (const listener of this.remapListeners) listener(bar.index, address);
    }
  }

  private decodedAddress(bar: Bar): number | undefined {
    const offset = PCI_BAR0 + 4 * bar.index;
    const enable = bar.kind === 'io' ? PCI_COMMAND_IO : PCI_COMMAND_MEMORY;
    if (!(this.command & enable)) return undefined;
    const low = (this.getU32(offset) & bar.lowMask) >>> 0;
    const high = bar.kind === 'mem64' ? (this.getU32(offset + 4) & bar.highMask) >>> 0 : 0;
    // Writable bits all ones means the BAR is being sized (or parked at the
    // very top of its space, which firmware never does): not a mapping.
    // A 64-bit BAR's low dword may legitimately be all ones above 4 GiB.
    const sizing = allOnes(high, bar.highMask) || (high === 0 && allOnes(low, bar.lowMask));
    const address = high * U32 + low;
    if (sizing || address === 0 || address + bar.size > Number.MAX_SAFE_INTEGER) return undefined;
    return address;
  }
}

function allOnes(value: number, mask: number): boolean {
  return mask !== 0 && (value & mask) >>> 0 === mask;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}
