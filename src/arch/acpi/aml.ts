/**
 * A small AML encoder: the subset of ACPI Machine Language a VMM's DSDT
 * needs (names, integers, strings, buffers, packages, scopes, devices,
 * methods that return a constant, and _CRS resource templates).
 *
 * Every function returns the encoded bytes, so a table is built the way
 * its ASL reads:
 *
 * ```ts
 * Device('COM1', [
 *   Name('_HID', EisaId('PNP0501')),
 *   Name('_CRS', ResourceTemplate([IO(0x3f8, 0x3f8, 1, 8), Interrupt({}, [4])])),
 * ]);
 * ```
 *
 * References: ACPI 6.x, chapter 20 (AML grammar: 20.2.2 names, 20.2.3 data
 * objects, 20.2.4 PkgLength, 20.2.5 term objects) and chapter 6.4 (resource
 * data types).
 */
import { TsvmmKindError } from '../../base/errors.js';

/** Encoded AML: a term, a data object or a resource descriptor. */
export type Aml = Uint8Array;

/**
 * What a Name() or Package() element may be given: encoded AML, an
 * integer (encoded in the smallest form) or a string (an AML String).
 */
export type AmlValue = Aml | number | bigint | string;

export class AmlError extends TsvmmKindError<'BAD_NAME' | 'BAD_INTEGER' | 'BAD_STRING' | 'TOO_LONG' | 'BAD_RESOURCE'> {
  constructor(kind: 'BAD_NAME' | 'BAD_INTEGER' | 'BAD_STRING' | 'TOO_LONG' | 'BAD_RESOURCE', message: string) {
    super('AML_', kind, message);
  }
}

// --- Opcodes (20.3 "AML Byte Stream Byte Values") ---

const ZERO_OP = 0x00;
const ONE_OP = 0x01;
const NAME_OP = 0x08;
const BYTE_PREFIX = 0x0a;
const WORD_PREFIX = 0x0b;
const DWORD_PREFIX = 0x0c;
const STRING_PREFIX = 0x0d;
const QWORD_PREFIX = 0x0e;
const SCOPE_OP = 0x10;
const BUFFER_OP = 0x11;
const PACKAGE_OP = 0x12;
const METHOD_OP = 0x14;
const DUAL_NAME_PREFIX = 0x2e;
const MULTI_NAME_PREFIX = 0x2f;
const EXT_OP_PREFIX = 0x5b;
const DEVICE_OP = 0x82; // after EXT_OP_PREFIX
const ROOT_CHAR = 0x5c; // '\'
const PARENT_PREFIX_CHAR = 0x5e; // '^'
const NULL_NAME = 0x00;
const RETURN_OP = 0xa4;
const ONES_OP = 0xff;

/** Largest value a PkgLength can hold: 4 bits plus three bytes (20.2.4). */
const PKG_LENGTH_MAX = 0x0fff_ffff;
/** Package() counts its elements in one byte; VarPackage is not needed here. */
const PACKAGE_MAX_ELEMENTS = 255;
const U64_MAX = (1n << 64n) - 1n;

