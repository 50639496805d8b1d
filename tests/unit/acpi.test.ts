import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PM1_CONTROL } from '../../src/devices/acpi-pm.js';
import { ACPI_PM1_CNT_LEN, ACPI_PM1_EVT_LEN, ACPI_S5_SLEEP_TYPE } from '../../src/arch/layout.js';
import {
  AcpiError,
  FACS,
  FADT,
  FADT_FLAGS,
  IAPC_BOOT_ARCH,
  MADT_ENTRY,
  buildAcpiTables,
  layoutAcpiConfig,
  sdt,
  writeAcpiTables,
  type AcpiConfig,
} from '../../src/arch/acpi/index.js';
import {
  AmlBuffer,
  AmlError,
  DWordMemory,
  EisaId,
  IO,
  Integer,
  Interrupt,
  Method,
  Name,
  NamePath,
  Package,
  ResourceTemplate,
  Scope,
  WordIO,
  encodePkgLength,
  pkgLengthFor,
} from '../../src/arch/acpi/aml.js';
import { buildE820Map, E820_RESERVED } from '../../src/arch/boot/params.js';
import {
  ACPI_PM1A_CNT_PORT,
  ACPI_PM1A_EVT_PORT,
  ACPI_SCI_IRQ,
  ACPI_TABLES_SIZE,
  ACPI_TABLES_START,
  IOAPIC_START,
  IRQ_MAX,
  MPTABLE_START,
  PVPANIC_PORT,
  virtioMmioSlot,
} from '../../src/arch/layout.js';
import { GuestMemory } from '../../src/base/memory.js';
import { writeMpTable } from '../../src/arch/mptable.js';

const MiB = 1024 * 1024;

function hex(bytes: Uint8Array): string {
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join(' ');
}

function sum(bytes: Uint8Array): number {
  return bytes.reduce((s, b) => (s + b) & 0xff, 0);
}

function fullConfig(cpus = 2): AcpiConfig {
  return layoutAcpiConfig({
    cpus,
    virtioMmio: [0, 1, 2].map((i) => {
      const s = virtioMmioSlot(i);
      return { base: s.base, size: s.size, gsi: s.irq };
    }),
    pci: {
      mmio32: { base: 0xc000_0000, size: 0x1000_0000 },
      slotGsis: Array.from({ length: 4 }, (_, slot) => [0, 1, 2, 3].map((pin) => 20 + ((slot + pin) % 4))),
    },
  });
}

/** A table's bytes out of an image built at `base`. */
function tableAt(image: Uint8Array, base: number, loc: { address: number; length: number }): Uint8Array {
  return image.subarray(loc.address - base, loc.address - base + loc.length);
}

function signatureAt(image: Uint8Array, base: number, address: number): string {
  return String.fromCharCode(...image.subarray(address - base, address - base + 4));
}

