"""lora_format.combine against the dense float64 definition, independently of PEFT.

Tolerances: everything is float64; ``cat`` is a reordering of the same sums, so it agrees with the
dense sum to ~1e-15 relative (checked at 1e-12); the ``svd`` error equals the Eckart-Young optimum
(the norm of the dropped singular values) to 1e-12 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

from lora_format.combine import Factors, combine_adapters, combined_rank
from lora_format.patterns import module_scaling

RNG = np.random.default_rng(0)


def factors(fan_in, fan_out, rank, alpha, rslora) -> Factors:
    return Factors(RNG.normal(size=(fan_in, rank)), RNG.normal(size=(rank, fan_out)),
                   module_scaling(rank, alpha, rslora))


def mixed_adapters():
    """Three adapters: ranks 2, 4, 1; alphas 3, 16, 1; rsLoRA on for the second; the third lacks module 'v'."""
    return [
        {"q": factors(12, 8, 2, 3.0, False), "v": factors(12, 20, 2, 3.0, False)},
        {"q": factors(12, 8, 4, 16.0, True), "v": factors(12, 20, 4, 16.0, True)},
        {"q": factors(12, 8, 1, 1.0, False)},
    ]


def dense_sum(adapters, weights, name) -> np.ndarray:
    return sum(w * a[name].delta() for w, a in zip(weights, adapters) if name in a)


def test_cat_is_the_exact_weighted_sum_with_rslora_mixed_ranks_and_alphas():
    adapters, weights = mixed_adapters(), [0.7, -0.4, 1.3]
    rank, combined = combine_adapters("cat", adapters, weights)
    assert rank == 7 and sorted(combined) == ["q", "v"]
    for name, result in combined.items():
        want = dense_sum(adapters, weights, name)
        assert result.scaling == 1.0 and result.a.shape == (12, 7)
        np.testing.assert_allclose(result.delta(), want, rtol=0, atol=1e-12 * np.abs(want).max())
    # 'v' is adapted by two adapters only (ranks 2 + 4): the last row of B' is zero, as in PEFT.
    assert np.abs(combined["v"].b[6:]).max() == 0.0


def test_svd_is_the_best_rank_k_approximation_of_the_weighted_sum():
    adapters, weights = mixed_adapters(), [0.7, -0.4, 1.3]
    for k in (1, 3, 7):
        _, combined = combine_adapters("svd", adapters, weights, svd_rank=k)
        for name, result in combined.items():
            want = dense_sum(adapters, weights, name)
            singular = np.linalg.svd(want, compute_uv=False)
            optimum = np.sqrt(np.sum(singular[k:] ** 2))  # Eckart-Young: the smallest error of any rank-k matrix
            error = np.linalg.norm(result.delta() - want)
            assert error == pytest.approx(optimum, rel=1e-12, abs=1e-12 * singular[0])
            assert np.linalg.matrix_rank(result.delta()) <= k


def test_linear_sums_the_factors_and_is_exact_only_for_one_adapter():
    one = {"q": factors(6, 5, 3, 6.0, True)}
    _, alone = combine_adapters("linear", [one], [0.5])
    np.testing.assert_allclose(alone["q"].delta(), 0.5 * one["q"].delta(), rtol=1e-12)
    two = {"q": factors(6, 5, 3, 6.0, False)}
    _, both = combine_adapters("linear", [one, two], [0.5, 0.5])
    cross_terms = np.linalg.norm(both["q"].delta() - dense_sum([one, two], [0.5, 0.5], "q"))
    assert cross_terms > 1e-3  # PEFT's 'linear' is not the weighted sum of deltas; documented, not hidden


def test_bad_combinations_are_refused():
    adapters = mixed_adapters()
    with pytest.raises(ValueError, match="every adapter needs the same rank, got ranks \\[2, 4, 1\\]"):
        combine_adapters("linear", adapters, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="must be finite numbers"):
        combine_adapters("cat", adapters, [1.0, float("inf"), 1.0])
    with pytest.raises(ValueError, match="got 2 combination weights for 3 adapters"):
        combine_adapters("cat", adapters, [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown combination_type 'ties'"):
        combined_rank("ties", [2, 2])
    other = [{"q": factors(12, 9, 2, 2.0, False)}, {"q": factors(12, 8, 2, 2.0, False)}]
    with pytest.raises(ValueError, match="made for different base models"):
        combine_adapters("cat", other, [1.0, 1.0])
    with pytest.raises(ValueError, match="svd_rank must be a positive int"):
        combine_adapters("svd", adapters, [1.0, 1.0, 1.0], svd_rank=0)


def test_inputs_are_not_changed():
    adapters = mixed_adapters()
    copies = [{n: (f.a.copy(), f.b.copy()) for n, f in a.items()} for a in adapters]
    combine_adapters("cat", adapters, [2.0, 3.0, 4.0])
    combine_adapters("svd", adapters, [2.0, 3.0, 4.0])
    for adapter, copy in zip(adapters, copies):
        for name, (a, b) in copy.items():
            assert np.array_equal(adapter[name].a, a) and np.array_equal(adapter[name].b, b)
