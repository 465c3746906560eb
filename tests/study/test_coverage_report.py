"""`alp_trl.study.coverage_report`: the coverage verdict follows the issue's rule."""


def test_coverage_overall_verdict_follows_the_issue_rule():
    """For the paper only with a positive control AND a realistic engine won; against when even every positive control
    is lost; the engines named in each case; a missing engine named as not measured, never counted as a loss."""
    from alp_trl.study.coverage_report import overall_verdict

    def v(engine, control, holds, seeds=5):
        return {"key": ("c", "base", engine), "positive_control": control, "holds": holds, "seeds": seeds}

    planned = ["hn0.02", "hn0.1", "vllm", "logit"]
    only = overall_verdict([v("hn0.02", True, False), v("hn0.1", True, True), v("vllm", False, False)], planned)
    assert only == [
        "- **base**: closer on the positive control only (hn0.1; not on hn0.02), not on the realistic engines measured "
        "(vllm); not measured yet: logit."
    ]
    both = overall_verdict([v("hn0.1", True, True), v("vllm", False, True, seeds=3)], ["hn0.1", "vllm"])
    assert both == [
        "- **base**: for the paper: closer on the positive control and on at least one realistic engine "
        "(provisional: 1 engine(s) with fewer than 5 seeds)."
    ]
    against = overall_verdict([v("hn0.1", True, False), v("vllm", False, True)], ["hn0.1", "vllm"])
    assert against[0].startswith("- **base**: against the paper's mechanism")