/** Concatenates encoded pieces. */
export function concat(parts: readonly Uint8Array[]): Aml {
  let total = 0;
  for (const p of parts) total += p.length;
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

// --- PkgLength (20.2.4) ---

/**
 * Encodes a PkgLength whose value is `length`, the number of bytes from the
 * PkgLength's own first byte to the end of the package. One byte holds 0-63;
 * beyond that, bits 7-6 of the lead byte count the bytes that follow (1-3),
 * its bits 3-0 hold the low nibble and each following byte 8 more bits.
 */
export function encodePkgLength(length: number): Aml {
  if (!Number.isInteger(length) || length < 0 || length > PKG_LENGTH_MAX) {
    throw new AmlError('TOO_LONG', `PkgLength ${length} does not fit in 28 bits`);
  }
  if (length < 0x40) return Uint8Array.of(length);
  const follow = length <= 0xfff ? 1 : length <= 0xf_ffff ? 2 : 3;
  const out = new Uint8Array(1 + follow);
  out[0] = (follow << 6) | (length & 0x0f);
  for (let i = 0; i < follow; i++) out[1 + i] = (length >>> (4 + 8 * i)) & 0xff;
  return out;
}

/**
 * The PkgLength for a package whose body (everything after the PkgLength)
 * is `bodyLength` bytes. The value counts the PkgLength's own bytes, so the
 * encoding grows at bodies of 63, 4094 and 1048573 bytes.
 */
export function pkgLengthFor(bodyLength: number): Aml {
  for (let size = 1; size <= 4; size++) {
    const total = bodyLength + size;
    const encodedSize = total < 0x40 ? 1 : total <= 0xfff ? 2 : total <= 0xf_ffff ? 3 : 4;
    if (encodedSize === size) return encodePkgLength(total);
  }
  throw new AmlError('TOO_LONG', `package body of ${bodyLength} bytes is too long for a PkgLength`);
}

/** `op` (one or two bytes), a PkgLength, then `body`. */
function withPkgLength(op: readonly number[], body: Aml): Aml {
  return concat([Uint8Array.from(op), pkgLengthFor(body.length), body]);
}

// --- Names (20.2.2) ---

const LEAD_NAME_CHAR = /^[A-Z_]$/;
const NAME_CHAR = /^[A-Z0-9_]$/;

/** One NameSeg: four characters, padded with '_' as ASL does (`_SB` is `_SB_`). */
function nameSeg(seg: string): Aml {
  if (seg.length === 0 || seg.length > 4) throw new AmlError('BAD_NAME', `name segment '${seg}' must be 1 to 4 characters`);
  const padded = seg.padEnd(4, '_');
  if (!LEAD_NAME_CHAR.test(padded[0]!) || ![...padded.slice(1)].every((c) => NAME_CHAR.test(c))) {
    throw new AmlError('BAD_NAME', `name segment '${seg}' must be [A-Z_] then [A-Z0-9_] (upper case)`);
  }
  return Uint8Array.from(padded, (c) => c.charCodeAt(0));
}

/**
 * A NameString: an optional root (`\`) or parent prefixes (`^`), then
 * dot-separated segments, e.g. `\_SB_.PCI0`, `_HID`, `^^FOO`, `\`.
 */
export function NamePath(path: string): Aml {
  let rest = path;
  const prefix: number[] = [];
  if (rest.startsWith('\\')) {
    prefix.push(ROOT_CHAR);
    rest = rest.slice(1);
  } else {
    while (rest.startsWith('^')) {
      prefix.push(PARENT_PREFIX_CHAR);
      rest = rest.slice(1);
    }
  }
  const segs = rest.length === 0 ? [] : rest.split('.').map(nameSeg);
  if (segs.length > 255) throw new AmlError('BAD_NAME', `name '${path}' has more than 255 segments`);
  let body: number[];
  if (segs.length === 0) {
    if (prefix.length === 0) throw new AmlError('BAD_NAME', 'empty name');
    body = [NULL_NAME];
  } else if (segs.length === 1) body = [];
  else if (segs.length === 2) body = [DUAL_NAME_PREFIX];
  else body = [MULTI_NAME_PREFIX, segs.length];
  return concat([Uint8Array.from(prefix), Uint8Array.from(body), ...segs]);
}

// --- Data objects (20.2.3) ---

/** ZeroOp: the integer 0. */
export const Zero: Aml = Uint8Array.of(ZERO_OP);
/** OneOp: the integer 1. */
export const One: Aml = Uint8Array.of(ONE_OP);
/** OnesOp: all bits set (64 bits in a revision 2 DSDT). */
export const Ones: Aml = Uint8Array.of(ONES_OP);

function toBigInt(value: number | bigint): bigint {
  if (typeof value === 'number' && !Number.isSafeInteger(value)) {
    throw new AmlError('BAD_INTEGER', `integer ${value} is not a safe integer; pass a bigint`);
  }
  const v = BigInt(value);
  if (v < 0n || v > U64_MAX) throw new AmlError('BAD_INTEGER', `integer ${value} is outside 0..2^64-1`);
  return v;
}

function fixedWidth(prefix: number, bytes: number, value: bigint): Aml {
  const out = new Uint8Array(1 + bytes);
  out[0] = prefix;
  for (let i = 0; i < bytes; i++) out[1 + i] = Number((value >> BigInt(8 * i)) & 0xffn);
  return out;
}

/** An integer in its shortest encoding: Zero, One, Ones, or a Byte/Word/DWord/QWord constant. */
export function Integer(value: number | bigint): Aml {
  const v = toBigInt(value);
  if (v === 0n) return Zero;
  if (v === 1n) return One;
  if (v === U64_MAX) return Ones;
  if (v <= 0xffn) return fixedWidth(BYTE_PREFIX, 1, v);
  if (v <= 0xffffn) return fixedWidth(WORD_PREFIX, 2, v);
  if (v <= 0xffff_ffffn) return fixedWidth(DWORD_PREFIX, 4, v);
  return fixedWidth(QWORD_PREFIX, 8, v);
}

function checkedWidth(value: number | bigint, max: bigint, what: string): bigint {
  const v = toBigInt(value);
  if (v > max) throw new AmlError('BAD_INTEGER', `${what} ${value} does not fit`);
  return v;
}

/** A ByteConst (0x0A prefix), whatever the value. */
export function ByteConst(value: number): Aml {
  return fixedWidth(BYTE_PREFIX, 1, checkedWidth(value, 0xffn, 'ByteConst'));
}
/** A WordConst (0x0B prefix). */
export function WordConst(value: number): Aml {
  return fixedWidth(WORD_PREFIX, 2, checkedWidth(value, 0xffffn, 'WordConst'));
}
/** A DWordConst (0x0C prefix). */
export function DWordConst(value: number): Aml {
  return fixedWidth(DWORD_PREFIX, 4, checkedWidth(value, 0xffff_ffffn, 'DWordConst'));
}
/** A QWordConst (0x0E prefix). */
export function QWordConst(value: number | bigint): Aml {
  return fixedWidth(QWORD_PREFIX, 8, checkedWidth(value, U64_MAX, 'QWordConst'));
}

/** An AML String: printable ASCII, NUL-terminated (20.2.3, AsciiCharList). */
export function AmlString(text: string): Aml {
  const bytes = new Uint8Array(text.length + 2);
  bytes[0] = STRING_PREFIX;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x01 || c > 0x7f) throw new AmlError('BAD_STRING', `string '${text}' has a character outside ASCII 0x01-0x7F`);
    bytes[1 + i] = c;
  }
  return bytes;
}

