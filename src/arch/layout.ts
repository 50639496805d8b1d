/**
 * Every fixed guest-physical address of a tsvmm x86-64 machine, in one
 * place. Anything that puts a structure in guest memory, maps a device or
 * picks an IRQ takes its number from here, so two users can never disagree
 * and overlaps can be seen at a glance.
 *
 * Low memory map (below 1 MiB):
 *
 * | range                 | what                                          |
 * | --------------------- | --------------------------------------------- |
 * | 0x00500 - 0x0052f     | boot GDT                                      |
 * | 0x00530 - 0x0053f     | boot IDT (empty)                              |
 * | 0x07000 - 0x07fff     | zero page (struct boot_params)                |
 * | 0x08000 - 0x08fff     | boot stack (grows down from 0x8ff0)           |
 * | 0x09000 - 0x0efff     | identity page tables (PML4, PDPT, 4 PDs)      |
 * | 0x20000 - 0x20fff     | kernel command line                           |
 * | 0x9fc00 - 0x9ffff     | EBDA: MP table for SMP                        |
 * | 0xa0000 - 0xfffff     | legacy VGA/BIOS hole, reserved in the e820 map|
 * | 0xe0000 - 0xfffff     | ACPI tables, RSDP first (inside the hole)     |
 * | 0x100000 -            | kernel (HIMEM_START), then initrd at the top  |
 *
 * Above the RAM: 3 GiB to 4 GiB is the MMIO gap (virtio-mmio, IOAPIC, LAPIC,
 * KVM's TSS and identity-map pages); RAM beyond 3 GiB continues at 4 GiB.
 */
import { TsvmmKindError } from '../base/errors.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Guest page size: the unit KVM memory slots and the initrd placement use. */
export const PAGE_SIZE = 4 * KiB;

// --- Boot structures written by the loader (src/arch/boot) ---

/**
 * Boot GDT. Below the zero page, in memory no BIOS owns (we have none); the
 * kernel loads its own GDT within its first instructions, so this one only
 * has to live until then. Same place as Firecracker's.
 */
export const BOOT_GDT_START = 0x500;
/**
 * Entries in the boot GDT: null, unused, code (selector 0x10), data (0x18),
 * and a 16-byte TSS descriptor (0x20). The boot protocol fixes __BOOT_CS =
 * 0x10 and __BOOT_DS = 0x18 (Documentation/x86/boot.rst, 64-bit protocol).
 */
export const BOOT_GDT_ENTRIES = 6;
/** Boot IDT: one empty gate right after the GDT. An exception before the
 * kernel installs its own IDT then ends in a triple fault (a clean VM exit)
 * instead of jumping through garbage. */
export const BOOT_IDT_START = BOOT_GDT_START + BOOT_GDT_ENTRIES * 8;
/** Size of the boot IDT: one 16-byte long-mode gate. */
export const BOOT_IDT_SIZE = 16;

/**
 * The zero page (struct boot_params, 4 KiB). %rsi points here at kernel
 * entry. Firecracker's address; clear of the GDT below and the stack above.
 */
export const ZERO_PAGE_START = 0x7000;
/** Size of struct boot_params. */
export const ZERO_PAGE_SIZE = 4 * KiB;

/**
 * Initial stack pointer. The kernel sets up its own stack at once, but the
 * decompressor and startup code may push before that; 0x8000-0x8ff0 is
 * free and lies between the zero page and the page tables.
 */
export const BOOT_STACK_POINTER = 0x8ff0;

/** PML4 of the boot identity map; CR3 points here. */
export const PML4_START = 0x9000;
/** The one PDPT; its first 4 entries cover 0-4 GiB. */
export const PDPT_START = 0xa000;
/** First of the page directories, one 4 KiB page per GiB mapped. */
export const PD_START = 0xb000;
/**
 * Page directories: 4 of them, identity-mapping 0-4 GiB with 2 MiB pages,
 * so the kernel, zero page, command line, initrd and the MMIO gap are all
 * reachable at entry (boot.rst asks for the kernel's init_size, the zero
 * page and the command line to be identity mapped). They end at 0xf000.
 */
