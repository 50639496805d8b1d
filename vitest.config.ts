import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['tests/**/*.test.ts'],
    // Boot tests run whole guests: on hosts whose KVM emulates guest kernel code
    // a boot takes minutes. Time limits here are hang guards, not speed checks.
    testTimeout: 20 * 60 * 1000,
    hookTimeout: 20 * 60 * 1000,
    // Two cores: one booted guest per core at most.
    maxWorkers: 2,
    minWorkers: 1,
    reporters: ['default'],
  },
});
