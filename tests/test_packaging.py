"""unifork as a wheel: `pip install .` into a fresh venv, without extras, runs a guest.

The sdist and the wheel (from the sdist, with ``python -m build``) are built
from a copy of the source tree without its generated gRPC modules, so what the installed package imports comes from the build step
(setup.py), and the venv is fresh (no system site-packages), so nothing is
borrowed from the development venv: the guest sources and protos must come
from the wheel, and neither grpcio-tools nor matplotlib is installed.

The install resolves the runtime dependencies through pip's configured
indexes (the one test that needs a package index; everything it runs talks to
no network).  Only zig's cache is shared with the development cache, so musl
is not rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import comparison
from comparison.compare import write_files
from comparison.report import Report
from tender_service import protos
from tender_service.toolchain import paths

ROOT = Path(__file__).resolve().parents[1]
#: what a copy of the source tree leaves out: what `make` and earlier builds produced
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "*.egg-info",
    "gen",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "report-*",
)


@dataclass
class Venv:
    root: Path
    wheel: Path
    env: dict[str, str]
    elsewhere: Path  # a cwd outside the repository

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv,
            cwd=self.elsewhere,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def python(self, code: str) -> subprocess.CompletedProcess:
        return self.run(str(self.root / "bin" / "python"), "-c", code)


def _checked(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"{res.args} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Iterator[Venv]:
    """The wheel built from a clean copy of the tree, installed without extras into a fresh
    venv (about 600 MB with zig and numpy: removed afterwards)."""
    tmp = tmp_path_factory.mktemp("wheel")
    try:
        yield _install(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path) -> Venv:
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    assert not (src / "tender_service" / "gen").exists()
    # the sdist, then the wheel built from the sdist (what `pip install .` builds from the tree)
    _checked(
        subprocess.run(
            [sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(src)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    )
    (wheel,) = (tmp / "dist").glob("unifork-*.whl")
    (sdist,) = (tmp / "dist").glob("unifork-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"setup.py", "guest/programs/hello.c", "proto/unifork/v1/tender.proto"} <= names
    venv = tmp / "venv"
    _checked(
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env |= {
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        paths.CACHE_ENV: str(tmp / "cache"),
        paths.ZIG_CACHE_ENV: str(paths.zig_cache_dir()),
    }
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    v = Venv(venv, wheel, env, elsewhere)
    _checked(
        v.run(
            str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel), timeout=600
        )
    )
    return v


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_in_a_fresh_venv_runs_hello(installed, record_property) -> None:
    record_property("wheel_bytes", installed.wheel.stat().st_size)
    res = installed.run(str(installed.root / "bin" / "unifork"), "run", "hello")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "Hello, unikernel!\n"
    built = list((installed.elsewhere.parent / "cache" / "images").rglob("*hello*"))
    assert built, "the image was built into the temporary cache from the wheel's guest sources"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_carries_its_data_and_generated_code(installed) -> None:
    site = installed.root / "lib"
    res = _checked(
        installed.python(
            "import json, tender_service.gen.unifork.v1.tender_pb2_grpc as g\n"
            "from tender_service import protos\n"
            "from tender_service.toolchain import paths\n"
            "protos.ensure()\n"
            "print(json.dumps([g.__file__, str(paths.guest_dir()), str(protos.proto_dir()),\n"
            "                  protos.tender()[0].__name__]))"
        )
    )
    gen, guest, proto, pb2 = json.loads(res.stdout)
    for path in (gen, guest, proto):
        assert Path(path).is_relative_to(site), f"{path} is not the installed copy"
    assert (Path(guest) / "programs" / "hello.c").is_file()
    assert (Path(guest) / "runtime" / "unifork_rt.c").is_file()
    assert sorted(p.name for p in Path(proto).rglob("*.proto")) == ["peer.proto", "tender.proto"]
    assert pb2 == "tender_service.gen.unifork.v1.tender_pb2"
    # the extras are not installed: generation and plots are not runtime needs
    for extra in ("grpc_tools", "matplotlib"):
        res = installed.python(f"import {extra}")
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, extra
    _checked(installed.python("import comparison.compare, tender_service.service.server"))


def test_compare_without_matplotlib_writes_everything_else(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plots extra were absent
    monkeypatch.delitem(sys.modules, "comparison.plots", raising=False)
    monkeypatch.delattr(comparison, "plots", raising=False)
    r = Report(
        quick=True,
        runs=1,
        started="now",
        machine={},
        modes=[],
        skipped_modes={},
        cells=[],
        semantics={},
        semantics_runs={},
        hazards={},
        hazards_runs={},
        memory=[],
        memory_children=0,
        scaling=[],
    )
    text = write_files(r, tmp_path)
    note = "plots skipped: matplotlib is not installed (pip install 'unifork[plots]' to draw them)"
    assert f"note: {note}" in text
    assert (tmp_path / "table.txt").read_text() == text + "\n"
    doc = json.loads((tmp_path / "report.json").read_text())
    assert note in doc["notes"]
    assert not [f for f in doc["files"] if f.endswith(".png")]
    for name in ("raw.csv", "summary.csv", "published.csv"):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob("*.png"))


def test_stale_or_missing_generated_code_is_refused_with_the_fix(tmp_path, monkeypatch) -> None:
    """Nothing runs protoc at import: code older than proto/ is an error naming the command."""
    stamp = tmp_path / protos.STAMP_NAME
    monkeypatch.setattr(protos, "STAMP", stamp)
    protos.ensure.cache_clear()
    try:
        with pytest.raises(protos.GeneratedCodeError, match=r"is missing: run `make proto`"):
            protos.ensure()
        stamp.write_text("0" * 64 + "\n")  # generated from other sources
        with pytest.raises(protos.GeneratedCodeError, match=r"is stale .*: run `make proto`"):
            protos.ensure()
        stamp.write_text(protos.sources_hash() + "\n")
        protos.ensure()
    finally:
        protos.ensure.cache_clear()
