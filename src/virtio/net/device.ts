/**
 * virtio-net (virtio 1.2 section 5.1) over a TAP device: queue 0 receives,
 * queue 1 transmits. Frames cross as-is, virtio_net_hdr included, because
 * the TAP speaks the same 12-byte header (IFF_VNET_HDR, TUNSETVNETHDRSZ 12).
 *
 * RX is driven by the TAP fd's readiness. The device reads a frame only
 * when the guest has posted receive buffers; with none, it stops watching
 * the fd, so frames wait in the kernel's TAP queue (which drops when full,
 * like a real NIC) instead of piling up in the VMM, and it watches again
 * when the guest notifies the RX queue.
 */
import { GuestEventLog, silentLogger, type Logger } from '../../base/log.js';
import type { GuestMemory } from '../../base/memory.js';
import { readConfigBytes, type VirtioActivation, type VirtioDevice, type VirtioInterrupt } from '../device.js';
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_NET, featureMask, hasFeature } from '../features.js';
import {
  CHAINS_PER_TURN,
  DESCRIPTORS_PER_TURN,
  LaterTurn,
  QueueError,
  serveChains,
  type ChainWriter,
  type DescriptorChain,
  type Queue,
  type UsedElement,
} from '../queue.js';
import { MAC_LENGTH } from './options.js';
import { EAGAIN, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, type TapBackend } from './tap.js';

/** Feature bits (virtio 1.2 section 5.1.3). */
export const VIRTIO_NET_F_CSUM = 0;
export const VIRTIO_NET_F_GUEST_CSUM = 1;
export const VIRTIO_NET_F_MAC = 5;
export const VIRTIO_NET_F_GUEST_TSO4 = 7;
export const VIRTIO_NET_F_GUEST_TSO6 = 8;
export const VIRTIO_NET_F_GUEST_ECN = 9;
export const VIRTIO_NET_F_HOST_TSO4 = 11;
export const VIRTIO_NET_F_HOST_TSO6 = 12;
export const VIRTIO_NET_F_HOST_ECN = 13;
export const VIRTIO_NET_F_MRG_RXBUF = 15;
export const VIRTIO_NET_F_STATUS = 16;

/** virtio_net_config.status */
export const VIRTIO_NET_S_LINK_UP = 1;

/** struct virtio_net_hdr_v1: flags u8, gso_type u8, hdr_len, gso_size, csum_start, csum_offset, num_buffers (le16). */
export const VNET_HDR_SIZE = 12;
export const VNET_HDR_FLAGS = 0;
export const VNET_HDR_NUM_BUFFERS = 10;

/** Byte offsets in struct virtio_net_config (5.1.4). */
export const NET_CONFIG_MAC = 0;
export const NET_CONFIG_STATUS = 6;
export const NET_CONFIG_MAX_VIRTQUEUE_PAIRS = 8;
export const NET_CONFIG_SIZE = 10;

/** The largest frame a TAP hands over with GSO: 64 KiB of payload plus headers. */
export const MAX_FRAME_SIZE = 65550;
export const NET_DEFAULT_QUEUE_SIZE = 256;
export const RX_QUEUE = 0;
export const TX_QUEUE = 1;

/** Pairs "feature requires one of these" (5.1.3.1). */
const FEATURE_REQUIREMENTS: Array<[number, number[]]> = [
  [VIRTIO_NET_F_GUEST_TSO4, [VIRTIO_NET_F_GUEST_CSUM]],
  [VIRTIO_NET_F_GUEST_TSO6, [VIRTIO_NET_F_GUEST_CSUM]],
  [VIRTIO_NET_F_GUEST_ECN, [VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6]],
  [VIRTIO_NET_F_HOST_TSO4, [VIRTIO_NET_F_CSUM]],
  [VIRTIO_NET_F_HOST_TSO6, [VIRTIO_NET_F_CSUM]],
  [VIRTIO_NET_F_HOST_ECN, [VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6]],
];

/** The TAP offloads matching the receive features the driver accepted. */
export function tapOffloadFlags(features: bigint): number {
  let flags = 0;
  if (hasFeature(features, VIRTIO_NET_F_GUEST_CSUM)) flags |= TUN_F_CSUM;
  if (hasFeature(features, VIRTIO_NET_F_GUEST_TSO4)) flags |= TUN_F_TSO4;
  if (hasFeature(features, VIRTIO_NET_F_GUEST_TSO6)) flags |= TUN_F_TSO6;
  if (hasFeature(features, VIRTIO_NET_F_GUEST_ECN)) flags |= TUN_F_TSO_ECN;
  return flags;
}

