"""`alp-trl diagnose`: the paper's one-step intervention on the importance ratio, from one checkpoint.

From one checkpoint and one batch of rollouts sampled from the inference policy (the checkpoint itself, or a simulated
inference engine with `--rollout-mismatch`, bf16 weights by default), it measures the per-token log-ratio
log pi_train(y) - log pi_rollout(y):

- at the checkpoint: the training policy as it is, and with ALP's layerwise perturbation on (the checkpoint's own
  sigma from `alp_perturbation.safetensors`, or `--sigma`);
- after ONE policy update on these rollouts (the intervention, `--update-lr`), made once with the Bypass objective
  (ratio policy / rollout, no noise) and once with the ALP objective (perturbed policy / rollout), both from the same
  weights: the ratio each objective uses next.

Tokens are binned by their rollout probability, and each bin's log-ratio quantiles (p1, p5, p50, p95, p99) form the
envelope the paper plots. Writes `diagnose.json` and `diagnose.png` and prints a summary table.

    alp-trl diagnose outputs/SmolLM2-135M-Instruct-ALP-demo --rollout-mismatch bf16 --num-prompts 16
"""

import argparse
import json
import os
import time
from contextlib import nullcontext
from typing import NamedTuple

import torch

from .data import DEFAULT_PROMPT_TEMPLATE


def attach_checkpoint_perturbation(model, path: str, sigma: float | None, layers: str, noise_scale: str, seed: int):
    """The checkpoint's own perturbation (side file) or one with a fixed `sigma`; returns it and where sigma came from."""
    from .perturbation import SIDE_CONFIG_FILE, LayerwisePerturbation

    side_config = os.path.join(path, SIDE_CONFIG_FILE)
    if sigma is None and os.path.exists(side_config):
        with open(side_config) as f:
            saved = json.load(f)
        final_only = saved["layer_ids"] == [model.config.num_hidden_layers]
        perturbation = LayerwisePerturbation.attach(
            model,
            layers="final_hidden" if final_only else saved["layer_ids"],
            sigma_shape=saved["sigma_shape"],
            noise_scale=saved["noise_scale"],
            learnable=False,
            seed=seed,
        )
        perturbation.load(path)
        return perturbation, f"checkpoint ({SIDE_CONFIG_FILE})"
    perturbation = LayerwisePerturbation.attach(
        model,
        layers=layers,
        sigma_init=0.02 if sigma is None else sigma,
        noise_scale=noise_scale,
        learnable=False,
        seed=seed,
    )
    return perturbation, f"fixed sigma={perturbation.sigma.flatten()[0].item():g}"


