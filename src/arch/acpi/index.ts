/**
 * ACPI for a tsvmm machine: builds the tables for a configuration and
 * places them at ACPI_TABLES_START, RSDP first, so Linux finds the RSDP
 * both through boot_params.acpi_rsdp_addr and by scanning 0xE0000-0xFFFFF.
 *
 * Image layout: RSDP, XSDT, FADT, FACS, MADT, MCFG (if any), DSDT, each on
 * a 16-byte boundary (the FACS on a 64-byte one).
 */
import { ACPI_PM1_CNT_LEN, ACPI_PM1_EVT_LEN } from '../layout.js';
import type { GuestMemory } from '../../base/memory.js';
import {
  ACPI_PM1A_CNT_PORT,
  ACPI_PM1A_EVT_PORT,
  ACPI_SCI_IRQ,
  ACPI_TABLES_SIZE,
  ACPI_TABLES_START,
  COM1_IRQ,
  COM1_PORT,
  IOAPIC_START,
  LAPIC_START,
  PVPANIC_PORT,
} from '../layout.js';
import {
  AcpiError,
  FACS_ALIGNMENT,
  FACS_SIZE,
  FADT_SIZE,
  IAPC_BOOT_ARCH,
  RSDP_SIZE,
  SDT_HEADER_SIZE,
  buildDsdt,
  buildFacs,
  buildFadt,
  buildMadt,
  buildMcfg,
  buildRsdp,
  buildXsdt,
  type EcamWindow,
  type InterruptSourceOverride,
} from './tables.js';

export * from './tables.js';
export * as aml from './aml.js';

/** What the tables describe. Addresses are guest-physical, ports are I/O ports. */
export interface AcpiConfig {
  /** vCPUs: APIC IDs and ACPI processor UIDs 0..cpus-1. */
  cpus: number;
  lapicAddress: number;
  ioapic: { id: number; address: number; gsiBase: number };
  com1: { port: number; irq: number };
  /** PM1a event block (PM1 status, PM1 enable): ACPI_PM1_EVT_LEN ports. */
  pm1aEventPort: number;
  /** PM1a control block: ACPI_PM1_CNT_LEN ports. */
  pm1aControlPort: number;
  /**
   * The SCI's ISA IRQ (FADT SCI_INT). Without an override for it in
   * `interruptOverrides` Linux makes it level-triggered, active low
   * (arch/x86/kernel/acpi/boot.c, acpi_sci_ioapic_setup), so no
   * edge-triggered device may use it.
   */
  sciIrq: number;
  /** pvpanic's port; no pvpanic device when absent. */
  pvpanicPort?: number;
  /** virtio-mmio devices, in order: device i gets _UID i. */
  virtioMmio: ReadonlyArray<{ base: number; size: number; gsi: number }>;
  /** A PCI host bridge (PNP0A08) on bus 0, when present. */
  pci?: {
    /** The 32-bit window BARs are assigned from. */
    mmio32: { base: number; size: number };
    /** An optional window above 4 GiB. */
    mmio64?: { base: number | bigint; size: number | bigint };
    /** [slot][pin 0..3 = INTA..INTD] -> GSI, for the _PRT. */
    slotGsis: ReadonlyArray<readonly number[]>;
    /** An ECAM window: adds an MCFG. Left out by default (config via ports 0xCF8). */
    ecam?: EcamWindow;
    /** False sets the FADT's "MSI not supported" flag. Default true. */
    msi?: boolean;
  };
  /** An i8042 at 0x60/0x64 (the reset line). Default true. */
  i8042?: boolean;
  /**
   * Interrupt source overrides. None by default: the MP table (mptable.ts)
   * routes ISA IRQ n to IOAPIC pin n with bus-default polarity and trigger,
   * which is what ACPI assumes without overrides (5.2.12.5). The SCI needs
   * none either: Linux gives IRQ 9 the SCI's level/active-low default, and
   * KVM's IOAPIC ignores polarity for its inputs, so nothing hangs on it.
   */
  interruptOverrides?: readonly InterruptSourceOverride[];
}

/** Where a table ended up in the image. */
export interface AcpiTableLocation {
  address: number;
  length: number;
}

export interface AcpiTables {
  /** The bytes to copy to `baseAddress`. */
  image: Uint8Array;
  rsdpAddress: number;
  /** By signature: RSDP, XSDT, FACP, FACS, APIC, DSDT, MCFG. */
  tables: Record<string, AcpiTableLocation>;
}

const TABLE_ALIGNMENT = 16;
const MAX_APIC_ID = 0xfe; // 0xFF is "invalid" in a Local APIC structure

function align(n: number, alignment = TABLE_ALIGNMENT): number {
  return Math.ceil(n / alignment) * alignment;
}

function check(ok: boolean, message: string): void {
  if (!ok) throw new AcpiError('INVALID_CONFIG', message);
}