/** Encodes a value given to Name() or Package(). */
export function value(v: AmlValue): Aml {
  if (v instanceof Uint8Array) return v;
  if (typeof v === 'string') return AmlString(v);
  return Integer(v);
}

/**
 * EISA ID compression (ACPI 6.x, 6.1.5 _HID): three upper-case letters
 * (5 bits each, 'A' = 1) and four hex digits, stored so that the bytes in
 * memory read the ID in order. `EisaId('PNP0501')` is 0x0105D041.
 */
export function EisaId(id: string): Aml {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) throw new AmlError('BAD_STRING', `EISA ID '${id}' must be 3 letters and 4 hex digits`);
  const c = (i: number) => id.charCodeAt(i) - 0x40;
  const product = parseInt(id.slice(3), 16);
  const bigEndian = ((c(0) << 26) | (c(1) << 21) | (c(2) << 16) | product) >>> 0;
  // The compressed ID is stored big-endian in a DWord that AML reads as little-endian.
  const swapped = (((bigEndian & 0xff) << 24) | ((bigEndian & 0xff00) << 8) | ((bigEndian >>> 8) & 0xff00) | (bigEndian >>> 24)) >>> 0;
  return DWordConst(swapped);
}

/**
 * Buffer(n) { bytes }: the buffer size is the byte count. (Named so as not
 * to shadow Node's global Buffer where it is imported.)
 */
