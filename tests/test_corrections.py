"""The corrections table (`alp_trl.corrections`): every fact and predicate of every correction, by value, as its
docstring describes them."""

import pytest

from alp_trl.corrections import CORRECTIONS, OFF_POLICY_CORRECTIONS, ROLLOUT_CORRECTIONS, Correction, correction


# name: (ratio_denominator, rollout_weight, weight_level, perturbed), as the module docstring describes them
FACTS = {
    "alp": ("rollout", None, None, True),
    "bypass": ("rollout", None, None, False),
    "token_mis": ("old", "mask", "token", False),
    "seq_mis": ("old", "mask", "sequence", False),
    "tis": ("old", "truncate", "token", False),
    "seq_tis": ("old", "truncate", "sequence", False),
    "ppo": ("old", None, None, False),
    "none": ("trl", None, None, False),
}
# name: (divides_by_rollout, has_rollout_weight, truncates, is_trl_loss, reads_old_logps)
PREDICATES = {
    "alp": (True, False, False, False, False),
    "bypass": (True, False, False, False, False),
    "token_mis": (False, True, False, False, True),
    "seq_mis": (False, True, False, False, True),
    "tis": (False, True, True, False, True),
    "seq_tis": (False, True, True, False, True),
    "ppo": (False, False, False, False, True),
    "none": (False, False, False, True, False),
}


def test_the_corrections_in_order():
    assert OFF_POLICY_CORRECTIONS == ("alp", "bypass", "token_mis", "seq_mis", "tis", "seq_tis", "ppo", "none")
    assert list(CORRECTIONS) == list(FACTS) == list(PREDICATES)
    assert ROLLOUT_CORRECTIONS == ("token_mis", "seq_mis", "tis", "seq_tis")


@pytest.mark.parametrize("name", list(FACTS))
def test_every_fact_and_predicate_of_each_correction(name):
    c = correction(name)
    assert c is CORRECTIONS[name] and c.name == name
    assert (c.ratio_denominator, c.rollout_weight, c.weight_level, c.perturbed) == FACTS[name]
    assert (c.divides_by_rollout, c.has_rollout_weight, c.truncates, c.is_trl_loss, c.reads_old_logps) == (
        PREDICATES[name]
    )


@pytest.mark.parametrize("name", list(FACTS))
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"])
def test_only_vespo_with_a_rollout_weight_is_refused(name, loss_type):
    refused = loss_type == "vespo" and name in ("token_mis", "seq_mis", "tis", "seq_tis")
    assert correction(name).allows_loss_type(loss_type) is not refused


def test_an_unknown_correction_names_the_allowed_values():
    with pytest.raises(ValueError) as error:
        correction("x")
    assert str(error.value) == (
        "`off_policy_correction` got 'x'; allowed values are "
        "['alp', 'bypass', 'token_mis', 'seq_mis', 'tis', 'seq_tis', 'ppo', 'none']."
    )


def test_a_correction_is_frozen():
    with pytest.raises(AttributeError):
        correction("alp").perturbed = False
    assert Correction("bypass", "rollout") == CORRECTIONS["bypass"]
