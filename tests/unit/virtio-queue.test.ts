import { describe, expect, it } from 'vitest';
import { GuestMemory } from '../../src/base/memory.js';
import {
  Queue,
  QueueError,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
  vringNeedEvent,
  type QueueErrorKind,
} from '../../src/virtio/queue.js';
import { VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, featureMask } from '../../src/virtio/features.js';
import { FakeVirtqueue, GuestAllocator } from '../../src/testing/index.js';

const MEM_SIZE = 1 << 20;

function setup(size = 8, features = featureMask(VIRTIO_F_INDIRECT_DESC)) {
  const mem = GuestMemory.fromBuffer(new Uint8Array(MEM_SIZE));
  const allocator = new GuestAllocator(0x1000, MEM_SIZE);
  const driver = FakeVirtqueue.create(mem, allocator, size);
  const queue = new Queue(size);
  driver.configure(queue);
  queue.setNegotiatedFeatures(features);
  return { mem, allocator, driver, queue };
}

function bytes(...values: number[]): Uint8Array {
  return Uint8Array.from(values);
}

function queueErrorKind(fn: () => unknown): QueueErrorKind | 'no error' {
  try {
    fn();
  } catch (err) {
    if (err instanceof QueueError) return err.kind;
    throw err;
  }
  return 'no error';
}

