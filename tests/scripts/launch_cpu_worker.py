"""Worker of tests/test_distributed.py's launch tests, started by `accelerate launch --config_file
accelerate_configs/{ddp,fsdp,zero2,zero3}.yaml` on CPU: runs the `alp_trl.train` entry point under accelerate's DDP,
FSDP2 or DeepSpeed path, then writes what each rank holds (sigma, how its parameter is partitioned, the first noise
it added) to `<output_dir>/rank<r>.json`."""

import json
import os
import sys

from tests.doubles import emulate_gpu_launch_on_cpu


BACKEND = emulate_gpu_launch_on_cpu()

from alp_trl import ALPGRPOTrainer  # noqa: E402
from alp_trl.train import main  # noqa: E402


def partition(parameter) -> dict:
    if hasattr(parameter, "to_local"):  # FSDP2 DTensor
        return {"kind": "dtensor", "local_numel": parameter.to_local().numel()}
    if hasattr(parameter, "ds_id") and hasattr(parameter, "ds_tensor"):  # ZeRO-3 partitioned parameter
        return {"kind": "zero3", "local_numel": parameter.ds_tensor.numel()}
    return {"kind": "replicated", "local_numel": parameter.numel()}


original_train = ALPGRPOTrainer.train


def train_and_record(self, *args, **kwargs):
    perturbation = self.perturbation
    first_noise = []

    def record_noise(module, inputs, output):
        if not first_noise and self.state.global_step == 1:  # the first perturbed layer of the second step
            first_noise.append((output - inputs[0]).float().flatten()[:16].tolist())

    handle = perturbation.register_forward_hook(record_noise)
    result = original_train(self, *args, **kwargs)
    handle.remove()
    record = {
        "backend": BACKEND,
        "rank": self.accelerator.process_index,
        "world_size": self.accelerator.num_processes,
        "distributed_type": self.accelerator.distributed_type.value,
        # what the real wrapping code made of the model (the harness only picks the code path)
        "wrapper": type(self.model_wrapped).__name__,
        "model_class": type(self.accelerator.unwrap_model(self.model_wrapped)).__name__,
        "noise_rank": perturbation.rank,
        "partition": partition(perturbation.log_sigma),
        "sigma": perturbation.sigma.float().tolist(),  # a collective under FSDP2 / ZeRO-3: every rank reads
        "first_noise": first_noise[0] if first_noise else None,
    }
    with open(os.path.join(self.args.output_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    return result


ALPGRPOTrainer.train = train_and_record

if __name__ == "__main__":
    main(sys.argv[1:])