export function AmlBuffer(bytes: Uint8Array): Aml {
  return withPkgLength([BUFFER_OP], concat([Integer(bytes.length), bytes]));
}

/** Package() { elements }, at most 255 of them. */
export function Package(elements: readonly AmlValue[]): Aml {
  if (elements.length > PACKAGE_MAX_ELEMENTS) {
    throw new AmlError('TOO_LONG', `Package of ${elements.length} elements: at most ${PACKAGE_MAX_ELEMENTS}`);
  }
  return withPkgLength([PACKAGE_OP], concat([Uint8Array.of(elements.length), ...elements.map(value)]));
}

// --- Named objects and statements (20.2.5) ---

/** Name(name, value). */
export function Name(name: string, v: AmlValue): Aml {
  return concat([Uint8Array.of(NAME_OP), NamePath(name), value(v)]);
}

/** Scope(name) { terms }. */
export function Scope(name: string, terms: readonly Aml[]): Aml {
  return withPkgLength([SCOPE_OP], concat([NamePath(name), ...terms]));
}

/** Device(name) { terms }. */
export function Device(name: string, terms: readonly Aml[]): Aml {
  return withPkgLength([EXT_OP_PREFIX, DEVICE_OP], concat([NamePath(name), ...terms]));
}

export interface MethodOptions {
  /** Number of arguments, 0-7. */
  args?: number;
  /** Serialized: the interpreter runs one invocation at a time. */
  serialized?: boolean;
  /** SyncLevel, 0-15 (only meaningful when serialized). */
  syncLevel?: number;
}

/** Method(name, args, Serialized|NotSerialized) { terms }. */
export function Method(name: string, options: MethodOptions, terms: readonly Aml[]): Aml {
  const args = options.args ?? 0;
  const syncLevel = options.syncLevel ?? 0;
  if (!Number.isInteger(args) || args < 0 || args > 7) throw new AmlError('BAD_INTEGER', `method ${name}: ${args} arguments (0-7)`);
  if (!Number.isInteger(syncLevel) || syncLevel < 0 || syncLevel > 15) {
    throw new AmlError('BAD_INTEGER', `method ${name}: sync level ${syncLevel} (0-15)`);
  }
  // MethodFlags: bits 0-2 ArgCount, bit 3 SerializeFlag, bits 4-7 SyncLevel.
  const flags = args | (options.serialized ? 0x08 : 0) | (syncLevel << 4);
  return withPkgLength([METHOD_OP], concat([NamePath(name), Uint8Array.of(flags), ...terms]));
}

/** Return(value). */
export function Return(v: AmlValue): Aml {
  return concat([Uint8Array.of(RETURN_OP), value(v)]);
}

// --- Resource descriptors (ACPI 6.x, 6.4) ---

/** Small and large resource item tags (6.4.2, 6.4.3). */
const RES_IO = 0x47; // small item 0x08, length 7
const RES_END_TAG = 0x79; // small item 0x0F, length 1
const RES_MEMORY32_FIXED = 0x86;
const RES_DWORD_ADDRESS = 0x87;
const RES_WORD_ADDRESS = 0x88;
const RES_EXTENDED_INTERRUPT = 0x89;
const RES_QWORD_ADDRESS = 0x8a;

/** Address space resource types (6.4.3.5, Table "Address Space Resource Descriptor"). */
const ADDRESS_SPACE_MEMORY = 0;
const ADDRESS_SPACE_IO = 1;
const ADDRESS_SPACE_BUS_NUMBER = 2;

function little(value: bigint, bytes: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < bytes; i++) out.push(Number((value >> BigInt(8 * i)) & 0xffn));
  return out;
}

