/**
 * The sandbox: what a VMM process may still do once its VM runs.
 *
 * Everything a VM needs from the host's file system (the kernel, the
 * initramfs, disk images, /dev/kvm, /dev/net/tun) is opened while the VM is
 * built, so once it starts, the process needs almost no file access at all.
 * `sandbox` on a VM (the CLI's default) then confines, where the kernel
 * offers it:
 *
 * - the whole process with Landlock: no file may be opened, created,
 *   removed or executed except under the paths allowed (the tsvmm package
 *   itself, read-only; `/proc/self`, read-only; the outputs the VM writes
 *   when it ends, such as a profile; and whatever the embedding program
 *   adds), no TCP socket bound or connected (ABI 4+), no abstract Unix
 *   socket reached nor signal sent outside the process (ABI 6+). Files
 *   opened before keep working: disk I/O goes on through its fds.
 * - each vCPU thread with a seccomp filter: `KVM_RUN` (and `KVM_GET_REGS`,
 *   the profiler's sample) on its own vCPU fd, and the calls that waiting,
 *   waking the main thread and allocating memory need. Any other call ends
 *   the process, with the call's number on stderr.
 *
 * The native side (native/sandbox.cc) only makes the system calls: the
 * masks for the kernel's Landlock ABI and the seccomp program are built here.
 */
import { closeSync, openSync, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Logger } from 'pino';
import type { NativeAddon } from './native.js';
import { TsvmmKindError } from '../base/errors.js';

/** Landlock file-system rights (include/uapi/linux/landlock.h), with the ABI that added each. */
export const LANDLOCK_FS = {
  EXECUTE: 1 << 0,
  WRITE_FILE: 1 << 1,
  READ_FILE: 1 << 2,
  READ_DIR: 1 << 3,
  REMOVE_DIR: 1 << 4,
  REMOVE_FILE: 1 << 5,
  MAKE_CHAR: 1 << 6,
  MAKE_DIR: 1 << 7,
  MAKE_REG: 1 << 8,
  MAKE_SOCK: 1 << 9,
  MAKE_FIFO: 1 << 10,
  MAKE_BLOCK: 1 << 11,
  MAKE_SYM: 1 << 12,
  /** ABI 2 */
  REFER: 1 << 13,
  /** ABI 3 */
  TRUNCATE: 1 << 14,
  /** ABI 5 */
  IOCTL_DEV: 1 << 15,
} as const;

/** Rights that apply to a regular file (a rule on a file may hold only these). */
const FILE_RIGHTS = LANDLOCK_FS.EXECUTE | LANDLOCK_FS.WRITE_FILE | LANDLOCK_FS.READ_FILE | LANDLOCK_FS.TRUNCATE | LANDLOCK_FS.IOCTL_DEV;

/** Every file-system right a kernel of this Landlock ABI knows (all of them handled, so denied unless allowed). */
export function landlockFsRights(abi: number): number {
  let rights = (1 << 13) - 1;
  if (abi >= 2) rights |= LANDLOCK_FS.REFER;
  if (abi >= 3) rights |= LANDLOCK_FS.TRUNCATE;
  if (abi >= 5) rights |= LANDLOCK_FS.IOCTL_DEV;
  return rights;
}

/** TCP bind and connect (ABI 4), both handled: the VMM makes no TCP connection. */
export function landlockNetRights(abi: number): number {
  return abi >= 4 ? (1 << 0) | (1 << 1) : 0;
}

/** Abstract Unix sockets and signals scoped to the process (ABI 6). */
export function landlockScopes(abi: number): number {
  return abi >= 6 ? (1 << 0) | (1 << 1) : 0;
}

/** What an embedding program lets a sandboxed process keep. */
export interface SandboxConfig {
  /**
   * More paths the process may use after the VM starts: 'read' (read files,
   * list directories) or 'write' (also write, truncate, and in a directory
   * create and remove files). Paths must exist.
   */
  allow?: readonly { path: string; access: 'read' | 'write' }[];
}

export interface SandboxStatus {
  /** Landlock: the process's file (and TCP, signal) access after start. */
  files:
    | {
        confined: true;
        abi: number;
        /** Threads confined (those created later inherit it). */
        threads: number;
        /** Threads that block every signal, so could not be reached (Node's inspector thread, see confineProcess). */
        unconfinedThreads: string[];
        allowed: string[];
      }
    | { confined: false; reason: string };
  /** seccomp on the vCPU threads. */
  vcpuThreads: { filtered: true; syscalls: string[] } | { filtered: false; reason: string };
}

/**
 * What went wrong with the sandbox: 'unconfinable' (the kernel refused
 * Landlock), 'bad-allow' (a path to allow does not exist), 'confined-earlier'
 * (an earlier VM's sandbox keeps this one from creating a file).
 */
export type SandboxErrorKind = 'unconfinable' | 'bad-allow' | 'confined-earlier';

