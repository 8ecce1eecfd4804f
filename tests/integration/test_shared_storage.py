"""A multi-node run whose output directory is not shared storage stops before any actor
starts: one probe per node, read back by the driver. A real 2-node Ray cluster on this machine
(in a subprocess, beside the suite's own Ray); node-local disks are imitated by a writer that
puts each node's probe under a directory of its own."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # real engines and trainers: minutes on 2 cores

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from cai_ray.runtime import SharedStorageError, check_shared_output

    out, local = Path(sys.argv[1]), Path(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        print("shared", check_shared_output(out))

        def node_local(path, name, nonce, root=str(local)):
            import os, socket
            d = Path(root) / name / Path(path).relative_to("/")
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(nonce)
            return socket.gethostname() + "-" + name[:6]

        try:
            check_shared_output(out, writer=node_local)
            print("not refused")
        except SharedStorageError as e:
            print("refused:", e)
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_unshared_run_directory_stops_a_two_node_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(tmp_path / "node-disks")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert "shared 2" in lines
    refused = [x for x in lines if x.startswith("refused:")]
    assert refused and f"{out} is not shared storage" in refused[0]
    assert refused[0].count(socket.gethostname() + "-") == 2  # both nodes named
    assert "every node mounts" in refused[0]
    assert not list((out / ".node-probe").glob("*"))  # probes cleaned up
