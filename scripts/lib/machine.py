"""The one place that builds qemu's and Xen's command lines (dom0 mode, the toolstack's Linux
dom0, qemu's own Xen emulation), and the choice between TCG and KVM."""

import os
import subprocess

from .common import CACHE, write_atomic

QEMU = "qemu-system-x86_64"
# QEMU 7.2 TCG + Xen 4.17. -smap: otherwise a PV kernel (ring 3) that takes an exception dies in
# Xen's create_bounce_frame (an old TCG SMAP emulation bug). family=23,model=1: with TCG's default
# family 15 the PV shim writes an AMD MSR the outer Xen refuses and panics. -monitor: Xen idles
# with MWAIT hints, which #GP on a second CPU.
TCG_CPU = "max,family=23,model=1,-smap,-monitor"


def kvm_works(xen):
    """Probe once per host (cached): does Xen print its banner under `-accel kvm`?"""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = os.uname().release
    stamp = CACHE / "kvm-probe"
    if stamp.exists():
        cached_key, _, verdict = stamp.read_text().partition("=")
        if cached_key == key:
            return verdict == "yes"
    try:
        out = subprocess.run(
            [QEMU, "-accel", "kvm", "-cpu", "host", "-m", "256", "-display", "none",
             "-nodefaults", "-no-reboot", "-serial", "stdio", "-kernel", str(xen),
             "-append", "console=com1"],
            capture_output=True, timeout=6).stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
    ok = b"Xen version" in out
    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(stamp, f"{key}={'yes' if ok else 'no'}")
    return ok


def accel_args(xen):
    if os.environ.get("XENPV_ACCEL", "auto") != "tcg" and kvm_works(xen):
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", "-cpu", TCG_CPU]


def xen_cmdline(dom0_mem_mb=None, dom0_vcpus=1, extra=()):
    """Xen's own command line: console on the serial line; dom0 limited to `dom0_mem_mb` (None:
    no limit, dom0 gets what Xen gives it) and `dom0_vcpus` vCPUs."""
    parts = ["console=com1", "com1=115200,8n1"]
    if dom0_mem_mb is not None:
        parts.append(f"dom0_mem={dom0_mem_mb}M,max:{dom0_mem_mb}M")
    parts.append(f"dom0_max_vcpus={dom0_vcpus}")
    parts += list(extra)
    return " ".join(parts)


def multiboot_modules(modules):
    """qemu's -initrd value for [(path, command line)]: qemu splits at ',' into modules, and
    ',,' is a literal comma."""
    return ",".join(f"{path} {cmdline}".rstrip().replace(",", ",,") for path, cmdline in modules)


def qemu_xen(xen, modules, xen_args, memory_mb, smp):
    """qemu arguments that boot Xen (`xen_args` its command line) with multiboot `modules`
    [(path, command line)], the first being dom0's kernel; the serial line on stdio."""
    return [QEMU, *accel_args(xen), "-m", str(memory_mb), "-smp", str(smp),
            "-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio",
            "-kernel", str(xen), "-append", xen_args, "-initrd", multiboot_modules(modules)]


# Dom0 mode: a small machine, dom0 limited to 96 MiB unless the user asks for more memory.
DOM0_QEMU_MEM_MB = 512
DOM0_MEM_MB = 96


def dom0_guest(xen, guest, guest_cmdline="", memory_mb=None, smp=1):
    """qemu arguments that boot `guest` as Xen's PV dom0 with its console on the serial line.
    `memory_mb`: the machine's memory, all of it for dom0 (None: 512 MiB, dom0 limited to 96)."""
    dom0_mem = DOM0_MEM_MB if memory_mb is None else None
    args = xen_cmdline(dom0_mem, smp, ["loglvl=all", "guest_loglvl=all"])
    return qemu_xen(xen, [(guest, guest_cmdline)], args, memory_mb or DOM0_QEMU_MEM_MB, smp)


def kvm_xen_guest(shim, guest, guest_cmdline="", memory_mb=512):
    """qemu arguments for qemu's own Xen emulation (KVM_CAP_XEN_HVM, QEMU >= 8.2): the PV shim is
    the kernel, the guest its module, the console a Xen console device (the shim has no serial).
    Only usable where `toolstack.kvm_xen_probe()` says so."""
    from .options import KVM_XEN_PREFIX
    return [QEMU, "-accel", "kvm,xen-version=0x40011,kernel-irqchip=split",
            "-cpu", "host", "-m", str(memory_mb), "-display", "none", "-nodefaults",
            "-no-reboot", "-chardev", "stdio,id=c0", "-device", "xen-console,chardev=c0",
            "-kernel", str(shim), "-initrd", str(guest),
            "-append", (KVM_XEN_PREFIX + guest_cmdline).strip()]
