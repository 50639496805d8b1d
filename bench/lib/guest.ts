/**
 * Driving a guest from a benchmark: the same helpers the boot tests use
 * (GuestSession boots through the library and types commands into the guest
 * shell; runCli runs the `tsvmm` CLI as a child process). Timeouts are hang
 * guards, never speed checks.
 */
export { BOOT_TIMEOUT_MS, CLI, GuestSession, PROMPT, REPO, runCli, testCmdline, type CliResult } from '../../fixtures/guest.js';
