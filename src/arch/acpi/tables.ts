/**
 * The ACPI tables of a tsvmm machine: RSDP, XSDT, FADT, FACS, MADT, DSDT
 * and, when asked for, MCFG. The platform is full (not hardware-reduced)
 * ACPI, presented as QEMU's PIIX4 `-M pc` does: a PM1a event and control
 * block (src/devices/acpi-pm.ts), the SCI on ISA IRQ 9, no SMI command port
 * (always in ACPI mode), no PM timer, no GPE blocks. Full ACPI matters to
 * Linux: in hardware-reduced mode acpi_generic_reduced_hw_init() drops the
 * legacy PIC and the PIT and makes IOAPIC IRQ numbers dynamic, so COM1's
 * IRQ 4 and the i8254 would stop working. Devices are described in the
 * DSDT; soft-off is `\_S5_` written to PM1 control.
 *
 * Each builder returns the finished table (length and checksum filled in)
 * for the addresses it is given; src/arch/acpi/index.ts lays them out.
 * Section numbers are ACPI 6.x (6.3 and later have the same layouts).
 */
import { ACPI_PM1_CNT_LEN, ACPI_PM1_EVT_LEN, ACPI_S5_SLEEP_TYPE } from '../layout.js';
import {
  DWordMemory,
  Device,
  EisaId,
  IO,
  Interrupt,
  Memory32Fixed,
  Method,
  Name,
  One,
  Package,
  QWordMemory,
  ResourceTemplate,
  Return,
  Scope,
  WordBusNumber,
  WordIO,
  Zero,
  concat,
  type Aml,
} from './aml.js';
import { TsvmmKindError } from '../../base/errors.js';

/** OEMID of every table and the RSDP (6 characters). */
export const OEM_ID = 'TSVMM ';
/** OEM Table ID of every table (8 characters). */
export const OEM_TABLE_ID = 'TSVMMACP';
/** OEM Revision of every table. */
export const OEM_REVISION = 1;
/** Creator ID: the "ASL compiler" that made the tables (4 characters). */
export const CREATOR_ID = 'TSVM';
/** Creator Revision. */
export const CREATOR_REVISION = 1;

/** System description table header (5.2.6): 36 bytes. */
export const SDT_HEADER_SIZE = 36;
const SDT = {
  SIGNATURE: 0,
  LENGTH: 4,
  REVISION: 8,
  CHECKSUM: 9,
  OEM_ID: 10,
  OEM_TABLE_ID: 16,
  OEM_REVISION: 24,
  CREATOR_ID: 28,
  CREATOR_REVISION: 32,
} as const;

export class AcpiError extends TsvmmKindError<'INVALID_CONFIG' | 'TOO_LARGE' | 'NO_MEMORY'> {
  constructor(kind: 'INVALID_CONFIG' | 'TOO_LARGE' | 'NO_MEMORY', message: string, options?: { cause?: unknown }) {
    super('ACPI_', kind, message, options);
  }
}

/** The byte that makes `bytes` (with that byte at 0) sum to zero mod 256. */
export function checksum(bytes: Uint8Array): number {
  let sum = 0;
  for (const b of bytes) sum = (sum + b) & 0xff;
  return (0x100 - sum) & 0xff;
}

function ascii(text: string, length: number): Uint8Array {
  if (text.length !== length || !/^[\x20-\x7e]*$/.test(text)) throw new AcpiError('INVALID_CONFIG', `'${text}' must be ${length} printable ASCII characters`);
  return Uint8Array.from(text, (c) => c.charCodeAt(0));
}