function validate(c: AcpiConfig): void {
  check(Number.isInteger(c.cpus) && c.cpus >= 1 && c.cpus <= MAX_APIC_ID + 1, `ACPI: invalid CPU count ${c.cpus}`);
  check(Number.isInteger(c.ioapic.id) && c.ioapic.id >= 0 && c.ioapic.id <= 0xff, `ACPI: invalid IOAPIC id ${c.ioapic.id}`);
  const ports: Array<[number, number]> = [
    [c.com1.port, 1],
    [c.pm1aEventPort, ACPI_PM1_EVT_LEN],
    [c.pm1aControlPort, ACPI_PM1_CNT_LEN],
    ...(c.pvpanicPort === undefined ? [] : [[c.pvpanicPort, 1] as [number, number]]),
  ];
  for (const [port, length] of ports) {
    check(Number.isInteger(port) && port >= 0 && port + length - 1 <= 0xffff, `ACPI: invalid I/O port ${port}`);
  }
  check(
    c.pm1aControlPort >= c.pm1aEventPort + ACPI_PM1_EVT_LEN || c.pm1aControlPort + ACPI_PM1_CNT_LEN <= c.pm1aEventPort,
    'ACPI: the PM1a event and control blocks overlap',
  );
  check(Number.isInteger(c.sciIrq) && c.sciIrq >= 1 && c.sciIrq <= 0xff, `ACPI: invalid SCI IRQ ${c.sciIrq}`);
  c.virtioMmio.forEach((d, i) => {
    check(d.size > 0 && d.base >= 0 && d.base + d.size <= 2 ** 32, `ACPI: virtio-mmio device ${i} must be a non-empty range below 4 GiB`);
    // Linux makes the SCI level/active-low; an edge-triggered device on it would not get its IRQ.
    check(d.gsi !== c.sciIrq, `ACPI: virtio-mmio device ${i} uses GSI ${d.gsi}, the SCI's`);
  });
  check(c.virtioMmio.length <= 256, 'ACPI: at most 256 virtio-mmio devices');
  if (c.pci) {
    const { base, size } = c.pci.mmio32;
    check(size > 0 && base >= 0 && base + size <= 2 ** 32, 'ACPI: the PCI 32-bit window must be a non-empty range below 4 GiB');
    check(c.pci.slotGsis.length <= 32, 'ACPI: PCI bus 0 has 32 slots');
    check(
      c.pci.slotGsis.every((pins) => pins.length <= 4),
      'ACPI: a PCI slot has 4 interrupt pins (INTA-INTD)',
    );
  }
}

/** The IAPC_BOOT_ARCH flags for `config`. */
export function iapcBootArch(config: AcpiConfig): number {
  // LEGACY_DEVICES and 8042 stay set: without 8042 Linux marks the i8042
  // "firmware absent" and its driver gives up unless the DSDT has a PNP0303
  // (reboot=k writes 0xFE to port 0x64 either way).
  let flags = IAPC_BOOT_ARCH.LEGACY_DEVICES | IAPC_BOOT_ARCH.VGA_NOT_PRESENT | IAPC_BOOT_ARCH.PCIE_ASPM_CONTROLS;
  if (config.i8042 ?? true) flags |= IAPC_BOOT_ARCH.I8042;
  if (config.pci && config.pci.msi === false) flags |= IAPC_BOOT_ARCH.MSI_NOT_SUPPORTED;
  return flags;
}