export class SandboxError extends TsvmmKindError<SandboxErrorKind> {
  constructor(kind: SandboxErrorKind, message: string, options?: { cause?: unknown }) {
    super('SANDBOX_', kind, message, options);
  }
}

/** The tsvmm package root (this file is dist/kvm/sandbox.js or src/kvm/sandbox.ts). */
function packageRoot(): string {
  return resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
}

interface Rule {
  path: string;
  access: number;
}

/** The rules a started VM's process keeps, rights limited to what the ABI knows. */
export function sandboxRules(abi: number, opts: { outputs: readonly string[]; allow: SandboxConfig['allow'] }): Rule[] {
  const known = landlockFsRights(abi);
  const read = LANDLOCK_FS.READ_FILE | LANDLOCK_FS.READ_DIR;
  const write = read | LANDLOCK_FS.WRITE_FILE | LANDLOCK_FS.TRUNCATE | LANDLOCK_FS.MAKE_REG | LANDLOCK_FS.REMOVE_FILE;
  const rules: Rule[] = [
    // Node may still load a module of tsvmm's (or read a source map) lazily.
    { path: packageRoot(), access: read | LANDLOCK_FS.EXECUTE },
    // process.memoryUsage() and friends read /proc/self.
    { path: '/proc/self', access: read },
  ];
  for (const path of opts.outputs) rules.push({ path: resolve(path), access: LANDLOCK_FS.WRITE_FILE | LANDLOCK_FS.TRUNCATE | LANDLOCK_FS.READ_FILE });
  for (const a of opts.allow ?? []) rules.push({ path: resolve(a.path), access: a.access === 'write' ? write : read });
  return rules.map((r) => {
    let access = r.access & known;
    let isDir = true;
    try {
      isDir = statSync(r.path).isDirectory();
    } catch (err) {
      throw new SandboxError(
        'bad-allow',
        `cannot allow ${r.path} in the sandbox: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}; give a path that exists`,
        { cause: err },
      );
    }
    if (!isDir) access &= FILE_RIGHTS;
    return { path: r.path, access };
  });
}

/** The confinement of this process, once a sandboxed VM started. */
let processConfinement: SandboxStatus['files'] | undefined;

/**
 * Confines the whole process with Landlock (see the module comment). Outputs
 * that do not exist yet are created empty first, since no file may be
 * created afterwards. Irreversible: call it once everything is open.
 */
export function confineProcess(addon: NativeAddon, opts: { outputs: readonly string[]; allow: SandboxConfig['allow'] }, log: Logger): SandboxStatus['files'] {
  // Once per process: Landlock layers only narrow, and a second broadcast
  // would reach the first VM's vCPU threads, whose filter forbids the
  // confinement calls. A later sandboxed VM gets the first one's rules; its
  // outputs must already be allowed there.
  if (processConfinement) {
    for (const out of opts.outputs) {
      try {
        closeSync(openSync(out, 'a'));
      } catch (err) {
        throw new SandboxError(
          'confined-earlier',
          `cannot create ${out} in a process an earlier VM's sandbox confined: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}; allow its directory in the first sandboxed VM's sandbox.allow`,
          { cause: err },
        );
      }
    }
    log.info('sandbox: the process is already confined (an earlier VM): its rules apply');
    return processConfinement;
  }
  const abi = addon.landlockAbi();
  if (abi < 1) {
    const reason =
      abi === -38
        ? 'this kernel has no Landlock (ENOSYS)'
        : abi === -95
          ? 'Landlock is built in but not enabled (add landlock to the lsm= boot parameter)'
          : `Landlock unavailable (errno ${-abi})`;
    log.info({ reason }, 'sandbox: files not confined');
    return { confined: false, reason };
  }
  for (const out of opts.outputs) closeSync(openSync(out, 'a'));
  const rules = sandboxRules(abi, opts);
  let result: { confined: number; skipped: string[] };
  try {
    result = addon.landlockRestrictProcess(
      landlockFsRights(abi),
      landlockNetRights(abi),
      landlockScopes(abi),
      rules.map((r) => [r.path, r.access]),
    );
  } catch (err) {
    throw new SandboxError(
      'unconfinable',
      `cannot confine the process with Landlock: ${(err as Error).message}; run with the sandbox off (sandbox: false) on this host`,
      {
        cause: err,
      },
    );
  }
  const allowed = rules.map((r) => r.path);
  const unconfinedThreads = result.skipped;
  if (unconfinedThreads.length > 0) {
    // The thread Node starts the inspector from blocks every signal and
    // sleeps until SIGUSR1 wakes it; a listener takes SIGUSR1 away from it,
    // so it never runs. (inspector.open() from the main thread still
    // works, and its thread inherits the confinement.)
    process.on('SIGUSR1', () => log.warn('SIGUSR1 ignored: the inspector cannot be started by a signal in a sandboxed process'));
  }
  log.info({ abi, threads: result.confined, unconfinedThreads, allowed }, 'sandbox: process confined with Landlock');
  processConfinement = { confined: true, abi, threads: result.confined, unconfinedThreads, allowed };
  return processConfinement;
}

