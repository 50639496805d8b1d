/**
 * virtio-blk (virtio 1.2 section 5.2): one request queue, backed by a
 * {@link BlockBackend}. Requests are parsed and submitted synchronously
 * when the driver notifies; the I/O runs on the libuv thread pool and
 * completes in any order. Each completion writes the status byte and the
 * used element at once; the interrupt is sent once per event-loop turn
 * for everything that completed in it.
 *
 * Host I/O reads and writes guest memory directly and cannot be
 * cancelled, so a reset (or the driver stopping the queue) completes only
 * once nothing submitted before it is still running: {@link reset}
 * returns a promise the transport waits for before it shows status 0.
 * At most one notification's worth of chains ({@link CHAINS_PER_TURN},
 * {@link DESCRIPTORS_PER_TURN}) is submitted per event-loop turn; the
 * rest waits for the next turn.
 */
import { GuestEventLog, silentLogger, type Logger } from '../../base/log.js';
import type { GuestMemory } from '../../base/memory.js';
import { readConfigBytes, type VirtioActivation, type VirtioDevice, type VirtioInterrupt } from '../device.js';
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, featureMask, hasFeature } from '../features.js';
import { CHAINS_PER_TURN, DESCRIPTORS_PER_TURN, LaterTurn, QueueError, type DescriptorChain, type Queue } from '../queue.js';
import type { BlockBackend } from './backend.js';
import { SECTOR_SIZE } from './image.js';
import { BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, parseBlkRequest, type BlkLimits, type BlkRequest } from './request.js';

/** Feature bits (virtio 1.2 section 5.2.3). */
export const VIRTIO_BLK_F_SEG_MAX = 2;
export const VIRTIO_BLK_F_RO = 5;
export const VIRTIO_BLK_F_BLK_SIZE = 6;
export const VIRTIO_BLK_F_FLUSH = 9;
export const VIRTIO_BLK_F_DISCARD = 13;
export const VIRTIO_BLK_F_WRITE_ZEROES = 14;

/** Byte offsets in struct virtio_blk_config (5.2.4). */
export const BLK_CONFIG_CAPACITY = 0;
export const BLK_CONFIG_SEG_MAX = 12;
export const BLK_CONFIG_BLK_SIZE = 20;
export const BLK_CONFIG_MAX_DISCARD_SECTORS = 36;
export const BLK_CONFIG_MAX_DISCARD_SEG = 40;
export const BLK_CONFIG_DISCARD_SECTOR_ALIGNMENT = 44;
export const BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS = 48;
export const BLK_CONFIG_MAX_WRITE_ZEROES_SEG = 52;
export const BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP = 56;
/** Up to and including unused1[3]; later fields belong to features we do not offer. */
export const BLK_CONFIG_SIZE = 60;

export const BLK_DEFAULT_QUEUE_SIZE = 256;
/** 2 GiB per discard: large, since discards cost nothing here. */
export const BLK_MAX_DISCARD_SECTORS = (1 << 22) - 1;
/** 32 MiB per write-zeroes request keeps each one short; Linux splits larger ones. */
export const BLK_MAX_WRITE_ZEROES_SECTORS = 1 << 16;

export interface BlkDeviceOptions {
  readonly backend: BlockBackend;
  /** GET_ID answer, at most 20 bytes; zero-padded. */
  readonly serial?: string;
  readonly queueSize?: number;
  readonly logger?: Logger;
}

export interface BlkStats {
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  writeZeroes: number;
  bytesRead: number;
  bytesWritten: number;
  /** Requests answered IOERR (malformed, out of range, or a failed host I/O). */
  errors: number;
  /** Requests answered UNSUPP. */
  unsupported: number;
  /** Requests submitted and not yet completed. */
  inFlight: number;
  /** Guest-triggered warnings counted but not logged (past the per-kind limit). */
  unloggedEvents: number;
}

interface Live {
  readonly memory: GuestMemory;
  readonly queue: Queue;
  readonly interrupt: VirtioInterrupt;
  readonly limits: BlkLimits;
  /** Set by a fatal queue error: nothing more is taken from or given to the ring. */
  failed: boolean;
  /** Set when the driver stopped the queue: completions no longer touch guest memory. */
  stopped: boolean;
}

