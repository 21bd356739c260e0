"""lora_format.patterns: PEFT's rank_pattern / alpha_pattern rule, compared with PEFT's own function.

The rule is shared by both halves, so a half-vs-half check could not catch a mistake in it; these
tests compare it with ``peft.utils.other.get_pattern_key`` and with the expression
``LoraModel._create_and_replace`` builds from it (``pattern.get(get_pattern_key(keys, name), default)``).
"""

from __future__ import annotations

import itertools
import random

import pytest
from peft.utils.other import get_pattern_key

from lora_format.patterns import (
    check_survives_sorting,
    module_rank_alpha,
    module_scaling,
    normalise_pattern,
    pattern_key,
    resolve_modules,
)

# Every module name of a 12-layer GPT2LMHeadModel, plus names that probe the edges of the rule.
GPT2_NAMES = ["transformer", "transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h",
              "transformer.ln_f", "lm_head"] + [
    f"transformer.h.{i}{tail}" for i in range(12) for tail in (
        "", ".ln_1", ".attn", ".attn.c_attn", ".attn.c_proj", ".attn.attn_dropout", ".attn.resid_dropout", ".ln_2",
        ".mlp", ".mlp.c_fc", ".mlp.c_proj", ".mlp.act", ".mlp.dropout")]
EDGE_NAMES = ["c_attn", "attn.c_attn", "xattn.c_attn", "transformer.h.0.attn.c_attn_extra", "model.c_attn.c_attn",
              "transformer.h.10.attn.c_attn", "encoder.layer.0.attention.self.query"]
NAMES = GPT2_NAMES + EDGE_NAMES

KEYS = ["c_attn", "attn.c_attn", "h.0.attn.c_attn", "transformer.h.0.attn.c_attn", "^transformer.h.0.attn.c_attn",
        r"^transformer\.h\.1\.attn\.c_attn", "c_proj", "mlp.c_proj", "attn.c_proj", ".*c_proj", "c_fc",
        r"h\.\d+\.mlp\.c_fc", "(c_fc|c_attn)", "c_fc|c_attn", "0.attn.c_attn", "h.[01].attn.c_attn", "ttn.c_attn",
        "n.c_attn", ".c_attn", "h.1", "h.1.attn", "attn", "c_", "c_.*", "transformer", "lm_head", "h.1.*",
        "1.attn.c_attn", "h.10.attn.c_attn", "query", "self.query", "layer.0.*", "C_ATTN", "c_attn$", "c_attn\n?"]


def _peft_value(pattern: dict, name: str, default):
    """What PEFT 0.21's LoraModel._create_and_replace computes (peft/tuners/lora/model.py:309-312)."""
    return pattern.get(get_pattern_key(pattern.keys(), name), default)


@pytest.mark.parametrize("key", KEYS)
def test_one_key_matches_exactly_where_peft_matches(key):
    ours = [name for name in NAMES if pattern_key([key], name) == key]
    peft = [name for name in NAMES if get_pattern_key([key], name) == key]
    assert ours == peft


def test_the_first_matching_key_wins_as_in_peft():
    rng = random.Random(0)
    orders = [rng.sample(KEYS, rng.randint(1, 5)) for _ in range(400)]
    compared = matched = disagreements = 0
    for keys, name in itertools.product(orders, NAMES):
        peft = get_pattern_key(keys, name)  # PEFT returns the name itself when nothing matches
        ours = pattern_key(keys, name)
        disagreements += (name if ours is None else ours) != peft
        compared, matched = compared + 1, matched + (ours is not None)
    # 9,883 of the 68,000 (keys, name) cases match some key: the comparison covers both outcomes.
    assert (compared, matched, disagreements) == (68_000, 9_883, 0)