export interface NetDeviceOptions {
  readonly tap: TapBackend;
  readonly mac: Uint8Array;
  readonly queueSize?: number;
  readonly logger?: Logger;
}

export interface NetStats {
  rxPackets: number;
  rxBytes: number;
  /** Frames dropped: larger than the buffers the guest can offer, or pending at reset. */
  rxDropped: number;
  /** TAP read failures and runt frames. */
  rxErrors: number;
  txPackets: number;
  txBytes: number;
  /** Frames the TAP refused with EAGAIN (its queue was full). */
  txDropped: number;
  /** Malformed TX chains and TAP write failures. */
  txErrors: number;
  /** Warnings counted but not logged (past the per-kind limit). */
  unloggedEvents: number;
}

/** A receive chain popped from the ring and kept until a frame fills it. */
interface RxBuffer {
  readonly head: number;
  readonly writer: ChainWriter;
}

interface Live {
  readonly memory: GuestMemory;
  readonly rx: Queue;
  readonly tx: Queue;
  readonly interrupt: VirtioInterrupt;
  readonly mergeRxBuffers: boolean;
  readonly guestCsum: boolean;
  /**
   * Receive chains popped for a frame that did not fit them: kept for the
   * next frame, so each chain is walked once, however many frames it is
   * too small for.
   */
  readonly held: RxBuffer[];
  /** Writable bytes in `held`. */
  heldCapacity: number;
  failed: boolean;
}

type Delivery = 'delivered' | 'dropped' | 'no-buffers';

