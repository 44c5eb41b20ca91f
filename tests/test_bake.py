"""Baked images (issue 14, item 1): ``unifork bake``, the format's checks, every boot path.

The format is docs/image-format.md.  Here: a bake parses back to the tree it
was made of; every malformed image (built byte by byte, past the writer's own
checks) is refused with a message that says what is wrong, never another
exception; ``unifork run IMAGE -- /bin/prog args`` prints what the ELF prints
run directly, in thread and VM-clone mode; ``unifork images FILE`` lists an
image; a real tender takes a baked image through UploadImage and Launch, and
refuses a corrupt or too large one while it keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from pathlib import Path

import grpc
import pytest
from test_service import (
    HELLO,
    MODES,
    Tender,
    cli,
    console,
    launch,
    rpc_error,
    stdout_of,
    stopped_cleanly,
    wait,
)

from tender_service.machine.errors import ImageError
from tender_service.machine.rootfs import (
    DIR,
    ENTRY,
    FILE,
    HEADER,
    MAGIC,
    MAX_ENTRY_BYTES,
    MAX_IMAGE_BYTES,
    PROGRAM,
    SYMLINK,
    FsEntry,
    RootFs,
    parse_image,
    parse_rootfs,
    select_program,
)
from tender_service.toolchain.bake import BakeError, bake, build_rootfs, encode
from tender_service.toolchain.images import build_image

F, D, L = 1, 2, 3  # kind codes in the file


def elf(name: str) -> bytes:
    return build_image(name).read_bytes()


def raw_image(
    entries: list[tuple[int, int, bytes, bytes]],
    programs: list[bytes],
    major: int = 1,
    minor: int = 0,
    total: int | None = None,
    count: int | None = None,
) -> bytes:
    """An image written byte by byte (kind, mode, path, payload per entry), past the
    writer's checks: what a hostile or broken client could send."""
    body = b"".join(
        ENTRY.pack(kind, 0, mode, len(path), len(payload)) + path + payload
        for kind, mode, path, payload in entries
    )
    body += b"".join(PROGRAM.pack(len(p)) + p for p in programs)
    size = HEADER.size + len(body) + 32
    head = HEADER.pack(
        MAGIC,
        major,
        minor,
        0,
        len(entries) if count is None else count,
        len(programs),
        size if total is None else total,
    )
    return head + body + hashlib.sha256(head + body).digest()


@pytest.fixture(scope="module")
def hello_elf() -> bytes:
    return elf("hello")