describe('AML encoder', () => {
  it('encodes PkgLength in 1 to 4 bytes at the 63/64, 4095/4096 and 2^20 boundaries', () => {
    expect(hex(encodePkgLength(63))).toBe('3f');
    expect(hex(encodePkgLength(64))).toBe('40 04');
    expect(hex(encodePkgLength(4095))).toBe('4f ff');
    expect(hex(encodePkgLength(4096))).toBe('80 00 01');
    expect(hex(encodePkgLength(0xf_ffff))).toBe('8f ff ff');
    expect(hex(encodePkgLength(0x10_0000))).toBe('c0 00 00 01');
    expect(hex(encodePkgLength(0xfff_ffff))).toBe('cf ff ff ff');
    expect(() => encodePkgLength(0x1000_0000)).toThrow(AmlError);
  });

  it('counts the PkgLength bytes themselves in the value', () => {
    // Body 62: 62 + 1 = 63 fits one byte. Body 63: one byte would say 64, which needs two.
    expect(hex(pkgLengthFor(62))).toBe('3f');
    expect(hex(pkgLengthFor(63))).toBe('41 04'); // 65
    expect(hex(pkgLengthFor(4093))).toBe('4f ff'); // 4095
    expect(hex(pkgLengthFor(4094))).toBe('81 00 01'); // 4097
    for (const body of [0, 1, 61, 62, 63, 64, 4092, 4093, 4094, 4095, 0xf_fffc, 0xf_fffd]) {
      const enc = pkgLengthFor(body);
      const follow = enc[0]! >> 6;
      let v = follow === 0 ? enc[0]! & 0x3f : enc[0]! & 0x0f;
      for (let i = 0; i < follow; i++) v |= enc[1 + i]! << (4 + 8 * i);
      expect(enc.length).toBe(follow + 1);
      expect(v).toBe(body + enc.length);
    }
  });

  it('encodes integers in the shortest form', () => {
    expect(hex(Integer(0))).toBe('00');
    expect(hex(Integer(1))).toBe('01');
    expect(hex(Integer(2))).toBe('0a 02');
    expect(hex(Integer(0xff))).toBe('0a ff');
    expect(hex(Integer(0x100))).toBe('0b 00 01');
    expect(hex(Integer(0x1_0000))).toBe('0c 00 00 01 00');
    expect(hex(Integer(0x1_0000_0000))).toBe('0e 00 00 00 00 01 00 00 00');
    expect(hex(Integer((1n << 64n) - 1n))).toBe('ff');
    expect(() => Integer(-1)).toThrow(AmlError);
    expect(() => Integer(1n << 64n)).toThrow(AmlError);
    expect(() => Integer(2 ** 53)).toThrow(AmlError);
  });

  it('compresses EISA IDs', () => {
    expect(hex(EisaId('PNP0501'))).toBe('0c 41 d0 05 01');
    expect(hex(EisaId('PNP0A08'))).toBe('0c 41 d0 0a 08');
    expect(hex(EisaId('PNP0A03'))).toBe('0c 41 d0 0a 03');
    expect(() => EisaId('pnp0501')).toThrow(AmlError);
  });

  it('encodes name strings: single, dual, multi, root and parent prefixes', () => {
    expect(hex(NamePath('_HID'))).toBe('5f 48 49 44');
    expect(hex(NamePath('_SB'))).toBe('5f 53 42 5f');
    expect(hex(NamePath('\\_SB_.PCI0'))).toBe('5c 2e 5f 53 42 5f 50 43 49 30');
    expect(hex(NamePath('\\_SB.PCI0.COM1').subarray(0, 3))).toBe('5c 2f 03');
    expect(hex(NamePath('^^FOO'))).toBe('5e 5e 46 4f 4f 5f');
    expect(hex(NamePath('\\'))).toBe('5c 00');
    for (const bad of ['', 'abcd', '1ABC', 'TOOLONG', 'A..B']) expect(() => NamePath(bad)).toThrow(AmlError);
  });

  it('encodes strings, packages, methods and names', () => {
    expect(hex(Name('_HID', 'QEMU0001'))).toBe('08 5f 48 49 44 0d 51 45 4d 55 30 30 30 31 00');
    expect(hex(Package([1, 2]))).toBe('12 05 02 01 0a 02');
    // Method flags: bits 0-2 arguments, bit 3 serialized.
    expect(hex(Method('_STA', { args: 2, serialized: true }, []))).toBe('14 06 5f 53 54 41 0a');
    expect(hex(Method('_STA', {}, []))).toBe('14 06 5f 53 54 41 00');
    expect(() => Package(Array.from({ length: 256 }, () => 0))).toThrow(AmlError);
  });

  it('ends resource templates with a checksummed End Tag', () => {
    const rt = ResourceTemplate([IO(0x3f8, 0x3f8, 1, 8), Interrupt({}, [4])]);
    // Buffer: 11, PkgLength, size, then the descriptors.
    const descriptors = rt.subarray(3 + 1);
    expect(rt[0]).toBe(0x11);
    expect(descriptors[descriptors.length - 2]).toBe(0x79);
    expect(sum(descriptors)).toBe(0);
    expect(hex(descriptors.subarray(0, 8))).toBe('47 01 f8 03 f8 03 01 08');
    // Extended interrupt: consumer (bit 0) and edge (bit 1); active high, exclusive.
    expect(hex(descriptors.subarray(8, 17))).toBe('89 06 00 03 01 04 00 00 00');
    expect(Interrupt({ level: true, activeLow: true, shared: true }, [9])[3]).toBe(0x01 | 0x04 | 0x08);
  });

  it('refuses an address window whose length is not max - min + 1', () => {
    expect(() => WordIO({ min: 0, max: 0xcf7, length: 0xcf7 })).toThrow(AmlError);
    expect(() => DWordMemory({ min: 0x2000, max: 0x1000, length: 0 })).toThrow(AmlError);
  });
});

