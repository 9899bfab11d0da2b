"""Spec rules: first match wins, labels, and one clear error for each kind of bad spec."""

import jax
import jax.numpy as jnp
import pytest

import lorax_ft as lf
from lorax_ft.transform import lora

PARAMS = {
    "layers_0": {
        "attn": {
            "q_proj": {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros(8)},
            "v_proj": {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros(8)},
        },
        "norm": {"scale": jnp.ones(16)},
    },
    "head": {"kernel": jnp.zeros((16, 3))},
}


def test_paths_are_slash_joined():
    assert list(lf.paths.flatten(PARAMS)) == [
        "head/kernel",
        "layers_0/attn/q_proj/bias",
        "layers_0/attn/q_proj/kernel",
        "layers_0/attn/v_proj/bias",
        "layers_0/attn/v_proj/kernel",
        "layers_0/norm/scale",
    ]


def test_first_match_wins_and_unmatched_is_frozen():
    spec = lf.Spec(
        [
            (r".*q_proj/kernel", lf.LoRA(rank=4, alpha=16)),  # a rank_pattern-style override
            (r".*_proj/kernel", lf.LoRA(rank=2)),
            (r".*bias", lf.Train()),
            (r"head/.*", lf.Train()),
        ]
    )
    actions = spec.resolve(PARAMS)
    assert actions["layers_0/attn/q_proj/kernel"] == lf.LoRA(rank=4, alpha=16)
    assert actions["layers_0/attn/v_proj/kernel"] == lf.LoRA(rank=2)
    assert actions["layers_0/norm/scale"] == lf.Freeze()
    labels = lf.paths.flatten(spec.labels(PARAMS))
    assert labels == {
        "head/kernel": "train",
        "layers_0/attn/q_proj/bias": "train",
        "layers_0/attn/q_proj/kernel": "frozen",
        "layers_0/attn/v_proj/bias": "train",
        "layers_0/attn/v_proj/kernel": "frozen",
        "layers_0/norm/scale": "frozen",
    }
    adapters = lora.factors_by_path(lora.init(jax.random.key(0), PARAMS, spec))
    assert adapters["layers_0/attn/q_proj/kernel"].rank == 4
    assert adapters["layers_0/attn/q_proj/kernel"].scale == 4.0
    assert adapters["layers_0/attn/v_proj/kernel"].rank == 2


def test_full_finetune_trains_everything():
    assert set(lf.paths.flatten(lf.FULL_FINETUNE.labels(PARAMS)).values()) == {"train"}


def test_scale_and_rslora():
    assert lf.LoRA(rank=8, alpha=16).scale == 2.0
    assert lf.LoRA(rank=16, alpha=8, rslora=True).scale == 2.0
    assert lf.LoRA(rank=8).scale == 1.0


def test_rule_matching_nothing_names_rule_and_closest_paths():
    spec = lf.Spec([(r".*q_prj/kernel", lf.LoRA(rank=2))])
    with pytest.raises(lf.SpecError, match=r"rule '\.\*q_prj/kernel' matches no parameter") as e:
        spec.resolve(PARAMS)
    assert "layers_0/attn/q_proj/kernel" in str(e.value)
    assert str(e.value).count("/") >= 5  # up to five closest paths are listed


@pytest.mark.parametrize("path", [r".*q_proj/bias", r".*norm/scale"])
def test_lora_on_a_non_kernel(path):
    with pytest.raises(lf.SpecError, match="which is not a kernel"):
        lf.Spec([(path, lf.LoRA(rank=2))]).resolve(PARAMS)


def test_lora_on_a_stacked_bias_is_still_not_a_kernel():
    stacked = {"layers": {"dense": {"bias": jnp.zeros((3, 8)), "kernel": jnp.zeros((3, 8, 8))}}}
    with pytest.raises(lf.SpecError, match=r"'layers/dense/bias' with shape \(3, 8\)"):
        lf.Spec([(r".*", lf.LoRA(rank=2))]).resolve(stacked)


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one(rank):
    with pytest.raises(lf.SpecError, match="rank must be an integer >= 1"):
        lf.LoRA(rank=rank)


def test_rank_above_min_features():
    spec = lf.Spec([(r"head/kernel", lf.LoRA(rank=4))])  # head is 16 × 3
    with pytest.raises(lf.SpecError, match=r"rank 4 for 'head/kernel'.* must be in \[1, 3\]"):
        lora.init(jax.random.key(0), PARAMS, spec)


def test_strict_coverage():
    spec = lf.Spec([(r".*kernel", lf.Train())], strict=True)
    with pytest.raises(lf.SpecError, match=r"'head/kernel'|'layers_0/attn/q_proj/bias'"):
        spec.resolve(PARAMS)
    with pytest.raises(lf.SpecError, match="matched by no rule and the spec is strict"):
        spec.resolve(PARAMS)
    ok = lf.Spec([(r".*kernel", lf.Train()), (".*", lf.Freeze())], strict=True)
    assert len(ok.resolve(PARAMS)) == 6


def test_bad_regex_and_bad_action():
    with pytest.raises(lf.SpecError, match="not a valid regex"):
        lf.Spec([("(", lf.Train())])
    with pytest.raises(lf.SpecError, match="is not one of LoRA"):
        lf.Spec([(".*", "train")])


def test_rules_as_a_dict_keep_their_order_and_malformed_rules_are_one_line_errors():
    params = {"q": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)}}
    spec = lf.Spec({r"q/kernel": lf.LoRA(rank=2), r".*": lf.Train()})
    assert spec.labels(params) == {"q": {"bias": "train", "kernel": "frozen"}}
    assert spec == lf.Spec([(r"q/kernel", lf.LoRA(rank=2)), (r".*", lf.Train())])
    for bad, message in [
        ("q/kernel", "rules or a"),
        ([("q/kernel",)], "not a \\(regex, action\\) pair"),
        ([(3, lf.Train())], "not a \\(regex, action\\) pair"),
    ]:
        with pytest.raises(lf.SpecError, match=message):
            lf.Spec(bad)


@pytest.mark.parametrize("alpha", [0, -2.0, float("nan"), float("inf"), "8"])
def test_lora_alpha_must_be_a_positive_number(alpha):
    with pytest.raises(lf.SpecError, match="alpha must be a number > 0"):
        lf.LoRA(rank=4, alpha=alpha)
