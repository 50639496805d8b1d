/**
 * The sandbox's pure parts: the vCPU thread's seccomp program, run here by
 * a small classic-BPF interpreter over struct seccomp_data, and the
 * Landlock masks and rules for each ABI. The system calls themselves are
 * tried in tests/boot/sandbox.test.ts.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  LANDLOCK_FS,
  SandboxError,
  VCPU_THREAD_SYSCALLS,
  assemble,
  landlockFsRights,
  landlockNetRights,
  landlockScopes,
  sandboxRules,
  vcpuSeccompFilter,
} from '../../src/kvm/sandbox.js';

// x86-64 numbers and ioctls, as the addon exports them (asm/unistd_64.h, linux/kvm.h).
const NR: Record<string, number> = {
  ioctl: 16,
  futex: 202,
  write: 1,
  mmap: 9,
  munmap: 11,
  mprotect: 10,
  madvise: 28,
  mremap: 25,
  brk: 12,
  rt_sigprocmask: 14,
  rt_sigreturn: 15,
  exit: 60,
  exit_group: 231,
  sched_yield: 24,
  nanosleep: 35,
  clock_nanosleep: 230,
  clock_gettime: 228,
  gettimeofday: 96,
  getpid: 39,
  gettid: 186,
  tgkill: 234,
  restart_syscall: 219,
  openat: 257,
};
const CONSTANTS: Record<string, number> = {
  AUDIT_ARCH_X86_64: 0xc000003e,
  SECCOMP_RET_ALLOW: 0x7fff0000,
  SECCOMP_RET_TRAP: 0x00030000,
  KVM_RUN: 0xae80,
  KVM_GET_REGS: 0x8090ae81,
  ...Object.fromEntries(Object.entries(NR).map(([k, v]) => [`__NR_${k}`, v])),
};
const KVM_SET_REGS = 0x4090ae82;
const AUDIT_ARCH_I386 = 0x40000003;

/** Runs a classic BPF program (the subset seccomp filters use) over seccomp_data. */
function runBpf(program: Buffer, data: { nr: number; arch?: number; args?: number[] }): number {
  const mem = Buffer.alloc(64);
  mem.writeUInt32LE(data.nr >>> 0, 0);
  mem.writeUInt32LE((data.arch ?? CONSTANTS.AUDIT_ARCH_X86_64!) >>> 0, 4);
  (data.args ?? []).forEach((a, i) => {
    mem.writeBigUInt64LE(BigInt(a), 16 + 8 * i);
  });
  let acc = 0;
  for (let pc = 0, steps = 0; pc * 8 < program.length && steps < 1000; steps++) {
    const code = program.readUInt16LE(pc * 8);
    const jt = program.readUInt8(pc * 8 + 2);
    const jf = program.readUInt8(pc * 8 + 3);
    const k = program.readUInt32LE(pc * 8 + 4);
    pc++;
    switch (code) {
      case 0x20: // ld [k]
        acc = mem.readUInt32LE(k);
        break;
      case 0x15: // jeq #k
        pc += acc === k ? jt : jf;
        break;
      case 0x35: // jge #k
        pc += acc >= k ? jt : jf;
        break;
      case 0x06: // ret #k
        return k;
      default:
        throw new Error(`unexpected BPF opcode 0x${code.toString(16)}`);
    }
  }
  throw new Error('BPF program fell off its end');
}

