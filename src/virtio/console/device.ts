/**
 * virtio-console (virtio 1.2 section 5.3), one port without MULTIPORT: the
 * guest's `hvc0`. Queue 0 (receiveq) carries host input to the guest,
 * queue 1 (transmitq) the guest's output. A guest prints a whole buffer
 * with one notification instead of two port I/O exits per byte on the
 * UART, which is what makes a verbose boot cheap.
 *
 * Output goes to `output` as it arrives (the console stream above it
 * holds it for a slow reader, up to its limit). Input waits in a bounded
 * host-side queue until the guest has posted receive buffers; each time
 * some is taken, `onInputTaken` lets the writer go on (back-pressure).
 */
import { GuestEventLog, silentLogger, type Logger } from '../../base/log.js';
import type { GuestMemory } from '../../base/memory.js';
import { readConfigBytes, type VirtioActivation, type VirtioDevice, type VirtioInterrupt } from '../device.js';
import { VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_CONSOLE, featureMask } from '../features.js';
import { CHAINS_PER_TURN, LaterTurn, QueueError, serveChains, type Queue } from '../queue.js';

export const CONSOLE_RX_QUEUE = 0;
export const CONSOLE_TX_QUEUE = 1;
export const CONSOLE_QUEUE_SIZE = 128;

/**
 * The most one output chain may hold. Linux's hvc layer writes at most a
 * page at a time; a chain of guest-sized buffers is refused rather than
 * copied.
 */
export const MAX_TX_CHAIN_BYTES = 1 << 20;

/** Output copied per turn of the event loop before the rest waits for the next turn. */
export const TX_BYTES_PER_TURN = 256 * 1024;

/** struct virtio_console_config (5.3.4): cols, rows (le16), max_nr_ports, emerg_wr (le32). */
export const CONSOLE_CONFIG_SIZE = 12;

export interface ConsoleDeviceOptions {
  /** The guest's output, in order. */
  output: (bytes: Uint8Array) => void;
  /** Some queued input reached the guest. */
  onInputTaken?: () => void;
  queueSize?: number;
  logger?: Logger;
}

export interface ConsoleDeviceStats {
  txBytes: number;
  rxBytes: number;
  /** Output chains that held more than a chain may (refused, not printed). */
  txErrors: number;
  unloggedEvents: number;
}

interface Live {
  memory: GuestMemory;
  rx: Queue;
  tx: Queue;
  interrupt: VirtioInterrupt;
  failed: boolean;
}