// ---------------------------------------------------------------------------
// seccomp for vCPU threads

/** The calls a vCPU thread makes besides its ioctls (see VcpuLoop in native/kvm.cc). */
export const VCPU_THREAD_SYSCALLS = [
  // waiting for the main thread's answer, and waking it (uv_async_send writes an eventfd)
  'futex',
  'write',
  'sched_yield',
  'nanosleep',
  'clock_nanosleep',
  'clock_gettime',
  'gettimeofday',
  // glibc's allocator, and the stack's release when the thread ends
  'mmap',
  'munmap',
  'mprotect',
  'madvise',
  'mremap',
  'brk',
  // the kick signal's handler, and the thread's end
  'rt_sigprocmask',
  'rt_sigreturn',
  'restart_syscall',
  'exit',
  'exit_group',
  // abort(): raise SIGABRT
  'getpid',
  'gettid',
  'tgkill',
] as const;

const BPF = { LD_W_ABS: 0x20, JEQ_K: 0x15, JGE_K: 0x35, RET_K: 0x06 } as const;
/** offsetof(struct seccomp_data, ...) */
const SECCOMP_DATA = { nr: 0, arch: 4, args: 16 } as const;
const X32_SYSCALL_BIT = 0x40000000;

type Insn = { code: number; jt: number | string; jf: number | string; k: number } | { label: string };

/** Assembles sock_filter entries; jump targets may be labels (resolved to offsets). */
export function assemble(program: readonly Insn[]): Buffer {
  const labels = new Map<string, number>();
  const insns: Exclude<Insn, { label: string }>[] = [];
  for (const i of program) {
    if ('label' in i) labels.set(i.label, insns.length);
    else insns.push(i);
  }
  const out = Buffer.alloc(insns.length * 8);
  insns.forEach((ins, pc) => {
    const target = (t: number | string) => {
      if (typeof t === 'number') return t;
      const at = labels.get(t);
      if (at === undefined) throw new Error(`BPF label ${t} undefined`);
      const off = at - pc - 1;
      if (off < 0 || off > 255) throw new Error(`BPF jump to ${t} out of range (${off})`);
      return off;
    };
    out.writeUInt16LE(ins.code, pc * 8);
    out.writeUInt8(target(ins.jt), pc * 8 + 2);
    out.writeUInt8(target(ins.jf), pc * 8 + 3);
    out.writeUInt32LE(ins.k >>> 0, pc * 8 + 4);
  });
  return out;
}

/**
 * The filter of one vCPU thread: x86-64 calls only; `ioctl` only on
 * `vcpuFd` and only KVM_RUN or KVM_GET_REGS; the calls of
 * VCPU_THREAD_SYSCALLS; anything else traps.
 */
export function vcpuSeccompFilter(constants: Record<string, number>, vcpuFd: number): Buffer {
  const c = (name: string): number => {
    const v = constants[name];
    if (v === undefined) throw new Error(`the addon does not export ${name}`);
    return v;
  };
  const ld = (k: number): Insn => ({ code: BPF.LD_W_ABS, jt: 0, jf: 0, k });
  const ret = (k: number): Insn => ({ code: BPF.RET_K, jt: 0, jf: 0, k });
  const program: Insn[] = [
    ld(SECCOMP_DATA.arch),
    { code: BPF.JEQ_K, jt: 0, jf: 'trap', k: c('AUDIT_ARCH_X86_64') },
    ld(SECCOMP_DATA.nr),
    { code: BPF.JGE_K, jt: 'trap', jf: 0, k: X32_SYSCALL_BIT },
    { code: BPF.JEQ_K, jt: 'ioctl', jf: 0, k: c('__NR_ioctl') },
    ...VCPU_THREAD_SYSCALLS.map((name): Insn => ({ code: BPF.JEQ_K, jt: 'allow', jf: 0, k: c(`__NR_${name}`) })),
    ret(c('SECCOMP_RET_TRAP')),
    { label: 'ioctl' },
    // The low words: the kernel takes the fd and the request as 32-bit values.
    ld(SECCOMP_DATA.args + 0 * 8),
    { code: BPF.JEQ_K, jt: 0, jf: 'trap', k: vcpuFd },
    ld(SECCOMP_DATA.args + 1 * 8),
    { code: BPF.JEQ_K, jt: 'allow', jf: 0, k: c('KVM_RUN') },
    { code: BPF.JEQ_K, jt: 'allow', jf: 'trap', k: c('KVM_GET_REGS') },
    { label: 'allow' },
    ret(c('SECCOMP_RET_ALLOW')),
    { label: 'trap' },
    ret(c('SECCOMP_RET_TRAP')),
  ];
  return assemble(program);
}
