/**
 * The ACPI PM1a event and control blocks (ACPI 6.x, 4.8.3.1 PM1 Event
 * Grouping, 4.8.3.2 PM1 Control Grouping), which the FADT names in
 * PM1a_EVT_BLK / X_PM1a_EVT_BLK and PM1a_CNT_BLK / X_PM1a_CNT_BLK, as one
 * device of {@link ACPI_PM_PORT_SIZE} ports:
 *
 * | offset | register     | width | access                               |
 * |--------|--------------|-------|--------------------------------------|
 * | 0      | PM1 status   | 16    | write 1 to clear                     |
 * | 2      | PM1 enable   | 16    | read/write                           |
 * | 4      | PM1 control  | 16    | SCI_EN reads 1; SLP_EN enters sleep  |
 *
 * A guest powers off by writing SLP_TYP (the S5 value from the DSDT's
 * `\_S5_`) with SLP_EN to PM1 control (ACPICA hwsleep.c,
 * acpi_hw_legacy_sleep), then polls WAK_STS in PM1 status.
 *
 * There is no SMI: the FADT's SMI_CMD is 0, so ACPICA takes the machine to
 * be in ACPI mode already (hwacpi.c, acpi_hw_get_mode) and SCI_EN is
 * hardwired to 1. No event source is modelled (no PM timer, no buttons, no
 * GPEs), so no enabled status bit is ever set and the SCI never fires; the
 * device therefore has no interrupt line.
 *
 * Mapping: `bus.insert(pm, ACPI_PM1A_EVT_PORT, ACPI_PM_PORT_SIZE, 'acpi-pm')`,
 * with the control block right after the event block (ACPI_PM1A_CNT_PORT =
 * ACPI_PM1A_EVT_PORT + {@link ACPI_PM1_CONTROL}).
 */
import type { BusDevice } from '../base/bus.js';
import { silentLogger, type Logger } from '../base/log.js';
import { ACPI_PM1_CNT_LEN, ACPI_PM1_EVT_LEN, ACPI_S5_SLEEP_TYPE } from '../arch/layout.js';

/** Offset of PM1 status (PM1a_STS) from the start of the event block. */
export const ACPI_PM1_STATUS = 0;
/** Offset of PM1 enable (PM1a_EN): the second half of the event block (4.8.3.1). */
export const ACPI_PM1_ENABLE = 2;
/** Offset of PM1 control (PM1a_CNT): the control block follows the event block. */
export const ACPI_PM1_CONTROL = 4;

/** PM1 status bits (4.8.3.1.1, Table 4.16). Write 1 to clear. */
export const PM1_STATUS = {
  TMR_STS: 1 << 0,
  BM_STS: 1 << 4,
  GBL_STS: 1 << 5,
  PWRBTN_STS: 1 << 8,
  SLPBTN_STS: 1 << 9,
  RTC_STS: 1 << 10,
  PCIEXP_WAKE_STS: 1 << 14,
  /** The system has woken from a sleep state. */
  WAK_STS: 1 << 15,
} as const;

/** PM1 enable bits (4.8.3.1.2, Table 4.17). */
export const PM1_ENABLE = {
  TMR_EN: 1 << 0,
  GBL_EN: 1 << 5,
  PWRBTN_EN: 1 << 8,
  SLPBTN_EN: 1 << 9,
  RTC_EN: 1 << 10,
  PCIEXP_WAKE_DIS: 1 << 14,
} as const;

/** The enable bits that hold a value; the others are reserved and read 0. */
const PM1_ENABLE_WRITABLE = Object.values(PM1_ENABLE).reduce((a, b) => a | b, 0);

/** PM1 control bits (4.8.3.2.1, Table 4.18). */
export const PM1_CONTROL = {
  /** SCI_EN: SCI (not SMI) delivery of power management events. Hardwired 1 here. */
  SCI_EN: 1 << 0,
  BM_RLD: 1 << 1,
  /** GBL_RLS: write-only, tells firmware the global lock was released; reads 0. */
  GBL_RLS: 1 << 2,
  /** SLP_TYPx, bits 10-12: the sleep type from the `\_Sx_` object. */
  SLP_TYP_MASK: 0x1c00,
  SLP_TYP_SHIFT: 10,
  /** SLP_EN, bit 13: enter the sleep state; write-only, reads 0. */
  SLP_EN: 1 << 13,
} as const;

/** The control bits that read back what was written. */
const PM1_CONTROL_STORED = PM1_CONTROL.BM_RLD | PM1_CONTROL.SLP_TYP_MASK;

export interface AcpiPmOptions {
  /** Called once, when the guest enters S5. */
  onPowerOff: () => void;
  /**
   * Called once, on the guest's first write to a PM1 register. Linux makes
   * that write when its ACPI subsystem starts: acpi_enable_subsystem() ->
   * acpi_ev_initialize_events() -> acpi_ev_fixed_event_initialize() clears
   * each fixed-event enable bit in PM1 enable. From then on the guest runs
   * ACPI and will power off through PM1 control.
   */
  onAcpiEnabled?: () => void;
  logger?: Logger;
}

/** Counters; read them, do not write them. */
export interface AcpiPmStats {
  /** Well-formed register reads and writes. */
  accesses: number;
  powerOffs: number;
  /** 1 once the guest has written a PM1 register (see `onAcpiEnabled`). */
  acpiEnabled: number;
  /** Requests for a sleep state other than S5, answered by waking at once. */
  ignoredSleeps: number;
  /** Accesses at a bad offset or size, ignored (reads return 0). */
  oddAccesses: number;
}

