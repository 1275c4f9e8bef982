"""Optimal-transport pairing of noise with images: `assign(images, noise, ...)` -> a permutation.

Kim, Choi, Shin, Hwang, Yoon, "Improving Diffusion-Based Generative Models via Approximated Optimal Transport"
(AOT, 2024, arXiv:2403.05069): before sigma is drawn, a pool of N images x_i and N unit Gaussian noises z_j is
paired by the assignment

    perm = argmin over permutations p of  sum_i C(x_i, z_p(i)),   C(x, z) = ||x - z||  (Euclidean, on the flattened
                                                                  rows; 'sqeuclidean': ||x - z||^2)

and noise z_perm(i) is used with image x_i. With labels, one assignment per class: the pairs never cross classes
(noise slot j belongs to class labels[j], so every class has as many slots as images).

Methods:
- 'exact'    the optimal assignment. exact_solver='scipy' (default): the cost matrix is computed by XLA, then
             `scipy.optimize.linear_sum_assignment` (Jonker-Volgenant) runs on the host through `jax.pure_callback`,
             so `assign` is usable inside jit (the callback is a host round trip). exact_solver='hungarian':
             `optax.assignment.hungarian_algorithm`, on the device inside the compiled program. scipy is the
             default because it measured 3-5x faster (benchmarks/aot_overhead.py; figures in RESULTS.md).
- 'sinkhorn' entropic OT (Cuturi 2013) with ott-jax's `Sinkhorn` on the same cost matrix, epsilon given relative
             to the cost scale (epsilon * std of the cost matrix), rounded to a permutation greedily: rows are
             visited in decreasing order of their largest log transport-plan entry (f_i + g_j - C_ij) / eps and
             each takes the unused noise (of its class) with the largest entry, so no noise is used twice.

Pure and jittable; no Flax, no config.
"""
import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('exact', 'sinkhorn')
COSTS = ('euclidean', 'sqeuclidean')
EXACT_SOLVERS = ('scipy', 'hungarian')

# Distances between images and noise are large (no cancellation); HIGHEST keeps TF32 out of the dot on GPUs.
_PRECISION = jax.lax.Precision.HIGHEST


def cost_matrix(images, noise, cost='euclidean'):
    """C_ij = ||x_i - z_j|| ('euclidean', AOT's cost) or ||x_i - z_j||^2 ('sqeuclidean') on the flattened rows,
    in matmul form ||x||^2 + ||z||^2 - 2 x.z (no [N, N, D] intermediate). images, noise [N, ...] -> [N, N]."""
    if cost not in COSTS:
        raise ValueError(f'coupling: unknown cost {cost!r}; valid costs: {", ".join(COSTS)}')
    x = images.reshape(images.shape[0], -1)
    z = noise.reshape(noise.shape[0], -1)
    squared = (jnp.sum(x * x, axis=1)[:, None] + jnp.sum(z * z, axis=1)[None, :]
               - 2 * jnp.matmul(x, z.T, precision=_PRECISION))
    squared = jnp.maximum(squared, 0.0)
    return squared if cost == 'sqeuclidean' else jnp.sqrt(squared)


def _same_class(labels, num):
    """[N, N] bool: image i may take noise j (all True without labels)."""
    if labels is None:
        return jnp.ones((num, num), bool)
    return labels[:, None] == labels[None, :]


def _forbid_cross_class(C, allowed):
    """C with cross-class entries raised above any within-class assignment: any permutation that crosses classes
    has at least two crossing pairs, so a penalty > N (max C - min C) / 2 + min C can never pay off. The within-class
    entries are unchanged, so the solvers' arithmetic on them (reduced costs) keeps its precision."""
    span = jnp.max(C) - jnp.min(C)
    penalty = C.shape[0] * span + jnp.max(C) + 1.0
    return jnp.where(allowed, C, penalty)


def _scipy_assignment(C, labels):
    """linear_sum_assignment on the host, one problem per class; returns int32 [N] with perm[i] = column of row i."""
    from scipy.optimize import linear_sum_assignment

    def host(C, labels):
        C, labels = np.asarray(C, np.float64), np.asarray(labels)
        perm = np.empty(C.shape[0], np.int32)
        for k in np.unique(labels):
            idx = np.flatnonzero(labels == k)
            rows, cols = linear_sum_assignment(C[np.ix_(idx, idx)])
            perm[idx[rows]] = idx[cols]
        return perm

    if labels is None:
        labels = jnp.zeros(C.shape[0], jnp.int32)
    out = jax.ShapeDtypeStruct((C.shape[0],), jnp.int32)
    return jax.pure_callback(host, out, C, labels, vmap_method='sequential')


