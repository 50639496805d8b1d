import { describe, expect, it } from 'vitest';
import { ACPI_PM1_CONTROL, ACPI_PM1_ENABLE, ACPI_PM1_STATUS, AcpiPm, PM1_CONTROL, PM1_ENABLE, PM1_STATUS } from '../../src/devices/acpi-pm.js';
import { Bus } from '../../src/base/bus.js';
import { ACPI_PM1A_CNT_PORT, ACPI_PM1A_EVT_PORT, ACPI_PM1_CNT_LEN, ACPI_PM1_EVT_LEN, ACPI_PM_PORT_SIZE, ACPI_S5_SLEEP_TYPE } from '../../src/arch/layout.js';

function setup() {
  let powerOffs = 0;
  let acpiEnabled = 0;
  const pm = new AcpiPm({ onPowerOff: () => powerOffs++, onAcpiEnabled: () => acpiEnabled++ });
  const bus = new Bus('pio');
  bus.insert(pm, ACPI_PM1A_EVT_PORT, ACPI_PM_PORT_SIZE, 'acpi-pm');
  const rd = (port: number, size = 2): number => {
    const d = new Uint8Array(size);
    bus.read(port, d);
    return d.reduce((v, b, i) => v + b * 2 ** (8 * i), 0);
  };
  const wr = (port: number, value: number, size = 2): void => {
    bus.write(
      port,
      Uint8Array.from({ length: size }, (_, i) => Math.floor(value / 2 ** (8 * i)) & 0xff),
    );
  };
  return { pm, rd, wr, powerOffs: () => powerOffs, acpiEnabled: () => acpiEnabled };
}

const STS = ACPI_PM1A_EVT_PORT + ACPI_PM1_STATUS;
const EN = ACPI_PM1A_EVT_PORT + ACPI_PM1_ENABLE;
const CNT = ACPI_PM1A_CNT_PORT;

/** What ACPICA's acpi_hw_legacy_sleep() writes, second write: SLP_TYP | SLP_EN over the old value. */
const sleepCommand = (type: number, old = 0) =>
  (old & ~(PM1_CONTROL.SLP_TYP_MASK | PM1_CONTROL.SLP_EN)) | ((type << PM1_CONTROL.SLP_TYP_SHIFT) & PM1_CONTROL.SLP_TYP_MASK) | PM1_CONTROL.SLP_EN;

