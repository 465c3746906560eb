"""Training entry point: a recipe YAML (plus command-line overrides) -> model, data, rewards -> ALPGRPOTrainer.

    accelerate launch --config_file accelerate_configs/cpu.yaml -m alp_trl.train --config recipes/X/alp/config.yaml
    alp-trl train --config recipes/X/alp/config.yaml --max_steps 10 --perturb_sigma_init 0.05

Every field of `ScriptArguments` below, of `ALPConfig` (all of `GRPOConfig` and the ALP fields) and of TRL's
`ModelConfig` can be set in the recipe or on the command line (the command line wins). An unknown key or a bad value is
an error that names it, raised before any model is loaded.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from .config import ALPConfig
from .data import ANSWER_FORMATS, DEFAULT_PROMPT_TEMPLATE


logger = logging.getLogger("alp_trl.train")


@dataclass
class ALPScriptArguments(ScriptArguments):
    """Data, prompt and reward settings of a training run (on top of TRL's `ScriptArguments`)."""

    dataset_mixture: dict | str | None = field(
        default=None,
        metadata={
            "help": "Several training sources, each with its own columns, shares and filters, merged and shuffled "
            "(open-r1's convention; see alp_trl.data_mixture). Replaces dataset_name."
        },
    )
    dataset_data_files: str | None = field(
        default=None,
        metadata={"help": "Only these files of the data set repository (e.g. 'train/math__combined_54.4k.parquet')."},
    )
    problem_column: str = field(
        default="problem",
        metadata={"help": "Column holding the problem: text, or chat messages (the last user message is used)."},
    )
    answer_column: str = field(
        default="answer",
        metadata={
            "help": "Column holding the gold answer; a dotted name reads a nested field (reward_model.ground_truth)."
        },
    )
    answer_format: str = field(
        default="auto",
        metadata={
            "help": "How to read the gold answer: 'raw', 'gsm8k' (text after '####'), 'boxed' (last \\boxed{}), or "
            "'auto' (either, when present).",
            "choices": list(ANSWER_FORMATS),
        },
    )
    prompt_template: str = field(
        default=DEFAULT_PROMPT_TEMPLATE,
        metadata={"help": "User message; '{problem}' is replaced by the problem text."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy", "format"],
        metadata={"help": "Reward functions by name (see alp_trl.rewards): accuracy, format, length."},
    )
    format_tag: str = field(
        default="boxed",
        metadata={"help": "`format` reward: 'boxed' for \\boxed{...}, or a tag name for <tag>...</tag>."},
    )
    length_target_chars: int = field(default=400, metadata={"help": "`length` reward: characters before penalty."})
    reward_timeout: int = field(default=5, metadata={"help": "Seconds math-verify may spend grading one completion."})
    auto_resume: bool = field(
        default=True,
        metadata={"help": "Resume from the newest checkpoint in output_dir when resume_from_checkpoint is unset."},
    )
    plot: bool = field(default=True, metadata={"help": "Write training-curve PNGs into output_dir/plots at the end."})
    avg_at_k_steps: int = field(
        default=0, metadata={"help": "Every N optimizer steps, log avg@k / pass@k on a benchmark (0: off)."}
    )
    avg_at_k_benchmark: str = field(default="arithmetic", metadata={"help": "Benchmark of the in-training avg@k."})
    avg_at_k_limit: int = field(default=32, metadata={"help": "Problems of the in-training avg@k."})
    avg_at_k_k: int = field(default=4, metadata={"help": "Samples per problem of the in-training avg@k."})
    avg_at_k_max_new_tokens: int = field(default=256, metadata={"help": "Max new tokens of the in-training avg@k."})

    @property
    def dataset_label(self) -> str:
        """The training data's name for logs and the model card: `dataset_name`, or the mixture's source ids."""
        if self.dataset_mixture is not None:
            return " + ".join(d["id"] for d in self.dataset_mixture["datasets"])
        return self.dataset_name

    def __post_init__(self):
        from .rewards import REWARD_REGISTRY

        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [name.strip() for name in self.reward_funcs.split(",") if name.strip()]
        unknown = [name for name in self.reward_funcs if name not in REWARD_REGISTRY]
        if unknown or not self.reward_funcs:
            raise ValueError(
                f"`reward_funcs` got {self.reward_funcs!r}; allowed values are {sorted(REWARD_REGISTRY)} (at least one)."
            )
        if self.dataset_mixture is not None:
            from .data_mixture import parse_dataset_mixture

            if isinstance(self.dataset_mixture, str):  # JSON text from the command line
                import json

                self.dataset_mixture = json.loads(self.dataset_mixture)
            parse_dataset_mixture(self.dataset_mixture)  # validated now, before any model loads
            if self.dataset_name is not None:
                raise ValueError("Set either `dataset_name` or `dataset_mixture`, not both.")
        elif self.dataset_name is None:
            raise ValueError(
                "`dataset_name` (or `dataset_mixture`) is required: a Hub data set, a local file, or builtin:arithmetic."
            )
        if "{problem}" not in self.prompt_template:
            raise ValueError(f"`prompt_template` must contain '{{problem}}', got {self.prompt_template!r}.")


def make_parser() -> TrlParser:
    return TrlParser((ALPScriptArguments, ALPConfig, ModelConfig))


def unknown_recipe_keys(parser: TrlParser, recipe_path: str) -> list[str]:
    """Keys of a recipe YAML that no dataclass of the parser has (checked before any value is validated)."""
    import yaml

    with open(recipe_path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        parser.error(f"The recipe {recipe_path} must be a YAML mapping of field: value.")
    known = {action.dest for action in parser._actions} | {"env"}
    return sorted(key for key in recipe if key not in known)


def parse_args(argv=None) -> tuple[ALPScriptArguments, ALPConfig, ModelConfig]:
    """Parse a recipe and overrides; a bad key or value exits with status 2 and a message naming it."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        recipe = argv[argv.index("--config") + 1]
        if not os.path.exists(recipe):
            parser.error(f"The recipe {recipe} does not exist.")
        unknown = unknown_recipe_keys(parser, recipe)
        if unknown:
            parser.error(
                f"Unknown keys in the recipe {recipe}: {unknown}. Check their spelling against "
                "`python -m alp_trl.train --help`."
            )
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    except ValueError as error:
        parser.error(str(error))
    if model_args.model_name_or_path is None:
        parser.error("`model_name_or_path` is required (a Hub id, a local path, or embedded:smollm2-135m-instruct).")
    if len(training_args.reward_weights or []) not in (0, len(script_args.reward_funcs)):
        parser.error(
            f"`reward_weights` has {len(training_args.reward_weights)} values for {len(script_args.reward_funcs)} "
            f"`reward_funcs` {script_args.reward_funcs}."
        )
    return script_args, training_args, model_args


def load_datasets(script_args: ALPScriptArguments, training_args: ALPConfig, conversational: bool):
    from .data import build_prompts, load_split

    if script_args.dataset_mixture is not None:
        from .data_mixture import load_mixture, parse_dataset_mixture

        train, test = load_mixture(
            parse_dataset_mixture(script_args.dataset_mixture),
            script_args.prompt_template,
            script_args.system_prompt,
            conversational,
        )
        if script_args.max_train_samples is not None:
            train = train.select(range(min(script_args.max_train_samples, len(train))))
        if test is not None and script_args.max_eval_samples is not None:
            test = test.select(range(min(script_args.max_eval_samples, len(test))))
        return train, test if training_args.eval_strategy != "no" else None

    def prepared(split: str, limit: int | None):
        raw = load_split(script_args.dataset_name, script_args.dataset_config, split, script_args.dataset_data_files)
        if limit is not None:
            raw = raw.select(range(min(limit, len(raw))))
        return build_prompts(
            raw,
            script_args.problem_column,
            script_args.answer_column,
            script_args.prompt_template,
            script_args.system_prompt,
            script_args.answer_format,
            conversational=conversational,
            source=f"{script_args.dataset_name} ({split})",
        )

    train = prepared(script_args.dataset_train_split, script_args.max_train_samples)
    evaluate = training_args.eval_strategy != "no"
    eval_dataset = prepared(script_args.dataset_test_split, script_args.max_eval_samples) if evaluate else None
    return train, eval_dataset


def load_tokenizer(model_args: ModelConfig, training_args: ALPConfig):
    from transformers import AutoTokenizer

    from .model_loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(model_args.model_name_or_path),
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelConfig, training_args: ALPConfig):
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    from .model_loading import resolve_model_path

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_args.model_name_or_path),
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
        quantization_config=quantization_config,
        device_map=None if quantization_config is None else {"": training_args.local_process_index},
    )


def recipe_text(argv=None) -> str | None:
    """The recipe YAML and the command-line overrides, for the model card (values of `*token*` keys redacted)."""
    import re

    argv = list(sys.argv[1:] if argv is None else argv)
    text = ""
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        with open(argv[argv.index("--config") + 1]) as f:
            text = f.read()
        del argv[argv.index("--config") : argv.index("--config") + 2]
    if argv:
        shown = ["<redacted>" if i > 0 and "token" in argv[i - 1].lower() else arg for i, arg in enumerate(argv)]
        shown = [re.sub(r"(?i)(token[\w-]*=).*", r"\1<redacted>", arg) for arg in shown]
        text += "\n# command-line overrides: " + " ".join(shown) + "\n"
    return re.sub(r"(?im)^(\s*[\w-]*token[\w-]*\s*:).*$", r"\1 <redacted>", text) or None


def last_checkpoint(output_dir: str) -> str | None:
    """The newest *complete* `checkpoint-N` of a run: a run killed while saving leaves a folder without
    `trainer_state.json` (the Trainer writes it last), which is skipped."""
    import re

    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        if os.path.exists(os.path.join(output_dir, name, "trainer_state.json")):
            return os.path.join(output_dir, name)
        logger.warning("Skipping the incomplete checkpoint %s (no trainer_state.json).", name)
    return None


def check_distributed_launch(training_args: ALPConfig) -> None:
    """Exit (status 2) if a launcher started several processes that do not form one distributed run.

    With a GPU config (`ddp.yaml`, ...) on a machine where accelerate finds no GPU, `accelerate launch` still starts
    `--num_processes` processes, but each one sets itself up alone: N identical runs on the same data, all writing the
    same output folder. Caught here, before any model is loaded.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        # every rank says it: the launcher may stop the others as soon as the first one exits
        print(
            f"alp_trl.train: error (rank {os.environ.get('RANK', '?')}): the launcher started {launched} processes, "
            "but they do not form one distributed run (accelerate found no GPU for this config), so each would train "
            "alone and overwrite the others' outputs. On CPUs add `--use_cpu true` (DDP over gloo, with "
            "accelerate_configs/ddp.yaml); FSDP and DeepSpeed need GPUs; or launch one process.",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2)


def release_process_groups() -> None:
    """Free the process groups that outlive `destroy_process_group`, so that their gloo threads are joined now.

    `torch.distributed.destroy_process_group` only forgets a group; the group (and, with gloo, its two worker threads
    and its device's TCP loop thread) lives as long as anything references it. DeepSpeed keeps references in module
    globals: ZeRO-3 pushes the model onto `deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK` for good (every
    partitioned parameter holds the world group in `ds_process_group`) and `deepspeed.utils.groups` holds its copy of
    the world group. Left there, both groups were never freed: gloo's 6 threads still ran while `exit()` tore the C++
    runtime down, where a 2-process ZeRO-3 CPU run rarely died with "terminate called without an active exception"
    (SIGABRT) after training had finished. This drops those references and collects, so the groups' destructors join
    their threads while the interpreter is alive. Call it after `destroy_process_group`, once nothing else of the run
    (trainer, model) is referenced."""
    import gc

    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK.clear()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        import torch.distributed as dist

        for name, value in list(vars(groups).items()):
            if isinstance(value, dist.ProcessGroup):
                setattr(groups, name, None)
            elif isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
                value.clear()
    gc.collect()


def main(argv=None) -> None:
    script_args, training_args, model_args = parse_args(argv)
    check_distributed_launch(training_args)

    import datasets
    import transformers
    from transformers import set_seed
    from trl import get_peft_config

    from .callbacks import MetricsJsonlCallback
    from .rewards import get_reward_funcs
    from .trainer import ALPGRPOTrainer

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    # Data and rewards come before the model: a missing column or file fails in seconds, not after loading weights.
    reward_funcs = get_reward_funcs(
        script_args.reward_funcs,
        format_tag=script_args.format_tag,
        length_target_chars=script_args.length_target_chars,
        reward_timeout=script_args.reward_timeout,
    )
    tokenizer = load_tokenizer(model_args, training_args)
    train_dataset, eval_dataset = load_datasets(script_args, training_args, tokenizer.chat_template is not None)
    logger.info("Training on %d prompts from %s", len(train_dataset), script_args.dataset_label)
    model = load_model(model_args, training_args)

    trainer = ALPGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[MetricsJsonlCallback()],
        recipe_text=recipe_text(argv),
    )
    if script_args.avg_at_k_steps > 0:
        from .callbacks import AvgAtKCallback
        from .evaluate import load_problems

        problems = load_problems(script_args.avg_at_k_benchmark, script_args.avg_at_k_limit)
        for problem in problems:
            problem["prompt_text"] = script_args.prompt_template.replace("{problem}", str(problem["problem"]))
        trainer.add_callback(
            AvgAtKCallback(
                trainer,
                problems,
                k=script_args.avg_at_k_k,
                temperature=training_args.temperature,
                max_new_tokens=script_args.avg_at_k_max_new_tokens,
                every=script_args.avg_at_k_steps,
                seed=training_args.seed,
            )
        )

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and script_args.auto_resume:
        checkpoint = last_checkpoint(training_args.output_dir)
        if checkpoint is not None:
            logger.warning("Resuming from the newest checkpoint in output_dir: %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    logger.info("Model saved to %s", training_args.output_dir)

    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=script_args.dataset_label, tags=["alp-trl"])
        if script_args.plot:
            from .plots import load_history, plot_training_curves

            for path in plot_training_curves(
                load_history(training_args.output_dir),
                os.path.join(training_args.output_dir, "plots"),
                title=os.path.basename(training_args.output_dir),
            ):
                logger.info("Plot written to %s", path)
    if training_args.do_eval and eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_label, tags=["alp-trl"])
    # All ranks leave together (the main process writes the card and plots last), then the process groups are torn
    # down and freed while the interpreter is alive (see `release_process_groups`).
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # a DeepSpeed engine is destroyed (its ZeRO-3 hooks removed)
    accelerator.end_training()
    del trainer, model, accelerator
    release_process_groups()


if __name__ == "__main__":
    main()
