"""Tiny PV kernels that misbehave on purpose, to check that the toolstack path reports a crash,
a silent shutdown and a hang as such (the real guest does none of these on demand yet).

Each is a minimal ELF that libxenguest accepts: one PT_LOAD, one PT_NOTE with the Xen notes the
generic loader insists on (GUEST_OS, XEN_VERSION, LOADER, VIRT_BASE, PADDR_OFFSET, ENTRY).
"""

import struct
from pathlib import Path

VIRT_BASE = 0xFFFFFFFF80000000
CODE_OFF = 0x1000
HYPERCALL_OFF = 0x2000          # Xen writes the hypercall page here
IMAGE_SIZE = 0x3000
SCHED_OP = 29                   # __HYPERVISOR_sched_op: offset 29 * 32 in the hypercall page
SCHEDOP_SHUTDOWN = 2

# Entry code for each kind. Nothing is printed: a crash or a hang must be caught from outside.
CODE = {
    # Invalid opcode with no trap table: Xen crashes the domain.
    "crash": b"\x0f\x0b",
    # Spin forever: no output, no exit.
    "hang": b"\xeb\xfe",
    # SCHEDOP_shutdown(poweroff) without a result line:
    #   lea rsi, [rip + reason]; mov edi, 2; call hypercall_page + 29*32; ud2; reason: .long 0
    "poweroff": None,
}


def _poweroff_code():
    code = bytearray()
    lea_at = len(code)
    code += b"\x48\x8d\x35" + b"\0\0\0\0"             # lea rsi, [rip + rel32]
    code += b"\xbf" + struct.pack("<I", SCHEDOP_SHUTDOWN)  # mov edi, 2
    call_at = len(code)
    code += b"\xe8" + b"\0\0\0\0"                     # call rel32
    code += b"\x0f\x0b"                               # ud2 (not reached)
    reason_at = len(code)
    code += struct.pack("<I", 0)                      # SHUTDOWN_poweroff
    struct.pack_into("<i", code, lea_at + 3, reason_at - (lea_at + 7))
    target = HYPERCALL_OFF + SCHED_OP * 32 - CODE_OFF
    struct.pack_into("<i", code, call_at + 1, target - (call_at + 5))
    return bytes(code)


def _note(ntype, desc):
    name = b"Xen\0"
    pad = b"\0" * (-len(desc) % 4)
    return struct.pack("<III", len(name), len(desc), ntype) + name + desc + pad


def build(kind):
    code = _poweroff_code() if kind == "poweroff" else CODE[kind]
    q = lambda v: struct.pack("<Q", v)  # noqa: E731
    notes = b"".join([
        _note(6, b"fake-" + kind.encode() + b"\0"),   # GUEST_OS
        _note(5, b"xen-3.0\0"),                       # XEN_VERSION
        _note(8, b"generic\0"),                       # LOADER
        _note(3, q(VIRT_BASE)),                       # VIRT_BASE
        _note(4, q(VIRT_BASE)),                       # PADDR_OFFSET
        _note(1, q(VIRT_BASE + CODE_OFF)),            # ENTRY
        _note(2, q(VIRT_BASE + HYPERCALL_OFF)),       # HYPERCALL_PAGE
    ])
    ehdr_size, phdr_size = 64, 56
    notes_off = ehdr_size + 2 * phdr_size
    ehdr = (b"\x7fELF\x02\x01\x01" + b"\0" * 9
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, VIRT_BASE + CODE_OFF, ehdr_size, 0, 0,
                          ehdr_size, phdr_size, 2, 64, 0, 0))
    load = struct.pack("<IIQQQQQQ", 1, 7, 0, VIRT_BASE, VIRT_BASE, IMAGE_SIZE, IMAGE_SIZE, 0x1000)
    note = struct.pack("<IIQQQQQQ", 4, 4, notes_off, VIRT_BASE + notes_off, VIRT_BASE + notes_off,
                       len(notes), len(notes), 4)
    image = bytearray(IMAGE_SIZE)
    head = ehdr + load + note + notes
    image[:len(head)] = head
    image[CODE_OFF:CODE_OFF + len(code)] = code
    return bytes(image)


def write(kind, path):
    path = Path(path)
    path.write_bytes(build(kind))
    return path