describe('AcpiPm: PM1a event and control blocks', () => {
  it('covers both blocks from the event port, as layout.ts places them', () => {
    expect(ACPI_PM1_EVT_LEN + ACPI_PM1_CNT_LEN).toBe(ACPI_PM_PORT_SIZE);
    expect(ACPI_PM1A_CNT_PORT).toBe(ACPI_PM1A_EVT_PORT + ACPI_PM1_CONTROL);
    expect(ACPI_PM1A_EVT_PORT).toBe(0x600);
    expect(ACPI_PM1A_CNT_PORT).toBe(0x604);
  });

  it('reads SCI_EN as 1 always and SLP_EN, GBL_RLS as 0; keeps SLP_TYP and BM_RLD', () => {
    const io = setup();
    expect(io.rd(CNT)).toBe(PM1_CONTROL.SCI_EN);
    io.wr(CNT, 0); // an OS clearing SCI_EN (there is no SMI to hand events to)
    expect(io.rd(CNT) & PM1_CONTROL.SCI_EN).toBe(PM1_CONTROL.SCI_EN);
    io.wr(CNT, (ACPI_S5_SLEEP_TYPE << PM1_CONTROL.SLP_TYP_SHIFT) | PM1_CONTROL.BM_RLD | PM1_CONTROL.GBL_RLS);
    expect(io.rd(CNT)).toBe((ACPI_S5_SLEEP_TYPE << PM1_CONTROL.SLP_TYP_SHIFT) | PM1_CONTROL.BM_RLD | PM1_CONTROL.SCI_EN);
    expect(io.powerOffs()).toBe(0);
  });

  it('powers off on SLP_EN with the S5 sleep type, once, and leaves WAK_STS clear', () => {
    const io = setup();
    // acpi_hw_legacy_sleep(): clear WAK_STS and all status, write SLP_TYP, then SLP_TYP|SLP_EN, poll WAK_STS.
    io.wr(STS, PM1_STATUS.WAK_STS);
    io.wr(STS, 0xffff);
    const old = io.rd(CNT);
    io.wr(CNT, sleepCommand(ACPI_S5_SLEEP_TYPE, old) & ~PM1_CONTROL.SLP_EN);
    expect(io.powerOffs()).toBe(0);
    io.wr(CNT, sleepCommand(ACPI_S5_SLEEP_TYPE, old));
    expect(sleepCommand(ACPI_S5_SLEEP_TYPE, old)).toBe(0x3401);
    expect(io.powerOffs()).toBe(1);
    expect(io.pm.isPoweredOff).toBe(true);
    expect(io.pm.stats.powerOffs).toBe(1);
    // The guest spins here until the VM stops; it must not see itself woken.
    expect(io.rd(STS) & PM1_STATUS.WAK_STS).toBe(0);
    // After 10 s ACPICA rewrites SLP_EN alone for states above S3: no second power-off.
    io.wr(CNT, sleepCommand(ACPI_S5_SLEEP_TYPE, old));
    io.wr(CNT, PM1_CONTROL.SLP_EN);
    expect(io.powerOffs()).toBe(1);
  });

  it('takes SLP_TYP and SLP_EN from a byte write to the control high byte', () => {
    const io = setup();
    io.wr(CNT + 1, sleepCommand(ACPI_S5_SLEEP_TYPE) >> 8, 1);
    expect(io.powerOffs()).toBe(1);
  });

  it('answers other sleep types by waking at once: WAK_STS set, cleared by writing 1', () => {
    const io = setup();
    for (const type of [0, 1, 3, 4, 7]) {
      io.wr(STS, PM1_STATUS.WAK_STS);
      expect(io.rd(STS)).toBe(0);
      io.wr(CNT, sleepCommand(type));
      expect(io.rd(STS)).toBe(PM1_STATUS.WAK_STS);
    }
    expect(io.pm.stats.ignoredSleeps).toBe(5);
    expect(io.powerOffs()).toBe(0);
    // Write-one-to-clear: 0s and other bits leave WAK_STS alone; the low byte alone cannot clear it.
    io.wr(STS, 0);
    io.wr(STS, PM1_STATUS.PWRBTN_STS | PM1_STATUS.TMR_STS);
    io.wr(STS, 0xff, 1);
    expect(io.rd(STS)).toBe(PM1_STATUS.WAK_STS);
    expect(io.rd(STS + 1, 1)).toBe(PM1_STATUS.WAK_STS >> 8);
    io.wr(STS + 1, PM1_STATUS.WAK_STS >> 8, 1);
    expect(io.rd(STS)).toBe(0);
  });

  it('keeps the defined PM1 enable bits, per byte, and reads status and enable as one dword', () => {
    const io = setup();
    io.wr(EN, 0xffff);
    const all = Object.values(PM1_ENABLE).reduce((a, b) => a | b, 0);
    expect(io.rd(EN)).toBe(all);
    io.wr(EN, 0, 1);
    expect(io.rd(EN)).toBe(all & 0xff00);
    io.wr(EN + 1, PM1_ENABLE.PWRBTN_EN >> 8, 1);
    expect(io.rd(EN)).toBe(PM1_ENABLE.PWRBTN_EN);
    io.wr(CNT, sleepCommand(1)); // sets WAK_STS
    expect(io.rd(STS, 4)).toBe(PM1_STATUS.WAK_STS + PM1_ENABLE.PWRBTN_EN * 0x10000);
    // A dword write clears status bits and sets enable bits at once.
    io.wr(STS, PM1_STATUS.WAK_STS + PM1_ENABLE.GBL_EN * 0x10000, 4);
    expect(io.rd(STS, 4)).toBe(PM1_ENABLE.GBL_EN * 0x10000);
  });

  it('calls onAcpiEnabled once, on the first PM1 write, before any power-off', () => {
    const io = setup();
    io.rd(STS);
    io.rd(CNT);
    expect(io.acpiEnabled()).toBe(0);
    expect(io.pm.isAcpiEnabled).toBe(false);
    // acpi_ev_fixed_event_initialize(): read-modify-write of PM1 enable.
    io.wr(EN, io.rd(EN) & ~PM1_ENABLE.TMR_EN);
    expect(io.acpiEnabled()).toBe(1);
    expect(io.pm.stats.acpiEnabled).toBe(1);
    expect(io.pm.isAcpiEnabled).toBe(true);
    io.wr(STS, 0xffff);
    io.wr(CNT, sleepCommand(ACPI_S5_SLEEP_TYPE));
    expect(io.acpiEnabled()).toBe(1);

    const order: string[] = [];
    const pm = new AcpiPm({ onPowerOff: () => order.push('off'), onAcpiEnabled: () => order.push('acpi') });
    pm.write(ACPI_PM1_CONTROL, Uint8Array.of(0, sleepCommand(ACPI_S5_SLEEP_TYPE) >> 8));
    expect(order).toEqual(['acpi', 'off']);
  });

  it('ignores accesses at bad offsets or sizes, reading 0, and counts the rest', () => {
    const io = setup();
    io.wr(CNT, sleepCommand(1)); // WAK_STS set, and ACPI enabled
    const d = Uint8Array.of(0xaa, 0xaa, 0xaa, 0xaa);
    io.pm.read(1, d.subarray(0, 2)); // misaligned word
    expect([...d.subarray(0, 2)]).toEqual([0, 0]);
    io.pm.read(ACPI_PM1_CONTROL, d); // dword on the 2-byte control block
    expect([...d]).toEqual([0, 0, 0, 0]);
    io.pm.write(2, Uint8Array.of(0xff, 0xff, 0xff, 0xff)); // dword across the blocks
    io.pm.write(ACPI_PM1_CONTROL, Uint8Array.of(0, 0, 0)); // 3 bytes
    io.pm.write(6, Uint8Array.of(0xff));
    io.pm.write(-1, Uint8Array.of(0xff));
    expect(io.pm.stats.oddAccesses).toBe(6);
    expect(io.rd(STS)).toBe(PM1_STATUS.WAK_STS);
    expect(io.rd(EN)).toBe(0);
    expect(io.pm.stats.accesses).toBe(3);
  });

  it('never throws, whatever the offset and size', () => {
    let powerOffs = 0;
    const pm = new AcpiPm({ onPowerOff: () => powerOffs++ });
    let seed = 7;
    const rand = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff);
    for (let i = 0; i < 10000; i++) {
      const offset = (rand() % 10) - 2;
      const data = Uint8Array.from({ length: [0, 1, 2, 3, 4, 8][rand() % 6]! }, () => rand() & 0xff);
      if (rand() & 1) pm.read(offset, data);
      else pm.write(offset, data);
    }
    expect(pm.stats.oddAccesses).toBeGreaterThan(0);
    expect(pm.stats.accesses).toBeGreaterThan(0);
    expect(powerOffs).toBeLessThanOrEqual(1);
  });
});
