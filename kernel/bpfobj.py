"""Read a compiled eBPF object: one program's instructions, its map relocations, its maps.

Pure (no syscalls, no root): ``kernel.bpf`` creates the maps and loads the program; this
only says what to create and where to patch. Why not libbpf or tc: tc creates fresh maps
for every interface it attaches to, and the only way to share or reach them is pinning
under /sys/fs/bpf, which ``ip netns exec`` hides (DESIGN.md). Loading ourselves, the agent
holds the map fds from the start, one map serves every interface, and nothing is pinned.

Supported is exactly what clang produces for a self-contained tc program: an ELF64
little-endian relocatable object, the program in one section, ``R_BPF_64_64``
relocations on ``ld_imm64`` instructions against symbols in ``.maps``, map definitions as
BTF (``__uint``/``__type`` in ``.maps``). Anything else (bpf-to-bpf calls, global data in
.data/.rodata/.bss, CO-RE relocations) raises :class:`ObjectError` naming what it found,
rather than loading something half-relocated.

ELF structures (include/uapi/linux/elf.h)::

    Elf64_Shdr { u32 sh_name, sh_type; u64 sh_flags, sh_addr, sh_offset, sh_size;
                 u32 sh_link, sh_info; u64 sh_addralign, sh_entsize; }       64 bytes
    Elf64_Sym  { u32 st_name; u8 st_info, st_other; u16 st_shndx;
                 u64 st_value, st_size; }                                   24 bytes
    Elf64_Rel  { u64 r_offset; u64 r_info; }   sym = r_info >> 32, type = r_info & 0xffffffff

BTF (include/uapi/linux/btf.h)::

    btf_header { u16 magic 0xeB9F; u8 version, flags; u32 hdr_len;
                 u32 type_off, type_len, str_off, str_len; }
    btf_type   { u32 name_off; u32 info (vlen 0-15, kind 24-28); u32 size|type; } + extra
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Mapping

from .errors import TcpcpError

R_BPF_64_64 = 1          # ld_imm64 with a 64-bit value (map reference)
BPF_LD_IMM64 = 0x18      # BPF_LD | BPF_DW | BPF_IMM
BPF_PSEUDO_MAP_FD = 1    # src_reg of ld_imm64: imm is a map fd
INSN_SIZE = 8
SHT_SYMTAB, SHT_REL = 2, 9

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_REL = struct.Struct("<QQ")
_BTF_HDR = struct.Struct("<HBBIIIII")
_BTF_TYPE = struct.Struct("<III")

# BTF kinds and the size of what follows each btf_type (per member when vlen counts).
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_STRUCT = 1, 2, 3, 4
BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT = 8, 9, 10, 11
BTF_KIND_VAR, BTF_KIND_DATASEC, BTF_KIND_TYPE_TAG = 14, 15, 18
_BTF_EXTRA = {1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0),
              8: (0, 0), 9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8),
              14: (4, 0), 15: (0, 12), 16: (0, 0), 17: (4, 0), 18: (0, 0), 19: (0, 12)}
_MODIFIERS = (BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT,
              BTF_KIND_TYPE_TAG)


class ObjectError(TcpcpError, ValueError):
    """The object file is not one this loader can load faithfully."""


@dataclass(frozen=True)
class MapSpec:
    """A map as the object declares it (``__uint(type, ...)`` and friends)."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int


@dataclass(frozen=True)
class Program:
    """One program section, ready to patch: ``relocs`` are (instruction index, map name)."""

    section: str
    insns: bytes
    license: str
    relocs: tuple[tuple[int, str], ...]
    maps: Mapping[str, MapSpec] = field(default_factory=dict)

    def patched(self, map_fds: Mapping[str, int]) -> bytes:
        """The instructions with every map reference turned into ``map_fds[name]``."""
        insns = bytearray(self.insns)
        for index, name in self.relocs:
            if name not in map_fds:
                raise ObjectError(f"no fd for map {name!r}")
            off = index * INSN_SIZE
            regs = insns[off + 1]
            insns[off + 1] = (regs & 0x0F) | (BPF_PSEUDO_MAP_FD << 4)  # dst low, src high
            struct.pack_into("<i", insns, off + 4, map_fds[name])
        return bytes(insns)


