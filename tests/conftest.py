import copy
import json
import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

from alp_trl.tiny_models import build_tiny_causal_lm, build_tiny_tokenizer  # noqa: E402

from .helpers import tiny_run_args  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def _base_models(tokenizer):
    return {arch: build_tiny_causal_lm(arch, vocab_size=len(tokenizer)) for arch in ("qwen2", "llama")}


@pytest.fixture
def make_model(_base_models):
    """A fresh copy of a tiny random model (same weights every time for a given architecture)."""

    def make(arch: str = "qwen2"):
        return copy.deepcopy(_base_models[arch])

    return make


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory, _base_models, tokenizer):
    """The tiny Qwen2 model saved to disk, for code paths that load by name (e.g. a separate reference model)."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    _base_models["qwen2"].save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def prompt_dataset():
    prompts = [[{"role": "user", "content": f"What is {i} + {i + 1}?"}] for i in range(32)]
    return Dataset.from_dict({"prompt": prompts})


@pytest.fixture
def train_args(tmp_path):
    """Keyword arguments of a tiny, fast CPU run (`helpers.tiny_run_args`), writing to `tmp_path / "out"`."""
    return tiny_run_args(tmp_path / "out")


@pytest.fixture(scope="module")
def tiny_run_assets(tmp_path_factory, _base_models, tokenizer):
    """The tiny Qwen2 model and tokenizer saved to disk, and 16 problems (`question` / `solution` columns) in a JSONL
    file: what an entry-point run reads (`helpers.write_tiny_recipe`). Returns `(model_dir, data)`."""
    root = tmp_path_factory.mktemp("entry")
    model_dir = root / "tiny-qwen2"
    _base_models["qwen2"].save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = root / "problems.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            f.write(json.dumps({"question": f"What is {i} + 2?", "solution": f"#### {i + 2}"}) + "\n")
    return model_dir, data
