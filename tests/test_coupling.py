"""coupling.assign against brute force and scipy's optimum (both costs, both exact solvers), the pairing direction,
per-class assignments, Sinkhorn's rounding, and use under jit."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxdiff.core import coupling


def cost64(x, z, cost):
    """The cost matrix in float64 from its definition: ||x_i - z_j|| or its square on the flattened rows."""
    d = np.asarray(x, np.float64).reshape(len(x), 1, -1) - np.asarray(z, np.float64).reshape(1, len(z), -1)
    squared = (d ** 2).sum(-1)
    return squared if cost == 'sqeuclidean' else np.sqrt(squared)


def total(C, perm):
    return float(C[np.arange(len(C)), np.asarray(perm)].sum())


def is_permutation(perm, n):
    perm = np.asarray(perm)
    return perm.dtype == np.int32 and perm.shape == (n,) and np.array_equal(np.sort(perm), np.arange(n))


def pool(seed, n, shape=(3, 2, 2)):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (n,) + shape).astype(np.float32), rng.normal(size=(n,) + shape).astype(np.float32))


def per_class_optimum(C, labels):
    best = 0.0
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        rows, cols = linear_sum_assignment(C[np.ix_(idx, idx)])
        best += C[idx[rows], idx[cols]].sum()
    return best


@pytest.mark.parametrize('exact_solver', coupling.EXACT_SOLVERS)
@pytest.mark.parametrize('cost', coupling.COSTS)
def test_exact_equals_the_brute_force_optimum(cost, exact_solver):
    x, z = pool(0, 7)
    C = cost64(x, z, cost)
    best = min(total(C, p) for p in itertools.permutations(range(7)))            # all 5040 pairings
    perm = coupling.assign(x, z, method='exact', cost=cost, exact_solver=exact_solver)
    assert is_permutation(perm, 7)
    np.testing.assert_allclose(total(C, perm), best, rtol=1e-6)


@pytest.mark.parametrize('exact_solver', coupling.EXACT_SOLVERS)
@pytest.mark.parametrize('cost', coupling.COSTS)
def test_exact_equals_scipys_optimum_on_a_larger_pool(cost, exact_solver):
    x, z = pool(1, 96, (4, 4, 3))
    C = cost64(x, z, cost)
    rows, cols = linear_sum_assignment(C)
    perm = coupling.assign(x, z, method='exact', cost=cost, exact_solver=exact_solver)
    assert is_permutation(perm, 96)
    np.testing.assert_allclose(total(C, perm), C[rows, cols].sum(), rtol=1e-5)
    assert total(C, perm) < 0.99 * np.trace(C)                                   # better than independent pairing


@pytest.mark.parametrize('method', coupling.METHODS)
def test_noise_perm_i_is_paired_with_image_i(method):
    """Noise that is a shuffled copy of the images (plus a little jitter) is paired back with its own image."""
    x, _ = pool(2, 32)
    shuffle = np.random.default_rng(3).permutation(32)
    noise = x[shuffle] + 1e-3 * np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    perm = np.asarray(coupling.assign(x, noise, method=method))
    np.testing.assert_array_equal(noise[perm], noise[np.argsort(shuffle)])
    np.testing.assert_array_equal(shuffle[perm], np.arange(32))


@pytest.mark.parametrize('exact_solver', coupling.EXACT_SOLVERS)
def test_per_class_exact_never_crosses_classes_and_is_the_sum_of_class_optima(exact_solver):
    x, z = pool(5, 60, (4, 4, 3))
    labels = np.random.default_rng(6).choice(4, size=60, p=[0.1, 0.2, 0.3, 0.4]).astype(np.int32)  # unequal classes
    C = cost64(x, z, 'euclidean')
    perm = np.asarray(coupling.assign(x, z, labels=labels, exact_solver=exact_solver))
    assert is_permutation(perm, 60)
    np.testing.assert_array_equal(labels[perm], labels)
    np.testing.assert_allclose(total(C, perm), per_class_optimum(C, labels), rtol=1e-5)
    # the unconstrained optimum crosses classes here, so the constraint is real
    rows, cols = linear_sum_assignment(C)
    assert (labels[cols] != labels[rows]).any()


@pytest.mark.parametrize('cost', coupling.COSTS)
def test_sinkhorn_gives_a_permutation_close_to_the_optimum(cost):
    x, z = pool(7, 128, (4, 4, 3))
    C = cost64(x, z, cost)
    rows, cols = linear_sum_assignment(C)
    best, independent = C[rows, cols].sum(), np.trace(C)
    perm = coupling.assign(x, z, method='sinkhorn', cost=cost)
    assert is_permutation(perm, 128)
    closed = (independent - total(C, perm)) / (independent - best)
    assert closed > 0.95, closed
    # a smaller epsilon is a sharper plan: closer still
    sharp = coupling.assign(x, z, method='sinkhorn', cost=cost, epsilon=0.01, max_iterations=5000)
    assert (independent - total(C, sharp)) / (independent - best) >= closed - 1e-3


def test_sinkhorn_per_class_never_crosses_classes():
    x, z = pool(8, 64, (4, 4, 3))
    labels = np.repeat(np.arange(4, dtype=np.int32), 16)[np.random.default_rng(9).permutation(64)]
    C = cost64(x, z, 'euclidean')
    perm = np.asarray(coupling.assign(x, z, method='sinkhorn', labels=labels))
    assert is_permutation(perm, 64)
    np.testing.assert_array_equal(labels[perm], labels)
    best, independent = per_class_optimum(C, labels), np.trace(C)
    assert (independent - total(C, perm)) / (independent - best) > 0.9


@pytest.mark.parametrize('method, exact_solver', [('exact', 'scipy'), ('exact', 'hungarian'), ('sinkhorn', 'scipy')])
def test_usable_inside_jit_with_traced_images_noise_and_labels(method, exact_solver):
    x, z = pool(10, 40)
    labels = np.random.default_rng(11).integers(0, 3, size=40).astype(np.int32)
    assign = functools.partial(coupling.assign, method=method, exact_solver=exact_solver)

    @jax.jit
    def pair(x, z, labels):
        perm = assign(x, z, labels=labels)
        return perm, z[perm]                                                   # use the result inside the program

    perm, paired = pair(jnp.asarray(x), jnp.asarray(z), jnp.asarray(labels))
    np.testing.assert_array_equal(perm, assign(x, z, labels=labels))
    np.testing.assert_array_equal(paired, z[np.asarray(perm)])
    np.testing.assert_array_equal(labels[np.asarray(perm)], labels)


def test_bad_options_are_one_line_errors():
    x, z = pool(12, 4)
    for kwargs, message in [({'method': 'greedy'}, 'valid methods: exact, sinkhorn'),
                            ({'cost': 'l1'}, 'valid costs: euclidean, sqeuclidean'),
                            ({'exact_solver': 'lapjv'}, 'valid: scipy, hungarian'),
                            ({'labels': np.zeros(3, np.int32)}, 'labels must be integers of shape'),
                            ({'method': 'sinkhorn', 'epsilon': 0.0}, 'epsilon must be positive')]:
        with pytest.raises(ValueError, match=message) as error:
            coupling.assign(x, z, **kwargs)
        assert '\n' not in str(error.value)
    with pytest.raises(ValueError, match='same shape'):
        coupling.assign(x, z[:3])