class RolloutBatch(NamedTuple):
    """One batch of rollouts: the left-padded prompts, the right-padded completions and the inference policy's
    per-token log-probs of them (`(B, T)`, zero on padding)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    rollout_logps: torch.Tensor

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(*(t.to(device) for t in self))


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float):
    """Per-token log-probs (temperature-scaled, like the trainer's) of the completion tokens, `(B, T)`.

    Differentiable: wrap it in `torch.no_grad()` when only the values are needed."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_ids.size(1) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def policy_logps(model, batches: list[RolloutBatch], perturbation, temperature: float, key: int = 0) -> torch.Tensor:
    """The policy's per-token log-probs of every batch's completions, concatenated `(N, T)`; with `perturbation`
    (else `None`) its noise is on, at step `key + i` for the i-th batch."""
    parts = []
    for step, batch in enumerate(batches):
        with perturbation.active(step=key + step) if perturbation is not None else nullcontext():
            parts.append(
                completion_logps(
                    model,
                    batch.prompt_ids,
                    batch.prompt_mask,
                    batch.completion_ids,
                    batch.completion_mask,
                    temperature,
                )
            )
    return torch.cat(parts)


@torch.no_grad()
def sample_rollouts(
    model,
    tokenizer,
    prompts: list,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    mismatch: str,
    mismatch_std: float,
    seed: int,
    batch_size: int,
) -> list[RolloutBatch]:
    """Sample completions from the (simulated) inference policy; returns padded tensors and its log-probs."""
    from .rollout_logprobs import sample_with_logprobs

    texts = [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
        for _ in range(num_generations)
    ]
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(next(model.parameters()).device)  # the rollouts live where the model does (CPU or GPU)
        completions, logprobs = sample_with_logprobs(
            model,
            enc.input_ids,
            enc.attention_mask,
            max_new_tokens,
            temperature,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            mismatch,
            mismatch_std,
            seed + start,
        )
        width = max(len(c) for c in completions)
        completion = torch.full((len(completions), width), tokenizer.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros_like(completion)
        rollout_logps = torch.zeros(completion.shape)
        for row, (ids, values) in enumerate(zip(completions, logprobs)):
            completion[row, : len(ids)] = torch.tensor(ids)
            completion_mask[row, : len(ids)] = 1
            rollout_logps[row, : len(values)] = torch.tensor(values)
        device = enc.input_ids.device
        batches.append(
            RolloutBatch(
                prompt_ids=enc.input_ids,
                prompt_mask=enc.attention_mask,
                completion_ids=completion.to(device),
                completion_mask=completion_mask.to(device),
                rollout_logps=rollout_logps.to(device),
            )
        )
    return batches


def prepared_prompts(tokenizer, data: dict) -> dict:
    """The prompts and gold answers a study experiment's `data` settings name (`dataset`, `split`, `num_prompts`,
    columns, `prompt_template`): chat messages for a chat model, `{"prompt": [...], "answer": [...]}`."""
    from .data import build_prompts, load_split

    raw = load_split(data.get("dataset", "builtin:arithmetic"), split=data.get("split", "test"))
    raw = raw.select(range(min(data.get("num_prompts", 8), len(raw))))
    return build_prompts(
        raw,
        data.get("problem_column", "problem"),
        data.get("answer_column", "answer"),
        data.get("prompt_template", DEFAULT_PROMPT_TEMPLATE),
        conversational=tokenizer.chat_template is not None,
    )


def pad_batches(batches: list[RolloutBatch]) -> list[RolloutBatch]:
    """Right-pad every batch's completion tensors to the widest completion, so they concatenate."""
    width = max(b.completion_ids.size(1) for b in batches)

    def pad(t):
        return torch.nn.functional.pad(t, (0, width - t.size(1)))

    return [
        b._replace(
            completion_ids=pad(b.completion_ids),
            completion_mask=pad(b.completion_mask),
            rollout_logps=pad(b.rollout_logps),
        )
        for b in batches
    ]


def group_advantages(
    tokenizer, batches: list[RolloutBatch], answers: list[str], num_generations: int, reward: str = "math"
):
    """Rewards of every rollout and GRPO's group-normalised advantages split like `batches`. `reward="math"`:
    math-verify accuracy plus 0.1 for a `\\boxed{}` answer (so that groups differ even when no sample is right);
    `"diversity"`: distinct characters / 10 (for random test models, whose answers are never right)."""
    from .rewards import completion_text, grade, make_format_reward

    texts = tokenizer.batch_decode(
        torch.cat(
            [b.completion_ids * b.completion_mask + tokenizer.pad_token_id * (1 - b.completion_mask) for b in batches]
        ),
        skip_special_tokens=True,
    )
    if reward == "diversity":
        rewards = torch.tensor([len(set(t)) / 10 for t in texts], dtype=torch.float32)
    elif reward == "math":
        boxed = make_format_reward("boxed")(texts)
        rewards = torch.tensor(
            [grade(completion_text(t), a)[0] + 0.1 * f for t, a, f in zip(texts, answers, boxed)], dtype=torch.float32
        )
    else:
        raise ValueError(f"`reward` got {reward!r}; allowed values are ['math', 'diversity'].")
    groups = rewards.view(-1, num_generations)
    advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    return rewards, list(advantages.split([b.completion_ids.size(0) for b in batches]))


def plot_envelopes(panels: dict[str, dict[str, list[dict]]], path: str, title: str) -> None:
    """One axis per panel; in each, the p1-p99 / p5-p95 bands and the median of every envelope, vs probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), constrained_layout=True, squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, (panel, envelopes) in zip(axes[0], panels.items()):
        for color, (name, rows) in zip(colors, envelopes.items()):
            if not rows:
                continue
            centers = [max((r["lo"] + r["hi"]) / 2, 1e-4) for r in rows]
            ax.fill_between(centers, [r["q01"] for r in rows], [r["q99"] for r in rows], alpha=0.12, color=color)
            ax.fill_between(
                centers,
                [r["q05"] for r in rows],
                [r["q95"] for r in rows],
                alpha=0.3,
                color=color,
                label=f"{name}: p5-p95 (light: p1-p99)",
            )
            ax.plot(centers, [r["q50"] for r in rows], color=color, marker="o", ms=3, label=f"{name}: median")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("rollout probability of the token")
        ax.set_ylabel("log pi_train(y) - log pi_rollout(y)")
        ax.set_title(panel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_loss(
    model,
    perturbation,
    batch: RolloutBatch,
    advantages: torch.Tensor,
    settings,
    num_items: float,
    temperature: float,
    noise_key: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The policy loss of one rollout batch, as `ALPGRPOTrainer` computes it for the first update on a generation
    batch (`objectives.policy_loss` with the config's `settings`, DAPO's token sum over `num_items`): the numerator
    runs with the perturbation's noise of `noise_key` = (step, micro-step) when it is not None (ALP), the old policy
    is the current one (detached). Differentiable."""
    from .objectives import aggregate_policy_loss, policy_loss

    with perturbation.active(*noise_key) if noise_key is not None else nullcontext():
        logps = completion_logps(
            model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, temperature
        )
    loss = policy_loss(logps, batch.rollout_logps, advantages.to(logps.device), batch.completion_mask, settings)
    return aggregate_policy_loss(loss, settings, num_items=num_items)[0]


UPDATE_OPTIMIZERS = ("adamw", "sgd")


def one_update(
    model,
    perturbation,
    batches: list[RolloutBatch],
    advantages,
    lr: float,
    temperature: float,
    perturbed: bool,
    settings=None,
    optimizer: str = "adamw",
    steps: int = 1,
) -> None:
    """The intervention's update on the ALP (`perturbed=True`) or Bypass objective over all rollouts, with the loss of
    `ALPGRPOTrainer` (`update_loss`, the config values of `settings`: `objectives.PolicyLossSettings`, default
    `ALPConfig`'s defaults with the correction set by `perturbed`) and the token sum over all rollouts (DAPO).

    `optimizer="adamw"`: AdamW from a fresh state, whose first step moves every weight by about `lr` whatever its
    gradient (nearly a sign step); `"sgd"`: plain gradient descent, which keeps the gradient's magnitudes (what the
    paper's mechanism acts through; no gradient clipping). `steps` full-batch steps (fresh noise at each under ALP,
    keyed (10000 + step, batch index)). Starts from zero
    gradients and leaves none behind, so that successive updates from a restored state are independent."""
    from .objectives import PolicyLossSettings

    if optimizer not in UPDATE_OPTIMIZERS:
        raise ValueError(f"`optimizer` got {optimizer!r}; allowed values are {list(UPDATE_OPTIMIZERS)}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got {steps!r}.")
    if settings is None:
        settings = PolicyLossSettings(off_policy_correction="alp" if perturbed else "bypass")
    params = [p for n, p in model.named_parameters() if "alp_perturbation" not in n]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.zero_grad(set_to_none=True)
    model.train()
    total_tokens = sum(int(b.completion_mask.sum()) for b in batches)
    for step in range(steps):
        for index, (batch, adv) in enumerate(zip(batches, advantages)):
            noise_key = (10_000 + step, index) if perturbed else None
            update_loss(model, perturbation, batch, adv, settings, total_tokens, temperature, noise_key).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    model.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="alp-trl diagnose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="checkpoint / output folder, PEFT adapter folder, Hub id or embedded: name")
    parser.add_argument("--dataset", default="builtin:arithmetic")
    parser.add_argument("--split", default="test")
    parser.add_argument("--problem-column", default="problem")
    parser.add_argument("--answer-column", default="answer")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--rollout-mismatch", default="bf16", help="none, bf16, fp16, bf16_activations, logit_noise, hidden_noise"
    )
    parser.add_argument("--rollout-mismatch-std", type=float, default=0.0)
    parser.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="fixed sigma of the perturbation (default: the checkpoint's side file, else 0.02)",
    )
    parser.add_argument("--perturb-layers", default="all")
    parser.add_argument("--noise-scale", default="absolute", choices=["absolute", "rms"])
    parser.add_argument(
        "--update-lr", type=float, default=1e-5, help="learning rate of the intervention's update; 0 skips it"
    )
    parser.add_argument(
        "--update-optimizer",
        default="adamw",
        choices=list(UPDATE_OPTIMIZERS),
        help="adamw: one step from a fresh state (nearly a sign step); sgd: plain gradient descent (keeps the "
        "gradient's magnitudes; needs a larger --update-lr)",
    )
    parser.add_argument("--update-steps", type=int, default=1, help="full-batch steps of the intervention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: MODEL/diagnose when MODEL is a folder)")
    args = parser.parse_args(argv)

    from .config import MISMATCH_KINDS
    from .data import build_prompts, load_split
    from .ratio_statistics import binned_log_ratio_envelope, mismatch_statistics, ratio_statistics

    if args.rollout_mismatch not in MISMATCH_KINDS:
        parser.error(f"--rollout-mismatch got {args.rollout_mismatch!r}; allowed values are {list(MISMATCH_KINDS)}.")
    out_dir = args.out or (os.path.join(args.model, "diagnose") if os.path.isdir(args.model) else "diagnose")
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()

    from .model_loading import load_policy

    model, tokenizer = load_policy(args.model)
    raw = load_split(args.dataset, split=args.split)
    raw = raw.select(range(min(args.num_prompts, len(raw))))
    prepared = build_prompts(
        raw,
        args.problem_column,
        args.answer_column,
        args.prompt_template,
        conversational=tokenizer.chat_template is not None,
    )
    perturbation, sigma_source = attach_checkpoint_perturbation(
        model, args.model, args.sigma, args.perturb_layers, args.noise_scale, args.seed
    )
    batches = sample_rollouts(
        model,
        tokenizer,
        prepared["prompt"],
        args.num_generations,
        args.max_new_tokens,
        args.temperature,
        args.rollout_mismatch,
        args.rollout_mismatch_std,
        args.seed,
        args.batch_size,
    )
    batches = pad_batches(batches)
    mask = torch.cat([b.completion_mask for b in batches])
    rollout = torch.cat([b.rollout_logps for b in batches])

    log_ratios = {}
    unperturbed = policy_logps(model, batches, None, args.temperature)
    log_ratios["checkpoint"] = {
        "unperturbed": unperturbed - rollout,
        "perturbed (ALP)": policy_logps(model, batches, perturbation, args.temperature) - rollout,
    }
    report = {
        "model": args.model,
        "sigma_source": sigma_source,
        "sigma_per_layer": perturbation.sigma_per_layer(),
        "rollout_mismatch": args.rollout_mismatch,
        "rollout_mismatch_std": args.rollout_mismatch_std,
        "num_sequences": int(mask.size(0)),
        "num_tokens": int(mask.sum()),
        "mismatch": {k: float(v) for k, v in mismatch_statistics(unperturbed, rollout, mask).items()},
    }

    if args.update_lr > 0:
        answers = [a for a in prepared["answer"] for _ in range(args.num_generations)]
        rewards, advantages = group_advantages(tokenizer, batches, answers, args.num_generations)
        report["reward_mean"] = float(rewards.mean())
        if float(rewards.view(-1, args.num_generations).std(1).max()) == 0.0:
            print(
                "warning: every group got the same reward, so the advantages are 0 and the update changes nothing;"
                " use more prompts or generations."
            )
        start_state = {k: v.clone() for k, v in model.state_dict().items()}
        after = {}
        for perturbed in (False, True):
            model.load_state_dict(start_state)
            torch.manual_seed(args.seed)
            one_update(
                model,
                perturbation,
                batches,
                advantages,
                args.update_lr,
                args.temperature,
                perturbed,
                optimizer=args.update_optimizer,
                steps=args.update_steps,
            )
            if perturbed:
                after["ALP update: perturbed (its ratio)"] = (
                    policy_logps(model, batches, perturbation, args.temperature, key=50_000) - rollout
                )
                after["ALP update: unperturbed"] = policy_logps(model, batches, None, args.temperature) - rollout
            else:
                after["Bypass update (its ratio)"] = policy_logps(model, batches, None, args.temperature) - rollout
        model.load_state_dict(start_state)
        log_ratios["after one update"] = after

    report["summary"], report["envelope"] = {}, {}
    for panel, ratios in log_ratios.items():
        report["summary"][panel] = {
            name: {k: float(v) for k, v in ratio_statistics(lr, mask).items()} for name, lr in ratios.items()
        }
        report["envelope"][panel] = {name: binned_log_ratio_envelope(lr, rollout, mask) for name, lr in ratios.items()}
    report["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out_dir, "diagnose.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_envelopes(
        report["envelope"],
        os.path.join(out_dir, "diagnose.png"),
        f"{os.path.basename(os.path.normpath(args.model))}: rollout engine {args.rollout_mismatch}",
    )

    print(
        f"{report['num_sequences']} rollouts, {report['num_tokens']} tokens; rollout engine: {args.rollout_mismatch}; "
        f"sigma: {sigma_source}"
    )
    print(
        f"mismatch of the engine vs the checkpoint: mean |dlogp| {report['mismatch']['logp_abs_diff_mean']:.4f}, "
        f"max |dp| {report['mismatch']['prob_abs_diff_max']:.3f}"
    )
    print(f"{'':<36}{'ratio p50':>10}{'ratio p99':>10}{'ratio max':>10}{'|log r| max':>12}{'KL k3':>10}")
    for panel, rows in report["summary"].items():
        for name, stats in rows.items():
            label = f"{panel}: {name}"
            print(
                f"{label:<36}{stats['ratio_p50']:>10.4f}{stats['ratio_p99']:>10.4f}{stats['ratio_max']:>10.3f}"
                f"{stats['log_ratio_abs_max']:>12.4f}{stats['kl_k3']:>10.5f}"
            )
    print(f"wrote {os.path.join(out_dir, 'diagnose.json')} and {os.path.join(out_dir, 'diagnose.png')}")
    return report


if __name__ == "__main__":
    main()