export class ConsoleDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID_CONSOLE;
  readonly name = 'virtio-console';
  readonly offeredFeatures = featureMask(VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC);
  readonly queueMaxSizes: readonly number[];
  readonly stats: ConsoleDeviceStats = { txBytes: 0, rxBytes: 0, txErrors: 0, unloggedEvents: 0 };

  private readonly config = new Uint8Array(CONSOLE_CONFIG_SIZE);
  private readonly output: (bytes: Uint8Array) => void;
  private readonly onInputTaken: (() => void) | undefined;
  private readonly events: GuestEventLog;
  private readonly txLater = new LaterTurn(() => this.processTx());
  private readonly rxLater = new LaterTurn(() => this.processRx());
  private live: Live | undefined;
  /** Host input not yet in the guest; `inputOffset` bytes of the first piece are. */
  private readonly input: Uint8Array[] = [];
  private inputOffset = 0;
  private inputBytes = 0;

  constructor(options: ConsoleDeviceOptions) {
    const size = options.queueSize ?? CONSOLE_QUEUE_SIZE;
    this.queueMaxSizes = [size, size];
    this.output = options.output;
    this.onInputTaken = options.onInputTaken;
    const log = (options.logger ?? silentLogger).child({ dev: 'virtio-console' });
    this.events = new GuestEventLog(log, this.stats);
    // max_nr_ports = 1; cols, rows and emerg_wr are only meaningful with
    // features this device does not offer (SIZE, EMERG_WRITE).
    new DataView(this.config.buffer).setUint32(4, 1, true);
  }

  /** Bytes of host input waiting for the guest. */
  get pendingInput(): number {
    return this.inputBytes;
  }

  /** Queues host input for the guest (the caller bounds how much waits: see pendingInput). */
  enqueueInput(bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    this.input.push(bytes.slice());
    this.inputBytes += bytes.length;
    this.processRx();
  }

  readConfig(offset: number, data: Uint8Array): void {
    readConfigBytes(this.config, offset, data);
  }

  writeConfig(): void {
    // emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, not offered: ignored.
  }

  activate({ memory, queues, interrupt }: VirtioActivation): void {
    const rx = queues[CONSOLE_RX_QUEUE];
    const tx = queues[CONSOLE_TX_QUEUE];
    if (!rx || !tx) throw new Error('virtio-console needs a receive and a transmit queue');
    this.live = { memory, rx, tx, interrupt, failed: false };
  }

  queueNotify(index: number): void {
    if (index === CONSOLE_RX_QUEUE) this.processRx();
    else if (index === CONSOLE_TX_QUEUE) this.processTx();
  }

  /** Nothing of the device's reaches guest memory outside a call: a reset only forgets the rings. Queued input waits for the next driver. */
  reset(): void {
    this.live = undefined;
  }

  stopQueue(): void {
    // Queues are only touched inside queueNotify and the later turns, which
    // check `ready`: nothing to wait for.
  }

  close(): void {
    this.live = undefined;
  }

  /** Prints what the guest posted, up to CHAINS_PER_TURN chains or TX_BYTES_PER_TURN bytes per turn. */
  processTx(): void {
    const live = this.live;
    if (!live || live.failed || this.txLater.scheduled) return;
    const { memory, tx } = live;
    if (!tx.ready) return;
    let used: boolean;
    let bytes = 0;
    try {
      used = serveChains(
        tx,
        memory,
        this.txLater,
        (chain) => {
          const reader = chain.reader(memory);
          const length = reader.remaining;
          if (length > MAX_TX_CHAIN_BYTES) {
            this.stats.txErrors++;
            this.events.warn('tx-too-long', { head: chain.head, length }, `console output chain of ${length} bytes refused (at most ${MAX_TX_CHAIN_BYTES})`);
          } else if (length > 0) {
            this.stats.txBytes += length;
            bytes += length;
            this.output(reader.readExact(length));
          }
          return 0;
        },
        () => bytes >= TX_BYTES_PER_TURN,
      );
    } catch (err) {
      this.fail(live, err);
      return;
    }
    if (used) this.signal(live, tx, CONSOLE_TX_QUEUE);
  }

  /** Moves queued input into the guest's receive buffers, up to CHAINS_PER_TURN per turn. */
  processRx(): void {
    const live = this.live;
    if (!live || live.failed || this.rxLater.scheduled || this.inputBytes === 0) return;
    const { memory, rx } = live;
    if (!rx.ready) return;
    let used = false;
    let chains = 0;
    try {
      while (this.inputBytes > 0) {
        if (chains >= CHAINS_PER_TURN) {
          this.rxLater.schedule();
          break;
        }
        const chain = rx.pop(memory);
        if (!chain) break;
        chains++;
        const writer = chain.writer(memory);
        let written = 0;
        while (this.inputBytes > 0 && writer.remaining > 0) {
          const piece = this.input[0]!;
          const n = writer.write(piece.subarray(this.inputOffset));
          written += n;
          this.inputOffset += n;
          this.inputBytes -= n;
          if (this.inputOffset === piece.length) {
            this.input.shift();
            this.inputOffset = 0;
          }
        }
        rx.addUsed(memory, chain.head, written);
        this.stats.rxBytes += written;
        used = true;
      }
    } catch (err) {
      this.fail(live, err);
      return;
    }
    if (used) {
      this.signal(live, rx, CONSOLE_RX_QUEUE);
      this.onInputTaken?.();
    }
  }

  private signal(live: Live, queue: Queue, index: number): void {
    try {
      if (queue.needsNotification(live.memory)) live.interrupt.signalUsedBuffer(index);
    } catch (err) {
      this.fail(live, err);
    }
  }

  private fail(live: Live, err: unknown): void {
    live.failed = true;
    const reason = err instanceof QueueError ? `${err.kind}: ${err.message}` : `internal error: ${(err as Error)?.message ?? err}`;
    this.events.warn('queue-broken', { err }, 'virtio-console queue broken');
    live.interrupt.needsReset(reason);
  }
}
