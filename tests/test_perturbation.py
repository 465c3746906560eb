"""LayerwisePerturbation: layer discovery on many architectures, noise gating, seeding, detach, checkpointing."""

import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from alp_trl.perturbation import (
    MODULE_NAME,
    LayerwisePerturbation,
    find_decoder_layers,
    noise_seed,
    resolve_layer_indices,
)
from alp_trl.tiny_models import ARCHITECTURES, build_tiny_causal_lm


EXPECTED_PATHS = {
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "llama": "model.layers",
    "mistral": "model.layers",
    "gemma": "model.layers",
    "gpt2": "transformer.h",
    "qwen3_moe": "model.layers",
}


@pytest.fixture
def ids(tokenizer):
    return tokenizer(["What is 2 + 3?", "Compute 7 * 6 now"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attaches_to_every_architecture_and_only_perturbs_when_active(arch, tokenizer, ids):
    model = build_tiny_causal_lm(arch, vocab_size=len(tokenizer), num_layers=3).eval()
    path, layers = find_decoder_layers(model)
    assert path == EXPECTED_PATHS[arch] and len(layers) == 3
    with torch.no_grad():
        clean = model(**ids).logits
        perturbation = LayerwisePerturbation.attach(model, "all", sigma_init=0.1)
        hooked = model(**ids).logits
        with perturbation.active(step=0):
            noisy = model(**ids).logits
    assert torch.equal(hooked, clean), "noise must be off outside `active`"
    assert (noisy - clean).abs().max() > 1e-3
    assert perturbation.num_noise_calls == 3


def test_peft_model_layers_are_found_and_perturbed(tokenizer, ids):
    base = build_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    path, _ = find_decoder_layers(model)
    assert path == "base_model.model.model.layers"
    perturbation = LayerwisePerturbation.attach(model, "late", sigma_init=0.5)
    assert perturbation.layer_ids == [2]
    with torch.no_grad():
        clean = model(**ids).logits
        with perturbation.active(0):
            noisy = model(**ids).logits
    assert not torch.allclose(clean, noisy)
    # sigma lives on the PeftModel wrapper: never in the adapter weights, never in the merged model
    merged = model.merge_and_unload()
    assert not any(MODULE_NAME in name for name, _ in merged.named_parameters())


def test_detach_leaves_the_model_bit_identical(tokenizer, ids):
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        clean = model(**ids).logits
    perturbation = LayerwisePerturbation.attach(model, "all", sigma_init=0.3)
    assert any(MODULE_NAME in k for k in model.state_dict())
    with perturbation.active(0), torch.no_grad():
        model(**ids)
    perturbation.detach()
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert not hasattr(model, MODULE_NAME)
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, clean)
    # can be attached again after detaching
    LayerwisePerturbation.attach(model, "all").detach()


def test_layer_selection_thirds_lists_and_errors():
    assert resolve_layer_indices("all", 6) == ([0, 1, 2, 3, 4, 5], False)
    assert resolve_layer_indices("early", 6) == ([0, 1], False)
    assert resolve_layer_indices("middle", 6) == ([2, 3], False)
    assert resolve_layer_indices("late", 6) == ([4, 5], False)
    assert resolve_layer_indices("final_hidden", 6) == ([], True)
    assert resolve_layer_indices("logits", 6) == ([], True), "the old name still works"
    assert resolve_layer_indices("none", 6) == ([], False)
    assert resolve_layer_indices([0, -1, 0], 6) == ([0, 5], False)
    assert resolve_layer_indices("1,3", 6) == ([1, 3], False)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer_indices([6], 6)
    with pytest.raises(ValueError, match="perturb_layers"):
        resolve_layer_indices("bottom", 6)
    with pytest.raises(ValueError, match="selects no layer"):
        resolve_layer_indices("early", 1)


def test_logits_mode_perturbs_only_the_final_hidden_state(tokenizer, ids):
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer)).eval()
    perturbation = LayerwisePerturbation.attach(model, "final_hidden", sigma_init=0.5)
    assert perturbation.layer_ids == [3]  # one past the last layer
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)
    with torch.no_grad():
        clean = model(**ids, output_hidden_states=True)
        with perturbation.active(0):
            noisy = model(**ids, output_hidden_states=True)
    # the inputs of every decoder layer are unchanged, the final hidden state (and so the logits) is not
    for h_clean, h_noisy in zip(clean.hidden_states[:-1], noisy.hidden_states[:-1]):
        assert torch.equal(h_clean, h_noisy)
    assert not torch.allclose(clean.logits, noisy.logits)


