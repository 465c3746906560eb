"""`alp_trl.study.significance`: Fisher's exact test of blow-up counts, by hand."""

import pytest


def test_fisher_exact_fewer_by_hand():
    from alp_trl.study.significance import fisher_exact_fewer

    # 13 of 16 runs blew up, 8 per group: P(A has <= 5) = C(13,5) C(3,3) / C(16,8) = 1287 / 12870
    assert fisher_exact_fewer(5, 8, 8, 8) == pytest.approx(0.1)
    # 12 of 16: P(A <= 4) = C(12,4) C(4,4) / C(16,8) = 495 / 12870
    assert fisher_exact_fewer(4, 8, 8, 8) == pytest.approx(495 / 12870)
    assert fisher_exact_fewer(0, 1, 1, 1) == pytest.approx(0.5)  # one event, either run equally likely
    assert fisher_exact_fewer(8, 8, 8, 8) == 1.0 and fisher_exact_fewer(8, 8, 0, 8) == 1.0
    # unequal groups: 2 events in 5 + 3 runs, A (5 runs) has 0: C(2,0) C(6,5) / C(8,5) = 6 / 56
    assert fisher_exact_fewer(0, 5, 2, 3) == pytest.approx(6 / 56)
    with pytest.raises(ValueError, match="events_b must be between 0 and runs_b"):
        fisher_exact_fewer(1, 8, 9, 8)


def test_blowup_verdict_applies_the_rule_on_final_counts():
    from alp_trl.study.significance import blowup_verdict

    # 8 runs each, the control (Bypass) blew up in all 8: the method needs 3 fewer for the paper
    assert blowup_verdict(5, 8, 3) == "for" and blowup_verdict(0, 8, 3) == "for"
    assert blowup_verdict(6, 8, 3) == "no verdict" and blowup_verdict(7, 8, 3) == "no verdict"
    assert blowup_verdict(8, 8, 3) == "against" and blowup_verdict(4, 2, 3) == "against"
    assert blowup_verdict(0, 0, 3) == "against", "as many blow-ups as the control, none: the rule says against"
    assert blowup_verdict(2, 3, 1) == "for"
    with pytest.raises(ValueError, match="for_margin must be at least 1"):
        blowup_verdict(0, 8, 0)


def test_possible_verdicts_enumerate_every_split_of_the_runs_to_come():
    from alp_trl.study.significance import possible_verdicts

    # Figure 1 after 5 of 8 seeds: 5 of 5 each. The method's fewest final blow-ups are 5, the control's most 8: a
    # difference from 5 - 8 = -3 (against) up to 8 - 5 = 3 (for), no verdict in between
    assert possible_verdicts((5, 5), (5, 5), 8, 3) == ("for", "no verdict", "against")
    # one more method blow-up: at most 8 - 6 = 2 fewer, "for" is out
    assert possible_verdicts((6, 6), (6, 6), 8, 3) == ("no verdict", "against")
    # the method blew up in 6 of 6, the control in 5 of 6: the difference is at most 7 - 6 = 1, at least 5 - 8 = -3
    assert possible_verdicts((6, 6), (5, 6), 8, 3) == ("no verdict", "against")
    # the method in 0 of 7, the control in 7 of 7: 7 or 8 fewer whatever comes, "for" only
    assert possible_verdicts((0, 7), (7, 7), 8, 3) == ("for",)
    # complete: the final verdict alone
    assert possible_verdicts((6, 8), (8, 8), 8, 3) == ("no verdict",)
    assert possible_verdicts((8, 8), (8, 8), 8, 3) == ("against",)
    with pytest.raises(ValueError, match=r"control: need 0 <= blown \(9\) <= judged \(9\) <= runs \(8\)"):
        possible_verdicts((0, 0), (9, 9), 8, 3)
