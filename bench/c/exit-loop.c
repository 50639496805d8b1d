/*
 * exit-loop: the floor for one userspace exit round trip on this host.
 *
 * Builds the same guest as tsvmm's TinyGuest (src/kvm/probe.ts): no
 * irqchip, one vCPU, 64 KiB of RAM at guest address 0, real-mode code at
 * 0x1000 with CS base 0, RIP 0x1000, RFLAGS 2; then loops on KVM_RUN on one
 * thread until the guest halts. Each `out` is one KVM_EXIT_IO round trip.
 *
 * usage: exit-loop N [CODE_HEX]
 *   N         loop iterations: the port writes the default code does
 *   CODE_HEX  the guest code as hex; by default the same bytes as
 *             portWriteLoopCode(N): mov ecx,N; mov dx,0x511; out dx,al;
 *             dec ecx; jnz; hlt. Any code that writes to port 0x511
 *             and ends in hlt will do (the bench also runs the loop with
 *             a nop in place of the out, to time the guest alone).
 *
 * Prints one JSON line: {"exits":E,"totalUs":T,"usPerIteration":T/N}. With
 * the default code, exits must equal N. Only the KVM_RUN loop is timed,
 * not VM creation.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE 0x10000
#define CODE_ADDR 0x1000
#define EXIT_PORT 0x511

static void die(const char *what) {
  fprintf(stderr, "exit-loop: %s: %s\n", what, strerror(errno));
  exit(1);
}

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void default_code(uint8_t *code, uint32_t n) {
  const uint8_t bytes[] = {
      0x66, 0xb9, n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, (n >> 24) & 0xff, /* mov ecx, n */
      0xba, 0x11, 0x05, /* mov dx, 0x511 */
      0xee,             /* loop: out dx, al */
      0x66, 0x49,       /* dec ecx */
      0x75, 0xfb,       /* jnz loop */
      0xf4,             /* hlt */
  };
  memcpy(code, bytes, sizeof bytes);
}

static void parse_hex(uint8_t *code, size_t cap, const char *hex) {
  size_t len = strlen(hex);
  if (len % 2 != 0 || len / 2 > cap) {
    fprintf(stderr, "exit-loop: bad code hex (odd length or longer than %zu bytes)\n", cap);
    exit(2);
  }
  for (size_t i = 0; i < len / 2; i++) {
    unsigned v;
    if (sscanf(hex + 2 * i, "%2x", &v) != 1) {
      fprintf(stderr, "exit-loop: bad code hex at %zu\n", 2 * i);
      exit(2);
    }
    code[i] = (uint8_t)v;
  }
}

int main(int argc, char **argv) {
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: exit-loop N [CODE_HEX]\n");
    return 2;
  }
  char *end;
  unsigned long n = strtoul(argv[1], &end, 10);
  if (*end != '\0' || n == 0 || n > 0xffffffffUL) {
    fprintf(stderr, "exit-loop: N must be 1 to 2^32-1\n");
    return 2;
  }

  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) die("open /dev/kvm");
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) die("KVM_CREATE_VM");

  uint8_t *mem = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) die("mmap guest RAM");
  if (argc == 3)
    parse_hex(mem + CODE_ADDR, RAM_SIZE - CODE_ADDR, argv[2]);
  else
    default_code(mem + CODE_ADDR, (uint32_t)n);
  struct kvm_userspace_memory_region region = {
      .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE, .userspace_addr = (uint64_t)(uintptr_t)mem};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) die("KVM_CREATE_VCPU");
  int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (run_size < 0) die("KVM_GET_VCPU_MMAP_SIZE");
  struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) die("mmap kvm_run");

  struct kvm_sregs sregs;
  if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
  struct kvm_regs regs;
  if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0) die("KVM_GET_REGS");
  regs.rip = CODE_ADDR;
  regs.rflags = 2;
  if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

  unsigned long exits = 0;
  double start = now_us();
  for (;;) {
    if (ioctl(vcpu, KVM_RUN, 0) < 0) {
      if (errno == EINTR) continue;
      die("KVM_RUN");
    }
    if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT && run->io.port == EXIT_PORT) {
      exits++;
      continue;
    }
    if (run->exit_reason == KVM_EXIT_HLT) break;
    fprintf(stderr, "exit-loop: unexpected exit reason %u after %lu exits\n", run->exit_reason, exits);
    return 1;
  }
  double total = now_us() - start;
  if (argc == 2 && exits != n) {
    fprintf(stderr, "exit-loop: guest made %lu port writes, expected %lu\n", exits, n);
    return 1;
  }
  printf("{\"exits\":%lu,\"totalUs\":%.1f,\"usPerIteration\":%.3f}\n", exits, total, total / (double)n);
  return 0;
}
