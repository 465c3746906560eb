"""`alp_trl.train` with PyTorch's cuDNN SDPA backend switched off globally, before anything runs: the control of the
cuDNN SDPA backward NaN (pytorch/pytorch#196678; alp_trl issue 12). Same arguments as `alp_trl.train`:

    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 1 \
        benchmarks/train_without_cudnn_sdpa.py --config RECIPE.yaml

`cudnn_sdpa_backward: off` in a recipe does the same for the policy-update step only; `auto` (the default) does it
where the bug applies. `benchmarks/gpu_checks.py --only cudnn_nan` runs both side by side.
"""

import sys

import torch

from alp_trl.train import main


if __name__ == "__main__":
    torch.backends.cuda.enable_cudnn_sdp(False)
    main(sys.argv[1:])