def test_noise_is_keyed_by_step_microstep_rank_and_layer(tokenizer, ids):
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer)).eval()
    perturbation = LayerwisePerturbation.attach(model, "all", sigma_init=0.2, seed=7)

    def noisy(step, micro, rank=0):
        perturbation.rank = rank
        with perturbation.active(step, micro), torch.no_grad():
            return model(**ids).logits

    assert torch.equal(noisy(3, 1), noisy(3, 1))  # reproducible
    assert not torch.allclose(noisy(3, 1), noisy(4, 1))  # differs across steps
    assert not torch.allclose(noisy(3, 1), noisy(3, 2))  # and micro-steps
    assert not torch.allclose(noisy(3, 1, rank=0), noisy(3, 1, rank=1))  # and ranks
    seeds = {noise_seed(7, 3, 1, 0, layer) for layer in range(100)}
    assert len(seeds) == 100  # and layers


def test_channel_sigma_and_rms_scale(tokenizer, ids):
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer))
    perturbation = LayerwisePerturbation.attach(
        model, [0, 2], sigma_init=0.05, sigma_shape="channel", noise_scale="rms"
    )
    assert perturbation.log_sigma.shape == (2, 32)
    with perturbation.active(0):
        model(**ids).logits.sum().backward()
    grad = perturbation.log_sigma.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).any(dim=1).all()
    assert perturbation.sigma_per_layer() == pytest.approx({0: 0.05, 2: 0.05})


def test_zero_sigma_is_exactly_the_clean_model(tokenizer, ids):
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer)).eval()
    with torch.no_grad():
        clean = model(**ids).logits
    perturbation = LayerwisePerturbation.attach(model, "all", sigma_init=0.0, learnable=False)
    with perturbation.active(5), torch.no_grad():
        assert torch.equal(model(**ids).logits, clean)


def _grads(model, perturbation, ids, step=1):
    model.zero_grad(set_to_none=True)
    with perturbation.active(step, 0):
        loss = model(**ids).logits.float().pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, ids, use_reentrant):
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer)).train()
    perturbation = LayerwisePerturbation.attach(model, "all", sigma_init=0.1)
    plain = _grads(model, perturbation, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    checkpointed = _grads(model, perturbation, ids)
    assert plain.keys() == checkpointed.keys() and f"{MODULE_NAME}.log_sigma" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


class ToyLM(nn.Module):
    """A stack whose checkpointing wraps the whole layer call, hooks included (as some remote-code models do)."""

    def __init__(self, checkpointed: bool, use_reentrant: bool = False):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=3, hidden_size=8)
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.checkpointed, self.use_reentrant = checkpointed, use_reentrant

    def forward(self, x):
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=self.use_reentrant) if self.checkpointed else layer(x)
            x = torch.tanh(x)
        return x


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_noise_is_replayed_when_hooks_run_inside_the_checkpoint(use_reentrant):
    x = torch.randn(4, 5, 8, requires_grad=True)
    grads = {}
    for checkpointed in (False, True):
        model = ToyLM(checkpointed, use_reentrant)
        perturbation = LayerwisePerturbation.attach(model, "all", sigma_init=0.3)
        with perturbation.active(2, 1):
            out = model(x).pow(2).sum()
        calls_in_forward = perturbation.num_noise_calls
        out.backward()  # outside `active`: a checkpointed layer re-runs its hooks here
        grads[checkpointed] = {n: p.grad.clone() for n, p in model.named_parameters()}
        if checkpointed:
            assert perturbation.num_noise_calls == 2 * calls_in_forward  # the replay added the same noise again
        perturbation.disarm()
        with torch.no_grad():
            torch.testing.assert_close(model(x), ToyLM(False)(x))  # no noise outside `active` and backward
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], msg=name)


