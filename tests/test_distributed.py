"""Two CPU processes (gloo) train ALP: sigma and weights stay identical across ranks, the noise differs per rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_training_keeps_sigma_in_sync_and_noise_per_rank(tmp_path):
    # torchrun sets RANK / WORLD_SIZE; with use_cpu=True accelerate then runs data parallel over gloo
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(REPO / "tests" / "scripts" / "ddp_worker.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["noise_rank"] for r in ranks] == [0, 1]
    assert ranks[0]["sigma_moved"] and ranks[0]["sigma"] == ranks[1]["sigma"], "sigma is synchronised"
    assert ranks[0]["weight_checksum"] == ranks[1]["weight_checksum"], "weights are synchronised"
    assert ranks[0]["eps"] != ranks[1]["eps"], "each rank draws its own noise"