describe('split virtqueue: chains', () => {
  it('returns nothing when the ring is empty or the queue not ready', () => {
    const { mem, queue, driver } = setup();
    expect(queue.pop(mem)).toBeUndefined();
    driver.addChain([{ len: 4 }]);
    queue.ready = false;
    expect(queue.pop(mem)).toBeUndefined();
    queue.ready = true;
    expect(queue.pop(mem)).toBeDefined();
  });

  it('pops a direct chain with its buffers and directions', () => {
    const { mem, queue, driver } = setup();
    const { head, addrs } = driver.addChain([
      { len: 3, data: bytes(1, 2, 3) },
      { len: 2, data: bytes(4, 5) },
      { len: 6, writable: true },
    ]);
    const chain = queue.pop(mem)!;
    expect(chain.head).toBe(head);
    expect(chain.descriptors).toEqual([
      { addr: addrs[0], len: 3, writable: false },
      { addr: addrs[1], len: 2, writable: false },
      { addr: addrs[2], len: 6, writable: true },
    ]);
    expect(chain.readableLength).toBe(5);
    expect(chain.writableLength).toBe(6);
    expect(chain.readablesFirst).toBe(true);
    expect(queue.pop(mem)).toBeUndefined();
  });

  it('reads across readable buffers and writes across writable ones', () => {
    const { mem, queue, driver } = setup();
    const { addrs } = driver.addChain([
      { len: 3, data: bytes(1, 2, 3) },
      { len: 2, data: bytes(4, 5) },
      { len: 2, writable: true },
      { len: 4, writable: true },
    ]);
    const chain = queue.pop(mem)!;
    const reader = chain.reader(mem);
    expect(reader.length).toBe(5);
    expect(reader.readExact(4)).toEqual(bytes(1, 2, 3, 4));
    expect(reader.remaining).toBe(1);
    const writer = chain.writer(mem);
    writer.write(bytes(9, 8, 7));
    expect(writer.remaining).toBe(3);
    const tail = writer.takeTail(1);
    tail[0]![0] = 0x55;
    expect(writer.remaining).toBe(2);
    writer.fill(2, 0xee);
    expect(writer.remaining).toBe(0);
    expect(mem.slice(addrs[2]!, 2)).toEqual(bytes(9, 8));
    expect(mem.slice(addrs[3]!, 4)).toEqual(bytes(7, 0xee, 0xee, 0x55));
  });

  it('refuses to read writable buffers or write readable ones', () => {
    const { mem, queue, driver } = setup();
    const { addrs } = driver.addChain([
      { len: 2, data: bytes(1, 2) },
      { len: 8, writable: true },
    ]);
    const chain = queue.pop(mem)!;
    const reader = chain.reader(mem);
    expect(queueErrorKind(() => reader.readExact(3))).toBe('chain-too-short');
    // The failed read consumed nothing.
    expect(reader.readExact(2)).toEqual(bytes(1, 2));
    const writer = chain.writer(mem);
    expect(queueErrorKind(() => writer.writeExact(new Uint8Array(9).fill(7)))).toBe('chain-too-short');
    // Nothing was written by the refused write, and the readable buffer is untouched.
    expect(mem.slice(addrs[1]!, 8)).toEqual(new Uint8Array(8));
    expect(mem.slice(addrs[0]!, 2)).toEqual(bytes(1, 2));
    const err = (() => {
      try {
        reader.readExact(1);
      } catch (e) {
        return e as QueueError;
      }
      return undefined;
    })();
    expect(err?.fatal).toBe(false);
  });

  it('expands an indirect table', () => {
    const { mem, queue, driver } = setup();
    const { head, addrs } = driver.addChain(
      [
        { len: 16, data: new Uint8Array(16).fill(1) },
        { len: 512, writable: true },
        { len: 1, writable: true },
      ],
      { indirect: true },
    );
    const chain = queue.pop(mem)!;
    expect(chain.head).toBe(head);
    expect(chain.descriptors).toEqual([
      { addr: addrs[0], len: 16, writable: false },
      { addr: addrs[1], len: 512, writable: true },
      { addr: addrs[2], len: 1, writable: true },
    ]);
  });

  it('follows direct descriptors into a final indirect table', () => {
    const { mem, queue, driver, allocator } = setup();
    const table = allocator.alloc(32);
    const a = allocator.alloc(4);
    const b = allocator.alloc(4);
    const c = allocator.alloc(4);
    driver.writeDescriptor(0, { addr: b, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 1 }, table);
    driver.writeDescriptor(1, { addr: c, len: 4, flags: VIRTQ_DESC_F_WRITE, next: 0 }, table);
    driver.writeDescriptor(5, { addr: a, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 6 });
    driver.writeDescriptor(6, { addr: table, len: 32, flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, next: 0 });
    driver.publish(5);
    const chain = queue.pop(mem)!;
    expect(chain.head).toBe(5);
    expect(chain.descriptors.map((d) => [d.addr, d.writable])).toEqual([
      [a, false],
      [b, false],
      [c, true],
    ]);
  });

  it('keeps a head in use from pop to addUsed, and counts the chains in flight', () => {
    const { mem, queue, driver } = setup();
    const first = driver.addChain([{ len: 4, writable: true }]);
    const second = driver.addChain([{ len: 4, writable: true }]);
    queue.pop(mem);
    queue.pop(mem);
    expect(queue.inFlight).toBe(2);
    queue.addUsed(mem, second.head, 0);
    expect(queue.inFlight).toBe(1);
    // Used, so the driver may post it again.
    driver.publish(second.head);
    expect(queue.pop(mem)!.head).toBe(second.head);
    queue.addUsedMany(mem, [
      { head: first.head, len: 0 },
      { head: second.head, len: 0 },
    ]);
    expect(queue.inFlight).toBe(0);
  });
});

