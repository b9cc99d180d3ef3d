"""The bpf(2) syscall through ctypes: maps, program load, object info, test runs.

Why not bpftool: map updates sit on the commit path (one per commit, thousands per
second), and a process per update costs milliseconds; one syscall on a held map fd costs
about a microsecond. Why not a binding library: Debian has none for Python that works
with this libbpf, and the handful of commands needed here are small fixed structs.

Each command's attribute block is the matching member of ``union bpf_attr``
(include/uapi/linux/bpf.h), quoted beside its ctypes structure. The kernel requires
the bytes after the last field it knows for a command to be zero, so each structure is
exactly that member. Failures raise :class:`BpfError` with the errno and the command.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass

from .errors import KernelError

# asm/unistd_64.h and friends: the bpf syscall number per architecture.
_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
           "riscv64": 280}

# enum bpf_cmd
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_MAP_GET_NEXT_KEY, BPF_PROG_LOAD = 4, 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 13, 14, 15
_CMD_NAMES = {0: "BPF_MAP_CREATE", 1: "BPF_MAP_LOOKUP_ELEM", 2: "BPF_MAP_UPDATE_ELEM",
              3: "BPF_MAP_DELETE_ELEM", 4: "BPF_MAP_GET_NEXT_KEY", 5: "BPF_PROG_LOAD",
              10: "BPF_PROG_TEST_RUN", 13: "BPF_PROG_GET_FD_BY_ID",
              14: "BPF_MAP_GET_FD_BY_ID", 15: "BPF_OBJ_GET_INFO_BY_FD"}

BPF_MAP_TYPE_HASH = 1
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_OBJ_NAME_LEN = 16
BPF_F_RDONLY = 1 << 3

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)
_NR = _NR_BPF.get(platform.machine())

u32, u64 = ctypes.c_uint32, ctypes.c_uint64


class BpfError(KernelError):
    """bpf(2) failed: ``errno`` is the kernel's answer, ``step`` the command, ``log`` the
    verifier's log when a program load failed."""

    def __init__(self, step: str, err: int, detail: str = "", log: str = ""):
        text = f"{step}: {os.strerror(err)} (errno {err})"
        if detail:
            text += f": {detail}"
        if err == errno.EPERM:
            text += "; eBPF needs CAP_BPF and CAP_NET_ADMIN (run as root)"
        OSError.__init__(self, err, text)
        self.step = step
        self.log = log


class MapCreateAttr(ctypes.Structure):
    """struct { u32 map_type, key_size, value_size, max_entries, map_flags, inner_map_fd,
    numa_node; char map_name[16]; u32 map_ifindex; }"""
    _fields_ = [("map_type", u32), ("key_size", u32), ("value_size", u32),
                ("max_entries", u32), ("map_flags", u32), ("inner_map_fd", u32),
                ("numa_node", u32), ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
                ("map_ifindex", u32)]


class ElemAttr(ctypes.Structure):
    """struct { u32 map_fd; aligned_u64 key; union { aligned_u64 value, next_key; };
    u64 flags; }"""
    _fields_ = [("map_fd", u32), ("_pad", u32), ("key", u64), ("value", u64), ("flags", u64)]


class ProgLoadAttr(ctypes.Structure):
    """struct { u32 prog_type, insn_cnt; aligned_u64 insns, license; u32 log_level,
    log_size; aligned_u64 log_buf; u32 kern_version, prog_flags; char prog_name[16];
    u32 prog_ifindex, expected_attach_type; }"""
    _fields_ = [("prog_type", u32), ("insn_cnt", u32), ("insns", u64), ("license", u64),
                ("log_level", u32), ("log_size", u32), ("log_buf", u64),
                ("kern_version", u32), ("prog_flags", u32),
                ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN), ("prog_ifindex", u32),
                ("expected_attach_type", u32)]


class GetIdAttr(ctypes.Structure):
    """struct { union { u32 start_id, prog_id, map_id; }; u32 next_id; u32 open_flags; }"""
    _fields_ = [("id", u32), ("next_id", u32), ("open_flags", u32)]