export const PD_COUNT = 4;
/** Memory the identity map covers: PD_COUNT GiB. */
export const IDENTITY_MAP_SIZE = PD_COUNT * GiB;

/**
 * Kernel command line. Above the page tables and below the EBDA, in memory
 * the kernel does not touch before it copies the line (Firecracker's address).
 */
export const CMDLINE_START = 0x20000;
/**
 * Bytes reserved for the command line including its NUL. x86 Linux accepts
 * at most COMMAND_LINE_SIZE = 2048 (arch/x86/include/asm/setup.h) and says
 * so in the header's cmdline_size; 4 KiB leaves room for kernels that raise it.
 */
export const CMDLINE_MAX_SIZE = 4 * KiB;

/**
 * Extended BIOS Data Area: the last KiB below 640 KiB. Linux scans it for
 * the MP floating pointer, so the MP table (SMP) goes here. Marked reserved
 * in the e820 map together with the rest of the legacy hole up to 1 MiB.
 */
export const EBDA_START = 0x9fc00;
/** Size of the EBDA. */
export const EBDA_SIZE = 1 * KiB;
/** The MP floating pointer and table live at the start of the EBDA. */
export const MPTABLE_START = EBDA_START;

/**
 * ACPI tables (src/arch/acpi), RSDP first. Linux looks for the RSDP on
 * 16-byte boundaries in 0xE0000-0xFFFFF when the boot protocol does not
 * hand it over (ACPI 6.x, 5.2.5.1), and this range is inside the legacy
 * hole that the e820 map already reserves.
 */
export const ACPI_TABLES_START = 0xe0000;
/** Bytes for the ACPI tables: up to 1 MiB (HIMEM_START). */
export const ACPI_TABLES_SIZE = 0x20000;

/**
 * Start of "high" memory: the protected-mode kernel of a bzImage is loaded
 * here (boot.rst: the traditional 0x100000), and nothing the VMM places may
 * be at or above it except the kernel and initrd.
 */
export const HIMEM_START = 1 * MiB;

// --- RAM and the MMIO gap ---

/**
 * RAM stops at 3 GiB; 3 GiB to 4 GiB is the MMIO gap, where 32-bit devices
 * (IOAPIC, LAPIC, virtio-mmio) must live. RAM beyond 3 GiB is placed at 4 GiB.
 */
export const MMIO_GAP_START = 3 * GiB;
/** End of the MMIO gap: 4 GiB. */
export const MMIO_GAP_END = 4 * GiB;
/** Where RAM beyond the first 3 GiB continues. */
export const HIGH_RAM_START = MMIO_GAP_END;

/** IOAPIC registers: the architectural default, which KVM's in-kernel IOAPIC uses. */
export const IOAPIC_START = 0xfec0_0000;
/** Local APIC registers: the architectural default (IA32_APIC_BASE reset value). */
export const LAPIC_START = 0xfee0_0000;

/**
 * KVM_SET_TSS_ADDR: three pages Intel VMX needs for real-mode emulation.
 * In the gap, above the APICs, where no RAM or device is (Firecracker's).
 */
export const KVM_TSS_ADDR = 0xfffb_d000;
/** KVM_SET_IDENTITY_MAP_ADDR: one page just below the TSS pages. */
export const KVM_IDENTITY_MAP_ADDR = 0xfffb_c000;

// --- Devices ---

/** First virtio-mmio device; well inside the MMIO gap, below the APICs. */
export const VIRTIO_MMIO_START = 0xd000_0000;
/** Each virtio-mmio device gets one page of registers (virtio 1.x, 4.2.2). */
export const VIRTIO_MMIO_SIZE = 0x1000;

/**
 * PCI configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at
 * 0xCFC-0xCFF (PCI Local Bus 3.0, 3.2.2.3.2).
 */
