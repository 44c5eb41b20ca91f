"""Third-party programs, built from their upstream sources with ``unifork cc``.

The tests (tests/test_shell.py) and ``unifork compare``'s real-program
workloads take dash from here, so both run the very same build.

dash (Debian's POSIX shell) comes from Debian's source packages: ``apt-get
source`` with a private apt state (its own sources.list with one ``deb-src``
line, its own lists and archives, all under the cache directory), so it works
on a machine with no ``deb-src`` line of its own and changes nothing of the
host's apt.  The upstream tarball is built (``dpkg-source -x --skip-patches``:
Debian's patches edit Makefile.am, which would need automake) with
``CC='unifork cc'`` through its own configure; its build-time generators
(mknodes, mksyntax, mksignames) run on the host, so ``CC_FOR_BUILD`` is the
host's cc.  The ELF is a static musl binary like every guest: it runs natively
as well as in a VM.

Built once per machine: cached under ``<unifork cache>/thirdparty/`` keyed by
the source package version and our toolchain's inputs (zig, flags, the guest
runtime, cc.py), under a file lock so parallel pytest workers build it once.
Nothing of the third-party code enters the repository.  ``python
tests/thirdparty.py`` builds it (``make thirdparty``, which ``make test`` and
``make run`` do first).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tender_service.toolchain import cc
from tender_service.toolchain.images import build_image, file_lock, zig_version
from tender_service.toolchain.paths import cache_dir, programs_dir

log = logging.getLogger(__name__)

#: our small POSIX tools baked beside the shell (dash has echo, test, true, false, printf)
TOOLS = ("cat", "ls", "rm", "sleep")
DEBIAN_SOURCES = "deb-src http://deb.debian.org/debian bookworm main"
#: how dash is configured (part of the cache key)
DASH_CONFIGURE = (
    "--host=x86_64-linux-musl",
    "--build=x86_64-pc-linux-gnu",
    "--disable-dependency-tracking",
)


class Unavailable(RuntimeError):
    """The machine cannot fetch or build the program (the tests then skip and the
    comparison marks its workloads skipped, saying why)."""


#: where the third-party builds are cached, if not ``<unifork cache>/thirdparty`` (a CI cache)
THIRDPARTY_ENV = "UNIFORK_THIRDPARTY_DIR"


def thirdparty_dir() -> Path:
    override = os.environ.get(THIRDPARTY_ENV)
    return Path(override).expanduser() if override else cache_dir() / "thirdparty"


def _run(cmd: list[str], cwd: Path, what: str, env: dict[str, str] | None = None) -> None:
    """Run a build step; its output goes to a log file beside it, quoted on failure."""
    logfile = cwd / f"{what}.log"
    t0 = time.monotonic()
    log.info("thirdparty: %s ...", what)
    with open(logfile, "wb") as out:
        p = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if p.returncode != 0:
        tail = logfile.read_bytes()[-3000:].decode(errors="replace")
        raise Unavailable(f"{what} failed (status {p.returncode}), see {logfile}:\n{tail}")
    log.info("thirdparty: %s done in %.0f s", what, time.monotonic() - t0)


def toolchain_key() -> str:
    """Everything of ours that changes a binary ``unifork cc`` builds."""
    h = hashlib.sha256()
    for part in (
        f"zig={zig_version()}",
        "base=" + "\0".join(cc.BASE_FLAGS),
        "wrap=" + "\0".join(cc.WRAPPED_FUNCTIONS),
        "configure=" + "\0".join(DASH_CONFIGURE),
        inspect.getsource(cc),
    ):
        h.update(part.encode() + b"\n")
    for path in cc.runtime_sources():
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def fetch_source(package: str) -> Path:
    """The package's ``.dsc`` (with its tarballs beside it), downloaded once with a private
    apt state under the cache directory."""
    top = thirdparty_dir() / "debian"
    src = top / "src" / package
    found = sorted(src.glob(f"{package}_*.dsc"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None or shutil.which("dpkg-source") is None:
        raise Unavailable("apt-get and dpkg-source are needed to fetch Debian's sources")
    etc, state, cache = top / "etc", top / "state", top / "cache"
    for d in (
        etc / "sources.list.d",
        state / "lists" / "partial",
        cache / "archives" / "partial",
        src,
    ):
        d.mkdir(parents=True, exist_ok=True)
    (etc / "sources.list").write_text(DEBIAN_SOURCES + "\n")
    apt = [
        "apt-get",
        "-q",
        "-o", f"Dir::Etc::SourceList={etc / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={etc / 'sources.list.d'}",
        "-o", f"Dir::State={state}",
        "-o", f"Dir::Cache={cache}",
    ]  # fmt: skip
    if os.geteuid() == 0:  # the private dirs are root's: apt's _apt sandbox cannot write them
        apt += ["-o", "APT::Sandbox::User=root"]
    try:
        _run([*apt, "update"], top, "apt-get update (deb.debian.org bookworm sources)")
    except Unavailable as e:
        raise Unavailable(f"cannot reach deb.debian.org for Debian's sources: {e}") from None
    _run([*apt, "source", "--download-only", package], src, f"apt-get source {package}")
    found = sorted(src.glob(f"{package}_*.dsc"))
    if not found:
        raise Unavailable(f"apt-get source {package} gave no .dsc in {src}")
    return found[-1]


def unifork_cc() -> str:
    """The ``unifork cc`` command of this environment (the venv's script)."""
    script = Path(sys.executable).parent / "unifork"
    return f"{script} cc" if script.is_file() else f"{sys.executable} -m unifork cc"


def dash() -> Path:
    """dash's static musl ELF, built with ``unifork cc`` (once per version and toolchain)."""
    with file_lock(thirdparty_dir() / "dash.lock"):
        dsc = fetch_source("dash")
        version = dsc.stem.removeprefix("dash_")
        target = thirdparty_dir() / f"dash-{version}-{toolchain_key()}.elf"
        if target.is_file():
            return target
        work = thirdparty_dir() / "build" / f"dash-{version}"
        shutil.rmtree(work, ignore_errors=True)
        work.parent.mkdir(parents=True, exist_ok=True)
        _run(
            ["dpkg-source", "--skip-patches", "-x", str(dsc), str(work)], work.parent, "unpack dash"
        )
        host_cc = shutil.which("cc") or shutil.which("gcc")
        if host_cc is None:
            raise Unavailable("no host C compiler for dash's build-time generators (CC_FOR_BUILD)")
        env = dict(os.environ, CC=unifork_cc(), CC_FOR_BUILD=host_cc, CFLAGS="-O2")
        _run(
            ["./configure", *DASH_CONFIGURE],
            work,
            "configure dash with unifork cc (a few minutes)",
            env,
        )
        jobs = str(min(2, os.cpu_count() or 1))
        _run(["make", f"-j{jobs}"], work, "make dash", env)
        built = work / "src" / "dash"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(built, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
        shutil.rmtree(work, ignore_errors=True)
        log.info("thirdparty: dash %s built: %s", version, target)
        return target


#: how mini_httpd's own Makefile is driven (part of the cache key): its port.h knows
#: Linux by the old ``linux`` macro, which zig's C mode does not define; initgroups
#: needs <grp.h>, which its sources leave out; no libcrypt (musl has crypt in libc)
MINI_HTTPD_MAKE = (
    "CFLAGS=-O2 -Dlinux -D_GNU_SOURCE -include grp.h",
    "CRYPT_LIB=",
    "LDFLAGS=",
)


def mini_httpd() -> Path:
    """mini_httpd's static musl ELF from Debian's mini-httpd sources (upstream tarball,
    Debian's patches skipped: they add OpenSSL), built with ``unifork cc``."""
    with file_lock(thirdparty_dir() / "mini-httpd.lock"):
        dsc = fetch_source("mini-httpd")
        version = dsc.stem.removeprefix("mini-httpd_")
        key = hashlib.sha256((toolchain_key() + "\0".join(MINI_HTTPD_MAKE)).encode()).hexdigest()[
            :16
        ]
        target = thirdparty_dir() / f"mini_httpd-{version}-{key}.elf"
        if target.is_file():
            return target
        work = thirdparty_dir() / "build" / f"mini-httpd-{version}"
        shutil.rmtree(work, ignore_errors=True)
        work.parent.mkdir(parents=True, exist_ok=True)
        _run(
            ["dpkg-source", "--skip-patches", "-x", str(dsc), str(work)],
            work.parent,
            "unpack mini-httpd",
        )
        _run(
            ["make", f"CC={unifork_cc()}", *MINI_HTTPD_MAKE, "mini_httpd"],
            work,
            "make mini_httpd with unifork cc",
        )
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(work / "mini_httpd", tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
        shutil.rmtree(work, ignore_errors=True)
        log.info("thirdparty: mini_httpd %s built: %s", version, target)
        return target


def tools() -> dict[str, Path]:
    """Our small POSIX tools (guest/programs/tools/*.c), built like the guest images."""
    return {name: build_image(programs_dir() / "tools" / f"{name}.c") for name in TOOLS}
