"""VM snapshots for VM-clone fork: a documented, versioned format.

A snapshot holds what a child VM needs to resume a forked process: the used
guest memory (the image region and the heap blocks the page allocator has
handed out, not the whole RAM), the forking thread's CPU state (with
``rax = 0`` and ``rip`` after the ``syscall``: the child returns 0 from
fork), the process's kernel state (pid, ppid, groups, dispositions, fd table,
brk and mappings, stack and TLS) and the allocator metadata.

Layout, little endian::

    magic     8 bytes   b"UFSNAP\\0\\0"
    version   u16       SNAPSHOT_VERSION (refused if unknown)
    reserved  u16       0
    meta_len  u32       length of the JSON metadata that follows
    nranges   u32       number of memory ranges
    meta      meta_len bytes of UTF-8 JSON (see ``capture``)
    ranges    nranges x (addr u64, length u64, bytes[length])

Every length and address is checked against the regions the metadata
declares before anything is allocated, so a corrupt or hostile snapshot is
refused with ``SnapshotError`` and never crashes the tender.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

from tender_service.bmk.memalloc import MEMWHO_WIREDBMK, MemAlloc
from tender_service.bmk.pagealloc import PageAllocator
from tender_service.machine.cpu import (
    GPRS,
    LINUX_FPCW,
    LINUX_MXCSR,
    STATE_REGS,
    SYSCALL_INSN_LEN,
)
from tender_service.machine.elf import ElfImage
from tender_service.machine.errors import GuestError
from tender_service.machine.layout import MAX_RAM, PAGE_SIZE
from tender_service.machine.loader import build_stack, layout_memory
from tender_service.machine.memory import GuestMemory
from tender_service.rump.console import Console
from tender_service.rump.fdtable import FdTable
from tender_service.rump.files import ConsoleFile, File, NullFile, ZeroFile
from tender_service.rump.inet import InetSocket
from tender_service.rump.kernel import Forker, Kernel
from tender_service.rump.process import Lwp
from tender_service.rump.proctable import INIT_PID
from tender_service.rump.vminfo import VmConfig

MAGIC = b"UFSNAP\0\0"
SNAPSHOT_VERSION = 1
_HEADER = struct.Struct("<8sHHII")
_RANGE = struct.Struct("<QQ")
MAX_META = 16 << 20
MAX_RANGES = 1 << 20
_ZERO_PAGE = bytes(PAGE_SIZE)

#: make a File of a kind this module does not know (remote pipe ends)
FileFactory = Callable[[dict], File]


class SnapshotError(ValueError):
    """A snapshot we refuse: wrong magic, unknown version, inconsistent data."""


@dataclass(slots=True)
class Snapshot:
    meta: dict
    ranges: list[tuple[int, memoryview]]

    @property
    def memory_bytes(self) -> int:
        return sum(len(data) for _, data in self.ranges)


def file_state(f: File) -> dict:
    """The snapshot description of an open file (remote kinds describe themselves)."""
    if isinstance(f, ConsoleFile):
        return {"kind": "console", "fdno": f.fdno, "flags": f.flags}
    if isinstance(f, ZeroFile):
        return {"kind": f.kind, "flags": f.flags}
    if isinstance(f, NullFile):
        return {"kind": "null", "flags": f.flags}
    state = getattr(f, "snapshot_state", None)
    if state is None:
        raise SnapshotError(f"a {f.kind} file cannot cross VMs (share it first)")
    return state()


def capture(k: Kernel, lwp: Lwp, child_pid: int) -> bytes:
    """Snapshot the VM as the child of a fork by ``lwp`` will see it.

    Called inside the fork syscall: the CPU holds the parent's registers.
    """
    proc, mem = lwp.proc, k.mem
    # kept program images and stacks are the parent's caches: the child VM would get
    # their pages (and the snapshot their bytes) without the cache that knows them
    k.drop_caches()
    regs = k.cpu.read_state()
    regs["rip"] += SYSCALL_INSN_LEN
    regs["rax"] = 0
    files: dict[int, int] = {}
    fds = []
    for fd, e in sorted(proc.fds.entries.items()):
        fid = files.setdefault(id(e.file), len(files))
        fds.append({"fd": fd, "cloexec": e.cloexec, "file": fid, "state": file_state(e.file)})
    regions = [{"name": r.name, "base": r.base, "size": r.size} for r in mem.regions]
    meta = {
        "config": _config_state(k.config),
        "regions": regions,
        "brk_base": k.brk_base,
        "pages": k.pages.export_state(),
        "heap": k.heap.export_state(),
        **k.export_process(lwp, child_pid),  # "process" and "lwp"
        "fds": fds,
        "cpu": regs,
    }
    return _encode(meta, mem, k.pages)


def _config_state(config: VmConfig) -> dict:
    return {
        "ram": config.ram,
        "stack_size": config.stack_size,
        "quantum": config.quantum,
        "max_procs": config.max_procs,
        "tty": config.tty,
    }


def _encode(meta: dict, mem: GuestMemory, pages: PageAllocator) -> bytes:
    """The snapshot bytes: header, metadata, then the regions but the heap and the
    heap's allocated blocks, less their pages of zeros (a restore starts from zeroed
    RAM): a stack's unused part was 254 KB of fork_time's 315 KB snapshot, sent,
    checked and written into the child's RAM (page faults included) for nothing."""
    spans = [(r.base, r.size) for r in mem.regions if r.name != "heap"]
    spans += pages.allocated_blocks()
    ranges = [run for addr, n in spans for run in _nonzero_runs(mem, addr, n)]
    meta_b = json.dumps(meta, separators=(",", ":")).encode()
    out: list[bytes | memoryview] = [
        _HEADER.pack(MAGIC, SNAPSHOT_VERSION, 0, len(meta_b), len(ranges)),
        meta_b,
    ]
    for addr, n in ranges:
        out.append(_RANGE.pack(addr, n))
        out.append(mem.slice(addr, n))
    return b"".join(out)


