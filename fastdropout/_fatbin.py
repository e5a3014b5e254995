"""The CUDA architectures compiled into a shared library, read from its ELF ``.nv_fatbin``
section without any CUDA tool (cuobjdump --list-elf / --list-ptx give the same answer; the
tests compare the two).

The section is a sequence of fat binaries (one per CUDA translation unit, 8-byte aligned).
Each starts with a 16-byte header (magic 0xBA55ED50, u16 version, u16 header size, u64 size of
the entries) followed by its entries; each entry header starts u16 kind (1 = PTX, 2 = ELF
cubin, i.e. SASS), u16, u32 header size, u64 payload size, and holds the u32 architecture
(e.g. 90) at byte 28. Payloads may be compressed; the headers never are. Architecture-specific
targets (sm_90a) are reported under their base number (sm_90).
"""
from __future__ import annotations

import mmap
import struct
from typing import Dict, List, Optional

_FATBIN_MAGIC = 0xBA55ED50
_KIND_NAMES = {1: "ptx", 2: "sass"}


def _section(data, wanted: bytes) -> Optional[bytes]:
    """The contents of the named section of a little-endian ELF64 file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(index: int):
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size
        return struct.unpack_from("<IIQQQQ", data, shoff + index * shentsize)

    names_offset = header(shstrndx)[4]
    for index in range(shnum):
        name, _, _, _, offset, size = header(index)
        start = names_offset + name
        if data[start:data.find(b"\0", start)] == wanted:
            return data[offset:offset + size]
    return None


def cuda_archs(path: str) -> Dict[str, List[str]]:
    """``{"sass": ["sm_80", "sm_90"], "ptx": ["compute_90"]}`` for the shared library at
    ``path`` (both lists empty when it holds no CUDA code). Raises ValueError on a file this
    reader does not understand.

    Example::

        >>> cuda_archs(fastdropout._C.__file__)   # doctest: +SKIP
        {'sass': ['sm_80', 'sm_90'], 'ptx': ['compute_90']}
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        section = _section(data, b".nv_fatbin")
    found: Dict[str, set] = {"sass": set(), "ptx": set()}
    pos = 0
    while section is not None and pos + 16 <= len(section):
        magic, _, header_size, entries_size = struct.unpack_from("<IHHQ", section, pos)
        if magic != _FATBIN_MAGIC:
            if any(section[pos:pos + 8]):
                raise ValueError(f"unexpected data at offset {pos} of .nv_fatbin")
            pos += 8   # alignment padding between fat binaries
            continue
        entry, end = pos + header_size, pos + header_size + entries_size
        while entry + 32 <= end:
            kind, _, entry_header_size, payload_size = struct.unpack_from("<HHIQ", section, entry)
            (arch,) = struct.unpack_from("<I", section, entry + 28)
            if entry_header_size == 0:
                raise ValueError(f"malformed fat binary entry at offset {entry} of .nv_fatbin")
            if kind in _KIND_NAMES:
                found[_KIND_NAMES[kind]].add(arch)
            entry += entry_header_size + payload_size
        pos = end
    return {"sass": [f"sm_{a}" for a in sorted(found["sass"])],
            "ptx": [f"compute_{a}" for a in sorted(found["ptx"])]}