def load(data: bytes, section: str) -> Program:
    """Parse ``data`` (the .o file) and return program ``section`` with its maps."""
    if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
        raise ObjectError("not an ELF file")
    ident = data[:16]
    if ident[4] != 2 or ident[5] != 1:
        raise ObjectError("not ELF64 little-endian (compile with -target bpf on a LE host)")
    (_, _, machine, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx) = _EHDR.unpack_from(data)
    if machine != 247:  # EM_BPF
        raise ObjectError(f"ELF machine {machine} is not EM_BPF (247)")
    if shentsize != _SHDR.size or shoff + shnum * shentsize > len(data):
        raise ObjectError("section header table out of bounds")
    shdrs = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]

    def body(i: int) -> bytes:
        _, sh_type, _, _, off, size, *_ = shdrs[i]
        if sh_type == 8:  # SHT_NOBITS
            return b""
        if off + size > len(data):
            raise ObjectError(f"section {i} out of bounds")
        return data[off:off + size]

    shstr = body(shstrndx)
    names = [_cstr(shstr, s[0]) for s in shdrs]
    by_name = {n: i for i, n in enumerate(names)}
    for bad in (".data", ".rodata", ".bss"):
        if bad in by_name and shdrs[by_name[bad]][5]:
            raise ObjectError(f"global data in {bad} is not supported: keep the program "
                              "self-contained (constants inline, no static variables)")
    if section not in by_name:
        raise ObjectError(f"no section {section!r} (have {sorted(n for n in names if n)})")
    prog_idx = by_name[section]
    insns = body(prog_idx)
    if not insns or len(insns) % INSN_SIZE:
        raise ObjectError(f"section {section!r} is not a whole number of instructions")

    symtab_idx = next((i for i, s in enumerate(shdrs) if s[1] == SHT_SYMTAB), None)
    if symtab_idx is None:
        raise ObjectError("no symbol table")
    symdata, strtab = body(symtab_idx), body(shdrs[symtab_idx][6])
    syms = [_SYM.unpack_from(symdata, o) for o in range(0, len(symdata), _SYM.size)]
    maps_idx = by_name.get(".maps")

    relocs = []
    for i, s in enumerate(shdrs):
        if s[1] != SHT_REL or s[7] != prog_idx:
            continue
        rel = body(i)
        for o in range(0, len(rel), _REL.size):
            r_offset, r_info = _REL.unpack_from(rel, o)
            sym_idx, rtype = r_info >> 32, r_info & 0xFFFFFFFF
            if sym_idx >= len(syms):
                raise ObjectError(f"relocation names symbol {sym_idx}: out of range")
            st_name, _, _, st_shndx, _, _ = syms[sym_idx]
            sym = _cstr(strtab, st_name)
            if rtype != R_BPF_64_64 or st_shndx != maps_idx:
                where = names[st_shndx] if st_shndx < len(names) else st_shndx
                raise ObjectError(f"unsupported relocation type {rtype} against {sym!r} in "
                                  f"{where}: only map references are (no bpf-to-bpf calls, "
                                  "no global data; mark helpers __always_inline)")
            if r_offset % INSN_SIZE or r_offset + 2 * INSN_SIZE > len(insns) \
                    or insns[r_offset] != BPF_LD_IMM64:
                raise ObjectError(f"relocation for {sym!r} at {r_offset} is not on ld_imm64")
            relocs.append((r_offset // INSN_SIZE, sym))

    license_ = _cstr(body(by_name["license"]), 0) if "license" in by_name else ""
    maps: dict[str, MapSpec] = {}
    if ".BTF" in by_name:
        maps = _btf_maps(body(by_name[".BTF"]))
    missing = {name for _, name in relocs} - set(maps)
    if missing:
        raise ObjectError(f"maps without a BTF definition in .maps: {sorted(missing)}")
    return Program(section, insns, license_, tuple(relocs), maps)


def _cstr(blob: bytes, off: int) -> str:
    end = blob.find(b"\0", off)
    return blob[off:end if end >= 0 else len(blob)].decode("ascii", "replace")


def _btf_maps(btf: bytes) -> dict[str, MapSpec]:
    """Map definitions from the BTF of the ``.maps`` DATASEC."""
    if len(btf) < _BTF_HDR.size:
        raise ObjectError("truncated .BTF")
    magic, _, _, hdr_len, type_off, type_len, str_off, str_len = _BTF_HDR.unpack_from(btf)
    if magic != 0xEB9F:
        raise ObjectError(f"bad BTF magic {magic:#x}")
    types_at, strs_at = hdr_len + type_off, hdr_len + str_off
    strs = btf[strs_at:strs_at + str_len]
    types: list = [None]  # type ids start at 1
    pos, end = types_at, types_at + type_len
    while pos < end:
        name_off, info, size_type = _BTF_TYPE.unpack_from(btf, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind not in _BTF_EXTRA:
            raise ObjectError(f"unknown BTF kind {kind}")
        fixed, per = _BTF_EXTRA[kind]
        extra = btf[pos + _BTF_TYPE.size:pos + _BTF_TYPE.size + fixed + per * vlen]
        types.append((kind, _cstr(strs, name_off), size_type, vlen, extra))
        pos += _BTF_TYPE.size + fixed + per * vlen

    def strip(tid: int) -> int:
        while types[tid][0] in _MODIFIERS:
            tid = types[tid][2]
        return tid

    def members(tid: int) -> dict[str, int]:
        kind, _, _, vlen, extra = types[strip(tid)]
        if kind != BTF_KIND_STRUCT:
            raise ObjectError("a .maps variable is not a struct")
        out = {}
        for i in range(vlen):
            m_name, m_type, _ = struct.unpack_from("<III", extra, i * 12)
            out[_cstr(strs, m_name)] = m_type
        return out

    def uint(tid: int) -> int:  # __uint(name, v) is `int (*name)[v]`
        ptr = types[strip(tid)]
        arr = types[strip(ptr[2])]
        if ptr[0] != BTF_KIND_PTR or arr[0] != BTF_KIND_ARRAY:
            raise ObjectError("a __uint() map attribute is not a pointer to an array")
        return struct.unpack_from("<III", arr[4])[2]

    def size_of(tid: int) -> int:  # __type(name, T) is `T *name`
        ptr = types[strip(tid)]
        if ptr[0] != BTF_KIND_PTR:
            raise ObjectError("a __type() map attribute is not a pointer")
        target = types[strip(ptr[2])]
        if target[0] in (BTF_KIND_STRUCT, 5, BTF_KIND_INT, 6, 19):
            return target[2]
        raise ObjectError(f"cannot size BTF kind {target[0]}")

    maps = {}
    for kind, name, _, vlen, extra in types[1:]:
        if kind != BTF_KIND_DATASEC or name != ".maps":
            continue
        for i in range(vlen):
            var_id = struct.unpack_from("<I", extra, i * 12)[0]
            vkind, vname, vtype, _, _ = types[var_id]
            if vkind != BTF_KIND_VAR:
                raise ObjectError(".maps holds something other than variables")
            m = members(vtype)
            try:
                maps[vname] = MapSpec(vname, uint(m["type"]), size_of(m["key"]),
                                      size_of(m["value"]), uint(m["max_entries"]))
            except KeyError as e:
                raise ObjectError(f"map {vname!r} lacks {e.args[0]!r}") from None
    return maps
