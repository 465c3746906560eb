"""slurm/train.slurm: run with stand-ins for `scontrol`, `srun` and `curl` on PATH, it starts the vLLM server on the
last node and one accelerate launcher per training node with the multi-node arguments (the launch itself is tested
on CPU in test_distributed.py::test_two_machines_one_process_each)."""

import os
import subprocess
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("nodes", [3, 1])
def test_slurm_script_launches_server_and_training_nodes(tmp_path, nodes):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "srun.log"
    hosts = "\n".join(f"node{i}" for i in range(1, nodes + 1))
    _stub(bin_dir, "scontrol", f'printf "{hosts}\\n"\n')
    _stub(bin_dir, "srun", f'printf "%s\\n" "$*" >> {calls}\n')
    _stub(bin_dir, "curl", "exit 0\n")
    recipe = REPO / "recipes" / "Qwen2.5-Math-1.5B" / "alp" / "config_seq_alp_vllm_server.yaml"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-3]"}
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "train.slurm"), str(recipe), "zero3", "--max_steps", "7"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    if nodes == 1:
        assert result.returncode == 2 and "need at least 2 nodes" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    server, training = calls.read_text().splitlines()
    assert "--nodelist=node3" in server and "alp-trl vllm-serve Qwen/Qwen2.5-Math-1.5B" in server
    assert "--weight-transfer nccl" in server and "--data-parallel-size 8" in server
    assert "--nodes=2 --ntasks=2 --nodelist=node1,node2" in training
    for fragment in (
        "--config_file accelerate_configs/zero3.yaml",
        "--num_machines 2 --num_processes 16",
        "--machine_rank $SLURM_PROCID --main_process_ip node1",
        "--vllm_server_host node3 --vllm_server_port 8000 --max_steps 7",
    ):
        assert fragment in training, fragment
