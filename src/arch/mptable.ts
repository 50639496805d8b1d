/**
 * The Intel MultiProcessor table (MP spec 1.4), which tells a kernel
 * without ACPI about its CPUs, the IOAPIC and how ISA IRQs reach it. Linux
 * finds the floating pointer by scanning the last KiB below 640 KiB.
 */
import type { GuestMemory } from '../base/memory.js';
import { IOAPIC_START, IRQ_MAX, LAPIC_START, MPTABLE_START } from './layout.js';

/** MP spec 1.4, section 4.1: floating pointer, 16 bytes. */
const MPF_SIGNATURE = '_MP_';
const MPF_SIZE = 16;
/** Section 4.2: configuration table header, 44 bytes. */
const MPC_SIGNATURE = 'PCMP';
const MPC_HEADER_SIZE = 44;
const MP_SPEC_REV = 4;
/** Section 4.3: entry types and sizes. */
const ENTRY_PROCESSOR = 0;
const ENTRY_BUS = 1;
const ENTRY_IOAPIC = 2;
const ENTRY_IO_INTERRUPT = 3;
const ENTRY_LOCAL_INTERRUPT = 4;
const PROCESSOR_ENTRY_SIZE = 20;
const OTHER_ENTRY_SIZE = 8;
const CPU_ENABLED = 1;
const CPU_BSP = 2;
/** Local APIC version as KVM's in-kernel LAPIC reports it (integrated APIC). */
const LAPIC_VERSION = 0x14;
const IOAPIC_VERSION = 0x11;
const IOAPIC_ENABLED = 1;
/** Interrupt types (table 4-8). */
const INT_TYPE_INT = 0;
const INT_TYPE_NMI = 1;
const INT_TYPE_EXTINT = 3;
/** Polarity and trigger "conform to the bus" (ISA: active high, edge). */
const INT_FLAGS_CONFORM = 0;
const ISA_BUS_ID = 0;
/** Destination "all local APICs". */
const ALL_LAPICS = 0xff;
/** Family 6 signature bits a kernel only logs. */
const CPU_SIGNATURE = 0x600;
/** CPUID.1:EDX FPU and APIC bits, which the table echoes. */
const CPU_FEATURES = (1 << 0) | (1 << 9);

function checksum(bytes: Uint8Array): number {
  let sum = 0;
  for (const b of bytes) sum = (sum + b) & 0xff;
  return (0x100 - sum) & 0xff;
}

/** The size of the structures written for `cpus` CPUs. */
export function mpTableSize(cpus: number): number {
  const entries = cpus * PROCESSOR_ENTRY_SIZE + OTHER_ENTRY_SIZE * (1 + 1 + (IRQ_MAX + 1) + 2);
  return MPF_SIZE + MPC_HEADER_SIZE + entries;
}

/**
 * Writes the floating pointer and configuration table for `cpus` CPUs
 * (APIC IDs 0..cpus-1, CPU 0 the bootstrap processor), one ISA bus, one
 * IOAPIC (ID `cpus`) with ISA IRQ n on pin n for every pin, ExtINT on LINT0
 * and NMI on LINT1. Returns the guest address of the floating pointer.
 */
export function writeMpTable(mem: GuestMemory, cpus: number, base = MPTABLE_START): number {
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 254) throw new RangeError(`MP table: invalid CPU count ${cpus}`);
  const total = mpTableSize(cpus);
  const buf = new Uint8Array(total);
  const view = new DataView(buf.buffer);
  const tableAddr = base + MPF_SIZE;
  const table = buf.subarray(MPF_SIZE);
  const tv = new DataView(table.buffer, table.byteOffset, table.byteLength);

  let at = MPC_HEADER_SIZE;
  let count = 0;
  for (let id = 0; id < cpus; id++) {
    tv.setUint8(at, ENTRY_PROCESSOR);
    tv.setUint8(at + 1, id);
    tv.setUint8(at + 2, LAPIC_VERSION);
    tv.setUint8(at + 3, CPU_ENABLED | (id === 0 ? CPU_BSP : 0));
    tv.setUint32(at + 4, CPU_SIGNATURE, true);
    tv.setUint32(at + 8, CPU_FEATURES, true);
    at += PROCESSOR_ENTRY_SIZE;
    count++;
  }
  tv.setUint8(at, ENTRY_BUS);
  tv.setUint8(at + 1, ISA_BUS_ID);
  table.set(new TextEncoder().encode('ISA   '), at + 2);
  at += OTHER_ENTRY_SIZE;
  count++;
  const ioapicId = cpus;
  tv.setUint8(at, ENTRY_IOAPIC);
  tv.setUint8(at + 1, ioapicId);
  tv.setUint8(at + 2, IOAPIC_VERSION);
  tv.setUint8(at + 3, IOAPIC_ENABLED);
  tv.setUint32(at + 4, IOAPIC_START, true);
  at += OTHER_ENTRY_SIZE;
  count++;
  for (let irq = 0; irq <= IRQ_MAX; irq++) {
    tv.setUint8(at, ENTRY_IO_INTERRUPT);
    tv.setUint8(at + 1, INT_TYPE_INT);
    tv.setUint16(at + 2, INT_FLAGS_CONFORM, true);
    tv.setUint8(at + 4, ISA_BUS_ID);
    tv.setUint8(at + 5, irq);
    tv.setUint8(at + 6, ioapicId);
    tv.setUint8(at + 7, irq);
    at += OTHER_ENTRY_SIZE;
    count++;
  }
  for (const [type, lint] of [
    [INT_TYPE_EXTINT, 0],
    [INT_TYPE_NMI, 1],
  ] as const) {
    tv.setUint8(at, ENTRY_LOCAL_INTERRUPT);
    tv.setUint8(at + 1, type);
    tv.setUint16(at + 2, INT_FLAGS_CONFORM, true);
    tv.setUint8(at + 4, ISA_BUS_ID);
    tv.setUint8(at + 5, 0);
    tv.setUint8(at + 6, ALL_LAPICS);
    tv.setUint8(at + 7, lint);
    at += OTHER_ENTRY_SIZE;
    count++;
  }

  // Configuration table header (section 4.2).
  table.set(new TextEncoder().encode(MPC_SIGNATURE), 0);
  tv.setUint16(4, at, true);
  tv.setUint8(6, MP_SPEC_REV);
  table.set(new TextEncoder().encode('TSVMM   '), 8);
  table.set(new TextEncoder().encode('TSVMM-MICROVM'.slice(0, 12)), 16);
  tv.setUint16(34, count, true);
  tv.setUint32(36, LAPIC_START, true);
  tv.setUint8(7, checksum(table.subarray(0, at)));

  // Floating pointer (section 4.1): feature byte 1 = 0 means "a table follows".
  buf.set(new TextEncoder().encode(MPF_SIGNATURE), 0);
  view.setUint32(4, tableAddr, true);
  view.setUint8(8, 1);
  view.setUint8(9, MP_SPEC_REV);
  view.setUint8(10, checksum(buf.subarray(0, MPF_SIZE)));

  mem.write(base, buf.subarray(0, MPF_SIZE + at));
  return base;
}