/** A table: header (signature, length, revision, checksum, OEM and creator fields) then `body`. */
export function sdt(signature: string, revision: number, body: Uint8Array): Uint8Array {
  const table = new Uint8Array(SDT_HEADER_SIZE + body.length);
  const dv = new DataView(table.buffer);
  table.set(ascii(signature, 4), SDT.SIGNATURE);
  dv.setUint32(SDT.LENGTH, table.length, true);
  dv.setUint8(SDT.REVISION, revision);
  table.set(ascii(OEM_ID, 6), SDT.OEM_ID);
  table.set(ascii(OEM_TABLE_ID, 8), SDT.OEM_TABLE_ID);
  dv.setUint32(SDT.OEM_REVISION, OEM_REVISION, true);
  table.set(ascii(CREATOR_ID, 4), SDT.CREATOR_ID);
  dv.setUint32(SDT.CREATOR_REVISION, CREATOR_REVISION, true);
  table.set(body, SDT_HEADER_SIZE);
  table[SDT.CHECKSUM] = checksum(table);
  return table;
}

// --- RSDP (5.2.5.3) ---

/** Size of the ACPI 2.0+ RSDP. */
export const RSDP_SIZE = 36;
/** The ACPI 1.0 part of the RSDP that `checksum` covers. */
export const RSDP_V1_SIZE = 20;
const RSDP = { SIGNATURE: 0, CHECKSUM: 8, OEM_ID: 9, REVISION: 15, RSDT_ADDRESS: 16, LENGTH: 20, XSDT_ADDRESS: 24, EXTENDED_CHECKSUM: 32 } as const;
/** Revision 2: ACPI 2.0 and later, with Length, XsdtAddress and the extended checksum. */
const RSDP_REVISION = 2;

/** The RSDP pointing at the XSDT (no RSDT: a 64-bit-only OS reads the XSDT). */
export function buildRsdp(xsdtAddress: number | bigint): Uint8Array {
  const rsdp = new Uint8Array(RSDP_SIZE);
  const dv = new DataView(rsdp.buffer);
  rsdp.set(ascii('RSD PTR ', 8), RSDP.SIGNATURE);
  rsdp.set(ascii(OEM_ID, 6), RSDP.OEM_ID);
  dv.setUint8(RSDP.REVISION, RSDP_REVISION);
  dv.setUint32(RSDP.RSDT_ADDRESS, 0, true);
  dv.setUint32(RSDP.LENGTH, RSDP_SIZE, true);
  dv.setBigUint64(RSDP.XSDT_ADDRESS, BigInt(xsdtAddress), true);
  rsdp[RSDP.CHECKSUM] = checksum(rsdp.subarray(0, RSDP_V1_SIZE));
  rsdp[RSDP.EXTENDED_CHECKSUM] = checksum(rsdp);
  return rsdp;
}

// --- XSDT (5.2.8) ---

const XSDT_REVISION = 1;

/** The XSDT: one 64-bit pointer per table (not the DSDT, which the FADT points to). */
export function buildXsdt(tableAddresses: readonly (number | bigint)[]): Uint8Array {
  const body = new Uint8Array(8 * tableAddresses.length);
  const dv = new DataView(body.buffer);
  tableAddresses.forEach((a, i) => {
    dv.setBigUint64(8 * i, BigInt(a), true);
  });
  return sdt('XSDT', XSDT_REVISION, body);
}

// --- FADT (5.2.9) ---

