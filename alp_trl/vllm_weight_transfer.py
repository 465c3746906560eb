"""Weight sync to a vLLM server without CUDA: a file-based weight-transfer backend for `vllm serve` and its client.

TRL 1.16's server mode talks to `vllm serve` (with `VLLM_SERVER_DEV_MODE=1`) and pushes weights through vLLM's
weight-transfer engine. vLLM ships NCCL and CUDA-IPC engines only, and TRL's `VLLMClient.init_communicator` refuses a
non-CUDA device, so a CPU trainer cannot update a server's weights. This module adds the narrowest CPU path:

- `FileWeightTransferEngine`: a vLLM weight-transfer engine (backend name `"alp_file"`, registered in every vLLM
  process by this package's vLLM plugin entry point, `register`). Each update names a safetensors file; the worker
  loads it through vLLM's layerwise reload (checkpoint format in, the model's kernel format out) and repacks the CPU
  build's GEMM weights.
- `FileWeightSyncClient`: TRL's `VLLMClient` whose communicator is a directory both sides can read (the same machine,
  or a shared filesystem across nodes): each sync writes one file, the server loads it, the file is removed.

Start the server with `alp-trl vllm-serve MODEL` (it runs `vllm serve` with this backend, `processed_logprobs` and, on a
CPU, eager mode).
"""

import logging
import os
import uuid
from dataclasses import dataclass, field

import torch


logger = logging.getLogger(__name__)

BACKEND = "alp_file"


def register() -> None:
    """vLLM plugin (entry point `vllm.general_plugins`): make the `alp_file` weight-transfer backend available."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "FileWeightTransferEngine")


def repack_cpu_gemm_weights(model: torch.nn.Module) -> None:
    """Repack, from their current weight, the layers of vLLM's CPU build that keep the weight beside a packed copy for
    their GEMM kernel (the embedding and a tied LM head). A reload never sees a tied LM head's weight loaded, so its
    packed copy would keep the old values. No-op outside the CPU build (no layer has `cpu_linear`)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        holds_weight = isinstance(weight, torch.Tensor) and weight.numel() > 0
        if holds_weight and hasattr(module, "cpu_linear") and hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)


try:  # the engine runs inside vLLM's processes; without vLLM only the helpers above are usable
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )
except ImportError:  # pragma: no cover - exercised where vLLM is not installed
    WeightTransferEngine = None

if WeightTransferEngine is not None:

    @dataclass
    class FileWeightTransferInitInfo(WeightTransferInitInfo):
        directory: str = ""

    @dataclass
    class FileWeightTransferUpdateInfo(WeightTransferUpdateInfo):
        path: str
        names: list[str] = field(default_factory=list)

    class FileWeightTransferEngine(WeightTransferEngine[FileWeightTransferInitInfo, FileWeightTransferUpdateInfo]):
        """Loads each update from a safetensors file through vLLM's layerwise reload."""

        init_info_cls = FileWeightTransferInitInfo
        update_info_cls = FileWeightTransferUpdateInfo
        supports_draft_weight_update = False

        def init_transfer_engine(self, init_info) -> None:
            self.directory = init_info.directory

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict) -> None:  # vLLM's version synchronises an accelerator
            self.receive_weights(self.parse_update_info(update_info))
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def receive_weights(self, update_info) -> None:
            from safetensors.torch import load_file

            tensors = load_file(update_info.path)
            missing = [name for name in update_info.names if name not in tensors]
            if missing:
                raise ValueError(f"weight file {update_info.path} lacks {missing[:5]}")
            self.model.load_weights([(name, tensors[name]) for name in update_info.names])

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)
            repack_cpu_gemm_weights(self.model)

        def shutdown(self) -> None:
            pass


def _client_class():
    from trl.generation.vllm_client import VLLMClient

    class FileWeightSyncClient(VLLMClient):
        """TRL's `VLLMClient` whose weight updates travel as safetensors files in `sync_dir` (any device)."""

        def __init__(self, *args, sync_dir: str, **kwargs):
            self.sync_dir = os.path.abspath(sync_dir)
            super().__init__(*args, **kwargs)

        def init_communicator(self, device=None):
            transfer = self.get_server_info().get("weight_transfer_config") or {}
            if transfer.get("backend") != BACKEND:
                raise RuntimeError(
                    f"The vLLM server at {self.base_url} has weight-transfer backend {transfer.get('backend')!r}; a "
                    f"trainer without CUDA syncs weights through {BACKEND!r}. Start it with `alp-trl vllm-serve MODEL` "
                    f'(or `vllm serve MODEL --weight-transfer-config \'{{"backend": "{BACKEND}"}}\'` with '
                    "VLLM_SERVER_DEV_MODE=1 and alp_trl installed next to vLLM)."
                )
            os.makedirs(self.sync_dir, exist_ok=True)
            self._post(
                f"{self.base_url}/init_weight_transfer_engine", json={"init_info": {"directory": self.sync_dir}}
            )

        def update_named_params(self, metadata, named_params):
            from safetensors.torch import save_file

            tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in named_params}
            path = os.path.join(self.sync_dir, f"weights-{uuid.uuid4().hex}.safetensors")
            save_file(tensors, path)
            try:
                if not self._updating_weights:
                    self._start_weight_update()
                self._post(
                    f"{self.base_url}/update_weights", json={"update_info": {"path": path, "names": list(tensors)}}
                )
                if not self._updating_weights:
                    self._finish_weight_update()
            finally:
                os.remove(path)

        def close_communicator(self):
            pass

    return FileWeightSyncClient


def file_weight_sync_client(base_url: str, group_port: int, connection_timeout: float, sync_dir: str):
    """A connected `FileWeightSyncClient` (TRL's `VLLMClient` with the file channel)."""
    return _client_class()(
        base_url=base_url, group_port=group_port, connection_timeout=connection_timeout, sync_dir=sync_dir
    )
