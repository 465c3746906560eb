"""Worker of tests/test_vllm_engine.py: trains SmolLM2-135M (the embedded model) for a few steps with a real colocated
vLLM engine on CPU and writes what the test asserts on to a JSON file.

    python tests/scripts/vllm_worker.py SCENARIO OUT.json

Scenarios: `sync` (fp32 engine, Bypass at a high learning rate), `nosync` (the same with the weight sync switched
off), `server` (as `sync`, against the `alp-trl vllm-serve` server at `$ALP_VLLM_SERVER_URL`, weights synced as files), `bf16` (bfloat16 engine, fp32 trainer), `lora` (ALP with a LoRA adapter), `token_alp` / `seq_alp`
(ALP at either level), `replay` / `no_replay` (top_p 0.8, sampling-mask replay on / off, no update: learning rate 0).

Recorded per optimizer step: the logged metrics; per generation: the log-probs the engine returned (read from vLLM's
own `RequestOutput`s) and the denominator the loss received; at the end: the engine's parameter names, and whether
the policy's weights and sigma changed. vLLM starts its engine with `spawn`, hence the `__main__` guard.
"""

import json
import os
import sys


SCENARIOS = ("sync", "nosync", "bf16", "lora", "token_alp", "seq_alp", "replay", "no_replay", "server")


def config_for(scenario: str, output_dir: str):
    from alp_trl import ALPConfig
    from tests.helpers import tiny_run_args

    fields = tiny_run_args(
        output_dir,
        per_device_train_batch_size=8,
        max_completion_length=12,
        max_steps=3,
        learning_rate=3e-4,
        lr_scheduler_type="constant",
        use_vllm=True,
        vllm_mode="colocate",
        vllm_dtype="float32",
        vllm_max_model_length=256,
        log_rollout_mismatch=True,
        off_policy_correction="bypass",
        beta=0.0,
    )
    if scenario == "bf16":
        fields.update(vllm_dtype="bfloat16", max_steps=2, learning_rate=1e-6)
    elif scenario in ("lora", "token_alp", "seq_alp"):
        fields.update(off_policy_correction="alp", perturb_sigma_init=0.02, perturb_lr=0.05)
        if scenario == "seq_alp":
            fields.update(importance_sampling_level="sequence", epsilon=0.5, epsilon_high=4.0)
        if scenario == "lora":
            fields.update(learning_rate=5e-3)
    elif scenario == "server":
        fields.update(
            vllm_mode="server", vllm_server_base_url=os.environ["ALP_VLLM_SERVER_URL"], vllm_server_timeout=60
        )
    elif scenario in ("replay", "no_replay"):
        fields.update(
            top_p=0.8,
            learning_rate=0.0,
            max_steps=2,
            sampling_mask_replay=scenario == "replay",
            max_completion_length=24,
        )
    return ALPConfig(**fields)


def run(scenario: str, out_path: str) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alp_trl.model_loading import resolve_model_path
    from alp_trl.perturbation import MODULE_NAME
    from tests.helpers import build_trainer

    path = resolve_model_path("embedded:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(32)]

    def distinct_characters(completions, **kwargs):
        return [len(set(c[0]["content"])) / 10.0 for c in completions]

    args = config_for(scenario, os.path.join(os.path.dirname(out_path), f"run-{scenario}"))
    trainer = build_trainer(
        model,
        tokenizer,
        Dataset.from_dict({"prompt": prompts}),
        args,
        reward_funcs=distinct_characters,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        if scenario == "lora"
        else None,
    )
    record = {"engine_logprobs": [], "denominators": [], "syncs": 0}
    generation = trainer.vllm_generation
    engine = generation.vllm_client if scenario == "server" else generation.llm
    real_generate, real_sync = engine.generate, generation.sync_weights

    def recording_generate(*a, **kw):
        outputs = real_generate(*a, **kw)
        if scenario == "server":  # the server's response, as TRL's client parsed it
            record["engine_logprobs"] += [[token[0] for token in seq] for seq in outputs["logprobs"]]
            return outputs
        for request in outputs:
            for completion in request.outputs:
                record["engine_logprobs"].append([next(iter(lp.values())).logprob for lp in completion.logprobs])
        return outputs

    def counting_sync():
        record["syncs"] += 1
        if scenario != "nosync":
            real_sync()

    engine.generate = recording_generate  # the real engine's outputs, recorded on their way to TRL
    generation.sync_weights = counting_sync
    real_score = trainer._generate_and_score_completions

    def recording_score(inputs):
        output = real_score(inputs)
        mask = output["completion_mask"].bool()
        for row in range(mask.size(0)):
            record["denominators"].append(output["sampling_per_token_logps"][row][mask[row]].tolist())
        return output

    trainer._generate_and_score_completions = recording_score
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    change = {n: (after[n].detach() - before[n]).abs().max().item() for n in before}
    changed = [n for n, value in change.items() if value > 0]
    names = []
    if scenario != "server":  # a server's model lives in its own process
        engine_model = engine.llm_engine.model_executor.driver_worker.model_runner.get_model()
        names = [n for n, _ in engine_model.named_parameters()]
    record.update(
        log_history=trainer.state.log_history,
        changed=changed,
        max_change=change,
        num_policy_weights=sum(MODULE_NAME not in n for n in before),
        sigma_changed=any(MODULE_NAME in n for n in changed),
        engine_parameter_names=names,
    )
    with open(out_path, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sys.argv[1] not in SCENARIOS:
        raise SystemExit(f"unknown scenario {sys.argv[1]!r}; one of {SCENARIOS}")
    run(sys.argv[1], sys.argv[2])