function field(v: number | bigint, bytes: number, what: string): number[] {
  const max = (1n << BigInt(8 * bytes)) - 1n;
  let b: bigint;
  try {
    b = toBigInt(v);
  } catch {
    throw new AmlError('BAD_RESOURCE', `${what} ${v} is not a valid ${8 * bytes}-bit value`);
  }
  if (b > max) throw new AmlError('BAD_RESOURCE', `${what} 0x${b.toString(16)} does not fit in ${8 * bytes} bits`);
  return little(b, bytes);
}

function largeItem(tag: number, body: readonly number[]): Aml {
  return Uint8Array.from([tag, body.length & 0xff, body.length >> 8, ...body]);
}

/**
 * IO(Decode16|Decode10, min, max, alignment, length) (6.4.2.5). For a fixed
 * range give min === max.
 */
export function IO(min: number, max: number, alignment: number, length: number, decode: 'decode16' | 'decode10' = 'decode16'): Aml {
  if (min > max) throw new AmlError('BAD_RESOURCE', `IO: minimum 0x${min.toString(16)} above maximum 0x${max.toString(16)}`);
  return Uint8Array.from([
    RES_IO,
    decode === 'decode16' ? 1 : 0,
    ...field(min, 2, 'IO minimum'),
    ...field(max, 2, 'IO maximum'),
    ...field(alignment, 1, 'IO alignment'),
    ...field(length, 1, 'IO length'),
  ]);
}

/** Memory32Fixed(ReadWrite|ReadOnly, base, length) (6.4.3.4). */
export function Memory32Fixed(base: number, length: number, writable = true): Aml {
  return largeItem(RES_MEMORY32_FIXED, [writable ? 1 : 0, ...field(base, 4, 'Memory32Fixed base'), ...field(length, 4, 'Memory32Fixed length')]);
}

export interface InterruptOptions {
  /** ResourceConsumer (default) or ResourceProducer. */
  producer?: boolean;
  /** Level-triggered; default edge. */
  level?: boolean;
  /** Active low; default active high. */
  activeLow?: boolean;
  /** Shared; default exclusive. */
  shared?: boolean;
  /** Can wake the system; default not. */
  wakeCapable?: boolean;
}

/**
 * Interrupt(consumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared)
 * { GSIs }: the Extended Interrupt Descriptor (6.4.3.6). On an IOAPIC
 * machine each number is a GSI.
 */
export function Interrupt(options: InterruptOptions, gsis: readonly number[]): Aml {
  if (gsis.length < 1 || gsis.length > 255) throw new AmlError('BAD_RESOURCE', `Interrupt: ${gsis.length} interrupts (1-255)`);
  const flags =
    (options.producer ? 0 : 0x01) |
    (options.level ? 0 : 0x02) |
    (options.activeLow ? 0x04 : 0) |
    (options.shared ? 0x08 : 0) |
    (options.wakeCapable ? 0x10 : 0);
  return largeItem(RES_EXTENDED_INTERRUPT, [flags, gsis.length, ...gsis.flatMap((g) => field(g, 4, 'Interrupt number'))]);
}

/** The fields every address space descriptor has (6.4.3.5). */
export interface AddressSpaceOptions {
  /** ResourceProducer (a bridge's window) is the default; ResourceConsumer for a device's own range. */
  consumer?: boolean;
  /** SubDecode; default PosDecode. */
  subtractive?: boolean;
  /** MinFixed / MaxFixed: default both fixed. */
  minFixed?: boolean;
  maxFixed?: boolean;
  granularity?: number | bigint;
  min: number | bigint;
  max: number | bigint;
  translation?: number | bigint;
  length: number | bigint;
}

export interface MemoryOptions extends AddressSpaceOptions {
  /** Cacheability (_MEM): default NonCacheable, what an MMIO window is. */
  cacheable?: 'noncacheable' | 'cacheable' | 'writecombining' | 'prefetchable';
  /** ReadOnly; default ReadWrite. */
  readOnly?: boolean;
}

