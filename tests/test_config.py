"""ALPConfig: defaults, parsing of the layer spec, and validation errors that name the field."""

import pytest

from alp_trl import ALPConfig


def make(tmp_path, **kwargs):
    kwargs.setdefault("report_to", "none")
    return ALPConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)


def test_defaults_follow_the_paper(tmp_path):
    config = make(tmp_path)
    assert config.off_policy_correction == "alp"
    assert config.perturb_layers == "all"
    assert config.perturb_sigma_init == 0.02 and config.perturb_lr == 1e-2
    assert config.perturb_sigma_learnable and config.perturb_sigma_shape == "scalar"
    assert config.dual_clip_c == 10.0 and config.log_ratio_clamp == 20.0 and config.mis_threshold == 3.0
    assert config.sequence_ratio_aggregation == "mean"
    assert config.uses_perturbation and config.uses_rollout_logps


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("off_policy_correction", "grpo", r"off_policy_correction.*\['alp', 'bypass'"),
        ("mis_rejection", "skip", r"mis_rejection.*\['drop', 'zero'\]"),
        ("mis_aggregation", "max", r"mis_aggregation.*\['sum', 'mean'\]"),
        ("mis_threshold_low", 0.0, r"mis_threshold_low.*> 0"),
        ("mis_threshold_high", -1.0, r"mis_threshold_high.*> 0"),
        ("mis_veto_threshold", float("inf"), r"mis_veto_threshold.*finite"),
        ("perturb_layers", "bottom", r"perturb_layers.*'all', 'early'"),
        ("perturb_layers", [], r"perturb_layers"),
        ("perturb_layers", [0, "a"], r"perturb_layers"),
        ("perturb_sigma_init", -0.1, r"perturb_sigma_init.*>= 0"),
        ("perturb_sigma_init", float("nan"), r"perturb_sigma_init"),
        ("perturb_sigma_shape", "vector", r"perturb_sigma_shape.*\['scalar', 'channel'\]"),
        ("perturb_noise_scale", "relative", r"perturb_noise_scale.*\['absolute', 'rms'\]"),
        ("perturb_lr", 0.0, r"perturb_lr"),
        ("sequence_ratio_aggregation", "max", r"sequence_ratio_aggregation.*\['mean', 'sum'\]"),
        ("dual_clip_c", 1.0, r"dual_clip_c.*> 1"),
        ("dual_clip_c", 0.5, r"dual_clip_c"),
        ("log_ratio_clamp", 0.0, r"log_ratio_clamp"),
        ("mis_threshold", 1.0, r"mis_threshold"),
        ("cudnn_sdpa_backward", "never", r"cudnn_sdpa_backward.*\['auto', 'on', 'off'\]"),
        ("max_consecutive_nonfinite_steps", 0, r"max_consecutive_nonfinite_steps.*>= 1"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **{field: value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", "all"),
        ("LATE", "late"),
        ("0,2", [0, 2]),
        ("[1, -1]", [1, -1]),
        ([3], [3]),
        ("final_hidden", "final_hidden"),
        ("logits", "final_hidden"),
    ],
)
def test_layer_spec_accepts_names_and_index_lists(tmp_path, value, expected):
    assert make(tmp_path, perturb_layers=value).perturb_layers == expected


def test_trl_vllm_correction_never_stacks(tmp_path):
    # unset: off for every correction of this package, TRL's default (on) for plain GRPO
    for correction in ("alp", "bypass", "token_mis", "seq_mis", "tis"):
        assert make(tmp_path, off_policy_correction=correction).vllm_importance_sampling_correction is False
    assert make(tmp_path, off_policy_correction="none").vllm_importance_sampling_correction is True
    # explicitly on together with ALP: refused
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction.*stack"):
        make(tmp_path, vllm_importance_sampling_correction=True)
    assert make(tmp_path, off_policy_correction="none", vllm_importance_sampling_correction=False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"off_policy_correction": "token_mis", "mis_threshold_low": 2.0, "mis_threshold_high": 1.5},
            r"low.*\(2.0\) must be below.*\(1.5\)",
        ),
        (
            {"off_policy_correction": "alp", "mis_veto_threshold": 1e-4},
            r"mis_veto_threshold.*off_policy_correction='alp'",
        ),
        (
            {"off_policy_correction": "none", "mis_threshold_high": 2.0},
            r"mis_threshold_high.*off_policy_correction='none'",
        ),
        (
            {"off_policy_correction": "ppo", "mis_threshold_low": 0.5},
            r"mis_threshold_low.*off_policy_correction='ppo'",
        ),
        ({"off_policy_correction": "seq_tis", "mis_threshold_low": 0.5}, r"seq_tis.*truncates.*mis_threshold_high"),
    ],
)
def test_inconsistent_rollout_correction_fields_are_refused(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **fields)