class InfoAttr(ctypes.Structure):
    """struct { u32 bpf_fd; u32 info_len; aligned_u64 info; }"""
    _fields_ = [("bpf_fd", u32), ("info_len", u32), ("info", u64)]


class TestRunAttr(ctypes.Structure):
    """struct { u32 prog_fd, retval, data_size_in, data_size_out; aligned_u64 data_in,
    data_out; u32 repeat, duration; }"""
    _fields_ = [("prog_fd", u32), ("retval", u32), ("data_size_in", u32),
                ("data_size_out", u32), ("data_in", u64), ("data_out", u64),
                ("repeat", u32), ("duration", u32)]


class ProgInfo(ctypes.Structure):
    """struct bpf_prog_info, up to the name: { u32 type, id; u8 tag[8]; u32 jited_prog_len,
    xlated_prog_len; aligned_u64 jited_prog_insns, xlated_prog_insns; u64 load_time;
    u32 created_by_uid, nr_map_ids; aligned_u64 map_ids; char name[16]; }"""
    _fields_ = [("type", u32), ("id", u32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", u32), ("xlated_prog_len", u32), ("jited_prog_insns", u64),
                ("xlated_prog_insns", u64), ("load_time", u64), ("created_by_uid", u32),
                ("nr_map_ids", u32), ("map_ids", u64), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


class MapInfo(ctypes.Structure):
    """struct bpf_map_info, up to the name: { u32 type, id, key_size, value_size,
    max_entries, map_flags; char name[16]; }"""
    _fields_ = [("type", u32), ("id", u32), ("key_size", u32), ("value_size", u32),
                ("max_entries", u32), ("map_flags", u32), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


def call(cmd: int, attr: ctypes.Structure, detail: str = "") -> int:
    """bpf(cmd, &attr, sizeof attr); the result, or BpfError with the errno."""
    if _NR is None:
        raise BpfError(_CMD_NAMES.get(cmd, str(cmd)), errno.ENOSYS,
                       f"no bpf syscall number known for {platform.machine()}")
    ret = _syscall(_NR, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise BpfError(_CMD_NAMES.get(cmd, str(cmd)), ctypes.get_errno() or errno.EIO, detail)
    return ret


def _addr(buf) -> int:
    return ctypes.addressof(buf)


class Map:
    """A map held by fd. Keys and values are bytes of exactly ``key_size``/``value_size``.

    ``update``/``lookup_into`` reuse nothing mutable between calls except what the caller
    passes, so different threads may use one Map; the hot path (the commit) uses
    :meth:`prepared` to skip per-call allocation.
    """

    def __init__(self, fd: int, key_size: int, value_size: int, max_entries: int, name: str):
        self.fd, self.key_size, self.value_size = fd, key_size, value_size
        self.max_entries, self.name = max_entries, name

    @classmethod
    def create(cls, name: str, map_type: int, key_size: int, value_size: int,
               max_entries: int, flags: int = 0) -> "Map":
        attr = MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                             max_entries=max_entries, map_flags=flags,
                             map_name=name.encode()[:BPF_OBJ_NAME_LEN - 1])
        fd = call(BPF_MAP_CREATE, attr, f"create map {name}")
        return cls(fd, key_size, value_size, max_entries, name)

    @classmethod
    def from_id(cls, map_id: int) -> "Map":
        fd = call(BPF_MAP_GET_FD_BY_ID, GetIdAttr(id=map_id), f"map id {map_id}")
        try:
            info = map_info(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, info.key_size, info.value_size, info.max_entries, info.name.decode())

    def info(self) -> MapInfo:
        return map_info(self.fd)

    def _check(self, key: bytes, value: bytes | None = None) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key is {len(key)} bytes, map wants {self.key_size}")
        if value is not None and len(value) != self.value_size:
            raise ValueError(f"{self.name}: value is {len(value)} bytes, map wants {self.value_size}")

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._check(key, value)
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(value, self.value_size)
        call(BPF_MAP_UPDATE_ELEM, ElemAttr(map_fd=self.fd, key=_addr(k), value=_addr(v),
                                           flags=flags), f"update {self.name}")

    def prepared(self, key: bytes, flags: int = 0) -> tuple[ElemAttr, ctypes.Array]:
        """An attribute block for repeated operations on one key, and the buffer it points
        into (key, then value): for an update write the value at ``key_size`` and
        ``call(BPF_MAP_UPDATE_ELEM, attr)``; for a lookup call BPF_MAP_LOOKUP_ELEM (with
        ``flags`` 0) and read the value there. Keep the buffer alive with the block."""
        self._check(key)
        buf = ctypes.create_string_buffer(self.key_size + self.value_size)
        buf[:self.key_size] = key
        base = _addr(buf)
        attr = ElemAttr(map_fd=self.fd, key=base, value=base + self.key_size, flags=flags)
        return attr, buf

    def lookup(self, key: bytes) -> bytes | None:
        self._check(key)
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(self.value_size)
        try:
            call(BPF_MAP_LOOKUP_ELEM, ElemAttr(map_fd=self.fd, key=_addr(k), value=_addr(v)),
                 f"lookup {self.name}")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def delete(self, key: bytes) -> bool:
        self._check(key)
        k = ctypes.create_string_buffer(key, self.key_size)
        try:
            call(BPF_MAP_DELETE_ELEM, ElemAttr(map_fd=self.fd, key=_addr(k)), f"delete {self.name}")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> list[bytes]:
        """Every key now present (a snapshot: entries may come and go meanwhile)."""
        out = []
        cur = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        attr = ElemAttr(map_fd=self.fd, key=0, value=_addr(nxt))  # key NULL: the first key
        while True:
            try:
                call(BPF_MAP_GET_NEXT_KEY, attr, f"iterate {self.name}")
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            out.append(nxt.raw)
            ctypes.memmove(cur, nxt, self.key_size)
            attr.key = _addr(cur)

    def items(self) -> dict[bytes, bytes]:
        found = {}
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                found[key] = value
        return found

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    call(BPF_OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                          info=_addr(info)), "map info")
    return info


@dataclass(frozen=True)
class ProgDescription:
    """What the kernel says about a loaded program."""

    id: int
    type: int
    name: str
    tag: str
    map_ids: tuple[int, ...]


def prog_info(fd: int) -> ProgDescription:
    info = ProgInfo()
    call(BPF_OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                          info=_addr(info)), "program info")
    ids = (u32 * info.nr_map_ids)()
    if info.nr_map_ids:
        again = ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=_addr(ids))
        call(BPF_OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(again),
                                              info=_addr(again)), "program map ids")
    return ProgDescription(info.id, info.type, info.name.decode(), bytes(info.tag).hex(),
                           tuple(ids))