describe('split virtqueue: used ring', () => {
  it('writes the used element and then used.idx', () => {
    const { mem, queue, driver } = setup();
    const a = driver.addChain([{ len: 4, writable: true }]);
    const b = driver.addChain([{ len: 4, writable: true }]);
    queue.pop(mem);
    queue.pop(mem);
    queue.addUsed(mem, b.head, 3);
    expect(driver.usedIdx()).toBe(1);
    queue.addUsed(mem, a.head, 4);
    expect(driver.takeUsed()).toEqual([
      { id: b.head, len: 3 },
      { id: a.head, len: 4 },
    ]);
    expect(queue.nextUsed).toBe(2);
  });

  it('publishes a batch with one used.idx update', () => {
    const { mem, queue, driver } = setup();
    const heads = [0, 1, 2].map(() => driver.addChain([{ len: 4, writable: true }]).head);
    heads.forEach(() => {
      queue.pop(mem);
    });
    queue.addUsedMany(
      mem,
      heads.map((head) => ({ head, len: 1 })),
    );
    expect(driver.usedIdx()).toBe(3);
    expect(driver.takeUsed().map((u) => u.id)).toEqual(heads);
  });

  it('does not touch the rings of a queue that is not ready', () => {
    const { mem, queue, driver } = setup();
    const { head } = driver.addChain([{ len: 4, writable: true }]);
    queue.pop(mem);
    queue.ready = false;
    queue.addUsed(mem, head, 4);
    expect(driver.usedIdx()).toBe(0);
  });

  it('wraps the 16-bit ring indices', () => {
    const { mem, queue, driver } = setup(4);
    const laps = 0x10000 + 37;
    for (let i = 0; i < laps; i++) {
      const { head } = driver.addChain([{ len: 8, writable: true }]);
      const chain = queue.pop(mem);
      if (chain?.head !== head) throw new Error(`lap ${i}: popped ${chain?.head}, expected ${head}`);
      queue.addUsed(mem, chain.head, i & 0xff);
      const used = driver.takeUsed();
      if (used.length !== 1 || used[0]!.id !== head || used[0]!.len !== (i & 0xff)) {
        throw new Error(`lap ${i}: ${JSON.stringify(used)}`);
      }
    }
    expect(driver.usedIdx()).toBe(laps & 0xffff);
    expect(queue.nextAvail).toBe(laps & 0xffff);
    expect(queue.pop(mem)).toBeUndefined();
  });

  it('accepts a full ring that straddles the index wrap', () => {
    const { mem, queue, driver } = setup(4);
    for (let i = 0; i < 0xfffe; i++) {
      driver.addChain([{ len: 1 }]);
      queue.addUsed(mem, queue.pop(mem)!.head, 0);
      driver.takeUsed();
    }
    // avail.idx goes 0xfffe -> 0x0002: four entries across the wrap.
    for (let i = 0; i < 4; i++) driver.addChain([{ len: 1 }]);
    expect(driver.availIndex).toBe(2);
    expect(queue.availableCount(mem)).toBe(4);
    for (let i = 0; i < 4; i++) expect(queue.pop(mem)).toBeDefined();
    expect(queue.pop(mem)).toBeUndefined();
  });
});

describe('split virtqueue: notification suppression', () => {
  it('vring_need_event matches the Linux rule, across the wrap', () => {
    expect(vringNeedEvent(0, 1, 0)).toBe(true);
    expect(vringNeedEvent(1, 1, 0)).toBe(false);
    expect(vringNeedEvent(5, 8, 3)).toBe(true);
    expect(vringNeedEvent(2, 8, 3)).toBe(false);
    expect(vringNeedEvent(0xffff, 2, 0xfffe)).toBe(true);
    expect(vringNeedEvent(0xfffd, 2, 0xfffe)).toBe(false);
  });

  it('with EVENT_IDX, interrupts only when used.idx passes used_event', () => {
    const { mem, queue, driver } = setup(8, featureMask(VIRTIO_F_EVENT_IDX));
    const complete = () => {
      driver.addChain([{ len: 1, writable: true }]);
      queue.addUsed(mem, queue.pop(mem)!.head, 1);
      driver.takeUsed();
    };
    driver.setUsedEvent(0);
    complete();
    expect(queue.needsNotification(mem)).toBe(true);
    complete();
    // used_event still 0: the driver has not asked again.
    expect(queue.needsNotification(mem)).toBe(false);
    driver.setUsedEvent(3);
    complete(); // used.idx 3: used_event 3 not yet passed
    expect(queue.needsNotification(mem)).toBe(false);
    complete(); // used.idx 4: passed
    expect(queue.needsNotification(mem)).toBe(true);
    // Nothing new: no notification whatever used_event says.
    expect(queue.needsNotification(mem)).toBe(false);
    // A batch that jumps over used_event still notifies once.
    driver.setUsedEvent(5);
    complete();
    complete();
    complete();
    expect(queue.needsNotification(mem)).toBe(true);
  });

  it('with EVENT_IDX, enableNotification publishes avail_event and reports late buffers', () => {
    const { mem, queue, driver } = setup(8, featureMask(VIRTIO_F_EVENT_IDX));
    driver.addChain([{ len: 1 }]);
    driver.addChain([{ len: 1 }]);
    queue.disableNotification(mem);
    expect(driver.usedFlags()).toBe(0); // EVENT_IDX never uses the flag
    queue.pop(mem);
    expect(queue.enableNotification(mem)).toBe(true);
    expect(driver.availEvent()).toBe(1);
    queue.pop(mem);
    expect(queue.enableNotification(mem)).toBe(false);
    expect(driver.availEvent()).toBe(2);
  });

  it('without EVENT_IDX, honours NO_INTERRUPT and sets NO_NOTIFY', () => {
    const { mem, queue, driver } = setup(8, 0n);
    driver.addChain([{ len: 1 }]);
    queue.addUsed(mem, queue.pop(mem)!.head, 0);
    expect(queue.needsNotification(mem)).toBe(true);
    driver.setAvailFlags(VIRTQ_AVAIL_F_NO_INTERRUPT);
    driver.addChain([{ len: 1 }]);
    queue.addUsed(mem, queue.pop(mem)!.head, 0);
    expect(queue.needsNotification(mem)).toBe(false);
    queue.disableNotification(mem);
    expect(driver.usedFlags()).toBe(VIRTQ_USED_F_NO_NOTIFY);
    expect(queue.enableNotification(mem)).toBe(false);
    expect(driver.usedFlags()).toBe(0);
  });
});