/** The 16-bit register (ACPI_PM1_STATUS, _ENABLE or _CONTROL) that holds byte `port` of the range. */
function registerOf(port: number): number {
  return port & ~1;
}

/** PM1a event and control registers. Guest accesses never throw. */
export class AcpiPm implements BusDevice {
  readonly stats: AcpiPmStats = { accesses: 0, powerOffs: 0, acpiEnabled: 0, ignoredSleeps: 0, oddAccesses: 0 };

  private readonly onPowerOff: () => void;
  private readonly onAcpiEnabled: (() => void) | undefined;
  private readonly log: Logger;
  private status = 0;
  private enable = 0;
  /** BM_RLD and SLP_TYP as last written; SCI_EN, GBL_RLS and SLP_EN are not stored. */
  private control = 0;
  private poweredOff = false;

  constructor(options: AcpiPmOptions) {
    this.onPowerOff = options.onPowerOff;
    this.onAcpiEnabled = options.onAcpiEnabled;
    this.log = (options.logger ?? silentLogger).child({ device: 'acpi-pm' });
  }

  /** True once the guest has entered S5. */
  get isPoweredOff(): boolean {
    return this.poweredOff;
  }

  /** True once the guest has written a PM1 register: its ACPI subsystem runs. */
  get isAcpiEnabled(): boolean {
    return this.stats.acpiEnabled > 0;
  }

  read(offset: number, data: Uint8Array): void {
    if (!this.decodes('read', offset, data.length)) {
      data.fill(0);
      return;
    }
    for (let i = 0; i < data.length; i++) {
      const port = offset + i;
      data[i] = (this.readRegister(registerOf(port)) >> (8 * (port & 1))) & 0xff;
    }
  }

  write(offset: number, data: Uint8Array): void {
    if (!this.decodes('write', offset, data.length)) return;
    if (!this.isAcpiEnabled) {
      this.stats.acpiEnabled = 1;
      this.log.debug('guest wrote a PM1 register: ACPI enabled');
      this.onAcpiEnabled?.();
    }
    // Gather the bytes per 16-bit register, so a byte write changes only its half.
    const parts = new Map<number, { value: number; mask: number }>();
    for (let i = 0; i < data.length; i++) {
      const port = offset + i;
      const part = parts.get(registerOf(port)) ?? { value: 0, mask: 0 };
      part.value |= data[i]! << (8 * (port & 1));
      part.mask |= 0xff << (8 * (port & 1));
      parts.set(registerOf(port), part);
    }
    for (const [register, { value, mask }] of parts) this.writeRegister(register, value, mask);
  }

  /**
   * Whether real hardware would decode the access: size 1, 2 or 4, aligned,
   * inside one block (so 4 bytes only on the event block: status and enable).
   */
  private decodes(kind: 'read' | 'write', offset: number, size: number): boolean {
    const inEvent = offset >= 0 && offset + size <= ACPI_PM1_EVT_LEN;
    const inControl = offset >= ACPI_PM1_CONTROL && offset + size <= ACPI_PM1_CONTROL + ACPI_PM1_CNT_LEN;
    if ((size === 1 || size === 2 || size === 4) && offset % size === 0 && (inEvent || inControl)) {
      this.stats.accesses++;
      return true;
    }
    this.stats.oddAccesses++;
    this.log.debug({ kind, offset, size }, 'PM1 access at a bad offset or size ignored');
    return false;
  }

  private readRegister(register: number): number {
    switch (register) {
      case ACPI_PM1_STATUS:
        return this.status;
      case ACPI_PM1_ENABLE:
        return this.enable;
      default:
        return this.control | PM1_CONTROL.SCI_EN;
    }
  }

  private writeRegister(register: number, value: number, mask: number): void {
    switch (register) {
      case ACPI_PM1_STATUS:
        this.status &= ~(value & mask);
        return;
      case ACPI_PM1_ENABLE:
        this.enable = (this.enable & ~mask) | (value & mask & PM1_ENABLE_WRITABLE);
        return;
      default:
        this.control = (this.control & ~mask) | (value & mask & PM1_CONTROL_STORED);
        if (value & mask & PM1_CONTROL.SLP_EN) this.sleep((this.control & PM1_CONTROL.SLP_TYP_MASK) >> PM1_CONTROL.SLP_TYP_SHIFT);
    }
  }

  private sleep(sleepType: number): void {
    if (sleepType === ACPI_S5_SLEEP_TYPE) {
      // WAK_STS stays clear: Linux spins on it until the VM stops. Were it
      // set, acpi_power_off() would return and the kernel would halt instead.
      if (this.poweredOff) return;
      this.poweredOff = true;
      this.stats.powerOffs++;
      this.log.info('guest entered S5 (ACPI soft-off)');
      this.onPowerOff();
      return;
    }
    // Only \_S5_ is declared, so a kernel should never ask for another state;
    // waking at once keeps its WAK_STS poll from spinning forever.
    this.stats.ignoredSleeps++;
    this.status |= PM1_STATUS.WAK_STS;
    this.log.debug({ sleepType }, 'sleep type not supported: woke the guest at once');
  }
}
