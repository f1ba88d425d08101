"""Two "nodes" of two processes each on this machine, started by torchrun with a static rendezvous on
127.0.0.1, reach the same weights under ZeRO as under Lightning's ddp."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(strategy: str, out: Path) -> str:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",
                               "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "tests/multinode_script.py", strategy, str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
             for node in (0, 1)]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=240)[0])
        finally:
            if node.poll() is None:
                os.killpg(node.pid, 9)
    text = "\n".join(outputs)
    assert all(node.returncode == 0 for node in nodes), text[-4000:]
    return text


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "zero2-node", "zero3-node"])
def test_two_nodes_under_torchrun_match_ddp(tmp_path: Path, strategy: str) -> None:
    reference = tmp_path / "ddp.pt"
    two_nodes("ddp", reference)
    output = two_nodes(strategy, tmp_path / "zero.pt")
    for rank in range(4):
        assert f"global rank {rank} of 4, node {rank // 2}, local rank {rank % 2}, environment " \
               "TorchElasticEnvironment" in output, output[-3000:]
    if strategy.endswith("-node"):  # hybrid sharding: one sharding group per node, the nodes replicas
        for rank in range(4):
            assert f"global rank {rank}: sharding group of 2, replica {rank // 2}, across groups" in output, output
        print("\n".join(sorted({line for line in output.splitlines() if "sharding group of" in line})))
    expected, got = torch.load(reference), torch.load(tmp_path / "zero.pt")
    worst = max(((got[n] - expected[n]).norm() / expected[n].norm()).item() for n in expected)
    print(f"{strategy} on 2 nodes x 2 processes against ddp: worst per-tensor relative error {worst:.2e}")
    assert worst <= 1e-5
