"""The public conformance suite over every registered rule, third-party ones included."""

import pytest

from fa_rules.plugins.manager import get_registry
from fa_rules.testing import CHECKS, run_check

RULES = sorted(get_registry().rules)


def test_the_example_third_party_rule_is_in_the_suite():
    assert "readout_only" in RULES and "backprop" in RULES


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("rule", RULES)
def test_conformance(rule, check):
    run_check(rule, check)