def prog_fd_by_id(prog_id: int) -> int:
    return call(BPF_PROG_GET_FD_BY_ID, GetIdAttr(id=prog_id), f"program id {prog_id}")


def prog_load(insns: bytes, *, name: str, license: str = "GPL",
              prog_type: int = BPF_PROG_TYPE_SCHED_CLS) -> int:
    """Load a program; on failure load again with the verifier log and attach its tail."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attr = ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=_addr(code),
                        license=_addr(lic), prog_name=name.encode()[:BPF_OBJ_NAME_LEN - 1])
    try:
        return call(BPF_PROG_LOAD, attr, f"load program {name}")
    except BpfError as first:
        if first.errno in (errno.EPERM, errno.ENOSYS):
            raise
        log = ctypes.create_string_buffer(1 << 22)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), _addr(log)
        try:
            return call(BPF_PROG_LOAD, attr, f"load program {name}")
        except BpfError as again:
            text = log.value.decode(errors="replace")
            tail = "\n".join(text.strip().splitlines()[-20:])
            raise BpfError(again.step, again.errno, f"verifier says:\n{tail}", text) from None


def test_run(prog_fd: int, data: bytes, out_size: int = 0) -> tuple[int, bytes]:
    """Run a program once on ``data`` (BPF_PROG_TEST_RUN); its return value and the packet
    as the program left it. For tc programs the data is an Ethernet frame."""
    inp = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(max(out_size, len(data) + 256))
    attr = TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_size_out=len(out),
                       data_in=_addr(inp), data_out=_addr(out), repeat=1)
    call(BPF_PROG_TEST_RUN, attr, "test run")
    return attr.retval, out.raw[:attr.data_size_out]