/** FADT revision 6, minor 3: the ACPI 6.3 layout, 276 bytes. */
const FADT_REVISION = 6;
const FADT_MINOR_REVISION = 3;
export const FADT_SIZE = 276;
/** Byte offsets in the FADT (Table 5.9). */
export const FADT = {
  FIRMWARE_CTRL: 36,
  DSDT: 40,
  PREFERRED_PM_PROFILE: 45,
  SCI_INT: 46,
  SMI_CMD: 48,
  PM1A_EVT_BLK: 56,
  PM1B_EVT_BLK: 60,
  PM1A_CNT_BLK: 64,
  PM1B_CNT_BLK: 68,
  PM2_CNT_BLK: 72,
  PM_TMR_BLK: 76,
  GPE0_BLK: 80,
  GPE1_BLK: 84,
  PM1_EVT_LEN: 88,
  PM1_CNT_LEN: 89,
  PM2_CNT_LEN: 90,
  PM_TMR_LEN: 91,
  GPE0_BLK_LEN: 92,
  GPE1_BLK_LEN: 93,
  P_LVL2_LAT: 96,
  P_LVL3_LAT: 98,
  IAPC_BOOT_ARCH: 109,
  FLAGS: 112,
  MINOR_VERSION: 131,
  X_FIRMWARE_CTRL: 132,
  X_DSDT: 140,
  X_PM1A_EVT_BLK: 148,
  X_PM1B_EVT_BLK: 160,
  X_PM1A_CNT_BLK: 172,
  X_PM1B_CNT_BLK: 184,
  X_PM2_CNT_BLK: 196,
  X_PM_TMR_BLK: 208,
  X_GPE0_BLK: 220,
  X_GPE1_BLK: 232,
  SLEEP_CONTROL_REG: 244,
  SLEEP_STATUS_REG: 256,
  HYPERVISOR_VENDOR_IDENTITY: 268,
} as const;

/** IAPC_BOOT_ARCH flags (5.2.9.3, Table 5.11). */
export const IAPC_BOOT_ARCH = {
  /** User-visible devices on the ISA/LPC bus (our COM1). Linux: pnpbios only. */
  LEGACY_DEVICES: 1 << 0,
  /** An 8042 is present: Linux keeps x86_platform.legacy.i8042 "expected present". */
  I8042: 1 << 1,
  /** Do not probe VGA. */
  VGA_NOT_PRESENT: 1 << 2,
  /** Do not enable MSI (Linux: pci_no_msi()). */
  MSI_NOT_SUPPORTED: 1 << 3,
  /** The OS must not enable PCIe ASPM. */
  PCIE_ASPM_CONTROLS: 1 << 4,
  /** No CMOS RTC at 0x70. */
  CMOS_RTC_NOT_PRESENT: 1 << 5,
} as const;

/** FADT Flags (5.2.9, Table 5.10). */
export const FADT_FLAGS = {
  /** WBINVD works (KVM executes it), as QEMU's `-M pc` FADT says. */
  WBINVD: 1 << 0,
  /** C1 (HLT) is supported on every processor. */
  PROC_C1: 1 << 2,
  /** No fixed-feature power button (so Linux adds no LNXPWRBN device). */
  PWR_BUTTON: 1 << 4,
  /** No fixed-feature sleep button. */
  SLP_BUTTON: 1 << 5,
  /** Hardware-reduced ACPI (4.1). Not set: Linux would drop the PIC and the PIT. */
  HW_REDUCED_ACPI: 1 << 20,
} as const;

/** Generic Address Structure (5.2.3.2): 12 bytes. Address space and access size codes. */
export const GAS = { SYSTEM_IO: 1, ACCESS_WORD: 2 } as const;
const HYPERVISOR_VENDOR = 'TSVMM   ';
/** P_LVL2_LAT above 100 and P_LVL3_LAT above 1000: C2 and C3 not supported (5.2.9). */
const C2_NOT_SUPPORTED = 0x0fff;
const C3_NOT_SUPPORTED = 0x0fff;

/** A System I/O GAS for a block of 16-bit registers at `port`, `length` bytes long. */
function writeIoGas(dv: DataView, at: number, port: number, length: number): void {
  dv.setUint8(at, GAS.SYSTEM_IO);
  // ACPICA checks the bit width against the legacy length field (tbfadt.c, "32/64X length mismatch").
  dv.setUint8(at + 1, 8 * length);
  dv.setUint8(at + 2, 0); // bit offset
  dv.setUint8(at + 3, GAS.ACCESS_WORD);
  dv.setBigUint64(at + 4, BigInt(port), true);
}

export interface FadtOptions {
  dsdtAddress: number;
  facsAddress: number;
  /** The SCI's ISA IRQ. */
  sciIrq: number;
  /** PM1a event block: PM1 status then PM1 enable, {@link ACPI_PM1_EVT_LEN} bytes. */
  pm1aEventPort: number;
  /** PM1a control block, {@link ACPI_PM1_CNT_LEN} bytes. */
  pm1aControlPort: number;
  iapcBootArch: number;
}

