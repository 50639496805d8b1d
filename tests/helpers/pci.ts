/**
 * The guest's side of PCI configuration mechanism #1, for device tests:
 * select a dword with CONFIG_ADDRESS, then access CONFIG_DATA at the byte
 * offset within it, as Linux's pci_conf1_read/write do.
 */
import { PCI_CONFIG_ADDRESS_ENABLE, type PciConfigIo } from '../../src/devices/pci/index.js';
import { PCI_CONFIG_PORT as PCI_CONFIG_ADDRESS_PORT } from '../../src/arch/layout.js';

const CONFIG_DATA_PORT = PCI_CONFIG_ADDRESS_PORT + 4;

export class PciPortIo {
  constructor(readonly io: PciConfigIo) {}

  /** An OUT of `size` bytes to `port` (0xCF8..0xCFF). */
  out(port: number, size: number, value: number): void {
    const b = new Uint8Array(size);
    for (let i = 0; i < size; i++) b[i] = (value >>> (8 * i)) & 0xff;
    this.io.write(port - PCI_CONFIG_ADDRESS_PORT, b);
  }

  /** An IN of `size` bytes from `port`, as an unsigned number. */
  in(port: number, size: number): number {
    const b = new Uint8Array(size);
    this.io.read(port - PCI_CONFIG_ADDRESS_PORT, b);
    return b.reduce((v, byte, i) => v + byte * 2 ** (8 * i), 0);
  }

  select(slot: number, register: number, bus = 0, fn = 0): void {
    this.out(PCI_CONFIG_ADDRESS_PORT, 4, PCI_CONFIG_ADDRESS_ENABLE | (bus << 16) | (slot << 11) | (fn << 8) | (register & 0xfc));
  }

  read(slot: number, register: number, size: number): number {
    this.select(slot, register);
    return this.in(CONFIG_DATA_PORT + (register & 3), size);
  }

  write(slot: number, register: number, size: number, value: number): void {
    this.select(slot, register);
    this.out(CONFIG_DATA_PORT + (register & 3), size, value);
  }
}
