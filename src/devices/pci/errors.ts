/** The one error class of the PCI model: configuration mistakes of the VMM, never guest faults. */
import { TsvmmKindError } from '../../base/errors.js';

export type PciErrorCode =
  /** A BAR definition that cannot exist (index, size, kind). */
  | 'PCI_BAD_BAR'
  /** A capability's writable range lies outside it. */
  | 'PCI_BAD_CAPABILITY'
  /** The capabilities do not fit in the 256-byte configuration space. */
  | 'PCI_CONFIG_FULL'
  /** A slot number outside 0..31, or one already taken. */
  | 'PCI_BAD_SLOT'
  /** All 32 slots of bus 0 are taken. */
  | 'PCI_BUS_FULL'
  /** A BAR does not fit in what is left of its address window. */
  | 'PCI_WINDOW_FULL'
  /** A BAR of a kind the allocator was given no window for. */
  | 'PCI_NO_WINDOW';

export class PciError extends TsvmmKindError<PciErrorCode> {
  constructor(kind: PciErrorCode, message: string, options?: { cause?: unknown }) {
    super('', kind, message, options);
  }
}