/**
 * The FADT of a full-ACPI platform without an SMI: SMI_CMD 0 (ACPICA's
 * acpi_hw_get_mode() then reports ACPI mode and acpi_enable() writes
 * nothing), the SCI, the PM1a blocks in both the 32-bit and the X_ fields
 * (ACPICA uses the X_ ones; they agree so it does not warn), no PM1b, PM2,
 * PM timer or GPE blocks (Linux runs without a PM timer: no acpi_pm
 * clocksource), no hardware-reduced sleep registers, and the FACS and DSDT
 * in both the 32-bit and the 64-bit pointer (both are below 4 GiB).
 */
export function buildFadt(o: FadtOptions): Uint8Array {
  const table = new Uint8Array(FADT_SIZE);
  const dv = new DataView(table.buffer);
  dv.setUint32(FADT.FIRMWARE_CTRL, o.facsAddress, true);
  dv.setUint32(FADT.DSDT, o.dsdtAddress, true);
  dv.setUint16(FADT.SCI_INT, o.sciIrq, true);
  dv.setUint32(FADT.SMI_CMD, 0, true);
  dv.setUint32(FADT.PM1A_EVT_BLK, o.pm1aEventPort, true);
  dv.setUint32(FADT.PM1A_CNT_BLK, o.pm1aControlPort, true);
  dv.setUint8(FADT.PM1_EVT_LEN, ACPI_PM1_EVT_LEN);
  dv.setUint8(FADT.PM1_CNT_LEN, ACPI_PM1_CNT_LEN);
  dv.setUint16(FADT.P_LVL2_LAT, C2_NOT_SUPPORTED, true);
  dv.setUint16(FADT.P_LVL3_LAT, C3_NOT_SUPPORTED, true);
  dv.setUint16(FADT.IAPC_BOOT_ARCH, o.iapcBootArch, true);
  dv.setUint32(FADT.FLAGS, FADT_FLAGS.WBINVD | FADT_FLAGS.PROC_C1 | FADT_FLAGS.PWR_BUTTON | FADT_FLAGS.SLP_BUTTON, true);
  dv.setUint8(FADT.MINOR_VERSION, FADT_MINOR_REVISION);
  dv.setBigUint64(FADT.X_FIRMWARE_CTRL, BigInt(o.facsAddress), true);
  dv.setBigUint64(FADT.X_DSDT, BigInt(o.dsdtAddress), true);
  writeIoGas(dv, FADT.X_PM1A_EVT_BLK, o.pm1aEventPort, ACPI_PM1_EVT_LEN);
  writeIoGas(dv, FADT.X_PM1A_CNT_BLK, o.pm1aControlPort, ACPI_PM1_CNT_LEN);
  table.set(ascii(HYPERVISOR_VENDOR, 8), FADT.HYPERVISOR_VENDOR_IDENTITY);
  return sdt('FACP', FADT_REVISION, table.subarray(SDT_HEADER_SIZE));
}

// --- FACS (5.2.10) ---

/** The FACS is 64 bytes and must sit on a 64-byte boundary (5.2.10, Table 5.14). */
export const FACS_SIZE = 64;
export const FACS_ALIGNMENT = 64;
/** Byte offsets in the FACS (Table 5.14). It has no checksum. */
export const FACS = {
  SIGNATURE: 0,
  LENGTH: 4,
  HARDWARE_SIGNATURE: 8,
  FIRMWARE_WAKING_VECTOR: 12,
  GLOBAL_LOCK: 16,
  FLAGS: 20,
  X_FIRMWARE_WAKING_VECTOR: 24,
  VERSION: 32,
  OSPM_FLAGS: 36,
} as const;
/** FACS version 2 (ACPI 4.0 and later). */
const FACS_VERSION = 2;

