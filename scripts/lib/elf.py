"""The little of ELF the harness needs: the DT_NEEDED libraries of a 64-bit little-endian ELF."""

import struct

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5


def elf_needed(data):
    """DT_NEEDED sonames of a 64-bit little-endian ELF: [] for anything that is not one (or has
    no dynamic section); ValueError for a truncated or inconsistent one."""
    if data[:4] != b"\x7fELF" or len(data) < 6 or data[4] != 2 or data[5] != 1:
        return []
    try:
        e_phoff, = struct.unpack_from("<Q", data, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
        loads, dynamic = [], None
        for i in range(e_phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
                "<IIQQQQ", data, e_phoff + i * e_phentsize)
            if p_type == PT_LOAD:
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == PT_DYNAMIC:
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return []

        def file_off(vaddr):
            for v, o, sz in loads:
                if v <= vaddr < v + sz:
                    return o + vaddr - v
            raise ValueError(f"vaddr {vaddr:#x} not in a PT_LOAD")

        needed, strtab = [], None
        off, end = dynamic[0], dynamic[0] + dynamic[1]
        while off < end:
            tag, val = struct.unpack_from("<qQ", data, off)
            off += 16
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed.append(val)
            elif tag == DT_STRTAB:
                strtab = file_off(val)
        if needed and strtab is None:
            raise ValueError("DT_NEEDED without DT_STRTAB")
        names = []
        for n in needed:
            s = strtab + n
            names.append(data[s:data.index(b"\0", s)].decode())
        return names
    except struct.error as e:
        raise ValueError(f"truncated ELF ({e})") from None
    except (IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"bad dynamic section ({e})") from None