export class NetDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID_NET;
  readonly name = 'virtio-net';
  readonly offeredFeatures = featureMask(
    VIRTIO_F_VERSION_1,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
  );
  readonly queueMaxSizes: readonly number[];
  readonly stats: NetStats = {
    rxPackets: 0,
    rxBytes: 0,
    rxDropped: 0,
    rxErrors: 0,
    txPackets: 0,
    txBytes: 0,
    txDropped: 0,
    txErrors: 0,
    unloggedEvents: 0,
  };
  readonly tap: TapBackend;
  readonly mac: Uint8Array;

  private readonly config = new Uint8Array(NET_CONFIG_SIZE);
  private readonly log: Logger;
  private readonly events: GuestEventLog;
  private readonly rxBuffer = new Uint8Array(VNET_HDR_SIZE + MAX_FRAME_SIZE);
  /** A frame read from the TAP that did not find room in the guest yet (a view of rxBuffer). */
  private pendingFrame: Uint8Array | undefined;
  private watching = false;
  private live: Live | undefined;
  /** Work left over from a turn that reached its budget, queued for the next one. */
  private readonly rxLater = new LaterTurn(() => this.processRx());
  private readonly txLater = new LaterTurn(() => this.processTx());

  constructor(options: NetDeviceOptions) {
    if (options.mac.length !== MAC_LENGTH) throw new RangeError(`MAC address must be ${MAC_LENGTH} bytes`);
    this.tap = options.tap;
    this.mac = Uint8Array.from(options.mac);
    const queueSize = options.queueSize ?? NET_DEFAULT_QUEUE_SIZE;
    this.queueMaxSizes = [queueSize, queueSize];
    this.log = (options.logger ?? silentLogger).child({ device: 'virtio-net', tap: this.tap.name });
    this.events = new GuestEventLog(this.log, this.stats);
    this.config.set(this.mac, NET_CONFIG_MAC);
    const v = new DataView(this.config.buffer);
    v.setUint16(NET_CONFIG_STATUS, VIRTIO_NET_S_LINK_UP, true);
    v.setUint16(NET_CONFIG_MAX_VIRTQUEUE_PAIRS, 1, true);
  }

  /** True while the device waits for the TAP fd to become readable. */
  get rxWatching(): boolean {
    return this.watching;
  }

  validateFeatures(features: bigint): string | undefined {
    for (const [bit, anyOf] of FEATURE_REQUIREMENTS) {
      if (hasFeature(features, bit) && !anyOf.some((b) => hasFeature(features, b))) {
        return `virtio-net feature ${bit} requires feature ${anyOf.join(' or ')}`;
      }
    }
    return undefined;
  }

  readConfig(offset: number, data: Uint8Array): void {
    readConfigBytes(this.config, offset, data);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // The MAC is writable only in the legacy interface; nothing else is writable.
    this.log.debug({ offset, length: data.length }, 'config write ignored');
  }

  activate({ memory, queues, interrupt, features }: VirtioActivation): void {
    const rx = queues[RX_QUEUE];
    const tx = queues[TX_QUEUE];
    if (!rx || !tx) throw new Error('virtio-net needs a receive and a transmit queue');
    // VERSION_1 is always negotiated here, so the header always has num_buffers.
    this.tap.setVnetHdrSize(VNET_HDR_SIZE);
    this.tap.setOffload(tapOffloadFlags(features));
    this.live = {
      memory,
      rx,
      tx,
      interrupt,
      mergeRxBuffers: hasFeature(features, VIRTIO_NET_F_MRG_RXBUF),
      guestCsum: hasFeature(features, VIRTIO_NET_F_GUEST_CSUM),
      held: [],
      heldCapacity: 0,
      failed: false,
    };
    // Readiness drives RX from here; with no buffers yet it stops at once.
    this.setWatching(true);
  }

  queueNotify(index: number): void {
    if (index === RX_QUEUE) this.processRx();
    else if (index === TX_QUEUE) this.processTx();
  }

  reset(): void {
    this.setWatching(false);
    if (this.pendingFrame) {
      this.stats.rxDropped++;
      this.pendingFrame = undefined;
    }
    this.live = undefined;
  }

  /** Stops RX and closes the TAP (after the VM stops). */
  close(): void {
    // Nothing may reach the TAP's fd after this, not even a later turn's work.
    this.setWatching(false);
    this.live = undefined;
    this.tap.close();
  }

  /**
   * The driver stopped queue `index`: the receive chains the device holds
   * go back to the driver unused (nothing more is written to them), and
   * the device takes nothing more from that queue.
   */
  stopQueue(index: number): void {
    const live = this.live;
    if (!live) return;
    if (index === RX_QUEUE) {
      live.held.length = 0;
      live.heldCapacity = 0;
      if (this.pendingFrame) {
        this.stats.rxDropped++;
        this.pendingFrame = undefined;
      }
      this.setWatching(false);
    }
  }

  /**
   * Moves frames from the TAP into the guest until one side runs dry, or
   * {@link CHAINS_PER_TURN} frames were read in this turn (the rest in a
   * later turn, so a flood from the host does not starve the event loop).
   */
  processRx(): void {
    const live = this.live;
    if (!live || live.failed) {
      this.setWatching(false);
      return;
    }
    if (this.rxLater.scheduled) return;
    const { memory, rx } = live;
    if (!rx.ready) {
      this.setWatching(false); // stopped by the driver
      return;
    }
    let delivered = false;
    let frames = 0;
    try {
      for (;;) {
        if (frames++ >= CHAINS_PER_TURN) {
          this.setWatching(false);
          this.rxLater.schedule();
          break;
        }
        if (!this.pendingFrame) {
          if (live.held.length === 0 && !rx.hasAvailable(memory)) {
            if (rx.enableNotification(memory)) continue;
            this.setWatching(false); // back-pressure: the frames stay in the kernel
            break;
          }
          const frame = this.readFrame();
          if (!frame) {
            this.setWatching(true); // drained the TAP: wait for the next frame
            break;
          }
          this.pendingFrame = frame;
        }
        const result = this.deliver(live, this.pendingFrame);
        if (result === 'no-buffers') {
          // Ask for a notification when the driver posts beyond what is there now.
          const seen = (rx.nextAvail + rx.availableCount(memory)) & 0xffff;
          if (rx.enableNotification(memory, seen)) continue;
          this.setWatching(false);
          break;
        }
        this.pendingFrame = undefined;
        if (result === 'delivered') delivered = true;
      }
    } catch (err) {
      this.fail(live, err);
      return;
    }
    if (delivered) this.signal(live, rx, RX_QUEUE);
  }

  /**
   * Sends the chains the guest queued for transmission: all of them, or
   * one turn's budget ({@link CHAINS_PER_TURN}, {@link DESCRIPTORS_PER_TURN})
   * with the rest in a later turn.
   */
  processTx(): void {
    const live = this.live;
    if (!live || live.failed || this.txLater.scheduled) return;
    const { memory, tx } = live;
    if (!tx.ready) return; // stopped by the driver
    let sent: boolean;
    try {
      sent = serveChains(tx, memory, this.txLater, (chain) => {
        this.transmit(live, chain);
        return 0;
      });
    } catch (err) {
      this.fail(live, err);
      return;
    }
    if (sent) this.signal(live, tx, TX_QUEUE);
  }

  private transmit(live: Live, chain: DescriptorChain): void {
    const reader = chain.reader(live.memory);
    const length = reader.remaining;
    if (length < VNET_HDR_SIZE || length > VNET_HDR_SIZE + MAX_FRAME_SIZE) {
      this.stats.txErrors++;
      this.log.debug({ head: chain.head, length }, 'TX chain length out of range; dropped');
      return;
    }
    let written: number;
    try {
      written = this.tap.writev(reader.views(length));
    } catch (err) {
      this.stats.txErrors++;
      this.events.warn('tap-write', { err }, 'TAP write failed');
      return;
    }
    if (written === -EAGAIN) {
      this.stats.txDropped++;
    } else if (written < 0) {
      this.stats.txErrors++;
      this.events.warn('tap-write', { errno: -written }, 'TAP write failed');
    } else {
      this.stats.txPackets++;
      this.stats.txBytes += length - VNET_HDR_SIZE;
    }
  }

  /** One frame from the TAP (a view of rxBuffer), or undefined when there is none. */
  private readFrame(): Uint8Array | undefined {
    for (;;) {
      let n: number;
      try {
        n = this.tap.read(this.rxBuffer);
      } catch (err) {
        this.stats.rxErrors++;
        this.events.warn('tap-read', { err }, 'TAP read failed');
        return undefined;
      }
      if (n === -EAGAIN) return undefined;
      if (n < 0) {
        this.stats.rxErrors++;
        this.events.warn('tap-read', { errno: -n }, 'TAP read failed');
        return undefined;
      }
      if (n >= VNET_HDR_SIZE) return this.rxBuffer.subarray(0, n);
      this.stats.rxErrors++; // a runt without a full header: skip it
    }
  }

  /** Places one frame (header included) into the guest's receive buffers. */
  private deliver(live: Live, frame: Uint8Array): Delivery {
    const { memory, rx, held } = live;
    // 5.1.6.4.1: without GUEST_CSUM the device must leave flags zero (the
    // TAP may still mark frames DATA_VALID).
    if (!live.guestCsum) frame[VNET_HDR_FLAGS] = 0;
    // Without MRG_RXBUF a frame goes into one chain: the held one, or the next.
    const maxParts = live.mergeRxBuffers ? rx.size : 1;
    while (live.heldCapacity < frame.length && held.length < maxParts) {
      const chain = rx.pop(memory);
      if (!chain) return 'no-buffers'; // what was popped stays held for the next try
      const writer = chain.writer(memory);
      held.push({ head: chain.head, writer });
      live.heldCapacity += writer.remaining;
    }
    if (live.heldCapacity < frame.length) {
      // Larger than any buffer set the guest offers: drop it, keep the buffers.
      this.stats.rxDropped++;
      this.log.debug({ length: frame.length - VNET_HDR_SIZE, capacity: live.heldCapacity }, 'RX frame larger than the guest buffers; dropped');
      return 'dropped';
    }
    const parts = this.takeParts(live, frame.length);
    new DataView(frame.buffer, frame.byteOffset).setUint16(VNET_HDR_NUM_BUFFERS, parts.length, true);
    const used: UsedElement[] = [];
    let offset = 0;
    for (const part of parts) {
      const n = part.writer.write(frame.subarray(offset));
      used.push({ head: part.head, len: n });
      offset += n;
    }
    // All buffers of a merged frame become visible together (5.1.6.4.1).
    rx.addUsedMany(memory, used);
    this.stats.rxPackets++;
    this.stats.rxBytes += frame.length - VNET_HDR_SIZE;
    return 'delivered';
  }

  /**
   * Takes from `held`, in ring order, the fewest chains that hold `length`
   * bytes (all of them fit: the caller checked the capacity).
   */
  private takeParts(live: Live, length: number): RxBuffer[] {
    let capacity = 0;
    let n = 0;
    while (capacity < length) capacity += live.held[n++]!.writer.remaining;
    live.heldCapacity -= capacity;
    return live.held.splice(0, n);
  }

  private signal(live: Live, queue: Queue, index: number): void {
    try {
      if (queue.needsNotification(live.memory)) live.interrupt.signalUsedBuffer(index);
    } catch (err) {
      this.fail(live, err);
    }
  }

  private setWatching(on: boolean): void {
    if (on === this.watching) return;
    this.watching = on;
    if (on) this.tap.startReadable(() => this.processRx());
    else this.tap.stopReadable();
  }

  private fail(live: Live, err: unknown): void {
    live.failed = true;
    this.setWatching(false);
    const reason = err instanceof QueueError ? `${err.kind}: ${err.message}` : `internal error: ${(err as Error)?.message ?? err}`;
    this.events.warn('queue-broken', { err }, 'virtio-net queue broken');
    live.interrupt.needsReset(reason);
  }
}