/**
 * The FACS, which ACPICA requires outside hardware-reduced mode: no waking
 * vector (no S1-S4), the global lock free, no S4BIOS and no 64-bit wake
 * support. The hardware signature is fixed: the hardware never changes
 * across a hibernation that this machine does not offer anyway.
 */
export function buildFacs(): Uint8Array {
  const facs = new Uint8Array(FACS_SIZE);
  const dv = new DataView(facs.buffer);
  facs.set(ascii('FACS', 4), FACS.SIGNATURE);
  dv.setUint32(FACS.LENGTH, FACS_SIZE, true);
  dv.setUint32(FACS.HARDWARE_SIGNATURE, 0, true);
  dv.setUint32(FACS.FIRMWARE_WAKING_VECTOR, 0, true);
  dv.setUint32(FACS.GLOBAL_LOCK, 0, true);
  dv.setUint32(FACS.FLAGS, 0, true);
  dv.setBigUint64(FACS.X_FIRMWARE_WAKING_VECTOR, 0n, true);
  dv.setUint8(FACS.VERSION, FACS_VERSION);
  dv.setUint32(FACS.OSPM_FLAGS, 0, true);
  return facs;
}

// --- MADT (5.2.12) ---

/** MADT revision 5 (ACPI 6.2-6.4). */
const MADT_REVISION = 5;
/** MADT flags: PCAT_COMPAT, the machine has dual 8259s (KVM's in-kernel PIC). */
const MADT_PCAT_COMPAT = 1;
/** Interrupt controller structure types (Table 5.45) and their sizes. */
export const MADT_ENTRY = {
  LOCAL_APIC: { type: 0, length: 8 },
  IO_APIC: { type: 1, length: 12 },
  INTERRUPT_SOURCE_OVERRIDE: { type: 2, length: 10 },
  LOCAL_APIC_NMI: { type: 4, length: 6 },
} as const;
/** Local APIC flags (Table 5.47). */
const LAPIC_ENABLED = 1;
/** Processor UID 0xFF in a Local APIC NMI structure: all processors. */
const ALL_PROCESSORS = 0xff;
/** MPS INTI flags 0: polarity and trigger conform to the bus (Table 5.50). */
const MPS_INTI_CONFORMS = 0;
/** The LAPIC input NMI is wired to, as in the MP table. */
const NMI_LINT = 1;

/** An Interrupt Source Override (5.2.12.5): ISA IRQ `isaIrq` arrives at `gsi`. */
export interface InterruptSourceOverride {
  isaIrq: number;
  gsi: number;
  /** MPS INTI flags: bits 1:0 polarity, 3:2 trigger mode; 0 = conforms to ISA. */
  flags: number;
}

export interface MadtOptions {
  cpus: number;
  lapicAddress: number;
  ioapic: { id: number; address: number; gsiBase: number };
  overrides: readonly InterruptSourceOverride[];
}

/**
 * The MADT: one enabled Processor Local APIC per CPU (ACPI processor UID =
 * APIC ID = index), the IOAPIC, any interrupt source overrides, and NMI on
 * LINT1 of every CPU.
 */