def good_entries(hello_elf: bytes) -> list[tuple[int, int, bytes, bytes]]:
    return [(D, 0o755, b"/bin", b""), (F, 0o755, b"/bin/hello", hello_elf)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A host directory with a subdirectory, a file and a relative symlink."""
    d = tmp_path_factory.mktemp("etc")
    (d / "sub").mkdir(mode=0o750)
    (d / "motd").write_text("welcome\n")
    (d / "motd").chmod(0o640)
    (d / "sub" / "deep").write_bytes(b"\x00\x01binary")
    (d / "link").symlink_to("motd")
    return d


@pytest.fixture(scope="module")
def app(tmp_path_factory, tree) -> Path:
    """An image of three programs (args the default), a tree and a file."""
    out = tmp_path_factory.mktemp("app") / "app.img"
    bake(
        out,
        [(f"/bin/{n}", build_image(n)) for n in ("args", "token_ring", "fork_exit_wait")],
        [("/etc", tree)],
        [("/motd", tree / "motd")],
    )
    return out


# -- bake and parse ------------------------------------------------------------------------------
def test_bake_parse_round_trip(app, tree):
    data = app.read_bytes()
    boot = parse_image(data, "app.img")
    fs = boot.rootfs
    assert fs is not None
    assert fs.programs == ("/bin/args", "/bin/token_ring", "/bin/fork_exit_wait")
    assert boot.path == "/bin/args" and boot.elf.data == elf("args")
    by_path = {e.path: e for e in fs.entries}
    assert by_path["/bin"] == FsEntry("/bin", DIR, 0o755)  # created on the way
    assert by_path["/bin/args"] == FsEntry("/bin/args", FILE, 0o755, elf("args"))
    assert by_path["/etc/sub"] == FsEntry("/etc/sub", DIR, 0o750)
    assert by_path["/etc/motd"] == FsEntry("/etc/motd", FILE, 0o640, b"welcome\n")
    assert by_path["/etc/sub/deep"].data == b"\x00\x01binary"
    assert by_path["/etc/link"] == FsEntry("/etc/link", SYMLINK, 0o777, target="motd")
    assert by_path["/motd"].data == b"welcome\n"
    # parents first, every path once; the bytes are a function of the tree
    seen: set[str] = set()
    for e in fs.entries:
        assert e.path.rsplit("/", 1)[0] in seen | {""}
        seen.add(e.path)
    assert len(seen) == len(fs.entries) == 10
    assert encode(parse_rootfs(data)) == data


def test_a_plain_elf_parses_without_a_tree(hello_elf):
    boot = parse_image(hello_elf, "hello")
    assert (boot.rootfs, boot.path, boot.elf.data) == (None, "hello", hello_elf)
    assert select_program(boot, ["a"]) == (boot, ["a"])


def test_select_program(app):
    boot = parse_image(app.read_bytes(), "app.img")
    chosen, argv = select_program(boot, ["-n", "3"])
    assert (chosen.path, argv) == ("/bin/args", ["/bin/args", "-n", "3"])
    chosen, argv = select_program(boot, ["/bin/token_ring", "x"])
    assert (chosen.elf.data, argv) == (elf("token_ring"), ["/bin/token_ring", "x"])
    for path, why in [
        (
            "/bin/nope",
            "no program /bin/nope in the image (its programs: /bin/args, /bin/token_ring,",
        ),
        ("/etc", "program /etc: a dir, not a file"),
        ("/etc/motd", "program /etc/motd: not executable (mode 0640)"),
        ("/motd", "program /motd: not executable (mode 0640)"),
    ]:
        with pytest.raises(ImageError) as ei:
            select_program(boot, [path])
        assert str(ei.value).startswith(f"app.img: {why}"), str(ei.value)


def _bad_images(hello: bytes) -> dict[str, tuple[bytes, str]]:
    ok = good_entries(hello)
    good = raw_image(ok, [b"/bin/hello"])
    flipped = bytearray(good)
    flipped[HEADER.size + 20] ^= 0x40
    return {
        "empty": (b"", "not an ELF file, nor a baked image (bad magic)"),
        "bad magic": (b"\x89UFK\r\n\x1a\x0b" + good[8:], "not an ELF file, nor a baked image"),
        "header only": (good[: HEADER.size], "truncated: 32 bytes, a baked image has at least 64"),
        "truncated": (good[:-100], f"truncated: the header says {len(good)} bytes"),
        "trailing bytes": (good + b"x", "trailing bytes: the header says"),
        "newer major": (
            raw_image(ok, [b"/bin/hello"], major=2, minor=3),
            "image format version 2.3 is newer than the version this unifork reads (1.0)",
        ),
        "major 0": (raw_image(ok, [b"/bin/hello"], major=0), "version 0.0 is not the version"),
        "checksum": (bytes(flipped), "checksum mismatch: the image is corrupt"),
        "absurd total": (raw_image(ok, [b"/bin/hello"], total=1 << 62), "image too large"),
        "absurd count": (raw_image(ok, [b"/bin/hello"], count=(1 << 32) - 1), "4294967295 entries"),
        "count past the end": (raw_image(ok, [b"/bin/hello"], count=3), "truncated: entry 2"),
        "dotdot": (
            raw_image([*ok, (F, 0o644, b"/bin/../etc", b"x")], [b"/bin/hello"]),
            "entry 2: path '/bin/../etc': empty, '.' or '..' component",
        ),
        "relative": (raw_image([(F, 0o644, b"etc", b"x"), *ok], [b"/bin/hello"]), "absolute"),
        "double slash": (raw_image([*ok, (F, 0o644, b"/bin//x", b"")], [b"/bin/hello"]), "empty"),
        "root": (raw_image([(D, 0o755, b"/", b""), *ok], [b"/bin/hello"]), "below /"),
        "NUL in path": (raw_image([*ok, (F, 0o644, b"/a\0b", b"")], [b"/bin/hello"]), "NUL"),
        "not UTF-8": (raw_image([*ok, (F, 0o644, b"/\xff", b"")], [b"/bin/hello"]), "not UTF-8"),
        "long component": (
            raw_image([*ok, (F, 0o644, b"/" + b"a" * 256, b"")], [b"/bin/hello"]),
            "a component longer than 255 bytes",
        ),
        "long path": (
            raw_image([*ok, (F, 0o644, b"/a" * 2100, b"")], [b"/bin/hello"]),
            "entry 2: path: 4200 bytes, longer than 4096",
        ),
        "duplicate": (
            raw_image([*ok, (F, 0o644, b"/bin/hello", b"x")], [b"/bin/hello"]),
            "duplicate path /bin/hello",
        ),
        "under a file": (
            raw_image([*ok, (F, 0o644, b"/bin/hello/x", b"")], [b"/bin/hello"]),
            "/bin/hello/x: under /bin/hello, which is a file, not a directory",
        ),
        "under a symlink": (
            raw_image([*ok, (L, 0o777, b"/l", b"/bin"), (F, 0o644, b"/l/x", b"")], [b"/bin/hello"]),
            "/l/x: under /l, which is a symlink, not a directory",
        ),
        "child before parent": (
            raw_image(
                [(F, 0o755, b"/bin/hello", hello), (D, 0o755, b"/bin", b"")], [b"/bin/hello"]
            ),
            "its directory /bin is not in the image before it",
        ),
        "unknown kind": (raw_image([*ok, (9, 0o644, b"/x", b"")], [b"/bin/hello"]), "kind 9"),
        "file-type bits in mode": (
            raw_image([*ok, (F, 0o100644, b"/x", b"")], [b"/bin/hello"]),
            "mode 0o100644 has bits beyond 0o7777",
        ),
        "dir with contents": (
            raw_image([*ok, (D, 0o755, b"/d", b"xyz")], [b"/bin/hello"]),
            "a directory with 3 bytes",
        ),
        "empty symlink": (raw_image([*ok, (L, 0o777, b"/l", b"")], [b"/bin/hello"]), "symlink"),
        "NUL in symlink": (raw_image([*ok, (L, 0o777, b"/l", b"a\0")], [b"/bin/hello"]), "NUL"),
        "no programs": (raw_image(ok, []), "0 programs"),
        "program missing": (raw_image(ok, [b"/bin/sh"]), "program /bin/sh: not in the image"),
        "program is a dir": (raw_image(ok, [b"/bin"]), "program /bin: a dir"),
        "program twice": (raw_image(ok, [b"/bin/hello", b"/bin/hello"]), "listed twice"),
        "program not an ELF": (
            raw_image([*ok, (F, 0o755, b"/bin/sh", b"#!/bin/sh\n")], [b"/bin/sh"]),
            "program /bin/sh: not an ELF file",
        ),
        "program a truncated ELF": (
            raw_image([*ok, (F, 0o755, b"/bin/sh", hello[:2000])], [b"/bin/sh"]),
            "program /bin/sh: ",
        ),
        "program not executable": (
            raw_image([ok[0], (F, 0o644, b"/bin/hello", hello)], [b"/bin/hello"]),
            "program /bin/hello: not executable (mode 0644)",
        ),
        "bytes after the programs": (
            _with_extra_body(raw_image(ok, [b"/bin/hello"])),
            "4 bytes after the program list",
        ),
    }


def _with_extra_body(img: bytes) -> bytes:
    body = img[:-32] + b"\0\0\0\0"
    body = body[:24] + struct.pack("<Q", len(body) + 32) + body[32:]
    return body + hashlib.sha256(body).digest()


def _absurd_entry_size() -> bytes:
    """An entry that claims 2**63 bytes (the last entry of an otherwise valid image)."""
    head = HEADER.pack(MAGIC, 1, 0, 1, 1, 1, 0)
    body = ENTRY.pack(F, 0, 0o755, 2, 1 << 63) + b"/x"
    img = head + body
    img = img[:24] + struct.pack("<Q", len(img) + 32) + img[32:]
    return img + hashlib.sha256(img).digest()


@pytest.fixture(scope="module")
def bad_images(hello_elf):
    cases = _bad_images(hello_elf)
    cases["absurd entry size"] = (
        _absurd_entry_size(),
        f"entry 0 ('/x'): {1 << 63} bytes, more than an entry may hold ({MAX_ENTRY_BYTES})",
    )
    return cases


BAD_CASES = [
    "empty", "bad magic", "header only", "truncated", "trailing bytes", "newer major", "major 0",
    "checksum", "absurd total", "absurd count", "count past the end", "absurd entry size",
    "dotdot", "relative", "double slash", "root", "NUL in path", "not UTF-8", "long component",
    "long path", "duplicate", "under a file", "under a symlink", "child before parent",
    "unknown kind", "file-type bits in mode", "dir with contents", "empty symlink",
    "NUL in symlink", "no programs", "program missing", "program is a dir", "program twice",
    "program not an ELF", "program a truncated ELF", "program not executable",
    "bytes after the programs",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_malformed_image_refused_with_its_reason(bad_images, case):
    data, reason = bad_images[case]
    with pytest.raises(ImageError) as ei:
        parse_image(data, "bad.img")
    assert str(ei.value).startswith("bad.img: ") and reason in str(ei.value), str(ei.value)


def test_the_raw_builder_makes_valid_images(hello_elf):
    """The control of the cases above: unmutated, the hand-built image parses."""
    boot = parse_image(raw_image(good_entries(hello_elf), [b"/bin/hello"]), "ok")
    assert boot.path == "/bin/hello" and boot.elf.data == hello_elf


def test_mutated_tables_fail_only_with_image_errors(hello_elf):
    """Random bytes of the table (checksum recomputed, so the checks behind it run):
    each image parses or is an ImageError, never another exception."""
    entries = [
        (D, 0o755, b"/bin", b""),
        (D, 0o755, b"/etc", b""),
        (F, 0o644, b"/etc/motd", b"hi\n"),
        (L, 0o777, b"/etc/l", b"motd"),
        (F, 0o755, b"/bin/hello", hello_elf),
    ]
    good = raw_image(entries, [b"/bin/hello", b"/etc/motd"])[:-32]
    table_end = good.index(hello_elf) - 1  # the table and the last entry's header
    spots = [*range(HEADER.size - 12, table_end), *range(len(good) - 30, len(good))]
    rng = random.Random(14)
    outcomes = {"refused": 0, "parsed": 0}
    for _ in range(400):
        body = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(spots)] = rng.randrange(256)
        body[24:32] = struct.pack("<Q", len(body) + 32)
        try:
            parse_image(bytes(body) + hashlib.sha256(body).digest(), "m")
            outcomes["parsed"] += 1
        except ImageError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200, outcomes


def test_a_too_large_image_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as fh:
        fh.write(MAGIC)
        fh.truncate(MAX_IMAGE_BYTES + 1)  # sparse: nothing is written
    r = cli("run", str(big))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert f"image too large ({MAX_IMAGE_BYTES + 1} bytes; at most {MAX_IMAGE_BYTES})" in r.stderr


# -- the writer's own checks ---------------------------------------------------------------------
def test_bake_refuses_what_it_cannot_pack(tmp_path, tree):
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    hello = build_image("hello")
    fifo = tmp_path / "withfifo"
    fifo.mkdir()
    os.mkfifo(fifo / "pipe")
    cases = [
        (dict(bins=[]), "no program: give at least one --bin"),
        (dict(bins=[("/bin/sh", text)]), f"--bin /bin/sh={text}: {text}: not an ELF file"),
        (dict(bins=[("/bin/sh", tmp_path / "gone")]), "No such file or directory"),
        (dict(bins=[("/bin/../sh", hello)]), "'..' component"),
        (dict(bins=[("bin/sh", hello)]), "not an absolute path"),
        (dict(bins=[("/bin/sh", hello), ("/bin/sh", hello)]), "/bin/sh is in the image already"),
        (dict(bins=[("/a/b", hello)], files=[("/a", text)]), "under /a, which is a file"),
        (dict(bins=[("/a", hello)], files=[("/a/b", text)]), "/a is in the image already (a dir)"),
        (dict(bins=[("/a", hello)], dirs=[("/e", tmp_path / "gone")]), "not a directory"),
        (dict(bins=[("/a", hello)], dirs=[("/e", fifo)]), "is not a regular file, directory"),
        (dict(bins=[("/a", hello)], files=[("/f", tmp_path)]), "not a regular file"),
    ]
    for kw, why in cases:
        with pytest.raises(BakeError) as ei:
            build_rootfs(kw.get("bins", []), kw.get("dirs", []), kw.get("files", []))
        assert why in str(ei.value), (kw, str(ei.value))
    assert not list(tmp_path.glob("*.img"))


# -- unifork run / bake / images -----------------------------------------------------------------
@pytest.mark.parametrize("fork", ["thread", "vmclone"])
def test_run_a_program_of_the_image_as_the_elf_runs(app, fork):
    for prog, args in [("token_ring", ["-n", "4", "-r", "3"]), ("fork_exit_wait", ["-n", "3"])]:
        direct = cli("run", "--fork", fork, str(build_image(prog)), *args)
        baked = cli("run", "--fork", fork, str(app), "--", f"/bin/{prog}", *args)
        assert direct.stdout and direct.returncode == 0, direct
        assert (baked.returncode, baked.stdout, baked.stderr) == (0, direct.stdout, ""), baked
    # argv[0] is the program's path as given; without one the image's first program runs
    r = cli("run", "--fork", fork, str(app), "--", "/bin/args", "5", "two words")
    assert r.returncode == 5, r
    assert r.stdout.startswith("argc=3\nargv[0]=/bin/args\nargv[1]=5\nargv[2]=two words\n"), r
    r = cli("run", "--fork", fork, str(app), "--", "7")
    assert r.returncode == 7 and r.stdout.startswith("argc=2\nargv[0]=/bin/args\nargv[1]=7\n"), r


@pytest.mark.parametrize("fork", ["thread", "vmclone"])
def test_run_refuses_a_corrupt_image(app, tmp_path, fork):
    data = bytearray(app.read_bytes())
    data[len(data) // 2] ^= 1
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    r = cli("run", "--fork", fork, str(bad))
    assert (r.returncode, r.stdout) == (2, ""), r
    assert r.stderr == "unifork: bad.img: checksum mismatch: the image is corrupt\n", r.stderr
    r = cli("run", "--fork", fork, str(app), "--", "/bin/sh")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert (
        "app.img: no program /bin/sh in the image (its programs: /bin/args, /bin/token_ring"
        in r.stderr
    )


def test_bake_command_and_images_listing(tmp_path, tree):
    out = tmp_path / "cli.img"
    r = cli(
        "bake", "-o", str(out), "--bin", f"/bin/hello={build_image('hello')}",
        "--dir", f"/etc={tree}", "--file", f"/motd={tree / 'motd'}",
    )  # fmt: skip
    assert r.returncode == 0, r
    size = out.stat().st_size
    assert r.stdout == f"{out}: 1 programs (/bin/hello), 8 entries, {size} bytes\n"
    r = cli("run", str(out))
    assert (r.returncode, r.stdout) == (0, HELLO.decode()), r
    r = cli("images", str(out), "-o", "json")
    assert r.returncode == 0, r
    info = json.loads(r.stdout)
    assert info["kind"] == "baked" and info["programs"] == ["/bin/hello"]
    assert (info["entries"], info["files"], info["dirs"], info["symlinks"]) == (8, 4, 3, 1)
    assert info["size_bytes"] == size
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert {"path": "/etc/link", "kind": "symlink", "mode": "0777", "size_bytes": 0,
            "target": "motd"} in info["tree"]  # fmt: skip
    r = cli("images", str(out))
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines[1:3] == [
        "programs: /bin/hello",
        f"entries: 8 (4 files, 3 directories, 1 symlinks; {info['file_bytes']} bytes of contents)",
    ], lines
    assert any(ln.split() == ["symlink", "0777", "0", "/etc/link", "->", "motd"] for ln in lines)
    r = cli("images", "-o", "json")  # the built-in listing is unchanged
    assert r.returncode == 0 and "hello" in {i["name"] for i in json.loads(r.stdout)}, r


def test_bake_command_errors_are_one_line(tmp_path):
    text = tmp_path / "notelf"
    text.write_text("hello\n")
    out = tmp_path / "x.img"
    for args, why in [
        (["--bin", f"/bin/sh={text}"], f"--bin /bin/sh={text}: {text}: not an ELF file"),
        (["--bin", "/bin/sh"], "--bin '/bin/sh': not GUEST_PATH=HOST_PATH"),
        (["--dir", f"/etc={tmp_path}"], "no program: give at least one --bin GUEST_PATH=ELF"),
    ]:
        r = cli("bake", "-o", str(out), *args)
        assert (r.returncode, r.stdout) == (2, ""), r
        assert r.stderr == f"unifork: {why}\n", r.stderr
    assert not out.exists()
    r = cli("images", str(text))
    assert r.returncode == 2 and "not an ELF file, nor a baked image" in r.stderr, r


# -- a real tender -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tender(tmp_path_factory):
    t = Tender.start(tmp_path_factory.mktemp("bake-tender"), "--pool", "1", "--max-upload", "6M")
    yield t
    stopped_cleanly(t)


@pytest.fixture(scope="module")
def client(tender):
    c = tender.client()
    yield c
    c.close()


@pytest.mark.parametrize("mode", ["thread", "vmclone-shm"])
def test_tender_launches_a_baked_image(client, app, mode):
    info = client.upload("app", app.read_bytes())
    assert (info.size_bytes, info.builtin) == (app.stat().st_size, False)
    iid = launch(client, "app", ["/bin/token_ring", "-n", "3", "-r", "2"], **MODES[mode])
    r = wait(client, iid)
    assert (r.outcome, r.exit_code) == ("exited", 0), r
    assert stdout_of(console(client, iid)) == b"token=6\n"
    iid = launch(client, "app", ["/bin/args", "x"], **MODES[mode])
    assert wait(client, iid).exit_code == 0
    assert stdout_of(console(client, iid)).startswith(b"argc=2\nargv[0]=/bin/args\nargv[1]=x\n")


def test_tender_refuses_corrupt_and_too_large_images_and_keeps_serving(tender, client, app):
    data = bytearray(app.read_bytes())
    data[len(data) // 3] ^= 0x80
    e = rpc_error(lambda: client.upload("corrupt", bytes(data)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert e.details() == "data: corrupt: checksum mismatch: the image is corrupt", e.details()
    newer = bytearray(app.read_bytes())
    newer[8:10] = struct.pack("<H", 7)
    e = rpc_error(lambda: client.upload("newer", bytes(newer)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert "image format version 7.0 is newer than the version this unifork reads (1.0)" in (
        e.details()
    )
    big = encode(RootFs((FsEntry("/bin", DIR, 0o755),) + tuple(
        FsEntry(f"/bin/{n}", FILE, 0o755, elf(n)) for n in ("hello", "args", "token_ring",
                                                              "fork_exit_wait", "pipe_talk")
    ), ("/bin/hello",)))  # fmt: skip
    assert len(big) > 6 << 20
    e = rpc_error(lambda: client.upload("big", big))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
    assert {"corrupt", "newer", "big"}.isdisjoint(i.name for i in client.images())
    # Launch: what was refused is not there; a program the image lacks is refused
    assert rpc_error(lambda: launch(client, "corrupt")).code() == grpc.StatusCode.NOT_FOUND
    client.upload("app2", app.read_bytes())
    e = rpc_error(lambda: launch(client, "app2", ["/bin/sh", "-c", "echo hi"]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert e.details().startswith("image: app2: no program /bin/sh in the image"), e.details()
    # still healthy: the default program of the image, and a plain ELF
    for image, out in (("app2", b"argc=1\nargv[0]=/bin/args\n"), ("hello", HELLO)):
        iid = launch(client, image, **MODES["vmclone-shm"])
        assert wait(client, iid).exit_code == 0
        assert stdout_of(console(client, iid)).startswith(out)
    assert tender.health() == 1  # SERVING
    assert tender.proc.poll() is None


def test_cli_uploads_and_launches_a_baked_image(tender, app):
    tgt = ["--target", tender.target]
    r = cli("upload", str(app), "--name", "cliapp", *tgt)
    assert r.returncode == 0 and r.stdout.startswith("cliapp "), r
    r = cli("launch", "cliapp", "--wait", *tgt, "--", "/bin/fork_exit_wait", "-n", "2")
    assert (r.returncode, r.stdout) == (0, "ok 2 children\n"), r
