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
