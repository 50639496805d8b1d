/**
 * Guest physical memory: bounds-checked typed access to the host mapping
 * that backs guest RAM. Every access the guest can influence goes through
 * here, so a hostile address or length becomes a {@link GuestMemoryError},
 * never a read or write outside guest RAM.
 */
import { TsvmmError } from './errors.js';

/** One contiguous piece of guest RAM. */
export interface MemoryRegion {
  /** Guest physical address of the first byte. */
  readonly guestAddr: number;
  /** Host bytes backing the region; its length is the region size. */
  readonly bytes: Uint8Array;
}

export class GuestMemoryError extends TsvmmError {
  constructor(
    readonly addr: number | bigint,
    readonly length: number,
  ) {
    super('ERR_TSVMM_GUEST_MEMORY_OUT_OF_RANGE', `guest memory access out of range: ${length} bytes at 0x${addr.toString(16)}`);
  }
}

export class GuestMemory {
  private readonly regions: readonly MemoryRegion[];

  /** Regions must not overlap; they are kept sorted by address. */
  constructor(regions: readonly MemoryRegion[]) {
    this.regions = [...regions].sort((a, b) => a.guestAddr - b.guestAddr);
    for (let i = 1; i < this.regions.length; i++) {
      const prev = this.regions[i - 1]!;
      const cur = this.regions[i]!;
      if (prev.guestAddr + prev.bytes.length > cur.guestAddr) {
        throw new Error(`memory regions overlap at 0x${cur.guestAddr.toString(16)}`);
      }
    }
  }

  /** Guest RAM made of plain host memory: for device tests and tools. */
  static fromBuffer(bytes: Uint8Array, guestAddr = 0): GuestMemory {
    return new GuestMemory([{ guestAddr, bytes }]);
  }

  /** Total RAM in bytes. */
  get size(): number {
    return this.regions.reduce((sum, r) => sum + r.bytes.length, 0);
  }

  /** The regions, for the code that registers them with KVM. */
  get memoryRegions(): readonly MemoryRegion[] {
    return this.regions;
  }

  /** The end of the highest region: one past the last guest RAM byte. */
  get end(): number {
    const last = this.regions[this.regions.length - 1];
    return last ? last.guestAddr + last.bytes.length : 0;
  }

  /** True when `[addr, addr + length)` lies inside one region. */
  checkRange(addr: number | bigint, length: number): boolean {
    return this.find(addr, length) !== undefined;
  }

  /**
   * A view (not a copy) of `length` bytes at `addr`. Writes through the
   * view reach the guest. Throws {@link GuestMemoryError} when the range is
   * not inside one region.
   */
  slice(addr: number | bigint, length: number): Uint8Array {
    const hit = this.find(addr, length);
    if (!hit) throw new GuestMemoryError(addr, length);
    return hit.region.bytes.subarray(hit.offset, hit.offset + length);
  }

  read(addr: number | bigint, dst: Uint8Array): void {
    dst.set(this.slice(addr, dst.length));
  }

  write(addr: number | bigint, src: Uint8Array): void {
    this.slice(addr, src.length).set(src);
  }

  fill(addr: number | bigint, length: number, value = 0): void {
    this.slice(addr, length).fill(value);
  }

  readU8(addr: number | bigint): number {
    return this.slice(addr, 1)[0]!;
  }
  readU16(addr: number | bigint): number {
    return this.view(addr, 2).getUint16(0, true);
  }
  readU32(addr: number | bigint): number {
    return this.view(addr, 4).getUint32(0, true);
  }
  readU64(addr: number | bigint): bigint {
    return this.view(addr, 8).getBigUint64(0, true);
  }
  writeU8(addr: number | bigint, value: number): void {
    this.slice(addr, 1)[0] = value;
  }
  writeU16(addr: number | bigint, value: number): void {
    this.view(addr, 2).setUint16(0, value, true);
  }
  writeU32(addr: number | bigint, value: number): void {
    this.view(addr, 4).setUint32(0, value, true);
  }
  writeU64(addr: number | bigint, value: bigint): void {
    this.view(addr, 8).setBigUint64(0, value, true);
  }

  private view(addr: number | bigint, length: number): DataView {
    const s = this.slice(addr, length);
    return new DataView(s.buffer, s.byteOffset, length);
  }

  private find(addr: number | bigint, length: number): { region: MemoryRegion; offset: number } | undefined {
    if (!Number.isInteger(length) || length < 0) return undefined;
    let a: number;
    if (typeof addr === 'bigint') {
      if (addr < 0n || addr > BigInt(Number.MAX_SAFE_INTEGER)) return undefined;
      a = Number(addr);
    } else {
      if (!Number.isSafeInteger(addr) || addr < 0) return undefined;
      a = addr;
    }
    for (const region of this.regions) {
      const offset = a - region.guestAddr;
      if (offset >= 0 && offset + length <= region.bytes.length) return { region, offset };
    }
    return undefined;
  }
}
