/**
 * Booting and driving the fixture guest: the helpers live beside the
 * fixtures (fixtures/guest.ts), since the benchmarks drive the same guest.
 */
export * from '../../fixtures/guest.js';