export const PCI_CONFIG_PORT = 0xcf8;
/** The eight ports of configuration mechanism #1. */
export const PCI_CONFIG_PORT_SIZE = 8;
/**
 * The window that PCI memory BARs are assigned from, as firmware would:
 * 256 MiB at the start of the MMIO gap, below the virtio-mmio devices.
 */
export const PCI_MMIO_START = MMIO_GAP_START;
/** Size of the PCI memory window. */
export const PCI_MMIO_SIZE = 256 * MiB;
/** PCI devices on bus 0 (slot 0 is the host bridge). */
export const PCI_MAX_SLOTS = 32;

/**
 * ACPI PM1a event block (ACPI 6.x, 4.8.3.1): PM1 status (2 bytes) then PM1
 * enable (2 bytes), the FADT's PM1a_EVT_BLK. 0x600 is where QEMU's PIIX4
 * puts its PM base, so traces read alike; the block is below 0x1000, where
 * Linux never places PCI I/O BARs (PCIBIOS_MIN_IO).
 */
export const ACPI_PM1A_EVT_PORT = 0x600;
/** ACPI PM1a control block (ACPI 6.x, 4.8.3.2), 2 bytes, right after the event block. */
export const ACPI_PM1A_CNT_PORT = 0x604;
/** The FADT's PM1_EVT_LEN: status and enable, 2 bytes each. */
export const ACPI_PM1_EVT_LEN = 4;
/** The FADT's PM1_CNT_LEN. */
export const ACPI_PM1_CNT_LEN = 2;
/** Ports one device (src/devices/acpi-pm.ts) covers from ACPI_PM1A_EVT_PORT: both blocks. */
export const ACPI_PM_PORT_SIZE = ACPI_PM1_EVT_LEN + ACPI_PM1_CNT_LEN;
/**
 * The SLP_TYP value of S5 (soft-off) on this machine: the DSDT's `\_S5_`
 * package carries it and a PM1 control write with it and SLP_EN powers off.
 * 5, so it reads as "S5" in a trace; it fits the 3-bit field.
 */
export const ACPI_S5_SLEEP_TYPE = 5;
/**
 * The SCI's ISA IRQ, the FADT's SCI_INT: 9, as on a PIIX4 PC. Without an
 * interrupt source override Linux sets it up level-triggered, active low
 * (acpi_sci_ioapic_setup), so no edge-triggered virtio-mmio device may
 * share it: virtioMmioSlot() skips it.
 */
export const ACPI_SCI_IRQ = 9;
/** pvpanic (QEMU docs/specs/pvpanic.rst): QEMU's ISA port, so guests find it where they expect. */
export const PVPANIC_PORT = 0x505;

/** COM1: the legacy port base and ISA IRQ every PC OS expects. */
export const COM1_PORT = 0x3f8;
/** COM1's ISA IRQ. */
export const COM1_IRQ = 4;
/** COM2, COM3, COM4: Linux probes them; tsvmm answers as absent UARTs. */
export const ABSENT_UART_PORTS: readonly number[] = [0x2f8, 0x3e8, 0x2e8];
/** i8042 keyboard controller IRQ (used for the reset line; aux is off). */
export const I8042_IRQ = 1;
/** The i8042's data port and its command/status port. */
export const I8042_DATA_PORT = 0x60;
export const I8042_COMMAND_PORT = 0x64;
/** The i8254 PIT's four ports (counters 0-2, mode/command) and channel 0's ISA IRQ. */
export const PIT_PORT = 0x40;
export const PIT_IRQ = 0;
/** Port B (0x61): the PC speaker gate and PIT channel 2's output. */
export const PORT_B_PORT = 0x61;
/** The MC146818 RTC/CMOS index and data ports. */
export const CMOS_PORT = 0x70;
/** The POST code port; Linux also writes it as an I/O delay (`outb_p`). */
export const DEBUG_PORT = 0x80;
/**
 * Virtio devices take IRQs from 5 up: 0-4 belong to the PIT, keyboard,
 * cascade, COM2 and COM1, and 9 (ACPI_SCI_IRQ) is skipped. The last is the
 * IOAPIC's last pin (24 pins).
 */