describe('the vCPU thread seccomp filter', () => {
  const FD = 21;
  const filter = vcpuSeccompFilter(CONSTANTS, FD);
  const ALLOW = CONSTANTS.SECCOMP_RET_ALLOW;
  const TRAP = CONSTANTS.SECCOMP_RET_TRAP;

  it('lets KVM_RUN and KVM_GET_REGS through on its own vCPU fd only', () => {
    expect(runBpf(filter, { nr: NR.ioctl!, args: [FD, CONSTANTS.KVM_RUN!, 0] })).toBe(ALLOW);
    expect(runBpf(filter, { nr: NR.ioctl!, args: [FD, CONSTANTS.KVM_GET_REGS!, 0x1000] })).toBe(ALLOW);
    expect(runBpf(filter, { nr: NR.ioctl!, args: [FD + 1, CONSTANTS.KVM_RUN!, 0] })).toBe(TRAP);
    expect(runBpf(filter, { nr: NR.ioctl!, args: [FD, KVM_SET_REGS, 0x1000] })).toBe(TRAP);
  });

  it('lets the calls of waiting, waking, allocating and ending through', () => {
    for (const name of VCPU_THREAD_SYSCALLS) expect(runBpf(filter, { nr: NR[name]! }), name).toBe(ALLOW);
  });

  it('traps everything else, other ABIs and x32 numbers included', () => {
    const allowed = new Set<number>([NR.ioctl!, ...VCPU_THREAD_SYSCALLS.map((n) => NR[n]!)]);
    for (let nr = 0; nr < 460; nr++) if (!allowed.has(nr)) expect(runBpf(filter, { nr }), `syscall ${nr}`).toBe(TRAP);
    expect(runBpf(filter, { nr: NR.write!, arch: AUDIT_ARCH_I386 })).toBe(TRAP);
    expect(runBpf(filter, { nr: 0x40000000 | NR.write! })).toBe(TRAP);
  });

  it('assembles labels into forward jumps and refuses an unknown one', () => {
    const prog = assemble([{ code: 0x15, jt: 'b', jf: 0, k: 1 }, { code: 0x06, jt: 0, jf: 0, k: 7 }, { label: 'b' }, { code: 0x06, jt: 0, jf: 0, k: 9 }]);
    expect(runBpf(prog, { nr: 0, arch: 1 })).toBe(7);
    expect(() => assemble([{ code: 0x15, jt: 'nowhere', jf: 0, k: 0 }])).toThrow(/nowhere/);
  });
});

describe('Landlock masks and rules', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tsvmm-sandbox-unit-'));
  const file = join(dir, 'profile.txt');
  writeFileSync(file, '');
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('handles every right the ABI knows, and only those', () => {
    expect(landlockFsRights(1)).toBe((1 << 13) - 1);
    expect(landlockFsRights(2) & LANDLOCK_FS.REFER).toBeTruthy();
    expect(landlockFsRights(2) & LANDLOCK_FS.TRUNCATE).toBe(0);
    expect(landlockFsRights(3) & LANDLOCK_FS.TRUNCATE).toBeTruthy();
    expect(landlockFsRights(4) & LANDLOCK_FS.IOCTL_DEV).toBe(0);
    expect(landlockFsRights(5) & LANDLOCK_FS.IOCTL_DEV).toBeTruthy();
    expect([landlockNetRights(3), landlockNetRights(4)]).toEqual([0, 3]);
    expect([landlockScopes(5), landlockScopes(6)]).toEqual([0, 3]);
  });

  it('gives a file only file rights, and a directory more', () => {
    const rules = sandboxRules(7, { outputs: [file], allow: [{ path: dir, access: 'write' }] });
    const out = rules.find((r) => r.path === file)!;
    expect(out.access).toBe(LANDLOCK_FS.WRITE_FILE | LANDLOCK_FS.TRUNCATE | LANDLOCK_FS.READ_FILE);
    const d = rules.find((r) => r.path === dir)!;
    expect(d.access & LANDLOCK_FS.MAKE_REG).toBeTruthy();
    expect(d.access & LANDLOCK_FS.EXECUTE).toBe(0);
    // ABI 1 knows no TRUNCATE: the rule must not name it.
    expect(sandboxRules(1, { outputs: [file], allow: [] }).find((r) => r.path === file)!.access & LANDLOCK_FS.TRUNCATE).toBe(0);
    expect(rules.find((r) => r.path === '/proc/self')!.access).toBe(LANDLOCK_FS.READ_FILE | LANDLOCK_FS.READ_DIR);
  });

  it('refuses a path that does not exist, naming it', () => {
    expect(() => sandboxRules(7, { outputs: [], allow: [{ path: join(dir, 'missing'), access: 'read' }] })).toThrow(SandboxError);
    expect(() => sandboxRules(7, { outputs: [], allow: [{ path: join(dir, 'missing'), access: 'read' }] })).toThrow(
      /missing in the sandbox: ENOENT; give a path that exists/,
    );
  });
});