const MEM_CACHEABILITY = { noncacheable: 0, cacheable: 1, writecombining: 2, prefetchable: 3 } as const;
/** IO range type-specific flags: _RNG EntireRange (ISA and non-ISA ports). */
const IO_RANGE_ENTIRE = 0x03;

function addressSpace(tag: number, width: number, type: number, typeFlags: number, o: AddressSpaceOptions, what: string): Aml {
  const minFixed = o.minFixed ?? true;
  const maxFixed = o.maxFixed ?? true;
  const min = toBigInt(o.min);
  const max = toBigInt(o.max);
  const length = toBigInt(o.length);
  if (min > max) throw new AmlError('BAD_RESOURCE', `${what}: minimum above maximum`);
  // 6.4.3.5, "Valid Combination of Address Space Descriptor Fields": a fixed
  // window of non-zero length must be exactly max - min + 1 long.
  if (minFixed && maxFixed && length !== 0n && max - min + 1n !== length) {
    throw new AmlError('BAD_RESOURCE', `${what}: length 0x${length.toString(16)} is not max - min + 1 for a fixed window`);
  }
  const generalFlags = (o.consumer ? 0x01 : 0) | (o.subtractive ? 0x02 : 0) | (minFixed ? 0x04 : 0) | (maxFixed ? 0x08 : 0);
  return largeItem(tag, [
    type,
    generalFlags,
    typeFlags,
    ...field(o.granularity ?? 0, width, `${what} granularity`),
    ...field(min, width, `${what} minimum`),
    ...field(max, width, `${what} maximum`),
    ...field(o.translation ?? 0, width, `${what} translation`),
    ...field(length, width, `${what} length`),
  ]);
}

/** WordBusNumber(...): a bus number range (6.4.3.5.3). */
export function WordBusNumber(o: AddressSpaceOptions): Aml {
  return addressSpace(RES_WORD_ADDRESS, 2, ADDRESS_SPACE_BUS_NUMBER, 0, o, 'WordBusNumber');
}

/** WordIO(..., EntireRange): an I/O port window (6.4.3.5.3). */
export function WordIO(o: AddressSpaceOptions): Aml {
  return addressSpace(RES_WORD_ADDRESS, 2, ADDRESS_SPACE_IO, IO_RANGE_ENTIRE, o, 'WordIO');
}

function memoryFlags(o: MemoryOptions): number {
  // Bit 0 _RW (1 = read-write), bits 2:1 _MEM; _MTP AddressRangeMemory and _TTP TypeStatic are 0.
  return (o.readOnly ? 0 : 0x01) | (MEM_CACHEABILITY[o.cacheable ?? 'noncacheable'] << 1);
}

/** DWordMemory(...): a 32-bit memory window (6.4.3.5.2). */
export function DWordMemory(o: MemoryOptions): Aml {
  return addressSpace(RES_DWORD_ADDRESS, 4, ADDRESS_SPACE_MEMORY, memoryFlags(o), o, 'DWordMemory');
}

/** QWordMemory(...): a 64-bit memory window (6.4.3.5.1). */
export function QWordMemory(o: MemoryOptions): Aml {
  return addressSpace(RES_QWORD_ADDRESS, 8, ADDRESS_SPACE_MEMORY, memoryFlags(o), o, 'QWordMemory');
}

/**
 * ResourceTemplate() { descriptors }: a Buffer of the descriptors and an
 * End Tag (6.4.2.9) whose checksum makes the bytes of the whole template
 * sum to zero.
 */
export function ResourceTemplate(descriptors: readonly Aml[]): Aml {
  const body = concat([...descriptors, Uint8Array.of(RES_END_TAG, 0)]);
  let sum = 0;
  for (const b of body) sum = (sum + b) & 0xff;
  body[body.length - 1] = (0x100 - sum) & 0xff;
  return AmlBuffer(body);
}