export class BlkDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID_BLOCK;
  readonly name = 'virtio-blk';
  readonly offeredFeatures: bigint;
  readonly queueMaxSizes: readonly number[];
  readonly stats: BlkStats = {
    reads: 0,
    writes: 0,
    flushes: 0,
    discards: 0,
    writeZeroes: 0,
    bytesRead: 0,
    bytesWritten: 0,
    errors: 0,
    unsupported: 0,
    inFlight: 0,
    unloggedEvents: 0,
  };

  readonly backend: BlockBackend;
  private readonly config: Uint8Array;
  private readonly serialBytes: Uint8Array;
  private readonly log: Logger;
  private readonly events: GuestEventLog;
  private live: Live | undefined;
  private notifyScheduled = false;
  /** The rest of a notification's chains is waiting for the next event-loop turn. */
  private readonly processLater = new LaterTurn(() => {
    this.processQueue();
    this.maybeIdle();
  });
  private closed = false;
  private idleWaiters: Array<() => void> = [];

  constructor(options: BlkDeviceOptions) {
    this.backend = options.backend;
    this.log = (options.logger ?? silentLogger).child({ device: 'virtio-blk' });
    this.events = new GuestEventLog(this.log, this.stats);
    if (this.backend.size % SECTOR_SIZE !== 0) {
      throw new RangeError(`disk size ${this.backend.size} is not a multiple of ${SECTOR_SIZE}`);
    }
    const queueSize = options.queueSize ?? BLK_DEFAULT_QUEUE_SIZE;
    this.queueMaxSizes = [queueSize];
    this.offeredFeatures =
      featureMask(
        VIRTIO_F_VERSION_1,
        VIRTIO_F_EVENT_IDX,
        VIRTIO_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
      ) | (this.backend.readonly ? featureMask(VIRTIO_BLK_F_RO) : 0n);

    this.serialBytes = new Uint8Array(BLK_ID_BYTES);
    const serial = Buffer.from(options.serial ?? '', 'utf8');
    if (serial.length > BLK_ID_BYTES) throw new RangeError(`serial is ${serial.length} bytes; at most ${BLK_ID_BYTES}`);
    this.serialBytes.set(serial);

    this.config = new Uint8Array(BLK_CONFIG_SIZE);
    const v = new DataView(this.config.buffer);
    v.setBigUint64(BLK_CONFIG_CAPACITY, BigInt(this.backend.size / SECTOR_SIZE), true);
    // Header and status take two descriptors of a chain no longer than the queue.
    v.setUint32(BLK_CONFIG_SEG_MAX, queueSize - 2, true);
    v.setUint32(BLK_CONFIG_BLK_SIZE, SECTOR_SIZE, true);
    v.setUint32(BLK_CONFIG_MAX_DISCARD_SECTORS, BLK_MAX_DISCARD_SECTORS, true);
    v.setUint32(BLK_CONFIG_MAX_DISCARD_SEG, 1, true);
    v.setUint32(BLK_CONFIG_DISCARD_SECTOR_ALIGNMENT, 1, true);
    v.setUint32(BLK_CONFIG_MAX_WRITE_ZEROES_SECTORS, BLK_MAX_WRITE_ZEROES_SECTORS, true);
    v.setUint32(BLK_CONFIG_MAX_WRITE_ZEROES_SEG, 1, true);
    // We never deallocate on write-zeroes.
    v.setUint8(BLK_CONFIG_WRITE_ZEROES_MAY_UNMAP, 0);
  }

  /** Disk size in 512-byte sectors. */
  get capacity(): number {
    return this.backend.size / SECTOR_SIZE;
  }

  readConfig(offset: number, data: Uint8Array): void {
    readConfigBytes(this.config, offset, data);
  }

  writeConfig(offset: number, data: Uint8Array): void {
    // No writable fields (CONFIG_WCE is not offered).
    this.log.debug({ offset, length: data.length }, 'config write ignored');
  }

  activate({ memory, queues, interrupt, features }: VirtioActivation): void {
    const queue = queues[0];
    if (!queue) throw new Error('virtio-blk has no request queue');
    this.live = {
      memory,
      queue,
      interrupt,
      failed: false,
      stopped: false,
      limits: {
        size: this.backend.size,
        readonly: this.backend.readonly,
        discard: hasFeature(features, VIRTIO_BLK_F_DISCARD),
        writeZeroes: hasFeature(features, VIRTIO_BLK_F_WRITE_ZEROES),
        maxDiscardSectors: BLK_MAX_DISCARD_SECTORS,
        maxDiscardSegments: 1,
        maxWriteZeroesSectors: BLK_MAX_WRITE_ZEROES_SECTORS,
        maxWriteZeroesSegments: 1,
      },
    };
  }

  queueNotify(index: number): void {
    if (index === 0) this.processQueue();
  }

  /**
   * Forgets the activation. In-flight host I/O cannot be cancelled: its
   * completions see that `live` changed and touch nothing, and the reset
   * is complete (the promise resolves) when the last of them has run.
   */
  reset(): Promise<void> | void {
    this.live = undefined;
    return this.stats.inFlight > 0 ? this.drain() : undefined;
  }

  /** The driver stopped the request queue (virtio-mmio QueueReady = 0): as reset, for the queue. */
  stopQueue(index: number): Promise<void> | void {
    if (index !== 0 || !this.live) return undefined;
    this.live.stopped = true;
    return this.stats.inFlight > 0 ? this.drain() : undefined;
  }

  /**
   * Resolves when no request is in flight, completed ones have been
   * signalled, and no chains wait for a later turn.
   */
  drain(): Promise<void> {
    if (this.idle) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Closes the backing store (after the VM stops). */
  close(): void {
    // Nothing may reach the image's fd after this, not even a later turn's chains.
    this.closed = true;
    this.live = undefined;
    this.backend.close();
  }

  private processQueue(): void {
    const live = this.live;
    if (!live || live.failed || live.stopped || this.closed || this.processLater.scheduled) return;
    const { memory, queue } = live;
    let chains = 0;
    let descriptors = 0;
    try {
      do {
        queue.disableNotification(memory);
        for (let chain = queue.pop(memory); chain; chain = queue.pop(memory)) {
          this.submit(live, chain);
          descriptors += chain.descriptors.length;
          if (++chains >= CHAINS_PER_TURN || descriptors >= DESCRIPTORS_PER_TURN) {
            // Enough for one turn: the console, timers and other devices go first.
            this.processLater.schedule();
            return;
          }
        }
      } while (queue.enableNotification(memory));
    } catch (err) {
      this.fail(live, err);
    }
  }

  private submit(live: Live, chain: DescriptorChain): void {
    const request = parseBlkRequest(live.memory, chain, live.limits);
    const op = request.operation;
    this.stats.inFlight++;
    const done = (status: number, detail?: string) => this.complete(live, request, status, detail);
    const ioDone = (what: string) => (err: Error | null) => (err ? done(VIRTIO_BLK_S_IOERR, `${what} failed: ${err.message}`) : done(VIRTIO_BLK_S_OK));
    try {
      switch (op.kind) {
        case 'reject':
          done(op.status, op.reason);
          return;
        case 'read':
          this.stats.reads++;
          this.backend.readv(op.target, op.offset, (err) => {
            if (!err) this.stats.bytesRead += op.length;
            ioDone('read')(err);
          });
          return;
        case 'write':
          this.stats.writes++;
          this.backend.writev(op.source, op.offset, (err) => {
            if (!err) this.stats.bytesWritten += op.length;
            ioDone('write')(err);
          });
          return;
        case 'flush':
          this.stats.flushes++;
          this.backend.flush(ioDone('flush'));
          return;
        case 'get-id':
          op.target.writeExact(this.serialBytes);
          done(VIRTIO_BLK_S_OK);
          return;
        case 'discard':
          this.stats.discards++;
          this.eachRange(op.ranges, (r, cb) => this.backend.discard(r.offset, r.length, cb), ioDone('discard'));
          return;
        case 'write-zeroes':
          this.stats.writeZeroes++;
          this.eachRange(op.ranges, (r, cb) => this.backend.writeZeroes(r.offset, r.length, cb), ioDone('write zeroes'));
          return;
      }
    } catch (err) {
      // A backend that throws instead of calling back: still one answer per request.
      done(VIRTIO_BLK_S_IOERR, `request failed: ${(err as Error).message}`);
    }
  }

  private eachRange<T>(ranges: readonly T[], run: (range: T, cb: (err: Error | null) => void) => void, done: (err: Error | null) => void): void {
    const next = (i: number): void => {
      const range = ranges[i];
      if (range === undefined) {
        done(null);
        return;
      }
      run(range, (err) => (err ? done(err) : next(i + 1)));
    };
    next(0);
  }

  private complete(live: Live, request: BlkRequest, status: number, detail?: string): void {
    this.stats.inFlight--;
    if (status === VIRTIO_BLK_S_IOERR) this.stats.errors++;
    if (status === VIRTIO_BLK_S_UNSUPP) this.stats.unsupported++;
    if (detail) this.log.debug({ head: request.head, type: request.type, status }, detail);
    if (this.live !== live || live.failed || live.stopped) {
      // Reset, stopped or broken since submission: the guest no longer expects this.
      this.maybeIdle();
      return;
    }
    let usedLen = 0;
    if (request.status) {
      request.status[0] = status;
      usedLen = status === VIRTIO_BLK_S_OK ? request.usedLenOnSuccess : 1;
    }
    try {
      live.queue.addUsed(live.memory, request.head, usedLen);
    } catch (err) {
      this.fail(live, err);
      this.maybeIdle();
      return;
    }
    this.scheduleNotify(live);
  }

  /** One interrupt check per event-loop turn, after every completion of that turn. */
  private scheduleNotify(live: Live): void {
    if (this.notifyScheduled) return;
    this.notifyScheduled = true;
    setImmediate(() => {
      this.notifyScheduled = false;
      if (this.live === live && !live.failed && !live.stopped) {
        try {
          if (live.queue.needsNotification(live.memory)) live.interrupt.signalUsedBuffer(0);
        } catch (err) {
          this.fail(live, err);
        }
      }
      this.maybeIdle();
    });
  }

  private get idle(): boolean {
    return this.stats.inFlight === 0 && !this.notifyScheduled && !this.processLater.scheduled;
  }

  private maybeIdle(): void {
    if (!this.idle) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const resolve of waiters) resolve();
  }

  private fail(live: Live, err: unknown): void {
    live.failed = true;
    const reason = err instanceof QueueError ? `${err.kind}: ${err.message}` : `internal error: ${(err as Error)?.message ?? err}`;
    this.events.warn('queue-broken', { err }, 'request queue broken');
    live.interrupt.needsReset(reason);
  }
}
