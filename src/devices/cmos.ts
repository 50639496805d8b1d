/**
 * MC146818 real-time clock and CMOS RAM (ports 0x70 index, 0x71 data).
 *
 * Reference: Motorola MC146818A datasheet, "Address Map" (figure 3), "Time,
 * Calendar and Alarm Data Modes" (table 3) and "Register A/B/C/D"; the PC
 * CMOS layout (0x0F shutdown status, 0x10-0x3F configuration, 0x32 century)
 * from the IBM PC/AT Technical Reference; the memory size fields beyond
 * 16 MiB (0x34/0x35, 0x5B-0x5D) are the QEMU/SeaBIOS convention.
 *
 * The clock shows the host's wall clock in UTC (as VMMs do by default),
 * plus whatever offset the guest sets by writing the time. It never
 * updates "in the middle" of a read, so register A's UIP bit always reads 0;
 * Linux still guards against a second boundary between two reads by
 * re-reading the seconds. Periodic, alarm and update interrupts (IRQ 8) are
 * not emulated: register C always reads 0.
 */
import type { BusDevice } from '../base/bus.js';
import { silentLogger, type Logger } from '../base/log.js';

/** Offset of the index port (0x70); bit 7 of the index masks NMIs on a PC. */
export const CMOS_INDEX = 0;
/** Offset of the data port (0x71). */
export const CMOS_DATA = 1;
/** Length of the port range. */
export const CMOS_PORT_COUNT = 2;
/** Bytes of CMOS RAM, clock registers included. */
export const CMOS_SIZE = 128;

/** Register numbers (MC146818A figure 3; PC/AT layout above 0x0D). */
export const RTC_REG = {
  SECONDS: 0x00,
  SECONDS_ALARM: 0x01,
  MINUTES: 0x02,
  MINUTES_ALARM: 0x03,
  HOURS: 0x04,
  HOURS_ALARM: 0x05,
  DAY_OF_WEEK: 0x06,
  DAY_OF_MONTH: 0x07,
  MONTH: 0x08,
  YEAR: 0x09,
  A: 0x0a,
  B: 0x0b,
  C: 0x0c,
  D: 0x0d,
  /** What the BIOS should do after a CPU reset; plain RAM here. */
  SHUTDOWN_STATUS: 0x0f,
  BASE_MEMORY_LOW: 0x15,
  BASE_MEMORY_HIGH: 0x16,
  EXTENDED_MEMORY_LOW: 0x17,
  EXTENDED_MEMORY_HIGH: 0x18,
  CHECKSUM_HIGH: 0x2e,
  CHECKSUM_LOW: 0x2f,
  EXTENDED_MEMORY_LOW_COPY: 0x30,
  EXTENDED_MEMORY_HIGH_COPY: 0x31,
  CENTURY: 0x32,
  /** RAM between 16 MiB and 4 GiB, in 64 KiB units. */
  MEMORY_ABOVE_16M_LOW: 0x34,
  MEMORY_ABOVE_16M_HIGH: 0x35,
  /** RAM above 4 GiB, in 64 KiB units, 24 bits. */
  MEMORY_ABOVE_4G_LOW: 0x5b,
  MEMORY_ABOVE_4G_MID: 0x5c,
  MEMORY_ABOVE_4G_HIGH: 0x5d,
} as const;

/** Register A bits. */
export const RTC_A = {
  /** Update in progress: always 0 here. */
  UIP: 0x80,
  /** Power-on value: 32.768 kHz time base, 1024 Hz periodic rate. */
  DEFAULT: 0x26,
} as const;

/** Register B bits. */
export const RTC_B = {
  /** Halts updates while the guest sets the time. */
  SET: 0x80,
  PERIODIC_INT: 0x40,
  ALARM_INT: 0x20,
  UPDATE_INT: 0x10,
  SQUARE_WAVE: 0x08,
  /** Data mode: 1 = binary, 0 = BCD. */
  BINARY: 0x04,
  /** Hours: 1 = 24-hour, 0 = 12-hour with bit 7 as PM. */
  HOURS_24: 0x02,
  DAYLIGHT_SAVING: 0x01,
  DEFAULT: 0x02,
} as const;

/** Register D: valid RAM and time (the battery is fine). */
export const RTC_D_VALID = 0x80;
/** Hours register bit 7 in 12-hour mode. */
const HOURS_PM = 0x80;
/** Index bits that select a register; bit 7 is the PC's NMI mask, ignored. */
const INDEX_MASK = 0x7f;

const KIB = 1024;
const MIB = 1024 * KIB;

export interface CmosOptions {
  /** Wall clock in milliseconds since the epoch; default `Date.now`. */
  now?: () => number;
  logger?: Logger;
}

/** The calendar as the clock registers hold it, decoded. */
interface ClockFields {
  seconds: number;
  minutes: number;
  hours: number;
  dayOfMonth: number;
  /** 1-12 */
  month: number;
  /** Full year, century included. */
  year: number;
}

