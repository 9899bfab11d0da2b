"""The one rule matcher: first full match wins, a rule that matches nothing is one clear error."""

import re

import pytest

import lorax_ft as lf
from lorax_ft.errors import UserError
from lorax_ft.models.lora_targets import is_target
from lorax_ft.transform.rules import RuleError, Rules

PATHS = [
    "encoder/layer_0/attention/query/kernel",
    "encoder/layer_0/attention/query/bias",
    "encoder/layer_1/attention/query/kernel",
    "encoder/layer_1/mlp/dense/kernel",
    "head/kernel",
]


def _first_full_match(rules, path, default):
    # The textbook loop, for comparison.
    for pattern, value in rules:
        if re.fullmatch(pattern, path):
            return value
    return default


def test_first_full_match_wins_and_unmatched_paths_get_the_default():
    rules = [
        (r"encoder/layer_1/.*", "late"),
        (r".*/kernel", "kernel"),
        (r".*query.*", "query"),  # only the bias reaches this rule
        (r"head/.*", "head"),  # shadowed by .*/kernel everywhere: still not an error
    ]
    table = Rules(rules, what="test")
    assert table.match(PATHS, "none") == {p: _first_full_match(rules, p, "none") for p in PATHS}
    assert table.match(PATHS)["encoder/layer_0/attention/query/bias"] == "query"
    assert table.index("head/kernel") == 1 and table.index("nothing") is None


def test_regexes_must_match_the_whole_path():
    table = Rules([("kernel", 1), ("encoder/layer_0", 2)], what="t")
    assert table.index("head/kernel") is None
    assert table.index("encoder/layer_0/attention/query/kernel") is None
    assert is_target("head/kernel", (r".*/kernel",))
    assert not is_target("head/kernel_scale", (r".*/kernel",))


def test_rule_matching_nothing_names_what_rule_and_closest_paths():
    table = Rules([(r".*/kernel", 1.0), (r"encoder/layer_2/.*", 0.5)], what="optim.lr_mults")
    with pytest.raises(RuleError) as e:
        table.match(PATHS)
    message = str(e.value)
    assert message.startswith(
        "optim.lr_mults: rule 'encoder/layer_2/.*' matches no parameter (regexes must match the "
        "whole '/'-joined path); closest paths: ['encoder/layer_"
    )
    assert all(repr(p) in message for p in PATHS)  # up to five closest paths: all of these
    assert table.match(PATHS, check=False)["encoder/layer_1/mlp/dense/kernel"] == 1.0


def test_strict_refuses_an_uncovered_path():
    table = Rules([(r".*/kernel", 1.0)], what="sharding.path_rules")
    with pytest.raises(RuleError, match=r"sharding.path_rules: parameter '.*/bias' is matched by"):
        table.match(PATHS, strict=True)
    assert len(Rules([(r".*/kernel", 1.0), (".*", 0.0)]).match(PATHS, strict=True)) == 5


@pytest.mark.parametrize("pattern", ["(", "a{2,1}", 3])
def test_invalid_regex_names_the_rule(pattern):
    with pytest.raises(
        RuleError, match=rf"^wd: rule {re.escape(repr(pattern))}: not a valid regex"
    ):
        Rules([(".*", 1.0), (pattern, 2.0)], what="wd")


def test_one_error_class_for_every_rule_table():
    assert issubclass(RuleError, UserError) and issubclass(RuleError, ValueError)
    assert issubclass(lf.SpecError, RuleError)  # `except SpecError` code keeps working
    with pytest.raises(lf.SpecError, match=r"^rule 'nope' matches no parameter"):
        lf.Spec([("nope", lf.Train())]).resolve({"w": 1.0})
