"""`alp_trl.study.atomic_files`: an interrupted write never leaves a half file."""

import json
import pickle

import pytest
import torch


def test_an_interrupted_cache_write_leaves_the_previous_file_whole(tmp_path):
    from alp_trl.study.atomic_files import save_torch_atomically, write_json_atomically

    path = str(tmp_path / "cache" / "unit.pt")
    save_torch_atomically({"batches": [(torch.ones(2),)]}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot be pickled: the write fails part way
        save_torch_atomically({"batches": [(torch.zeros(2),)], "bad": lambda: 0}, path)
    assert torch.equal(torch.load(path, weights_only=False)["batches"][0][0], torch.ones(2))
    write_json_atomically(str(tmp_path / "scale.json"), {"absolute": 0.01})
    with pytest.raises(TypeError):
        write_json_atomically(str(tmp_path / "scale.json"), {"absolute": object()})
    assert json.loads((tmp_path / "scale.json").read_text()) == {"absolute": 0.01}