/** The RTC and CMOS RAM. Guest accesses never throw. */
export class Cmos implements BusDevice {
  private readonly now: () => number;
  private readonly log: Logger;
  private readonly ram = new Uint8Array(CMOS_SIZE);
  private index = 0;
  /** Guest time minus host time, in ms: what the guest set the clock to. */
  private offsetMs = 0;
  /** While register B's SET bit is on, the time the guest is composing. */
  private frozen: ClockFields | null = null;

  constructor(options: CmosOptions = {}) {
    this.now = options.now ?? Date.now;
    this.log = (options.logger ?? silentLogger).child({ device: 'cmos' });
    this.ram[RTC_REG.A] = RTC_A.DEFAULT;
    this.ram[RTC_REG.B] = RTC_B.DEFAULT;
    this.ram[RTC_REG.D] = RTC_D_VALID;
    this.setMemorySize(0);
  }

  /**
   * Fills the memory size fields firmware and some guests read, as
   * QEMU does: base memory (640 KiB), extended memory (KiB above 1 MiB, at
   * most 65535), 64 KiB units between 16 MiB and 4 GiB, and 64 KiB units
   * above 4 GiB. Updates the standard checksum over 0x10-0x2D.
   */
  setMemorySize(belowFourGiB: number, aboveFourGiB = 0): void {
    const base = Math.min(Math.floor(belowFourGiB / KIB), 640);
    this.set16(RTC_REG.BASE_MEMORY_LOW, base);
    const extended = belowFourGiB > MIB ? Math.min(Math.floor((belowFourGiB - MIB) / KIB), 0xffff) : 0;
    this.set16(RTC_REG.EXTENDED_MEMORY_LOW, extended);
    this.set16(RTC_REG.EXTENDED_MEMORY_LOW_COPY, extended);
    const above16m = belowFourGiB > 16 * MIB ? Math.min(Math.floor((belowFourGiB - 16 * MIB) / (64 * KIB)), 0xffff) : 0;
    this.set16(RTC_REG.MEMORY_ABOVE_16M_LOW, above16m);
    const above4g = Math.min(Math.floor(Math.max(aboveFourGiB, 0) / (64 * KIB)), 0xffffff);
    this.ram[RTC_REG.MEMORY_ABOVE_4G_LOW] = above4g & 0xff;
    this.ram[RTC_REG.MEMORY_ABOVE_4G_MID] = (above4g >> 8) & 0xff;
    this.ram[RTC_REG.MEMORY_ABOVE_4G_HIGH] = (above4g >> 16) & 0xff;
    this.updateChecksum();
  }

  /** A CMOS byte as stored, without the clock's side effects: for the VMM and tests. */
  peek(index: number): number {
    return this.ram[index & INDEX_MASK]!;
  }

  /** Stores a CMOS RAM byte (not a clock register): for the VMM to describe the machine. */
  poke(index: number, value: number): void {
    this.ram[index & INDEX_MASK] = value & 0xff;
  }

  read(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (offset !== CMOS_INDEX && offset !== CMOS_DATA) {
      this.log.debug({ offset, size: data.length }, 'read outside the ports');
      data.fill(0xff);
      return;
    }
    if (data.length !== 1) {
      this.log.debug({ offset, size: data.length }, 'read wider than a byte: first byte only');
      data.fill(0);
    }
    // The index port is write only; it floats when read.
    data[0] = offset === CMOS_DATA ? this.readRegister(this.index) : 0xff;
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    if (offset !== CMOS_INDEX && offset !== CMOS_DATA) {
      this.log.debug({ offset, size: data.length }, 'write outside the ports');
      return;
    }
    if (data.length !== 1) this.log.debug({ offset, size: data.length }, 'write wider than a byte: first byte only');
    const value = data[0]!;
    if (offset === CMOS_INDEX) this.index = value & INDEX_MASK;
    else this.writeRegister(this.index, value);
  }

  private get regB(): number {
    return this.ram[RTC_REG.B]!;
  }

  private readRegister(index: number): number {
    switch (index) {
      case RTC_REG.SECONDS:
      case RTC_REG.MINUTES:
      case RTC_REG.HOURS:
      case RTC_REG.DAY_OF_WEEK:
      case RTC_REG.DAY_OF_MONTH:
      case RTC_REG.MONTH:
      case RTC_REG.YEAR:
      case RTC_REG.CENTURY:
        return this.readClock(index, this.frozen ?? this.currentFields());
      case RTC_REG.A:
        return this.ram[RTC_REG.A]! & ~RTC_A.UIP;
      case RTC_REG.C:
        // Interrupt flags: none are ever raised. Reading clears them anyway.
        return 0;
      case RTC_REG.D:
        return RTC_D_VALID;
      default:
        return this.ram[index]!;
    }
  }

  private writeRegister(index: number, value: number): void {
    switch (index) {
      case RTC_REG.SECONDS:
      case RTC_REG.MINUTES:
      case RTC_REG.HOURS:
      case RTC_REG.DAY_OF_MONTH:
      case RTC_REG.MONTH:
      case RTC_REG.YEAR:
      case RTC_REG.CENTURY:
        this.writeClock(index, value);
        return;
      case RTC_REG.DAY_OF_WEEK:
        // Derived from the date when read; a written weekday is not kept.
        return;
      case RTC_REG.A:
        this.ram[RTC_REG.A] = value & ~RTC_A.UIP;
        return;
      case RTC_REG.B:
        this.writeRegB(value);
        return;
      case RTC_REG.C:
      case RTC_REG.D:
        this.log.debug({ index, value }, 'write to a read-only RTC register ignored');
        return;
      default:
        this.ram[index] = value;
        return;
    }
  }

