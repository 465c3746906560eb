"""`alp_trl.study.envelope_report`: Figure 2's binned envelopes summarised over seeds, by hand."""

import pytest

from alp_trl import study


def test_envelope_bin_summary_by_hand(tmp_path):
    """Two seeds, one bin: widths averaged over seeds, tokens summed, the seeds where ALP's perturbed envelope is
    narrower than Bypass's at the same lr counted; Bypass's width at ALP's update size interpolated as a power law
    (seed 0: sizes 0.01 and 0.04 give widths 4 and 8, so 4 * sqrt(2) at 0.02), n/a outside its range (seed 1)."""

    def env(q01, q99, count=10):
        return [{"lo": 0.0, "hi": 0.5, "count": count, "q01": q01, "q99": q99}]

    def bypass_unit(seed, before, after, larger):
        points = [
            {"lr": 0.1, "update_size_kl": 0.01, "envelope": after},
            {"lr": 0.4, "update_size_kl": 0.04, "envelope": larger},
        ]
        return {
            "unit": {"type": "bypass_curve", "experiment": "f", "engine": {"engine": "vllm"}, "seed": seed},
            "status": "ok",
            "result": {"envelope_before": before, "points": points},
        }

    def alp_unit(seed, perturbed, unperturbed, size):
        config = {"perturb_sigma_init": 0.02, "perturb_noise_scale": "absolute", "perturb_layers": "all"}
        envelopes = {"perturbed_vs_rollout": perturbed, "unperturbed_vs_rollout": unperturbed}
        return {
            "unit": {
                "type": "perturbation",
                "experiment": "f",
                "engine": {"engine": "vllm"},
                "seed": seed,
                "config": config,
            },
            "status": "ok",
            "result": {"alp_update": {"lr": 0.1, "update_size_kl": size, "envelopes": envelopes}},
        }

    records = [
        bypass_unit(0, env(-1.0, 1.0, 7), env(-2.0, 2.0), env(-4.0, 4.0)),
        alp_unit(0, env(-1.0, 1.0), env(-0.5, 0.5), 0.02),  # perturbed width 2 < Bypass 4; unperturbed 1 < 5.66
        bypass_unit(1, env(-1.0, 3.0, 5), env(-1.0, 1.0), env(-1.0, 3.0)),
        alp_unit(1, env(-2.0, 2.0), env(-0.5, 1.5), 0.08),  # 4 > 2; ALP's update larger than any Bypass one
    ]
    (row,) = study.envelope_rows(records)
    assert row["key"] == ("f", "vllm-bfloat16", "absolute-s0.02-all")
    (entry,) = study.bin_summary(row)
    assert entry["tokens"] == 12 and entry["seeds"] == 2 and entry["alp_narrower_seeds"] == 1
    assert entry["before_width"] == pytest.approx(3.0) and entry["bypass_width"] == pytest.approx(3.0)
    assert entry["alp_perturbed_width"] == pytest.approx(3.0) and entry["alp_unperturbed_width"] == pytest.approx(1.5)
    assert entry["bypass_width_std"] == pytest.approx(2**0.5) and entry["before_q99"] == pytest.approx(2.0)
    assert entry["bypass_matched_width"] == pytest.approx(4 * 2**0.5) and entry["matched_seeds"] == 1
    assert entry["alp_unperturbed_narrower_matched_seeds"] == 1
    # across rows (engines x sigmas) the bins' counts add up; one row alone is its own table
    assert study.envelope_report.bin_tally([row]) == []
    assert "| [0, 0.5) | 2 of 4 | 2 of 2 |" in study.envelope_report.bin_tally([row, row])
    # a seed whose update did not move (every advantage 0) is left out and named
    still = alp_unit(2, env(-1.0, 1.0), env(-1.0, 1.0), 0.0)
    still["result"]["alp_update"]["update_size_reverse_k3"] = 0.0
    records += [bypass_unit(2, env(-1.0, 1.0), env(-1.0, 1.0), env(-1.0, 1.0)), still]
    (row,) = study.envelope_rows(records)
    assert [s["seed"] for s in row["seeds"]] == [0, 1] and row["no_signal"] == [2]
    assert "no learning signal (every rollout rewarded alike, so no update): [2]" in "\n".join(
        study.envelope_section(records, str(tmp_path / "images" / "report"))
    )