export const VIRTIO_IRQ_BASE = 5;
/** The IOAPIC's last pin (24 pins): the last GSI wired to a pin. */
export const IRQ_MAX = 23;
/**
 * PCI INTA#-INTD#, level-triggered, for devices that do not use MSI-X:
 * the IOAPIC's last four pins, swizzled by slot (ACPI _PRT).
 */
export const PCI_INTX_GSIS: readonly number[] = [20, 21, 22, 23];
/** Last IRQ a virtio-mmio device may use: the pin below the PCI INTx lines. */
export const VIRTIO_MMIO_IRQ_MAX = 19;
/** How many virtio-mmio devices the IRQ range allows: all but the SCI's IRQ. */
export const VIRTIO_MMIO_MAX_DEVICES = VIRTIO_MMIO_IRQ_MAX - VIRTIO_IRQ_BASE;

/** Interrupt pin INTA# as an index (0 = INTA# ... 3 = INTD#). */
export const PCI_INTERRUPT_PIN_INTA_INDEX = 0;

/** The GSI of PCI slot `slot`'s interrupt pin `pin` (0 = INTA#): the usual swizzle. */
export function pciIntxGsi(slot: number, pin: number): number {
  return PCI_INTX_GSIS[(slot + pin) % PCI_INTX_GSIS.length]!;
}

export class LayoutError extends TsvmmKindError<'INVALID_MEMORY_SIZE' | 'NO_VIRTIO_SLOT'> {
  constructor(kind: 'INVALID_MEMORY_SIZE' | 'NO_VIRTIO_SLOT', message: string) {
    super('LAYOUT_', kind, message);
  }
}

/** Where the `index`-th virtio-mmio device lives and which IRQ it raises (never ACPI_SCI_IRQ). */
export function virtioMmioSlot(index: number): { base: number; size: number; irq: number } {
  if (!Number.isInteger(index) || index < 0 || index >= VIRTIO_MMIO_MAX_DEVICES) {
    throw new LayoutError(
      'NO_VIRTIO_SLOT',
      `virtio-mmio device ${index} does not fit: at most ${VIRTIO_MMIO_MAX_DEVICES} devices (IRQs ${VIRTIO_IRQ_BASE}-${VIRTIO_MMIO_IRQ_MAX} but the SCI's ${ACPI_SCI_IRQ})`,
    );
  }
  const irq = VIRTIO_IRQ_BASE + index;
  return {
    base: VIRTIO_MMIO_START + index * VIRTIO_MMIO_SIZE,
    size: VIRTIO_MMIO_SIZE,
    irq: irq >= ACPI_SCI_IRQ ? irq + 1 : irq,
  };
}

/** One piece of guest RAM as the VMM registers it with KVM. */
export interface RamRegion {
  guestAddr: number;
  size: number;
}

/**
 * The guest RAM layout for `memSize` bytes: one region from 0 up to
 * min(memSize, 3 GiB), and the rest, if any, from 4 GiB up, leaving the
 * MMIO gap free. `memSize` must be a positive multiple of the page size.
 */
export function ramRegions(memSize: number): RamRegion[] {
  if (!Number.isSafeInteger(memSize) || memSize <= 0 || memSize % PAGE_SIZE !== 0) {
    throw new LayoutError('INVALID_MEMORY_SIZE', `guest memory size must be a positive multiple of ${PAGE_SIZE} bytes (got ${memSize})`);
  }
  const low = Math.min(memSize, MMIO_GAP_START);
  const regions: RamRegion[] = [{ guestAddr: 0, size: low }];
  if (memSize > low) regions.push({ guestAddr: HIGH_RAM_START, size: memSize - low });
  return regions;
}