  private writeRegB(value: number): void {
    const wasSet = (this.regB & RTC_B.SET) !== 0;
    const isSet = (value & RTC_B.SET) !== 0;
    // Freeze with the old data mode, before the new B changes how fields decode.
    if (!wasSet && isSet) this.frozen = this.currentFields();
    this.ram[RTC_REG.B] = value;
    if (wasSet && !isSet && this.frozen) {
      this.commit(this.frozen);
      this.frozen = null;
    }
  }

  private currentFields(): ClockFields {
    const d = new Date(this.now() + this.offsetMs);
    return {
      seconds: d.getUTCSeconds(),
      minutes: d.getUTCMinutes(),
      hours: d.getUTCHours(),
      dayOfMonth: d.getUTCDate(),
      month: d.getUTCMonth() + 1,
      year: d.getUTCFullYear(),
    };
  }

  private encode(value: number): number {
    if (this.regB & RTC_B.BINARY) return value & 0xff;
    return (((Math.floor(value / 10) % 10) << 4) | (value % 10)) & 0xff;
  }

  private decode(raw: number): number {
    if (this.regB & RTC_B.BINARY) return raw;
    return (raw >> 4) * 10 + (raw & 0x0f);
  }

  private readClock(index: number, f: ClockFields): number {
    switch (index) {
      case RTC_REG.SECONDS:
        return this.encode(f.seconds);
      case RTC_REG.MINUTES:
        return this.encode(f.minutes);
      case RTC_REG.HOURS: {
        if (this.regB & RTC_B.HOURS_24) return this.encode(f.hours);
        const h12 = f.hours % 12 === 0 ? 12 : f.hours % 12;
        return this.encode(h12) | (f.hours >= 12 ? HOURS_PM : 0);
      }
      case RTC_REG.DAY_OF_WEEK: {
        // 1 = Sunday (MC146818A table 3).
        const d = new Date(0);
        d.setUTCFullYear(f.year, f.month - 1, f.dayOfMonth);
        const weekday = d.getUTCDay();
        return this.encode(weekday + 1);
      }
      case RTC_REG.DAY_OF_MONTH:
        return this.encode(f.dayOfMonth);
      case RTC_REG.MONTH:
        return this.encode(f.month);
      case RTC_REG.YEAR:
        return this.encode(f.year % 100);
      default:
        return this.encode(Math.floor(f.year / 100));
    }
  }

  private writeClock(index: number, raw: number): void {
    const f = this.frozen ?? this.currentFields();
    switch (index) {
      case RTC_REG.SECONDS:
        f.seconds = this.decode(raw);
        break;
      case RTC_REG.MINUTES:
        f.minutes = this.decode(raw);
        break;
      case RTC_REG.HOURS:
        if (this.regB & RTC_B.HOURS_24) f.hours = this.decode(raw);
        else f.hours = (this.decode(raw & ~HOURS_PM) % 12) + (raw & HOURS_PM ? 12 : 0);
        break;
      case RTC_REG.DAY_OF_MONTH:
        f.dayOfMonth = this.decode(raw);
        break;
      case RTC_REG.MONTH:
        f.month = this.decode(raw);
        break;
      case RTC_REG.YEAR:
        f.year = Math.floor(f.year / 100) * 100 + (this.decode(raw) % 100);
        break;
      default:
        f.year = this.decode(raw) * 100 + (f.year % 100);
        break;
    }
    // With SET on, the chip holds the new fields until SET clears; otherwise
    // the write takes effect at once.
    if (!this.frozen) this.commit(f);
  }

  private commit(f: ClockFields): void {
    // Not Date.UTC: it would read years 0-99 as 1900-1999.
    const d = new Date(0);
    d.setUTCFullYear(f.year, f.month - 1, f.dayOfMonth);
    d.setUTCHours(f.hours, f.minutes, f.seconds, 0);
    const ms = d.getTime();
    if (!Number.isFinite(ms)) {
      this.log.debug({ fields: f }, 'guest set an impossible time; ignored');
      return;
    }
    // Keep the sub-second phase of the host clock so the guest's seconds
    // roll over when the host's do.
    const host = this.now();
    this.offsetMs = ms - (host - (host % 1000));
  }

  private set16(index: number, value: number): void {
    this.ram[index] = value & 0xff;
    this.ram[index + 1] = (value >> 8) & 0xff;
  }

  private updateChecksum(): void {
    let sum = 0;
    for (let i = 0x10; i <= 0x2d; i++) sum += this.ram[i]!;
    this.ram[RTC_REG.CHECKSUM_HIGH] = (sum >> 8) & 0xff;
    this.ram[RTC_REG.CHECKSUM_LOW] = sum & 0xff;
  }
}
