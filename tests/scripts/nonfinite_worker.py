"""Worker of tests/test_distributed.py's non-finite guard test, started by `accelerate launch` on 2 CPU processes:
rank 0 alone makes the loss of optimizer step 2 non-finite (`POISON_KIND`: its value or its gradient); each rank
writes the checksum of its weights after every optimizer step and its count of skipped steps to
`<output_dir>/guard_rank<r>.json`."""

import json
import os
import sys

from tests.doubles import emulate_gpu_launch_on_cpu, poison_loss


emulate_gpu_launch_on_cpu()

from transformers import TrainerCallback  # noqa: E402

from alp_trl import ALPGRPOTrainer  # noqa: E402
from alp_trl.train import main  # noqa: E402


KIND = os.environ["POISON_KIND"]
original_compute_loss = ALPGRPOTrainer._compute_loss
original_train = ALPGRPOTrainer.train


def poisoned_compute_loss(self, model, inputs):
    loss = original_compute_loss(self, model, inputs)
    rank0_step2 = self.model.training and self.accelerator.process_index == 0 and self.state.global_step == 1
    return poison_loss(loss, KIND if rank0_step2 else None)


def train_and_record(self, *args, **kwargs):
    checksums = []

    class Checksums(TrainerCallback):
        def on_step_end(self_, args, state, control, model=None, **kw):
            checksums.append(sum(p.detach().double().sum().item() for p in model.parameters()))

    self.add_callback(Checksums())
    result = original_train(self, *args, **kwargs)
    rank = self.accelerator.process_index
    with open(os.path.join(self.args.output_dir, f"guard_rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "checksums": checksums, "skipped": self._nonfinite.total_skipped}, f)
    return result


ALPGRPOTrainer._compute_loss = poisoned_compute_loss
ALPGRPOTrainer.train = train_and_record

if __name__ == "__main__":
    main(sys.argv[1:])
