"""Worker of tests/test_distributed.py's FSDP2 test, started by `accelerate launch --config_file
accelerate_configs/fsdp.yaml`: runs the `alp_trl.train` entry point under accelerate's FSDP2 path on CPU, then writes
what each rank holds (sigma, the first noise it added, its rank) to `<output_dir>/rank<r>.json`."""

import json
import os
import sys

from alp_trl.testing_utils import emulate_fsdp_on_cpu


emulate_fsdp_on_cpu()

from alp_trl import ALPGRPOTrainer  # noqa: E402
from alp_trl.train import main  # noqa: E402


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
    from torch.distributed.tensor import DTensor

    record = {
        "rank": self.accelerator.process_index,
        "world_size": self.accelerator.num_processes,
        "distributed_type": str(self.accelerator.distributed_type),
        "noise_rank": perturbation.rank,
        "log_sigma_is_sharded": isinstance(perturbation.log_sigma, DTensor),
        "log_sigma_local_shape": list(perturbation.log_sigma.to_local().shape)
        if isinstance(perturbation.log_sigma, DTensor)
        else None,
        "sigma": perturbation.sigma.tolist(),  # a collective under FSDP2: every rank reads
        "first_noise": first_noise[0] if first_noise else None,
    }
    with open(os.path.join(self.args.output_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    return result


ALPGRPOTrainer.train = train_and_record

if __name__ == "__main__":
    main(sys.argv[1:])
