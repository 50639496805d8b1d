/**
 * Kernel symbols for the guest profiler: a System.map (the `nm -n` listing
 * the kernel build writes, one `address type name` per line) turned into a
 * sorted table that maps a sampled RIP to the function it falls in.
 *
 * Only text symbols name functions (nm types t, T, w, W). Every other
 * symbol still marks where the previous function ends, so a RIP in data
 * (or past `_etext`) is "[unknown]" instead of a huge offset into the last
 * function before it.
 */

/** Where a RIP falls. */
export interface SymbolHit {
  /** The function, or {@link USER_SYMBOL} / {@link REAL_MODE_SYMBOL} / {@link UNKNOWN_SYMBOL}. */
  name: string;
  /** Bytes from the function's first instruction (0 for the groups). */
  offset: number;
}

/** Samples taken while the guest ran user code (RIP in the lower canonical half, above 1 MiB). */
export const USER_SYMBOL = '[user]';
/**
 * RIP in the first MiB: a vCPU still waiting for its startup IPI (parked at
 * the reset vector, 0xfff0) or running the real-mode trampoline. Linux
 * never maps user code there, and without this group a secondary vCPU's
 * wait would show up as user time.
 */
export const REAL_MODE_SYMBOL = '[real mode]';
/** Kernel addresses no text symbol covers (data, modules, padding) and non-canonical ones. */
export const UNKNOWN_SYMBOL = '[unknown]';

/** First address above the lower canonical half (48-bit virtual addresses). */
export const USER_ADDRESS_LIMIT = 0x0000_8000_0000_0000n;
/** First address above real-mode memory. */
export const REAL_MODE_LIMIT = 0x10_0000n;

/** nm's one-letter types that mark code. */
const TEXT_TYPES = new Set(['t', 'T', 'w', 'W']);

/**
 * Text symbols that mark the end of a text section, not a function: a RIP
 * past them is not inside the function before them.
 */
const TEXT_END_MARKERS = new Set(['_etext', '_einittext', '__exittext_end']);

const LINE = /^([0-9a-fA-F]{1,16})\s+([A-Za-z?])\s+(\S+)/;

interface RawSymbol {
  addr: bigint;
  name: string;
  text: boolean;
  /** Lower is preferred when several symbols share an address. */
  rank: number;
  order: number;
}

/**
 * Among aliases at one address, the name a reader expects: fewer leading
 * underscores first (`startup_64` over `_stext`, `memset` over `__memset`),
 * then a strong symbol over a weak one (`sys_ni_syscall` over the
 * `compat_sys_*` weak aliases), then file order.
 */
function rank(name: string, type: string): number {
  const underscores = /^_*/.exec(name)![0].length;
  const weak = type === 'w' || type === 'W' ? 1 : 0;
  return underscores * 2 + weak;
}

/** Kernel symbols sorted by address; {@link SymbolTable.lookup} maps a RIP to its function. */
export class SymbolTable {
  /** Start addresses, ascending. */
  private readonly addrs: BigUint64Array;
  /** The function starting at addrs[i], or undefined where a non-text region starts. */
  private readonly names: Array<string | undefined>;
  /** Text symbols in the table (functions a sample can land in). */
  readonly size: number;

  private constructor(addrs: BigUint64Array, names: Array<string | undefined>) {
    this.addrs = addrs;
    this.names = names;
    this.size = names.filter((n) => n !== undefined).length;
  }

  /**
   * Parses a System.map. Lines that are not `address type name` (blank,
   * undefined symbols without an address) are skipped; an empty result is
   * the caller's to judge.
   */
  static parseSystemMap(text: string): SymbolTable {
    const raw: RawSymbol[] = [];
    let order = 0;
    for (const line of text.split('\n')) {
      const m = LINE.exec(line);
      if (!m) continue;
      const type = m[2]!;
      const name = m[3]!;
      const text = TEXT_TYPES.has(type) && !TEXT_END_MARKERS.has(name);
      raw.push({ addr: BigInt(`0x${m[1]}`), name, text, rank: rank(name, type), order: order++ });
    }
    return SymbolTable.fromSymbols(raw);
  }

  /**
   * Builds a table from symbols: `text` ones name functions, the others
   * only end the function before them. For tests and other symbol sources.
   */
  static fromSymbols(symbols: ReadonlyArray<{ addr: bigint; name: string; text: boolean; rank?: number }>): SymbolTable {
    const raw = symbols.map((s, order) => ({ ...s, rank: s.rank ?? 0, order }));
    // At one address a function beats a marker, then the better-ranked name.
    raw.sort((a, b) => (a.addr < b.addr ? -1 : a.addr > b.addr ? 1 : Number(b.text) - Number(a.text) || a.rank - b.rank || a.order - b.order));
    const addrs: bigint[] = [];
    const names: Array<string | undefined> = [];
    for (const s of raw) {
      if (addrs.length > 0 && addrs[addrs.length - 1] === s.addr) continue;
      const name = s.text ? s.name : undefined;
      // Consecutive non-text entries say the same thing: keep the first.
      if (name === undefined && names.length > 0 && names[names.length - 1] === undefined) continue;
      addrs.push(s.addr);
      names.push(name);
    }
    return new SymbolTable(BigUint64Array.from(addrs), names);
  }

  /** The function `rip` is in, by binary search over the start addresses. */
  lookup(rip: bigint): SymbolHit {
    if (rip < REAL_MODE_LIMIT) return { name: REAL_MODE_SYMBOL, offset: 0 };
    if (rip < USER_ADDRESS_LIMIT) return { name: USER_SYMBOL, offset: 0 };
    // The last entry whose address is <= rip.
    let lo = 0;
    let hi = this.addrs.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (this.addrs[mid]! <= rip) {
        found = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    const name = found >= 0 ? this.names[found] : undefined;
    if (name === undefined) return { name: UNKNOWN_SYMBOL, offset: 0 };
    // The offset fits a number: no kernel function is 2^53 bytes long.
    return { name, offset: Number(rip - this.addrs[found]!) };
  }
}