describe('ACPI tables', () => {
  it('gives every table a correct length field and a checksum summing to 0', () => {
    for (const config of [fullConfig(1), fullConfig(8), layoutAcpiConfig({ cpus: 3, virtioMmio: [] })]) {
      const built = buildAcpiTables(config, ACPI_TABLES_START);
      for (const [sig, loc] of Object.entries(built.tables)) {
        const t = tableAt(built.image, ACPI_TABLES_START, loc);
        if (sig === 'RSDP') continue;
        if (sig === 'FACS') {
          // No checksum and no OEM fields (5.2.10): signature, length 64, 64-byte aligned.
          expect(String.fromCharCode(...t.subarray(0, 4))).toBe('FACS');
          expect(new DataView(t.buffer, t.byteOffset).getUint32(FACS.LENGTH, true)).toBe(64);
          expect(loc.address % 64).toBe(0);
          continue;
        }
        expect(String.fromCharCode(...t.subarray(0, 4))).toBe(sig);
        expect(new DataView(t.buffer, t.byteOffset).getUint32(4, true)).toBe(t.length);
        expect(sum(t)).toBe(0);
        expect(String.fromCharCode(...t.subarray(10, 16))).toBe('TSVMM ');
        expect(String.fromCharCode(...t.subarray(16, 24))).toBe('TSVMMACP');
        expect(String.fromCharCode(...t.subarray(28, 32))).toBe('TSVM');
        expect((loc.address - ACPI_TABLES_START) % 16).toBe(0);
      }
    }
  });

  it('puts an ACPI 2.0 RSDP first, with both checksums and the XSDT address', () => {
    const built = buildAcpiTables(fullConfig(), ACPI_TABLES_START);
    expect(built.rsdpAddress).toBe(ACPI_TABLES_START);
    const rsdp = built.image.subarray(0, 36);
    const dv = new DataView(rsdp.buffer, rsdp.byteOffset);
    expect(String.fromCharCode(...rsdp.subarray(0, 8))).toBe('RSD PTR ');
    expect(sum(rsdp.subarray(0, 20))).toBe(0);
    expect(sum(rsdp)).toBe(0);
    expect(rsdp[15]).toBe(2);
    expect(dv.getUint32(20, true)).toBe(36);
    expect(Number(dv.getBigUint64(24, true))).toBe(built.tables.XSDT!.address);
  });

  it('lists FADT and MADT (and MCFG when asked) in the XSDT; the FADT points at the DSDT', () => {
    const plain = buildAcpiTables(fullConfig(), ACPI_TABLES_START);
    const entries = (b: typeof plain) => {
      const x = tableAt(b.image, ACPI_TABLES_START, b.tables.XSDT!);
      const dv = new DataView(x.buffer, x.byteOffset, x.length);
      return Array.from({ length: (x.length - 36) / 8 }, (_, i) => Number(dv.getBigUint64(36 + 8 * i, true)));
    };
    expect(entries(plain).map((a) => signatureAt(plain.image, ACPI_TABLES_START, a))).toEqual(['FACP', 'APIC']);
    expect(plain.tables.MCFG).toBeUndefined();

    const config = fullConfig();
    config.pci!.ecam = { base: 0xe000_0000, endBus: 0 };
    const withMcfg = buildAcpiTables(config, ACPI_TABLES_START);
    expect(entries(withMcfg).map((a) => signatureAt(withMcfg.image, ACPI_TABLES_START, a))).toEqual(['FACP', 'APIC', 'MCFG']);

    const fadt = tableAt(plain.image, ACPI_TABLES_START, plain.tables.FACP!);
    const fv = new DataView(fadt.buffer, fadt.byteOffset, fadt.length);
    const dsdt = Number(fv.getBigUint64(FADT.X_DSDT, true));
    expect(dsdt).toBe(plain.tables.DSDT!.address);
    expect(fv.getUint32(FADT.DSDT, true)).toBe(dsdt);
    expect(signatureAt(plain.image, ACPI_TABLES_START, dsdt)).toBe('DSDT');
  });

  it('makes the FADT full ACPI: SCI 9, no SMI, the PM1a blocks in both forms, no PM timer, GPEs or sleep registers', () => {
    const built = buildAcpiTables(fullConfig(), ACPI_TABLES_START);
    const fadt = tableAt(built.image, ACPI_TABLES_START, built.tables.FACP!);
    const dv = new DataView(fadt.buffer, fadt.byteOffset, fadt.length);
    expect(fadt.length).toBe(276);
    expect(fadt[8]).toBe(6);
    expect(fadt[FADT.MINOR_VERSION]).toBe(3);
    const flags = dv.getUint32(FADT.FLAGS, true);
    expect(flags & FADT_FLAGS.HW_REDUCED_ACPI).toBe(0);
    expect(flags & FADT_FLAGS.PWR_BUTTON).toBeTruthy();
    expect(flags & FADT_FLAGS.SLP_BUTTON).toBeTruthy();
    expect(dv.getUint16(FADT.SCI_INT, true)).toBe(ACPI_SCI_IRQ);
    expect(ACPI_SCI_IRQ).toBe(9);
    expect(dv.getUint32(FADT.SMI_CMD, true)).toBe(0);
    expect(dv.getUint32(FADT.PM1A_EVT_BLK, true)).toBe(ACPI_PM1A_EVT_PORT);
    expect(dv.getUint32(FADT.PM1A_CNT_BLK, true)).toBe(ACPI_PM1A_CNT_PORT);
    expect(fadt[FADT.PM1_EVT_LEN]).toBe(ACPI_PM1_EVT_LEN);
    expect(fadt[FADT.PM1_CNT_LEN]).toBe(ACPI_PM1_CNT_LEN);
    expect([ACPI_PM1_EVT_LEN, ACPI_PM1_CNT_LEN]).toEqual([4, 2]);
    // X_ blocks: System I/O, bit width = 8 x the legacy length (ACPICA warns otherwise), same port.
    for (const [at, port, length] of [
      [FADT.X_PM1A_EVT_BLK, ACPI_PM1A_EVT_PORT, ACPI_PM1_EVT_LEN],
      [FADT.X_PM1A_CNT_BLK, ACPI_PM1A_CNT_PORT, ACPI_PM1_CNT_LEN],
    ] as const) {
      expect([...fadt.subarray(at, at + 4)]).toEqual([1, 8 * length, 0, 2]);
      expect(Number(dv.getBigUint64(at + 4, true))).toBe(port);
    }
    for (const at of [FADT.PM1B_EVT_BLK, FADT.PM1B_CNT_BLK, FADT.PM2_CNT_BLK, FADT.PM_TMR_BLK, FADT.GPE0_BLK, FADT.GPE1_BLK]) {
      expect(dv.getUint32(at, true)).toBe(0);
    }
    for (const at of [FADT.PM2_CNT_LEN, FADT.PM_TMR_LEN, FADT.GPE0_BLK_LEN, FADT.GPE1_BLK_LEN]) expect(fadt[at]).toBe(0);
    for (const at of [
      FADT.X_PM1B_EVT_BLK,
      FADT.X_PM1B_CNT_BLK,
      FADT.X_PM2_CNT_BLK,
      FADT.X_PM_TMR_BLK,
      FADT.X_GPE0_BLK,
      FADT.X_GPE1_BLK,
      FADT.SLEEP_CONTROL_REG,
      FADT.SLEEP_STATUS_REG,
    ]) {
      expect([...fadt.subarray(at, at + 12)].every((b) => b === 0)).toBe(true);
    }
    // The FACS, 64-byte aligned, in both pointers; not in the XSDT.
    const facs = built.tables.FACS!;
    expect(dv.getUint32(FADT.FIRMWARE_CTRL, true)).toBe(facs.address);
    expect(Number(dv.getBigUint64(FADT.X_FIRMWARE_CTRL, true))).toBe(facs.address);
    expect(facs.address % 64).toBe(0);
    expect(facs.length).toBe(64);
    const f = tableAt(built.image, ACPI_TABLES_START, facs);
    const fv = new DataView(f.buffer, f.byteOffset, f.length);
    expect(String.fromCharCode(...f.subarray(0, 4))).toBe('FACS');
    expect(fv.getUint32(FACS.LENGTH, true)).toBe(64);
    expect(f[FACS.VERSION]).toBe(2);
    expect(fv.getUint32(FACS.GLOBAL_LOCK, true)).toBe(0);
    expect(fv.getUint32(FACS.FIRMWARE_WAKING_VECTOR, true)).toBe(0);
    const boot = dv.getUint16(FADT.IAPC_BOOT_ARCH, true);
    expect(boot & IAPC_BOOT_ARCH.I8042).toBeTruthy();
    expect(boot & IAPC_BOOT_ARCH.LEGACY_DEVICES).toBeTruthy();
    expect(boot & IAPC_BOOT_ARCH.VGA_NOT_PRESENT).toBeTruthy();
    expect(boot & IAPC_BOOT_ARCH.MSI_NOT_SUPPORTED).toBe(0);
    expect(boot & IAPC_BOOT_ARCH.CMOS_RTC_NOT_PRESENT).toBe(0);
  });

  it('has one enabled Local APIC per CPU, the IOAPIC and NMI on LINT1 in the MADT', () => {
    for (const cpus of [1, 2, 7, 255]) {
      const built = buildAcpiTables(layoutAcpiConfig({ cpus, virtioMmio: [] }), ACPI_TABLES_START);
      const madt = tableAt(built.image, ACPI_TABLES_START, built.tables.APIC!);
      const dv = new DataView(madt.buffer, madt.byteOffset, madt.length);
      const lapics: Array<{ uid: number; id: number; flags: number }> = [];
      const ioapics: Array<{ id: number; address: number; gsiBase: number }> = [];
      let nmiLint = -1;
      let overrides = 0;
      for (let at = 44; at < madt.length; at += madt[at + 1]!) {
        expect(madt[at + 1]).toBeGreaterThan(0);
        switch (madt[at]) {
          case MADT_ENTRY.LOCAL_APIC.type:
            lapics.push({ uid: madt[at + 2]!, id: madt[at + 3]!, flags: dv.getUint32(at + 4, true) });
            break;
          case MADT_ENTRY.IO_APIC.type:
            ioapics.push({ id: madt[at + 2]!, address: dv.getUint32(at + 4, true), gsiBase: dv.getUint32(at + 8, true) });
            break;
          case MADT_ENTRY.LOCAL_APIC_NMI.type:
            expect(madt[at + 2]).toBe(0xff);
            nmiLint = madt[at + 5]!;
            break;
          case MADT_ENTRY.INTERRUPT_SOURCE_OVERRIDE.type:
            overrides++;
            break;
        }
      }
      expect(lapics).toEqual(Array.from({ length: cpus }, (_, i) => ({ uid: i, id: i, flags: 1 })));
      expect(ioapics).toEqual([{ id: cpus, address: IOAPIC_START, gsiBase: 0 }]);
      expect(nmiLint).toBe(1);
      expect(overrides).toBe(0);
    }
    expect(() => buildAcpiTables(layoutAcpiConfig({ cpus: 256, virtioMmio: [] }), ACPI_TABLES_START)).toThrow(AcpiError);
  });

  it('needs no interrupt source overrides because the MP table routes ISA IRQ n to pin n', () => {
    // If mptable.ts ever stops using identity routing, the MADT must get overrides to match.
    const mem = GuestMemory.fromBuffer(new Uint8Array(1 * MiB));
    writeMpTable(mem, 2);
    const tableAddr = mem.readU32(MPTABLE_START + 4);
    const entries = mem.readU16(tableAddr + 34);
    let at = tableAddr + 44;
    const routes: Array<[number, number, number]> = [];
    for (let i = 0; i < entries; i++) {
      const type = mem.readU8(at);
      if (type === 3) routes.push([mem.readU8(at + 5), mem.readU8(at + 7), mem.readU16(at + 2)]);
      at += type === 0 ? 20 : 8;
    }
    expect(routes).toEqual(Array.from({ length: IRQ_MAX + 1 }, (_, irq) => [irq, irq, 0]));
  });

  it('declares \\_S5_ with the SLP_TYP that PM1 control powers off on', () => {
    const built = buildAcpiTables(fullConfig(), ACPI_TABLES_START);
    const dsdt = tableAt(built.image, ACPI_TABLES_START, built.tables.DSDT!);
    const expected = Name('\\_S5_', Package([ACPI_S5_SLEEP_TYPE, 0, 0, 0]));
    const at = Buffer.from(dsdt).indexOf(Buffer.from(expected));
    expect(at).toBe(36);
    // It must fit SLP_TYP, bits 10-12 of PM1 control.
    expect((ACPI_S5_SLEEP_TYPE << PM1_CONTROL.SLP_TYP_SHIFT) & ~PM1_CONTROL.SLP_TYP_MASK).toBe(0);
    expect(PM1_CONTROL.SLP_TYP_MASK).toBe(0x1c00);
    expect(PM1_CONTROL.SLP_EN).toBe(0x2000);
  });

  it('writes the tables at 0xE0000 where a scan of 0xE0000-0xFFFFF finds the RSDP, inside e820-reserved memory', () => {
    const mem = GuestMemory.fromBuffer(new Uint8Array(2 * MiB));
    mem.fill(ACPI_TABLES_START, ACPI_TABLES_SIZE, 0xaa);
    const placed = writeAcpiTables(mem, fullConfig());
    expect(placed.start).toBe(ACPI_TABLES_START);
    expect(placed.size).toBeLessThanOrEqual(ACPI_TABLES_SIZE);
    expect(mem.readU8(ACPI_TABLES_START + ACPI_TABLES_SIZE - 1)).toBe(0);
    // Linux's acpi_find_root_pointer(): 16-byte steps, signature and 20-byte checksum.
    let found = -1;
    for (let a = 0xe0000; a < 0x100000; a += 16) {
      const head = mem.slice(a, 20);
      if (String.fromCharCode(...head.subarray(0, 8)) === 'RSD PTR ' && sum(head) === 0) {
        found = a;
        break;
      }
    }
    expect(found).toBe(placed.rsdpAddress);
    const reserved = buildE820Map(mem).filter((e) => e.type === E820_RESERVED);
    expect(reserved.some((e) => e.addr <= ACPI_TABLES_START && e.addr + e.size >= ACPI_TABLES_START + ACPI_TABLES_SIZE)).toBe(true);

    expect(() => writeAcpiTables(GuestMemory.fromBuffer(new Uint8Array(512 * 1024)), fullConfig())).toThrow(AcpiError);
  });

  it('validates the configuration', () => {
    const bad: Array<(c: AcpiConfig) => void> = [
      (c) => (c.cpus = 0),
      (c) => (c.pm1aEventPort = 0x10000),
      (c) => (c.pm1aControlPort = 0xffff), // a 2-byte block past the last port
      (c) => (c.pm1aControlPort = c.pm1aEventPort + 2), // overlaps the event block
      (c) => (c.sciIrq = 0),
      (c) => (c.virtioMmio = [{ base: 0xd000_0000, size: 0x1000, gsi: ACPI_SCI_IRQ }]),
      (c) => (c.virtioMmio = [{ base: 0xffff_f000, size: 0x2000, gsi: 5 }]),
      (c) => (c.pci!.slotGsis = [[1, 2, 3, 4, 5]]),
    ];
    for (const mutate of bad) {
      const c = fullConfig();
      mutate(c);
      expect(() => buildAcpiTables(c, ACPI_TABLES_START)).toThrow(AcpiError);
    }
  });
});