def _nonzero_runs(mem: GuestMemory, addr: int, n: int) -> list[tuple[int, int]]:
    """[addr, addr + n) as (start, length) runs without its whole pages of zeros (a part
    page at either end is kept as it is)."""
    buf, off = mem.buf, mem.offset(addr, n)
    lo = -(-off // PAGE_SIZE) * PAGE_SIZE  # the first page boundary inside
    runs: list[tuple[int, int]] = []
    start = off  # of the run being built (buffer offsets)
    for page in range(lo, off + n - PAGE_SIZE + 1, PAGE_SIZE):
        if buf.find(_ZERO_PAGE, page, page + PAGE_SIZE) == page:  # memmem: fast
            if page > start:
                runs.append((start, page - start))
            start = page + PAGE_SIZE
    if off + n > start:
        runs.append((start, off + n - start))
    return [(addr + s - off, length) for s, length in runs]


def capture_program(
    k: Kernel, lwp: Lwp, image: ElfImage, execfn: bytes, argv: list[bytes], env: list[bytes]
) -> bytes:
    """The snapshot of a VM that has just booted ``image`` for the process of ``lwp``
    after its exec (VM-clone mode, a clone(CLONE_VM) child): laid out as
    ``Kernel.boot`` lays out a first program, the process's pid, ppid, groups,
    dispositions (handlers reset by the caller) and fds without FD_CLOEXEC.
    No emulator is needed: the new VM starts at the entry point."""
    proc = lwp.proc
    mem = GuestMemory(k.config.ram)
    alloc: MemAlloc | None = None
    try:
        loaded = layout_memory(mem, image)
        heap = loaded.heap
        pages = PageAllocator(heap.base, heap.size, PAGE_SIZE)
        alloc = MemAlloc(mem.region_view(heap), heap.base, pages)
        size = k.stack_bytes
        stack = alloc.malloc(size, 16, owner=proc.pid, who=MEMWHO_WIREDBMK)
        if not stack:
            raise SnapshotError("guest RAM too small for the new program's stack")
        sp = build_stack(mem, loaded, stack + size, argv, env, execfn)
        state = k.export_process(lwp, proc.pid)
        p = state["process"]
        p.update(
            ppid=proc.ppid,
            name=execfn.rsplit(b"/", 1)[-1].decode(errors="replace"),
            brk=loaded.region.end,
            mmaps=[],
            owner=proc.pid,
            program=[execfn.hex(), loaded.region.base, loaded.region.size, False],
        )
        state["lwp"].update(stack=stack, stack_base=stack, stack_size=size, tls=0)
        fds = []
        files: dict[int, int] = {}
        for fd, e in sorted(proc.fds.entries.items()):
            if not e.cloexec:
                fid = files.setdefault(id(e.file), len(files))
                fds.append({"fd": fd, "cloexec": False, "file": fid, "state": file_state(e.file)})
        cpu = dict.fromkeys(GPRS, 0)
        cpu.update(
            rsp=sp, rip=loaded.entry, rflags=0x202, fs_base=0, gs_base=0,
            mxcsr=LINUX_MXCSR, fpcw=LINUX_FPCW,
        )  # fmt: skip
        meta = {
            "config": _config_state(k.config),
            "regions": [{"name": r.name, "base": r.base, "size": r.size} for r in mem.regions],
            "brk_base": loaded.region.end,
            "pages": pages.export_state(),
            "heap": alloc.export_state(),
            **state,
            "fds": fds,
            "cpu": cpu,
        }
        return _encode(meta, mem, pages)
    except GuestError as e:
        raise SnapshotError(f"the new program's arguments do not fit: {e}") from e
    finally:
        alloc = None  # its view of RAM goes before RAM is unmapped
        mem.close()


def decode(data: bytes | bytearray | memoryview) -> Snapshot:
    """Parse and validate a snapshot (memory ranges stay views into ``data``)."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise SnapshotError("snapshot truncated (no header)")
    magic, version, _, meta_len, nranges = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise SnapshotError("not a unifork snapshot (bad magic)")
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(
            f"unsupported snapshot version {version} (this tender reads version {SNAPSHOT_VERSION})"
        )
    if meta_len > MAX_META or nranges > MAX_RANGES:
        raise SnapshotError("snapshot header out of range")
    pos = _HEADER.size
    if pos + meta_len > len(view):
        raise SnapshotError("snapshot truncated (metadata)")
    try:
        meta = json.loads(bytes(view[pos : pos + meta_len]))
        regions = [(int(r["base"]), int(r["size"])) for r in meta["regions"]]
        ram = int(meta["config"]["ram"])
    except (ValueError, KeyError, TypeError, OverflowError) as e:  # 1e999 is inf
        raise SnapshotError(f"bad snapshot metadata: {e}") from e
    if not 0 < ram <= MAX_RAM or sum(size for _, size in regions) > ram:
        raise SnapshotError("snapshot regions exceed its RAM size")
    return Snapshot(meta, _decode_ranges(view, pos + meta_len, nranges, regions))


def _decode_ranges(
    view: memoryview, pos: int, nranges: int, regions: list[tuple[int, int]]
) -> list[tuple[int, memoryview]]:
    """The ``nranges`` memory ranges from ``pos`` to the end of the snapshot, each inside
    one of the snapshot's ``regions``."""
    ranges: list[tuple[int, memoryview]] = []
    for _ in range(nranges):
        if pos + _RANGE.size > len(view):
            raise SnapshotError("snapshot truncated (range header)")
        addr, n = _RANGE.unpack_from(view, pos)
        pos += _RANGE.size
        if not any(base <= addr and addr + n <= base + size for base, size in regions):
            raise SnapshotError(f"range {addr:#x}+{n:#x} outside the snapshot's regions")
        if pos + n > len(view):
            raise SnapshotError("snapshot truncated (range data)")
        ranges.append((addr, view[pos : pos + n]))
        pos += n
    if pos != len(view):
        raise SnapshotError("trailing bytes after the last range")
    return ranges


def restore(
    snap: Snapshot,
    console: Console,
    forker: Forker | None,
    make_file: FileFactory,
    timeout: float | None = None,
) -> Kernel:
    """Build the child VM of a snapshot, ready to run (its process returns 0 from fork)."""
    meta = snap.meta
    try:
        cfg = meta["config"]
        config = VmConfig(
            ram=int(cfg["ram"]),
            stack_size=int(cfg["stack_size"]),
            quantum=int(cfg["quantum"]),
            max_procs=int(cfg["max_procs"]),
            tty=bool(cfg["tty"]),
            timeout=timeout,
        )
        config.validate()
    except (LookupError, TypeError, ValueError, OverflowError) as e:
        raise SnapshotError(f"bad snapshot config: {e}") from e
    mem = GuestMemory(config.ram)
    try:
        return _restore_into(mem, snap, config, console, forker, make_file)
    except SnapshotError:
        mem.close()
        raise
    except (LookupError, TypeError, ValueError, OverflowError, AttributeError, MemoryError) as e:
        mem.close()
        raise SnapshotError(f"inconsistent snapshot: {e}") from e


def _restore_into(
    mem: GuestMemory,
    snap: Snapshot,
    config: VmConfig,
    console: Console,
    forker: Forker | None,
    make_file: FileFactory,
) -> Kernel:
    meta = snap.meta
    heap_region = None
    for r in meta["regions"]:
        region = mem.add_region(str(r["name"]), int(r["base"]), int(r["size"]))
        if region.name == "heap":
            heap_region = region
    if heap_region is None or heap_region.base % PAGE_SIZE:
        raise SnapshotError("snapshot has no page-aligned heap region")
    for addr, data in snap.ranges:
        mem.write(addr, data)
    pages = PageAllocator.from_state(meta["pages"])
    heap = MemAlloc.from_state(mem.region_view(heap_region), heap_region.base, pages, meta["heap"])
    k = Kernel(config, console, mem, int(meta["brk_base"]), pages, heap, forker)
    if int(meta["process"]["pid"]) <= INIT_PID:
        raise SnapshotError("bad pid in snapshot")
    fds = FdTable()
    made: dict[int, File] = {}
    for e in meta["fds"]:
        fid = int(e["file"])
        f = made.get(fid)
        if f is None:
            f = made[fid] = file_from_state(e["state"], make_file)
        fds.install(f, bool(e["cloexec"]), fd=int(e["fd"]))
    for f in made.values():
        if isinstance(f, InetSocket):  # a shared listener: its port in the child's table
            f.register(k)
    regs = {name: int(v) for name, v in meta["cpu"].items() if name in STATE_REGS}
    k.cpu.write_state(regs)
    k.restore_process(meta, fds, k.cpu.new_context())
    return k


def file_from_state(state: dict, make_file: FileFactory) -> File:
    """The file ``file_state`` described (remote kinds: ``make_file``'s); a shared
    listener's port is still to be registered in its kernel."""
    if not isinstance(state, dict):
        raise SnapshotError("an fd's state is not an object")
    kind = state.get("kind")
    flags = int(state.get("flags", 0))
    if kind == "console":
        return ConsoleFile(flags, int(state["fdno"]))
    if kind == "null":
        return NullFile(flags)
    if kind in ("zero", "urandom"):
        return ZeroFile(flags, random=kind == "urandom")
    if kind == "inet_listener":
        return InetSocket.from_state(state)
    return make_file(state)