@pytest.mark.parametrize(
    ("fields", "bounds"),
    [
        ({"off_policy_correction": "token_mis"}, (1 / 3, 3.0)),
        ({"off_policy_correction": "seq_mis", "mis_threshold": 2.0}, (0.5, 2.0)),
        ({"off_policy_correction": "tis"}, (None, 3.0)),
        ({"off_policy_correction": "seq_tis", "mis_threshold_high": 5.0}, (None, 5.0)),
        ({"off_policy_correction": "token_mis", "mis_threshold_low": 0.2}, (0.2, None)),
        ({"off_policy_correction": "token_mis", "mis_threshold_low": 0.2, "mis_threshold_high": 4.0}, (0.2, 4.0)),
    ],
)
def test_mis_bounds_default_to_mis_threshold_and_are_one_sided_when_one_is_set(tmp_path, fields, bounds):
    assert make(tmp_path, **fields).mis_bounds == pytest.approx(bounds)


@pytest.mark.parametrize("correction", ["token_mis", "seq_mis", "tis", "seq_tis"])
def test_vespo_with_an_auxiliary_weight_is_refused_with_the_reason(tmp_path, correction):
    with pytest.raises(ValueError, match=r"loss_type='vespo'.*off_policy_correction='" + correction + "'.*twice"):
        make(tmp_path, loss_type="vespo", off_policy_correction=correction)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("correction", ["alp", "bypass", "token_mis", "seq_mis", "tis", "seq_tis", "ppo", "none"])
def test_correction_and_loss_table(tmp_path, correction, loss_type):
    """Every correction x loss pair: refused exactly where the README says (vespo with a MIS / TIS weight)."""
    refused = loss_type == "vespo" and correction in ("token_mis", "seq_mis", "tis", "seq_tis")
    if refused:
        with pytest.raises(ValueError, match="vespo"):
            make(tmp_path, loss_type=loss_type, off_policy_correction=correction)
    else:
        config = make(tmp_path, loss_type=loss_type, off_policy_correction=correction)
        assert (config.loss_type, config.off_policy_correction) == (loss_type, correction)


@pytest.mark.parametrize(
    "fields",
    [
        {"loss_type": "cispo"},
        {"loss_type": "sapo"},
        {"loss_type": "vespo"},
        {"loss_type": "vespo", "off_policy_correction": "bypass"},
        {"loss_type": "cispo", "off_policy_correction": "token_mis"},
        {"top_entropy_quantile": 0.2},
        {"entropy_coef": 0.01},
        {"use_adaptive_entropy": True},
        {"off_policy_mask_threshold": 0.5},
    ],
)
def test_trl_features_orthogonal_to_the_ratio_are_accepted(tmp_path, fields):
    config = make(tmp_path, **fields)
    assert all(getattr(config, name) == value for name, value in fields.items())


def test_perturbation_only_for_alp(tmp_path):
    assert not make(tmp_path, off_policy_correction="bypass").uses_perturbation
    assert not make(tmp_path, perturb_layers="none").uses_perturbation
    assert not make(tmp_path, off_policy_correction="none").uses_rollout_logps


def test_the_simulator_is_refused_with_a_real_engine(tmp_path):
    with pytest.raises(ValueError, match=r"rollout_mismatch.*use_vllm=True.*mismatch is real"):
        make(tmp_path, rollout_mismatch="bf16", use_vllm=True)


def test_zero_learnable_sigma_warns(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="alp_trl.config"):
        make(tmp_path, perturb_sigma_init=0.0)
    assert "perturb_sigma_init=0" in caplog.text and "will stay 0" in caplog.text


def test_bad_cudnn_sdpa_backward_is_refused_naming_the_field():
    with pytest.raises(
        ValueError, match=r"`cudnn_sdpa_backward` got 'never'; allowed values are \['auto', 'on', 'off'\]"
    ):
        ALPConfig(output_dir="/tmp/x", cudnn_sdpa_backward="never", use_cpu=True, bf16=False)


def test_rollout_mismatch_fields_are_validated(tmp_path):
    with pytest.raises(ValueError, match="rollout_mismatch_std"):
        ALPConfig(output_dir=str(tmp_path), use_cpu=True, rollout_mismatch="logit_noise")
    with pytest.raises(ValueError, match="rollout_mismatch"):
        ALPConfig(output_dir=str(tmp_path), use_cpu=True, rollout_mismatch="tpu")


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_consecutive_nonfinite_steps_is_validated(value):
    with pytest.raises(ValueError, match="max_consecutive_nonfinite_steps"):
        ALPConfig(output_dir="/tmp/x", max_consecutive_nonfinite_steps=value, use_cpu=True, bf16=False)


@pytest.mark.parametrize(("field", "value"), [("max_turns", 0), ("code_timeout", -1.0), ("code_memory_mb", 0)])
def test_bad_code_tool_limits_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ALPConfig(output_dir="/tmp/x", use_cpu=True, code_tool="python", **{field: value})


def test_vllm_dtype_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"vllm_dtype.*\['auto', 'float32', 'bfloat16', 'float16'\]"):
        ALPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", vllm_dtype="fp8")