describe('split virtqueue: hostile driver', () => {
  type Case = [string, QueueErrorKind, (ctx: ReturnType<typeof setup>) => void];
  const cases: Case[] = [
    ['head index >= queue size', 'descriptor-index-out-of-range', ({ driver }) => driver.publish(8)],
    [
      'next index >= queue size',
      'descriptor-index-out-of-range',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 9 });
        driver.publish(0);
      },
    ],
    [
      'a descriptor loop',
      'chain-too-long',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 1 });
        driver.writeDescriptor(1, { addr: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'a self loop',
      'chain-too-long',
      ({ driver }) => {
        driver.writeDescriptor(3, { addr: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 3 });
        driver.publish(3);
      },
    ],
    [
      'a buffer beyond guest memory',
      'buffer-out-of-range',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: MEM_SIZE, len: 1, flags: 0, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'a buffer length running past guest memory',
      'buffer-out-of-range',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: MEM_SIZE - 16, len: 17, flags: VIRTQ_DESC_F_WRITE, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'a 64-bit address',
      'buffer-out-of-range',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0xffff_ffff_ffff_f000n, len: 16, flags: 0, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'a 4 GiB length',
      'buffer-out-of-range',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0x8000, len: 0xffff_ffff, flags: 0, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'a head made available again while in use',
      'head-in-use',
      ({ mem, queue, driver }) => {
        const { head } = driver.addChain([{ len: 4, writable: true }]);
        queue.pop(mem);
        driver.publish(head);
      },
    ],
    [
      'direct descriptors and an indirect table longer than the queue together',
      'chain-too-long',
      ({ driver }) => {
        // 3 direct descriptors, then a table of 6: 9 > the queue size 8.
        for (let i = 0; i < 6; i++) {
          driver.writeDescriptor(i, { addr: 0x9000, len: 4, flags: i < 5 ? VIRTQ_DESC_F_NEXT : 0, next: i + 1 }, 0x8000);
        }
        driver.writeDescriptor(0, { addr: 0x9000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 1 });
        driver.writeDescriptor(1, { addr: 0x9000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 2 });
        driver.writeDescriptor(2, { addr: 0x9000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 3 });
        driver.writeDescriptor(3, { addr: 0x8000, len: 96, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        driver.publish(0);
      },
    ],
    ['avail.idx jumping past the queue size', 'avail-index-jump', ({ driver }) => driver.setAvailIdx(9)],
    ['avail.idx moving backwards', 'avail-index-jump', ({ driver }) => driver.setAvailIdx(0xffff)],
    [
      'a zero-length indirect table',
      'indirect-table-bad-length',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0x8000, len: 0, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'an indirect table not a multiple of 16',
      'indirect-table-bad-length',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0x8000, len: 24, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'an indirect table outside memory',
      'ring-out-of-range',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: MEM_SIZE - 16, len: 32, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'INDIRECT with NEXT',
      'indirect-with-next',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0x8000, len: 16, flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, next: 1 });
        driver.publish(0);
      },
    ],
    [
      'a nested indirect table',
      'nested-indirect',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0x9000, len: 16, flags: VIRTQ_DESC_F_INDIRECT, next: 0 }, 0x8000);
        driver.writeDescriptor(0, { addr: 0x8000, len: 16, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'a loop inside an indirect table',
      'chain-too-long',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0x9000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 1 }, 0x8000);
        driver.writeDescriptor(1, { addr: 0x9000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 0 }, 0x8000);
        driver.writeDescriptor(0, { addr: 0x8000, len: 32, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'an indirect next index beyond its table',
      'descriptor-index-out-of-range',
      ({ driver }) => {
        driver.writeDescriptor(0, { addr: 0x9000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 2 }, 0x8000);
        driver.writeDescriptor(0, { addr: 0x8000, len: 32, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        driver.publish(0);
      },
    ],
    [
      'a descriptor table moved outside memory',
      'ring-out-of-range',
      ({ driver, queue }) => {
        driver.addChain([{ len: 1 }]);
        queue.descTable = MEM_SIZE;
      },
    ],
  ];

  it.each(cases)('%s is a fatal QueueError of kind %s', (_name, kind, arrange) => {
    const ctx = setup(8);
    arrange(ctx);
    let caught: unknown;
    try {
      ctx.queue.pop(ctx.mem);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(QueueError);
    expect((caught as QueueError).kind).toBe(kind);
    expect((caught as QueueError).fatal).toBe(true);
  });

  it('refuses indirect descriptors when INDIRECT_DESC was not negotiated', () => {
    const ctx = setup(8, 0n);
    ctx.driver.addChain([{ len: 4 }], { indirect: true });
    expect(queueErrorKind(() => ctx.queue.pop(ctx.mem))).toBe('indirect-not-negotiated');
  });

  it('ignores the address of a zero-length buffer', () => {
    const ctx = setup(8);
    ctx.driver.writeDescriptor(0, { addr: 0xffff_ffffn * 16n, len: 0, flags: 0, next: 0 });
    ctx.driver.publish(0);
    expect(ctx.queue.pop(ctx.mem)!.descriptors[0]!.len).toBe(0);
  });

  it('accepts a chain exactly as long as the queue', () => {
    const ctx = setup(4);
    ctx.driver.addChain([{ len: 1 }, { len: 1 }, { len: 1 }, { len: 1, writable: true }]);
    expect(ctx.queue.pop(ctx.mem)!.descriptors).toHaveLength(4);
  });
});

describe('split virtqueue: validate', () => {
  it('accepts a well-formed configuration', () => {
    const { mem, queue } = setup(8);
    expect(queue.validate(mem)).toBeUndefined();
  });

  it.each([
    ['size not a power of two', (q: Queue) => (q.size = 6), /power of two/],
    ['size above the maximum', (q: Queue) => (q.size = 16), /power of two/],
    ['size zero', (q: Queue) => (q.size = 0), /power of two/],
    ['misaligned descriptor table', (q: Queue) => (q.descTable += 8), /aligned/],
    ['misaligned used ring', (q: Queue) => (q.usedRing += 2), /aligned/],
    ['used ring outside memory', (q: Queue) => (q.usedRing = MEM_SIZE - 8), /outside guest memory/],
    ['avail ring at a huge address', (q: Queue) => (q.availRing = 2 ** 60), /outside guest memory/],
  ])('refuses %s', (_name, breakIt, message) => {
    const { mem, queue } = setup(8);
    breakIt(queue);
    expect(queue.validate(mem)).toMatch(message);
  });

  it('resets to the initial state', () => {
    const { mem, queue, driver } = setup(8);
    driver.addChain([{ len: 1 }]);
    queue.addUsed(mem, queue.pop(mem)!.head, 0);
    queue.reset();
    expect([queue.ready, queue.size, queue.nextAvail, queue.nextUsed, queue.descTable]).toEqual([false, 8, 0, 0, 0]);
  });
});
