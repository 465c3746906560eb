"""Writing a study's files so that an interrupted run (a kill, a session ending) never leaves half a file behind: each
is written beside its final name and renamed onto it, which is atomic on one file system."""

import json
import os

import torch


def write_json_atomically(path: str, value) -> None:
    """`value` as JSON at `path`, through a temporary file and a rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def save_torch_atomically(value, path: str) -> None:
    """`torch.save(value, path)` through a temporary file and a rename (a cache a resumed run must be able to load)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(value, path + ".tmp")
    os.replace(path + ".tmp", path)