export function buildMadt(o: MadtOptions): Uint8Array {
  const size =
    8 +
    o.cpus * MADT_ENTRY.LOCAL_APIC.length +
    MADT_ENTRY.IO_APIC.length +
    o.overrides.length * MADT_ENTRY.INTERRUPT_SOURCE_OVERRIDE.length +
    MADT_ENTRY.LOCAL_APIC_NMI.length;
  const body = new Uint8Array(size);
  const dv = new DataView(body.buffer);
  dv.setUint32(0, o.lapicAddress, true);
  dv.setUint32(4, MADT_PCAT_COMPAT, true);
  let at = 8;
  for (let id = 0; id < o.cpus; id++) {
    dv.setUint8(at, MADT_ENTRY.LOCAL_APIC.type);
    dv.setUint8(at + 1, MADT_ENTRY.LOCAL_APIC.length);
    dv.setUint8(at + 2, id); // ACPI processor UID
    dv.setUint8(at + 3, id); // APIC ID
    dv.setUint32(at + 4, LAPIC_ENABLED, true);
    at += MADT_ENTRY.LOCAL_APIC.length;
  }
  dv.setUint8(at, MADT_ENTRY.IO_APIC.type);
  dv.setUint8(at + 1, MADT_ENTRY.IO_APIC.length);
  dv.setUint8(at + 2, o.ioapic.id);
  dv.setUint32(at + 4, o.ioapic.address, true);
  dv.setUint32(at + 8, o.ioapic.gsiBase, true);
  at += MADT_ENTRY.IO_APIC.length;
  for (const ov of o.overrides) {
    dv.setUint8(at, MADT_ENTRY.INTERRUPT_SOURCE_OVERRIDE.type);
    dv.setUint8(at + 1, MADT_ENTRY.INTERRUPT_SOURCE_OVERRIDE.length);
    dv.setUint8(at + 2, 0); // bus: ISA
    dv.setUint8(at + 3, ov.isaIrq);
    dv.setUint32(at + 4, ov.gsi, true);
    dv.setUint16(at + 8, ov.flags, true);
    at += MADT_ENTRY.INTERRUPT_SOURCE_OVERRIDE.length;
  }
  dv.setUint8(at, MADT_ENTRY.LOCAL_APIC_NMI.type);
  dv.setUint8(at + 1, MADT_ENTRY.LOCAL_APIC_NMI.length);
  dv.setUint8(at + 2, ALL_PROCESSORS);
  dv.setUint16(at + 3, MPS_INTI_CONFORMS, true);
  dv.setUint8(at + 5, NMI_LINT);
  return sdt('APIC', MADT_REVISION, body);
}

// --- MCFG (PCI Firmware Specification 3.x, 4.1.2) ---

const MCFG_REVISION = 1;

export interface EcamWindow {
  base: number | bigint;
  segment?: number;
  startBus?: number;
  endBus?: number;
}

/** The MCFG: one ECAM allocation (base, segment group, bus range). */
export function buildMcfg(ecam: EcamWindow): Uint8Array {
  const body = new Uint8Array(8 + 16);
  const dv = new DataView(body.buffer);
  dv.setBigUint64(8, BigInt(ecam.base), true);
  dv.setUint16(16, ecam.segment ?? 0, true);
  dv.setUint8(18, ecam.startBus ?? 0);
  dv.setUint8(19, ecam.endBus ?? 0);
  return sdt('MCFG', MCFG_REVISION, body);
}

// --- DSDT (5.2.11.1) ---

/** Revision 2: integers are 64 bits wide (ACPI 6.x, 19.6.28 DefinitionBlock). */
const DSDT_REVISION = 2;
/** _STA: present, enabled, shown in the UI, functioning (6.3.7). */
const STA_PRESENT_AND_WORKING = 0x0f;
/** Length of the COM1 register block. */
const UART_PORTS = 8;
/** The PCI configuration mechanism #1 ports the host bridge itself decodes. */
const PCI_CONFIG_PORT = 0xcf8;
const PCI_CONFIG_PORTS = 8;
/** Highest I/O port. */
const IO_PORT_MAX = 0xffff;

export interface DsdtOptions {
  com1: { port: number; irq: number };
  pvpanicPort?: number | undefined;
  virtioMmio: ReadonlyArray<{ base: number; size: number; gsi: number }>;
  pci?:
    | {
        mmio32: { base: number; size: number };
        mmio64?: { base: number | bigint; size: number | bigint } | undefined;
        slotGsis: ReadonlyArray<readonly number[]>;
      }
    | undefined;
}

function gsiInterrupt(gsi: number): Aml {
  // How Linux's ACPI resource code takes a GSI: edge, active high, exclusive.
  return Interrupt({}, [gsi]);
}