def test_save_and_load_side_file(tmp_path, tokenizer):
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer))
    perturbation = LayerwisePerturbation.attach(model, [1, 2], sigma_init=0.03)
    with torch.no_grad():
        perturbation.log_sigma.add_(torch.tensor([0.5, -0.5]))
    perturbation.save(str(tmp_path))
    other = LayerwisePerturbation.attach(build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer)), [1, 2])
    assert other.load(str(tmp_path))
    torch.testing.assert_close(other.log_sigma, perturbation.log_sigma)
    mismatched = LayerwisePerturbation.attach(build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer)), "all")
    with pytest.raises(ValueError, match="shape"):
        mismatched.load(str(tmp_path))
    assert not other.load(str(tmp_path / "missing"))


@pytest.mark.parametrize("shape", ["scalar", "channel"])
@pytest.mark.parametrize("scale", ["absolute", "rms"])
def test_noise_gradient_matches_plain_autograd(shape, scale):
    """The custom backward (eps re-drawn from its seed) gives the gradients of h + sigma * scale * eps."""
    from alp_trl.perturbation import noise_seed

    model = ToyLM(checkpointed=False)
    perturbation = LayerwisePerturbation.attach(
        model, [1], sigma_init=0.2, sigma_shape=shape, noise_scale=scale, seed=3
    )
    with torch.no_grad():
        perturbation.log_sigma.add_(
            torch.linspace(-0.5, 0.5, perturbation.log_sigma.numel()).view_as(perturbation.log_sigma)
        )
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    with perturbation.active(4, 2):
        out = perturbation(hidden, 0)
    (out.pow(3).sum()).backward()
    # the same computation written out, with eps drawn from the same seed
    generator = torch.Generator().manual_seed(noise_seed(3, 4, 2, 0, 1))
    eps = torch.randn(hidden.shape, generator=generator)
    log_sigma = perturbation.log_sigma.detach().clone().requires_grad_()
    hidden2 = hidden.detach().clone().requires_grad_()
    factor = hidden2.detach().pow(2).mean(-1, keepdim=True).sqrt() if scale == "rms" else 1.0
    expected = hidden2 + log_sigma[0].exp() * factor * eps
    torch.testing.assert_close(out.detach(), expected.detach())
    expected.pow(3).sum().backward()
    torch.testing.assert_close(perturbation.log_sigma.grad, log_sigma.grad)
    torch.testing.assert_close(hidden.grad, hidden2.grad)


def test_noise_survival_by_hand():
    from alp_trl.perturbation import noise_survival

    hidden = torch.zeros(2, 2, 2)
    perturbed = torch.tensor([[[0.3, 0.4], [0.0, 0.0]], [[0.0, 0.0], [0.4, 0.3]]])
    # added RMS = sqrt((0.09 + 0.16) * 2 / 8) = 0.25; intended sigma 0.5 -> survival 0.5
    survival = noise_survival(hidden, perturbed, torch.tensor(math.log(0.5)))
    assert survival.item() == pytest.approx(0.5)
    # rms noise scale: intended = sigma * RMS(scale) = 0.5 * sqrt((1 + 9) / 2)... per position scale 1 and 3
    scale = torch.tensor([[[1.0], [3.0]], [[1.0], [3.0]]])
    assert noise_survival(hidden, perturbed, torch.tensor(math.log(0.5)), scale).item() == pytest.approx(
        0.25 / (0.5 * math.sqrt(5.0))
    )


@pytest.mark.parametrize(
    ("dtype", "magnitude", "expected"), [(torch.float32, 100.0, 1.0), (torch.bfloat16, 100.0, 0.0)]
)
def test_noise_survival_measured_in_the_forward(dtype, magnitude, expected):
    """sigma 0.02 on hidden states of magnitude 100: whole in float32, entirely rounded away in bfloat16 (its step at
    100 is 0.5)."""
    perturbation = LayerwisePerturbation([0], hidden_size=64, sigma_init=0.02, seed=1)
    perturbation.track_survival = True
    hidden = torch.full((4, 32, 64), magnitude, dtype=dtype)
    with perturbation.active(0):
        perturbation(hidden, 0)
    assert perturbation.survival_per_layer()[0].item() == pytest.approx(expected, abs=0.05)


def test_the_noise_module_needs_no_trl():
    """`alp_trl.perturbation` (the noise, its layer selection and persistence) imports neither TRL nor transformers."""
    import subprocess
    import sys

    code = "import sys, alp_trl.perturbation; print('trl' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