def test_rank_and_alpha_equal_peft_expression_for_every_module():
    rng = random.Random(1)
    for _ in range(200):
        rank_pattern = {key: rng.randint(1, 16) for key in rng.sample(KEYS, rng.randint(0, 4))}
        alpha_pattern = {key: rng.choice([0.5, 3, 8.0, 32]) for key in rng.sample(KEYS, rng.randint(0, 4))}
        ours = resolve_modules(NAMES, 4, 8.0, tuple(rank_pattern.items()), tuple(alpha_pattern.items()))
        peft = {name: (_peft_value(rank_pattern, name, 4), float(_peft_value(alpha_pattern, name, 8.0)))
                for name in NAMES}
        assert ours == peft


def test_the_brief_example():
    rank_pattern = normalise_pattern({"h.0.attn.c_attn": 2, "c_fc": 6}, "rank_pattern", integer=True)
    alpha_pattern = normalise_pattern({"mlp.c_proj": 3}, "alpha_pattern", integer=False)
    got = {name: module_rank_alpha(name, 4, 8.0, rank_pattern, alpha_pattern) for name in (
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc",
        "transformer.h.0.mlp.c_proj", "transformer.h.0.attn.c_proj")}
    assert got == {"transformer.h.0.attn.c_attn": (2, 8.0), "transformer.h.1.attn.c_attn": (4, 8.0),
                   "transformer.h.1.mlp.c_fc": (6, 8.0), "transformer.h.0.mlp.c_proj": (4, 3.0),
                   "transformer.h.0.attn.c_proj": (4, 8.0)}


def test_scaling_uses_the_modules_own_rank_and_alpha():
    assert (module_scaling(6, 8.0, False), module_scaling(2, 8.0, True), module_scaling(4, 3.0, False)) == (
        8.0 / 6, 8.0 / 2 ** 0.5, 0.75)


def test_normalise_keeps_order_and_accepts_pairs():
    assert normalise_pattern({"b": 2, "a": 3}, "rank_pattern", integer=True) == (("b", 2), ("a", 3))
    assert normalise_pattern([("b", 2), ("a", 3)], "rank_pattern", integer=True) == (("b", 2), ("a", 3))
    assert normalise_pattern(None, "rank_pattern", integer=True) == ()
    assert normalise_pattern({"a": 3}, "alpha_pattern", integer=False) == (("a", 3.0),)


@pytest.mark.parametrize(("value", "error", "match"), [
    ({"a": 0}, ValueError, r"rank_pattern\['a'\] must be a positive int rank, got 0"),
    ({"a": 2.0}, ValueError, "positive int rank"),
    ({"a": True}, ValueError, "positive int rank"),
    ({"(a": 2}, ValueError, r"key '\(a' is read as a regex and does not compile"),
    ({"": 2}, TypeError, "keys must be non-empty strings"),
    ({3: 2}, TypeError, "keys must be non-empty strings"),
    ([("a", 2), ("a", 3)], ValueError, r"repeats the keys \['a'\]"),
    ("a", TypeError, "must be a dict from module-name regex to value"),
])
def test_normalise_refuses_bad_rank_patterns(value, error, match):
    with pytest.raises(error, match=match):
        normalise_pattern(value, "rank_pattern", integer=True)


@pytest.mark.parametrize("alpha", [0, -1.0, float("inf"), float("nan"), "8", False])
def test_normalise_refuses_bad_alphas(alpha):
    with pytest.raises(ValueError, match=r"alpha_pattern\['a'\] must be a finite number > 0"):
        normalise_pattern({"a": alpha}, "alpha_pattern", integer=False)


def test_order_that_does_not_survive_sorting_is_named():
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    check_survives_sorting(names, 4, 8.0, (("c_attn", 5),), (("h.0.attn.c_attn", 2.0),))  # disjoint: no error
    check_survives_sorting(names, 4, 8.0, (("c_attn", 5), ("h.0.attn.c_attn", 2)))  # already sorted: no error
    with pytest.raises(ValueError, match=r"give transformer\.h\.0\.attn\.c_attn rank 5, alpha 8\.0 instead of "
                                         r"rank 2, alpha 8\.0"):
        check_survives_sorting(names, 4, 8.0, (("h.0.attn.c_attn", 2), ("c_attn", 5)))
