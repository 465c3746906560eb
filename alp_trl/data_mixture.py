"""Dataset mixtures: several training sources, each with its own columns, merged into one shuffled prompt set.

Follows open-r1's `dataset_mixture` convention (a `datasets` list with an `id`, `config`, `split`, `weight` per
source, a `seed` and an optional `test_split_size`), plus what a math RL mixture needs per source: which columns hold
the problem and the answer (`problem_column`, `answer_column`, `answer_format`), one file of a Hub repository
(`data_files`), an absolute number of rows (`samples`) instead of a fraction (`weight`), and a filter on the mean of a
score column (`score_column`, `score_range`, e.g. keep problems the reference model solves sometimes but not always).
In a recipe:

```yaml
dataset_mixture:
  datasets:
    - id: LLM360/guru-RL-92k
      data_files: train/math__combined_54.4k.parquet
      problem_column: prompt
      answer_column: reward_model.ground_truth
    - id: weqweasdas/from_default_filtered_openr1_with_scores
      problem_column: prompt
      answer_column: answer
      score_column: scores
      score_range: [0.0, 1.0]
  seed: 42
  test_split_size: 0.01
```
"""

from dataclasses import dataclass, fields

from datasets import Dataset, concatenate_datasets


@dataclass
class MixtureSource:
    """One source of a mixture (see the module docstring); `weight` is the fraction of its rows kept (0 < w <= 1),
    `samples` a number of rows; at most one of them."""

    id: str
    config: str | None = None
    split: str = "train"
    data_files: str | None = None
    problem_column: str = "problem"
    answer_column: str = "answer"
    answer_format: str = "auto"
    weight: float | None = None
    samples: int | None = None
    score_column: str | None = None
    score_range: tuple[float, float] | None = None


@dataclass
class DatasetMixture:
    sources: list[MixtureSource]
    seed: int = 0
    test_split_size: float | None = None


def parse_dataset_mixture(value) -> DatasetMixture:
    """Validate a `dataset_mixture` mapping (from a recipe); errors name the offending key, e.g.
    `dataset_mixture.datasets[1].weight`."""
    name = "dataset_mixture"
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a mapping with a `datasets` list, got {type(value).__name__}.")
    unknown = sorted(set(value) - {"datasets", "seed", "test_split_size"})
    if unknown:
        raise ValueError(f"`{name}` has unknown keys {unknown}; allowed: ['datasets', 'seed', 'test_split_size'].")
    entries = value.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"`{name}.datasets` must be a non-empty list of sources.")
    allowed = [f.name for f in fields(MixtureSource)]
    sources = []
    for index, entry in enumerate(entries):
        where = f"{name}.datasets[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise ValueError(
                f"`{where}` must be a mapping with a string `id` (a Hub id, a local file or builtin:...)."
            )
        extra = sorted(set(entry) - set(allowed))
        if extra:
            raise ValueError(f"`{where}` has unknown keys {extra}; allowed: {allowed}.")
        source = MixtureSource(**entry)
        if source.weight is not None and source.samples is not None:
            raise ValueError(f"`{where}` sets both `weight` and `samples`; use one.")
        if source.weight is not None and not (isinstance(source.weight, (int, float)) and 0 < source.weight <= 1):
            raise ValueError(f"`{where}.weight` is the fraction of the source kept, in (0, 1]; got {source.weight!r}.")
        if source.samples is not None and not (isinstance(source.samples, int) and source.samples > 0):
            raise ValueError(f"`{where}.samples` must be a positive integer, got {source.samples!r}.")
        if (source.score_column is None) != (source.score_range is None):
            raise ValueError(f"`{where}`: `score_column` and `score_range` go together.")
        if source.score_range is not None:
            if not (isinstance(source.score_range, (list, tuple)) and len(source.score_range) == 2):
                raise ValueError(f"`{where}.score_range` must be [low, high], got {source.score_range!r}.")
            source.score_range = (float(source.score_range[0]), float(source.score_range[1]))
        sources.append(source)
    test_split_size = value.get("test_split_size")
    if test_split_size is not None and not (isinstance(test_split_size, (int, float)) and 0 < test_split_size < 1):
        raise ValueError(f"`{name}.test_split_size` must be a fraction in (0, 1), got {test_split_size!r}.")
    seed = value.get("seed", 0)
    if not isinstance(seed, int):
        raise ValueError(f"`{name}.seed` must be an integer, got {seed!r}.")
    return DatasetMixture(sources, seed, test_split_size)


def _mean(value) -> float:
    if isinstance(value, (list, tuple)):
        return sum(value) / len(value) if value else float("nan")
    return float(value)


def load_mixture(
    mixture: DatasetMixture,
    prompt_template: str,
    system_prompt: str | None,
    conversational: bool,
) -> tuple[Dataset, Dataset | None]:
    """Build every source's prompts (`data.build_prompts`, with its own columns), take its share, concatenate, shuffle
    with the mixture's seed; returns `(train, test)` (`test` only with `test_split_size`). A `source` column says
    where each row came from."""
    from .data import build_prompts, load_split

    parts = []
    for index, source in enumerate(mixture.sources):
        raw = load_split(source.id, source.config, source.split, source.data_files)
        if source.score_range is not None:
            low, high = source.score_range
            if source.score_column not in raw.column_names:
                raise ValueError(
                    f"`dataset_mixture.datasets[{index}].score_column={source.score_column!r}` is not a column of "
                    f"{source.id}; its columns are {raw.column_names}."
                )
            column = source.score_column
            raw = raw.filter(
                lambda row, lo=low, hi=high, col=column: lo < _mean(row[col]) < hi, desc="Filtering by score"
            )
        rows = len(raw)
        keep = rows if source.weight is None and source.samples is None else None
        if source.weight is not None:
            keep = max(1, round(source.weight * rows))
        if source.samples is not None:
            if source.samples > rows:
                raise ValueError(
                    f"`dataset_mixture.datasets[{index}].samples={source.samples}` but {source.id} has {rows} rows."
                )
            keep = source.samples
        raw = raw.shuffle(seed=mixture.seed).select(range(keep)) if keep < rows else raw
        built = build_prompts(
            raw,
            source.problem_column,
            source.answer_column,
            prompt_template,
            system_prompt,
            source.answer_format,
            conversational=conversational,
            source=f"{source.id} ({source.split})",
        )
        built = built.select_columns(["prompt", "answer"]).map(lambda _, name=source.id: {"source": name})
        parts.append(built)
    merged = concatenate_datasets(parts).shuffle(seed=mixture.seed)
    if mixture.test_split_size is None:
        return merged, None
    split = merged.train_test_split(test_size=mixture.test_split_size, seed=mixture.seed)
    return split["train"], split["test"]
