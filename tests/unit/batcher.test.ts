import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { ByteBatcher } from '../../src/base/batcher.js';

describe('ByteBatcher', () => {
  beforeEach(() => vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] }));
  afterEach(() => vi.useRealTimers());

  function batcher(size = 8, delayMs = 2, streamDelayMs = 16) {
    const chunks: string[] = [];
    const b = new ByteBatcher(size, delayMs, (c) => chunks.push(c.toString('latin1')), true, streamDelayMs);
    const put = (s: string) => {
      for (const ch of s) b.add(Uint8Array.of(ch.charCodeAt(0)));
    };
    return { b, chunks, put };
  }

  it('sends a byte after a pause within delayMs', () => {
    const { chunks, put } = batcher();
    put('a');
    vi.advanceTimersByTime(1);
    expect(chunks).toEqual([]);
    vi.advanceTimersByTime(1);
    expect(chunks).toEqual(['a']);
  });

  it('waits streamDelayMs while bytes keep coming, and delayMs again after a pause', () => {
    const { chunks, put } = batcher();
    put('a');
    vi.advanceTimersByTime(2);
    put('b');
    vi.advanceTimersByTime(2);
    expect(chunks).toEqual(['a']); // streaming: this chunk waits longer
    vi.advanceTimersByTime(14);
    expect(chunks).toEqual(['a', 'b']);
    vi.advanceTimersByTime(16); // a pause as long as the stream delay
    put('c');
    vi.advanceTimersByTime(2);
    expect(chunks).toEqual(['a', 'b', 'c']);
  });

  it('sends a full batch at once, in order, whatever the timers', () => {
    const { b, chunks, put } = batcher(4);
    put('abcdef');
    expect(chunks).toEqual(['abcd']);
    b.add(Buffer.from('ghijkl'));
    expect(chunks).toEqual(['abcd', 'efgh', 'ijkl']);
    b.flush();
    expect(chunks).toEqual(['abcd', 'efgh', 'ijkl']);
    put('m');
    b.flush();
    expect(chunks.join('')).toBe('abcdefghijklm');
    vi.advanceTimersByTime(100);
    expect(chunks).toHaveLength(4); // the flushed chunk's timer is gone
  });

  it('gives emit a view that the next bytes overwrite (emit copies what it keeps)', () => {
    const seen: Buffer[] = [];
    const b = new ByteBatcher(4, 2, (c) => seen.push(c));
    b.add(Buffer.from('ab'));
    b.flush();
    b.add(Buffer.from('cd'));
    b.flush();
    expect(seen[0]!.toString()).toBe('cd');
  });
});