def _hungarian_assignment(C, allowed):
    """optax's Hungarian algorithm on device; cross-class pairs priced out (`_forbid_cross_class`)."""
    from optax import assignment          # only optax.assignment: a pure-JAX algorithm, no optimizer state

    rows, cols = assignment.hungarian_algorithm(_forbid_cross_class(C, allowed))
    return jnp.zeros(C.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))


def _sinkhorn_assignment(C, allowed, epsilon, threshold, max_iterations):
    """ott-jax Sinkhorn on C (epsilon relative to the std of the within-class costs), rounded greedily."""
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    num = C.shape[0]
    weight = allowed.astype(C.dtype) / jnp.sum(allowed)
    mean = jnp.sum(weight * C)
    scale = jnp.sqrt(jnp.sum(weight * (C - mean) ** 2))                    # std of the costs that can be chosen
    eps = epsilon * jnp.maximum(scale, jnp.finfo(C.dtype).tiny)
    C = _forbid_cross_class(C, allowed)
    geom = geometry.Geometry(cost_matrix=C, epsilon=eps)
    solver = sinkhorn.Sinkhorn(threshold=threshold, max_iterations=max_iterations)
    out = solver(linear_problem.LinearProblem(geom))
    log_plan = (out.f[:, None] + out.g[None, :] - C) / eps                  # log of the transport plan, up to a constant
    order = jnp.argsort(-jnp.max(log_plan, axis=1))                         # most confident rows first

    def take(t, carry):
        used, perm = carry
        i = order[t]
        j = jnp.argmax(jnp.where(used | ~allowed[i], -jnp.inf, log_plan[i]))
        return used.at[j].set(True), perm.at[i].set(j)

    init = (jnp.zeros(num, bool), jnp.zeros(num, jnp.int32))
    return jax.lax.fori_loop(0, num, take, init)[1].astype(jnp.int32)


def assign(images, noise, method='exact', cost='euclidean', labels=None, *, exact_solver='scipy', epsilon=0.05,
           threshold=1e-3, max_iterations=2000):
    """The pairing permutation of AOT (Kim et al. 2024): int32 [N], noise[perm[i]] is paired with images[i].

    Args:
      images: [N, ...] (augmented) images; noise: [N, ...] unit Gaussian noise of the same shape, before any sigma
        scaling (as in the paper).
      method: 'exact' (optimal assignment) or 'sinkhorn' (entropic OT rounded to a permutation).
      cost: 'euclidean' (||x - z||, the paper's) or 'sqeuclidean' (||x - z||^2) on the flattened rows.
      labels: optional int [N]: one assignment per class; then labels[perm] == labels.
      exact_solver: 'scipy' (host, through jax.pure_callback; the default, faster on CPU) or 'hungarian'
        (optax.assignment on the device).
      epsilon: Sinkhorn's entropic regularisation relative to the cost scale (times the std of the costs).
      threshold, max_iterations: Sinkhorn's stopping rule (marginal error, iteration cap).
    Jittable (method, cost, exact_solver and the Sinkhorn options static).
    """
    if method not in METHODS:
        raise ValueError(f'coupling: unknown method {method!r}; valid methods: {", ".join(METHODS)}')
    if exact_solver not in EXACT_SOLVERS:
        raise ValueError(f'coupling: unknown exact_solver {exact_solver!r}; valid: {", ".join(EXACT_SOLVERS)}')
    images, noise = jnp.asarray(images), jnp.asarray(noise)
    if images.ndim < 1 or images.shape != noise.shape:
        raise ValueError(f'coupling: images {images.shape} and noise {noise.shape} must both be [N, ...] with the '
                         'same shape')
    num = images.shape[0]
    if labels is not None:
        labels = jnp.asarray(labels)
        if labels.shape != (num,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f'coupling: labels must be integers of shape [{num}], got {labels.dtype} {labels.shape}')
    dtype = jnp.promote_types(jnp.promote_types(images.dtype, noise.dtype), jnp.float32)
    C = cost_matrix(images.astype(dtype), noise.astype(dtype), cost)
    if method == 'exact' and exact_solver == 'scipy':
        return _scipy_assignment(C, labels)
    allowed = _same_class(labels, num)
    if method == 'exact':
        return _hungarian_assignment(C, allowed)
    if not epsilon > 0:
        raise ValueError(f'coupling: epsilon must be positive, got {epsilon!r}')
    return _sinkhorn_assignment(C, allowed, epsilon, threshold, max_iterations)
