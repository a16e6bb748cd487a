"""The under-used budget warning (issue 12): one rule, shared with the torch bridge."""

import pytest

from optax_selective.inspect import (
    BudgetShortfallWarning,
    budget_shortfall_message,
    warn_budget_shortfall,
)


def test_no_message_when_budget_spent():
    assert budget_shortfall_message(20, 20, "id3", steps_run=5, max_steps=5) is None
    assert budget_shortfall_message(21, 20, "id3") is None


def test_fewer_steps_than_max_steps_names_both_numbers():
    msg = budget_shortfall_message(554, 2000, "id3", steps_run=277, max_steps=1000)
    assert "554 of its budget of 2000" in msg
    assert "only 277 of max_steps=1000" in msg
    assert "gradient accumulation" in msg


def test_all_steps_ran_points_to_gradients():
    msg = budget_shortfall_message(10, 20, "id3", steps_run=9, max_steps=5)
    assert "zero gradients" in msg and "first 5 updates" in msg


def test_warn_emits_the_category_once_per_call():
    with pytest.warns(BudgetShortfallWarning, match="3 of its budget of 4"):
        assert warn_budget_shortfall(3, 4, "fish", steps_run=1, max_steps=2)