function com1Device(com1: DsdtOptions['com1']): Aml {
  return Device('COM1', [
    Name('_HID', EisaId('PNP0501')),
    Name('_UID', Zero),
    Name('_CRS', ResourceTemplate([IO(com1.port, com1.port, 1, UART_PORTS), gsiInterrupt(com1.irq)])),
  ]);
}

function pvpanicDevice(port: number): Aml {
  return Device('PEVT', [
    Name('_HID', 'QEMU0001'),
    Name('_CRS', ResourceTemplate([IO(port, port, 1, 1)])),
    Method('_STA', { args: 0, serialized: false }, [Return(STA_PRESENT_AND_WORKING)]),
  ]);
}

function virtioMmioDevice(index: number, dev: DsdtOptions['virtioMmio'][number]): Aml {
  return Device(`VR${index.toString(16).toUpperCase().padStart(2, '0')}`, [
    Name('_HID', 'LNRO0005'),
    Name('_UID', index),
    // Cache-coherent DMA (6.2.17): what virtio assumes; x86 Linux assumes it anyway.
    Name('_CCA', One),
    Name('_CRS', ResourceTemplate([Memory32Fixed(dev.base, dev.size), gsiInterrupt(dev.gsi)])),
  ]);
}

function pciHostBridge(pci: NonNullable<DsdtOptions['pci']>): Aml {
  const { mmio32, mmio64 } = pci;
  const windows: Aml[] = [
    WordBusNumber({ min: 0, max: 0, length: 1 }),
    IO(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORTS),
    WordIO({ min: 0, max: PCI_CONFIG_PORT - 1, length: PCI_CONFIG_PORT }),
    // 0xD00 up: 0xCF8-0xCFF are the config ports above, 0xD00 is where the PC leaves room.
    WordIO({ min: 0xd00, max: IO_PORT_MAX, length: IO_PORT_MAX - 0xd00 + 1 }),
    DWordMemory({ min: mmio32.base, max: mmio32.base + mmio32.size - 1, length: mmio32.size }),
  ];
  if (mmio64) {
    const base = BigInt(mmio64.base);
    const size = BigInt(mmio64.size);
    windows.push(QWordMemory({ min: base, max: base + size - 1n, length: size }));
  }
  // _PRT (6.2.13): { address 0xSSSSFFFF (any function of slot S), pin 0-3, source Zero (a GSI), GSI }.
  const routes = pci.slotGsis.flatMap((pins, slot) => pins.map((gsi, pin) => Package([((slot << 16) | 0xffff) >>> 0, pin, Zero, gsi])));
  return Device('PCI0', [
    Name('_HID', EisaId('PNP0A08')),
    Name('_CID', EisaId('PNP0A03')),
    Name('_ADR', Zero),
    Name('_SEG', Zero),
    Name('_UID', Zero),
    Name('_BBN', Zero),
    Name('_CRS', ResourceTemplate(windows)),
    Name('_PRT', Package(routes)),
  ]);
}

/**
 * The DSDT: `\_S5_` (soft-off, SLP_TYP {@link ACPI_S5_SLEEP_TYPE} in PM1
 * control bits 10-12) and, under
 * `\_SB_`, COM1, pvpanic, each virtio-mmio device and the PCI host bridge.
 */
export function buildDsdt(o: DsdtOptions): Uint8Array {
  const devices: Aml[] = [com1Device(o.com1)];
  if (o.pvpanicPort !== undefined) devices.push(pvpanicDevice(o.pvpanicPort));
  o.virtioMmio.forEach((dev, i) => {
    devices.push(virtioMmioDevice(i, dev));
  });
  if (o.pci) devices.push(pciHostBridge(o.pci));
  const aml = concat([
    // SLP_TYPa, SLP_TYPb, reserved, reserved: SLP_TYPa goes to PM1a control; there is no PM1b.
    Name('\\_S5_', Package([ACPI_S5_SLEEP_TYPE, 0, 0, 0])),
    Scope('\\_SB_', devices),
  ]);
  return sdt('DSDT', DSDT_REVISION, aml);
}
