"""dash's scripts across two hosts: the scripts of test_shell.py in one VM-clone instance
whose VMs are placed on both hosts of a netns cluster (tests/cluster.py).

Two hosts (network namespaces), a tender on each, peers of each other.  The
baked image (dash as /bin/sh, our cat, ls, rm and sleep) is uploaded to host A only
and launched there with placement ``spread``: each clone (a fork's child, or
the new VM a vfork child's exec starts) goes to the less loaded of A and B, so
an instance's processes run on both hosts, talk over cross-host pipes (tcp)
and share one file system, which A's supervisor serves.  stdout and the exit
status must be those of the same script run natively.  Skips, saying why,
where network namespaces cannot be made or dash cannot be had.  Copy mode is
not run here: it keeps every process of an instance in one VM, so it never
spans two hosts (tests/test_shell.py runs every script in copy mode).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster import A, B, explain, hosts_of, running_cluster
from test_shell import SCRIPTS, STATUS, run_native

from tender_service.toolchain.bake import bake

IMAGE = "dash-app"
#: scripts that fork or exec (each clone goes to the less loaded host, ties alternate)
BOTH_HOSTS = tuple(n for n in SCRIPTS if n != "set_e")  # set_e runs builtins only


@pytest.fixture(scope="module")
def cluster(programs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    app = tmp_path_factory.mktemp("shell") / "app.img"
    bake(app, [(f"/bin/{name}", path) for name, path in programs.items()])
    with running_cluster("shell", n=2) as c:
        c.agent.call("upload", target=c.target(A), name=IMAGE, path=str(app))
        yield c


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_across_two_hosts(name: str, cluster, native_bin: Path, tmp_path: Path) -> None:
    c = cluster
    native = run_native(SCRIPTS[name], native_bin, tmp_path)
    assert native.returncode == STATUS[name], native.stderr
    r = c.run(
        IMAGE,
        ["/bin/sh", "-c", SCRIPTS[name]],
        fork_mode="vmclone",
        pipe_transport="tcp",
        placement="spread",
        env=["PATH=/bin", "W=/tmp"],
    )
    res = r["result"]
    assert res["done"] and res["outcome"] == "exited", explain(c, r)
    assert (r["stdout"], res["exit_code"]) == (
        native.stdout.decode(errors="replace"),
        native.returncode,
    ), explain(c, r)
    hosts = hosts_of(r["describe"])
    assert hosts <= {c.target(A), c.target(B)}, explain(c, r)
    if name in BOTH_HOSTS:
        assert hosts == {c.target(A), c.target(B)}, f"every VM on {hosts}\n{explain(c, r)}"
