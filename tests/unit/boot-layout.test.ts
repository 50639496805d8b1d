import { describe, expect, it } from 'vitest';
import * as layout from '../../src/arch/layout.js';
import { LayoutError, ramRegions, virtioMmioSlot } from '../../src/arch/layout.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

describe('ramRegions', () => {
  it('gives one region from 0 when the memory fits below the MMIO gap', () => {
    expect(ramRegions(256 * MiB)).toEqual([{ guestAddr: 0, size: 256 * MiB }]);
    expect(ramRegions(3 * GiB)).toEqual([{ guestAddr: 0, size: 3 * GiB }]);
  });

  it('puts memory beyond 3 GiB above 4 GiB, leaving the MMIO gap free', () => {
    expect(ramRegions(5 * GiB)).toEqual([
      { guestAddr: 0, size: 3 * GiB },
      { guestAddr: 4 * GiB, size: 2 * GiB },
    ]);
  });

  it('rejects sizes that are not positive page multiples', () => {
    for (const bad of [0, -4096, 4097, 1.5, Number.NaN]) {
      expect(() => ramRegions(bad)).toThrow(LayoutError);
    }
  });
});

describe('virtioMmioSlot', () => {
  it('gives each device its own page in the window and its own IRQ from 5 up', () => {
    expect(virtioMmioSlot(0)).toEqual({ base: 0xd000_0000, size: 0x1000, irq: 5 });
    expect(virtioMmioSlot(2)).toEqual({ base: 0xd000_2000, size: 0x1000, irq: 7 });
    const last = virtioMmioSlot(layout.VIRTIO_MMIO_MAX_DEVICES - 1);
    expect(last.irq).toBe(layout.VIRTIO_MMIO_IRQ_MAX);
    expect(layout.PCI_INTX_GSIS).not.toContain(last.irq);
  });

  it('skips the ACPI SCI (IRQ 9), which Linux makes level-triggered, active low', () => {
    const irqs = Array.from({ length: layout.VIRTIO_MMIO_MAX_DEVICES }, (_, i) => virtioMmioSlot(i).irq);
    expect(irqs).toEqual([5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]);
    expect(irqs).not.toContain(layout.ACPI_SCI_IRQ);
    expect(new Set(irqs).size).toBe(irqs.length);
  });

  it('refuses a device beyond the IRQ range', () => {
    expect(() => virtioMmioSlot(layout.VIRTIO_MMIO_MAX_DEVICES)).toThrow(/at most 14 devices/);
    expect(() => virtioMmioSlot(-1)).toThrow(LayoutError);
  });
});

describe('fixed addresses', () => {
  it('keeps the low-memory boot structures apart from each other and below 1 MiB', () => {
    const areas: Array<[string, number, number]> = [
      ['gdt', layout.BOOT_GDT_START, layout.BOOT_GDT_ENTRIES * 8],
      ['idt', layout.BOOT_IDT_START, layout.BOOT_IDT_SIZE],
      ['zero page', layout.ZERO_PAGE_START, layout.ZERO_PAGE_SIZE],
      ['stack', 0x8000, layout.BOOT_STACK_POINTER - 0x8000 + 16],
      ['pml4', layout.PML4_START, layout.PAGE_SIZE],
      ['pdpt', layout.PDPT_START, layout.PAGE_SIZE],
      ['pd', layout.PD_START, layout.PD_COUNT * layout.PAGE_SIZE],
      ['cmdline', layout.CMDLINE_START, layout.CMDLINE_MAX_SIZE],
      ['ebda', layout.EBDA_START, layout.EBDA_SIZE],
    ];
    for (const [name, start, size] of areas) {
      expect(start + size, name).toBeLessThanOrEqual(layout.HIMEM_START);
    }
    const sorted = [...areas].sort((a, b) => a[1] - b[1]);
    for (let i = 1; i < sorted.length; i++) {
      const [prevName, prevStart, prevSize] = sorted[i - 1]!;
      expect(prevStart + prevSize, `${prevName} overlaps ${sorted[i]![0]}`).toBeLessThanOrEqual(sorted[i]![1]);
    }
  });

  it('keeps devices and KVM pages inside the MMIO gap', () => {
    const inGap = (a: number) => a >= layout.MMIO_GAP_START && a < layout.MMIO_GAP_END;
    expect(inGap(layout.IOAPIC_START)).toBe(true);
    expect(inGap(layout.LAPIC_START)).toBe(true);
    expect(inGap(layout.VIRTIO_MMIO_START)).toBe(true);
    expect(inGap(layout.KVM_TSS_ADDR + 3 * layout.PAGE_SIZE - 1)).toBe(true);
    expect(layout.KVM_IDENTITY_MAP_ADDR + layout.PAGE_SIZE).toBeLessThanOrEqual(layout.KVM_TSS_ADDR);
    const lastVirtio = virtioMmioSlot(layout.VIRTIO_MMIO_MAX_DEVICES - 1);
    expect(lastVirtio.base + lastVirtio.size).toBeLessThanOrEqual(layout.IOAPIC_START);
    expect(layout.COM1_IRQ).toBeLessThan(layout.VIRTIO_IRQ_BASE);
  });
});