/** Builds every table for `config` as one image to be placed at `baseAddress`. */
export function buildAcpiTables(config: AcpiConfig, baseAddress: number): AcpiTables {
  validate(config);
  check(
    Number.isInteger(baseAddress) && baseAddress >= 0 && baseAddress % TABLE_ALIGNMENT === 0,
    `ACPI: base 0x${baseAddress.toString(16)} must be 16-byte aligned`,
  );

  const pieces: Array<{ signature: string; offset: number; bytes: Uint8Array }> = [];
  const tables: Record<string, AcpiTableLocation> = {};
  let end = 0;
  const place = (signature: string, length: number, alignment = TABLE_ALIGNMENT): number => {
    const offset = align(end, alignment);
    end = offset + length;
    tables[signature] = { address: baseAddress + offset, length };
    return baseAddress + offset;
  };

  // Sizes first, so each table can be given the addresses it points to.
  const dsdt = buildDsdt({
    com1: config.com1,
    pvpanicPort: config.pvpanicPort,
    virtioMmio: config.virtioMmio,
    pci: config.pci,
  });
  const madt = buildMadt({
    cpus: config.cpus,
    lapicAddress: config.lapicAddress,
    ioapic: config.ioapic,
    overrides: config.interruptOverrides ?? [],
  });
  const mcfg = config.pci?.ecam ? buildMcfg(config.pci.ecam) : undefined;
  const xsdtEntries = mcfg ? 3 : 2;

  const rsdpAddress = place('RSDP', RSDP_SIZE);
  const xsdtAddress = place('XSDT', SDT_HEADER_SIZE + 8 * xsdtEntries);
  const fadtAddress = place('FACP', FADT_SIZE);
  // The FACS is not in the XSDT: only the FADT points at it (5.2.10).
  const facsAddress = place('FACS', FACS_SIZE, FACS_ALIGNMENT);
  const madtAddress = place('APIC', madt.length);
  const mcfgAddress = mcfg ? place('MCFG', mcfg.length) : undefined;
  const dsdtAddress = place('DSDT', dsdt.length);

  const fadt = buildFadt({
    dsdtAddress,
    facsAddress,
    sciIrq: config.sciIrq,
    pm1aEventPort: config.pm1aEventPort,
    pm1aControlPort: config.pm1aControlPort,
    iapcBootArch: iapcBootArch(config),
  });
  const xsdt = buildXsdt(mcfgAddress === undefined ? [fadtAddress, madtAddress] : [fadtAddress, madtAddress, mcfgAddress]);
  const rsdp = buildRsdp(xsdtAddress);

  pieces.push({ signature: 'RSDP', offset: rsdpAddress - baseAddress, bytes: rsdp });
  pieces.push({ signature: 'XSDT', offset: xsdtAddress - baseAddress, bytes: xsdt });
  pieces.push({ signature: 'FACP', offset: fadtAddress - baseAddress, bytes: fadt });
  pieces.push({ signature: 'FACS', offset: facsAddress - baseAddress, bytes: buildFacs() });
  pieces.push({ signature: 'APIC', offset: madtAddress - baseAddress, bytes: madt });
  if (mcfg && mcfgAddress !== undefined) pieces.push({ signature: 'MCFG', offset: mcfgAddress - baseAddress, bytes: mcfg });
  pieces.push({ signature: 'DSDT', offset: dsdtAddress - baseAddress, bytes: dsdt });

  const image = new Uint8Array(end);
  for (const p of pieces) {
    if (p.bytes.length !== tables[p.signature]!.length) throw new Error(`ACPI: ${p.signature} size changed while laying out`);
    image.set(p.bytes, p.offset);
  }
  return { image, rsdpAddress, tables };
}

/**
 * Builds the tables and writes them at ACPI_TABLES_START (zeroing the rest
 * of the ACPI region, so no stale RSDP survives). The caller puts
 * `rsdpAddress` in boot_params.acpi_rsdp_addr.
 */
export function writeAcpiTables(mem: GuestMemory, config: AcpiConfig): { rsdpAddress: number; start: number; size: number } {
  const built = buildAcpiTables(config, ACPI_TABLES_START);
  if (built.image.length > ACPI_TABLES_SIZE) {
    throw new AcpiError(
      'TOO_LARGE',
      `ACPI tables take ${built.image.length} bytes; the region at 0x${ACPI_TABLES_START.toString(16)} holds ${ACPI_TABLES_SIZE}`,
    );
  }
  if (!mem.checkRange(ACPI_TABLES_START, ACPI_TABLES_SIZE)) {
    throw new AcpiError('NO_MEMORY', `guest RAM does not cover the ACPI region 0x${ACPI_TABLES_START.toString(16)}+0x${ACPI_TABLES_SIZE.toString(16)}`);
  }
  mem.fill(ACPI_TABLES_START, ACPI_TABLES_SIZE, 0);
  mem.write(ACPI_TABLES_START, built.image);
  return { rsdpAddress: built.rsdpAddress, start: ACPI_TABLES_START, size: built.image.length };
}

export interface LayoutAcpiOptions {
  cpus: number;
  virtioMmio: AcpiConfig['virtioMmio'];
  pci?: AcpiConfig['pci'];
  /** Include the pvpanic device at PVPANIC_PORT. Default true. */
  pvpanic?: boolean;
}

/**
 * An {@link AcpiConfig} from the fixed addresses in layout.ts, with the
 * IOAPIC id the MP table uses (`cpus`), so both descriptions agree.
 */
export function layoutAcpiConfig(o: LayoutAcpiOptions): AcpiConfig {
  return {
    cpus: o.cpus,
    lapicAddress: LAPIC_START,
    ioapic: { id: o.cpus, address: IOAPIC_START, gsiBase: 0 },
    com1: { port: COM1_PORT, irq: COM1_IRQ },
    pm1aEventPort: ACPI_PM1A_EVT_PORT,
    pm1aControlPort: ACPI_PM1A_CNT_PORT,
    sciIrq: ACPI_SCI_IRQ,
    ...(o.pvpanic === false ? {} : { pvpanicPort: PVPANIC_PORT }),
    virtioMmio: o.virtioMmio,
    ...(o.pci ? { pci: o.pci } : {}),
  };
}