describe('iasl round trip', () => {
  let dir: string;
  let iaslVersion = '';

  beforeAll(() => {
    const probe = spawnSync('iasl', ['-v'], { encoding: 'utf8' });
    if (probe.error) {
      throw new Error(`iasl is needed for the ACPI round-trip tests (${probe.error.message}): apt-get install acpica-tools`);
    }
    iaslVersion = probe.stdout;
    dir = mkdtempSync(join(tmpdir(), 'tsvmm-acpi-'));
  });

  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** Disassembles `table` and returns the .dsl text, failing on any problem iasl reports. */
  function disassemble(name: string, table: Uint8Array): string {
    const file = join(dir, `${name}.dat`);
    writeFileSync(file, table);
    const out = spawnSync('iasl', ['-d', file], { encoding: 'utf8' });
    const log = `${out.stdout}\n${out.stderr}`;
    expect(out.status, log).toBe(0);
    expect(log, log).not.toMatch(/error|warning|incorrect|invalid|does not contain/i);
    const dsl = readFileSync(join(dir, `${name}.dsl`), 'utf8');
    expect(dsl).not.toMatch(/\*\*\*\*|incorrect|invalid/i);
    return dsl;
  }

  it('has iasl', () => {
    expect(iaslVersion).toMatch(/ACPI/);
  });

  it('disassembles every table without complaint and finds what the DSDT declares', () => {
    const config = fullConfig(4);
    config.pci!.ecam = { base: 0xe000_0000, endBus: 0 };
    const built = buildAcpiTables(config, ACPI_TABLES_START);
    const dsl: Record<string, string> = {};
    for (const [sig, loc] of Object.entries(built.tables)) {
      if (sig === 'RSDP') continue; // iasl -d only takes tables with a standard header
      dsl[sig] = disassemble(sig.toLowerCase(), tableAt(built.image, ACPI_TABLES_START, loc));
    }

    const dsdt = dsl.DSDT!;
    expect(dsdt).toContain('_S5_');
    expect(dsdt).toMatch(/Name \(\\_S5, Package \(0x04\)[^{]*\{\s*0x05,/);
    expect(dsdt).toContain('EisaId ("PNP0501")');
    expect(dsdt).toMatch(/IO \(Decode16,\s*0x03F8,\s*\/\/ Range Minimum\s*0x03F8,\s*\/\/ Range Maximum\s*0x01,\s*\/\/ Alignment\s*0x08,/);
    expect(dsdt).toContain('Name (_HID, "QEMU0001")');
    expect(dsdt).toContain(`0x0${PVPANIC_PORT.toString(16).toUpperCase()},`);
    expect(dsdt).toMatch(/Method \(_STA, 0, NotSerialized\)[^{]*\{\s*Return \(0x0F\)/);
    expect(dsdt.match(/Name \(_HID, "LNRO0005"\)/g)).toHaveLength(3);
    for (const i of [0, 1, 2]) {
      const s = virtioMmioSlot(i);
      expect(dsdt).toContain(`0x${s.base.toString(16).toUpperCase()},         // Address Base`);
      expect(dsdt).toMatch(
        new RegExp(`Interrupt \\(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \\)\\s*\\{\\s*0x${s.irq.toString(16).padStart(8, '0').toUpperCase()},`),
      );
    }
    expect(dsdt).toContain('EisaId ("PNP0A08")');
    expect(dsdt).toContain('Name (_CID, EisaId ("PNP0A03")');
    for (const n of ['_SEG', '_BBN', '_UID', '_ADR']) expect(dsdt).toMatch(new RegExp(`Device \\(PCI0\\)[\\s\\S]*Name \\(${n}, Zero\\)`));
    expect(dsdt).toMatch(/WordBusNumber \(ResourceProducer[^)]*\)?[\s\S]*?0x0000,\s*\/\/ Range Maximum/);
    expect(dsdt).toMatch(/WordIO [\s\S]*?0x0000,\s*\/\/ Range Minimum\s*0x0CF7,\s*\/\/ Range Maximum/);
    expect(dsdt).toMatch(/WordIO [\s\S]*?0x0D00,\s*\/\/ Range Minimum\s*0xFFFF,\s*\/\/ Range Maximum/);
    expect(dsdt).toMatch(/DWordMemory [\s\S]*?0xC0000000,\s*\/\/ Range Minimum\s*0xCFFFFFFF,\s*\/\/ Range Maximum/);
    expect(dsdt).toMatch(/Name \(_PRT, Package \(0x10\)/);
    expect(dsdt).toMatch(/0x0003FFFF,\s*0x03,\s*Zero,\s*0x16/);

    const madt = dsl.APIC!;
    expect(madt.match(/Subtable Type : 00 \[Processor Local APIC\]/g)).toHaveLength(4);
    expect(madt).toMatch(/Subtable Type : 01 \[I\/O APIC\][\s\S]*Address : FEC00000/);
    expect(madt).toMatch(/Local APIC NMI[\s\S]*Interrupt Input LINT : 01/);
    expect(dsl.FACP).toMatch(/Hardware Reduced \(V5\) : 0/);
    expect(dsl.FACP).toMatch(/SCI Interrupt : 0009/);
    expect(dsl.FACP).toMatch(/SMI Command Port : 00000000/);
    expect(dsl.FACP).toMatch(/PM1A Event Block Address : 00000600/);
    expect(dsl.FACP).toMatch(/PM1A Control Block Address : 00000604/);
    expect(dsl.FACP).toMatch(/PM1 Event Block Length : 04/);
    expect(dsl.FACP).toMatch(/PM1 Control Block Length : 02/);
    expect(dsl.FACP).toMatch(/PM Timer Block Address : 00000000/);
    expect(dsl.FACP).toMatch(
      /PM1A Event Block : \[Generic Address Structure\][\s\S]*?Space ID : 01 \[SystemIO\][\s\S]*?Bit Width : 20[\s\S]*?Address : 0000000000000600/,
    );
    expect(dsl.FACP).toMatch(
      /PM1A Control Block : \[Generic Address Structure\][\s\S]*?Space ID : 01 \[SystemIO\][\s\S]*?Bit Width : 10[\s\S]*?Address : 0000000000000604/,
    );
    expect(dsl.FACP).toMatch(/Sleep Control Register[\s\S]*?Address : 0000000000000000/);
    const facs = built.tables.FACS!.address.toString(16).toUpperCase();
    expect(dsl.FACP).toMatch(new RegExp(`\\[024h 0036   4\\]\\s+FACS Address : ${facs.padStart(8, '0')}`));
    expect(dsl.FACP).toMatch(new RegExp(`\\[084h 0132   8\\]\\s+FACS Address : ${facs.padStart(16, '0')}`));
    expect(dsl.FACS).toMatch(/Length : 00000040/);
    expect(dsl.FACS).toMatch(/Version : 02/);
    expect(dsl.FACP).toMatch(/8042 Present on ports 60\/64 \(V2\) : 1/);
    expect(dsl.MCFG).toMatch(/Base Address : 00000000E0000000/);
    expect(dsl.XSDT!.match(/ACPI Table Address/g)).toHaveLength(3);
  });

  it('parses packages on both sides of each PkgLength size step', () => {
    // Buffer sizes whose PkgLength value is the last of one encoding size or the
    // first of the next: 63 | 65 (one to two bytes), 4095 | 4097 (two to three),
    // 0xFFFFF | 0x100001 (three to four). The size constant takes 2, 3 or 5 bytes.
    const sizes = [60, 61, 4090, 4091, 0xf_fff7, 0xf_fff8];
    expect(sizes.map((n) => hex(pkgLengthFor(Integer(n).length + n)).split(' ').length)).toEqual([1, 2, 2, 3, 3, 4]);
    const terms = sizes.map((n, i) => Name(`B${i.toString().padStart(3, '0')}`, AmlBuffer(new Uint8Array(n).fill(0x5a))));
    const ssdt = sdt('SSDT', 2, Scope('\\', terms));
    const dsl = disassemble('pkglen', ssdt);
    sizes.forEach((n, i) => {
      const digits = n <= 0xff ? 2 : n <= 0xffff ? 4 : 8;
      expect(dsl).toContain(`Name (B${i.toString().padStart(3, '0')}, Buffer (0x${n.toString(16).toUpperCase().padStart(digits, '0')})`);
    });
  });
});
