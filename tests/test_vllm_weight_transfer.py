"""The file channel's client (`alp_trl.vllm_weight_transfer.FileWeightSyncClient`) without a server: what it posts,
the file the server would read, and that nothing is left behind. The server side runs in tests/test_vllm_engine.py."""

import os

import pytest
import torch
from safetensors.torch import load_file

from alp_trl.vllm_weight_transfer import BACKEND, _client_class


def _client(tmp_path, updating=False):
    """A client that never connected (TRL's constructor checks a live server): its requests are recorded, and the
    weight file each update names is read at the moment the server would read it."""
    cls = _client_class()
    client = cls.__new__(cls)
    client.sync_dir, client.base_url, client._updating_weights = str(tmp_path), "http://server:8000", updating
    client.calls = []
    client.seen = {}

    def post(url, json=None, **kwargs):
        client.calls.append(url.rsplit("/", 1)[-1])
        if "update_info" in json:
            info = json["update_info"]
            client.seen = {"names": info["names"], "tensors": load_file(info["path"]), "path": info["path"]}
        return {}

    client._post = post
    client._start_weight_update = lambda: client.calls.append("start")
    client._finish_weight_update = lambda: client.calls.append("finish")
    return client


def test_an_update_posts_one_file_with_every_tensor_and_removes_it(tmp_path):
    client = _client(tmp_path)
    weights = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 3), "lm_head.weight": torch.randn(5, 3)}
    client.update_named_params(None, iter(weights.items()))
    assert client.calls == ["start", "update_weights", "finish"]
    assert client.seen["names"] == list(weights)
    for name, tensor in weights.items():
        assert torch.equal(client.seen["tensors"][name], tensor)
    assert os.path.dirname(client.seen["path"]) == str(tmp_path) and not os.path.exists(client.seen["path"])
    assert os.listdir(tmp_path) == []


def test_inside_trls_weight_update_the_client_opens_and_closes_nothing(tmp_path):
    client = _client(tmp_path, updating=True)
    client.update_named_params(None, iter({"w": torch.ones(2)}.items()))
    assert client.calls == ["update_weights"]


def test_the_file_is_removed_when_the_server_refuses_it(tmp_path):
    client = _client(tmp_path)

    def refuse(url, json=None, **kwargs):
        raise ConnectionError("server gone")

    client._post = refuse
    with pytest.raises(ConnectionError):
        client.update_named_params(None, iter({"w": torch.ones(2)}.items()))
    assert os.listdir(tmp_path) == []


def test_a_server_with_another_weight_transfer_backend_is_refused_with_the_fix(tmp_path):
    client = _client(tmp_path / "sync")
    client.get_server_info = lambda: {"weight_transfer_config": {"backend": "nccl"}}
    with pytest.raises(RuntimeError, match="backend 'nccl'.*alp-trl vllm-serve"):
        client.init_communicator()
    assert client.calls == []
    client.get_server_info = lambda: {"weight_transfer_config": {"backend": BACKEND}}
    client.init_communicator()
    assert client.calls == ["init_weight_transfer_engine"] and (tmp_path / "sync").is_dir()
