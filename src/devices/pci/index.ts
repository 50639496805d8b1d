/**
 * PCI: configuration space with BARs and capabilities, MSI-X, bus 0 with
 * its host bridge, configuration mechanism #1 and ECAM, BAR allocation.
 */
export * from './config-space.js';
export * from './device.js';
export * from './errors.js';
export * from './msix.js';
export * from './pci-bus.js';
