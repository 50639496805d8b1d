#!/usr/bin/env python3
"""Holds two idle KVM VMs open in L1 for as long as it runs.

QEMU 7.2's multi-threaded TCG mishandles code that one emulated CPU patches
while the other runs it: when L1's KVM flips one of its static keys (at the
first VM, and whenever the count of vCPUs with a disabled or absent in-kernel
LAPIC crosses zero), the kernel's int3-based text patching can leave the
other CPU looping on the breakpoint, and L1 locks up ("soft lockup ... in
kvm_vm_create_worker_thread", "stack guard page was hit at error_entry").
Keeping one vCPU with an in-kernel LAPIC (software-disabled: never run) and
one without an irqchip alive holds those counts above zero, so the keys are
patched once, here, before anything else runs, and never again. An emulator
artifact, not a tsvmm behaviour: on real hardware nothing of this is needed.
"""
import fcntl
import os
import signal
import sys

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_CREATE_IRQCHIP = 0xAE60

kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
held = []
for irqchip in (True, False):
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    if irqchip:
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
    held += [vm, fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)]
sys.stdout.write("ready\n")
sys.stdout.flush()
signal.pause()
