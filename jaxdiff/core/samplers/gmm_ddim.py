"""GMM-DDIM: DDIM with a moment-matched Gaussian-mixture reverse kernel (Gabbur, "Improved DDIM Sampling with
Moment Matching Gaussian Mixtures", arXiv 2311.04938), on sigma-space denoisers.

The paper (alpha-bar space, Eq. 7): DDIM's kernel N(mu_t, sigma_t^2 I) becomes, for t > 1,

    q(x_{t-1} | x_t, x0_hat) = sum_k pi_k N(mu_t + delta_k, sigma_t^2 I - Delta_k),
    sum_k pi_k = 1,  sum_k pi_k delta_k = 0,  sum_k pi_k Delta_k = sum_k pi_k delta_k delta_k^T        (Eq. 8)

so the mixture has DDIM's mean and covariance, hence the marginals keep DDPM's first two moments. Eq. 8's two
choices of Delta_k are `delta_form='component'` (Delta_k = delta_k delta_k^T) and `delta_form='shared'`
(Delta_k = (1 / (K pi_k)) sum_l pi_l delta_l delta_l^T, the default: its eigenvalues are those VUB bounds).

Offsets (random, drawn once before sampling, independent of x; `draw_offsets`). With O in R^{D x K} Gaussian:
  rand       u_k = O_k / |O_k|, delta_k = s (u_k - u_bar), u_bar = sum_l pi_l u_l                    (Eq. 9)
  ortho      u = the K orthonormal columns of the thin SVD of O, delta_k = s (u_k - u_bar)         (Eqs. 10-11)
  ortho_vub  ortho offsets; the covariance offset Delta_k is replaced by its eigenvalue upper bound
             lambda_k = s^2 max_l pi_l / (K pi_k)  (= s^2 / K for uniform pi)                      (Eq. 12)
  vub_star   ortho_vub with ONE set of offsets and bounds shared by all steps (the others draw a set per step).
Eq. 9 normalises the columns after centring, which leaves sum_k pi_k delta_k = O(s / sqrt(D)) != 0; here rand
normalises before centring, exactly like ortho, so the first-moment constraint holds exactly (|delta_k| ~ s).

Covariance of a component (`covariance`):
  'diagonal' (default, the paper's practical form): per-dimension variance sigma_t^2 - diag(Delta_k); for the VUB
             variants lambda_k is subtracted from K coordinates (`vub_coordinates`, below). Matches the second
             moment on the diagonal only.
  'exact'    the full sigma_t^2 I - Delta_k, drawn through the rank-<=K eigendecomposition of Delta_k (computed once,
             outside the scan); VUB subtracts lambda_k on the K-dim span of the directions u. With a non-VUB
             variant and eta > 0 this matches DDPM's marginal mean and covariance exactly (until clipping).
Negative variances (eigenvalues) are clipped to 0 (App. A.5), so a large `scale` never gives NaN; it then no longer
matches the second moment.

Map to sigma-space. x = x0 + sigma eps (SPEC.md) and the paper's x_abar = sqrt(abar) x0 + sqrt(1 - abar) eps
are related by x_sigma = x_abar / sqrt(abar) = sqrt(1 + sigma^2) x_abar (abar = 1 / (1 + sigma^2)). The step
t -> t-1 is the step sigma_t -> sigma_s here; dividing Eq. 7 by sqrt(abar_{t-1}) gives DDIM's sigma-space step
(ddim.py: sigma_up = paper sigma_t * sqrt(1 + sigma_s^2)) plus offsets and covariance offsets scaled by
c_s = sqrt(1 + sigma_s^2) and c_s^2:

    x_s = x0_hat + sigma_down eps_hat + c_s delta_k + noise,   Cov(noise) = max(sigma_up^2 I - c_s^2 Delta_k, 0),

so `scale` s means what it means in the paper (an L2 norm in alpha-bar space, where the data has unit scale).

Randomness, all from the sampler key: z of step i is `common.step_noise(key, i, ...)` exactly as in ddim, so with
scale = 0 this sampler returns ddim's samples for the same eta and key (common random numbers); the component
k ~ Cat(pi) of each sample is drawn from fold_in(fold_in(key, i), 1) (`component_choice`); the offsets from
fold_in(key, OFFSETS_STREAM) (or from jax.random.key(offsets_seed) to keep them fixed across calls), set j of a
per-step variant from fold_in(that key, j), so a set does not depend on the grid length.

Choices the paper leaves open (keyword options):
  last_step_offsets=False  Eq. 7 uses the mixture for t > 1 only: the last step (into sigmas[-1], sigma = 0 on the
                           standard grids, the paper's t = 1) is plain DDIM. True puts offsets on it too (they then
                           stay in the output as unremovable noise of norm ~ s).
  vub_coordinates='largest' the K coordinates whose VUB variance is reduced (diagonal VUB only) are those where the
                           offsets put the most energy (largest diag of sum_l pi_l delta_l delta_l^T);
                           'first' takes coordinates 0..K-1 of the flattened NHWC sample.

eta = 0: the DDIM kernel has no variance, every covariance offset is clipped away and the method is stochastic only
through the offsets; the mixture then ADDS sum_k pi_k delta_k delta_k^T to the covariance, so moment matching no
longer holds exactly (the paper's and the author's code's default setting nevertheless). NFE = number of steps,
one denoiser call per step, the same as ddim. Memory: the offsets are [steps, K, D] (one set for vub_star).
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.samplers import common
from jaxdiff.core.samplers.ddim import ddim_step_moments

VARIANTS = ('rand', 'ortho', 'ortho_vub', 'vub_star')
DELTA_FORMS = ('shared', 'component')
COVARIANCES = ('diagonal', 'exact')
VUB_COORDINATES = ('largest', 'first')
OFFSETS_STREAM = 0x7FFFFFFF      # fold_in data of the offsets key; grid indices i (z of step i) stay far below it
COMPONENT_STREAM = 1             # fold_in(fold_in(key, i), COMPONENT_STREAM): the component choice of step i


class Offsets(NamedTuple):
    """The mixture of every step, in alpha-bar units (scaled by c_s = sqrt(1 + sigma_s^2) when used).

    S = number of offset sets (one per step, or 1 for vub_star), K components, D = prod(sample shape).
    directions [S, K, D]  unit directions u_k before centring (orthonormal for the ortho variants)
    delta      [S, K, D]  mean offsets delta_k (Eqs. 9-11), sum_k pi_k delta_k = 0
    variance   [S, K, D]  diagonal covariance offsets diag(Delta_k) or the VUB bounds ('diagonal'); else None
    basis      [S, D, K]  orthonormal basis of span(u), holding every delta_k and Delta_k ('exact'); else None
    eigvecs    [S, K, K, K] / eigvals [S, K, K]: Delta_k = basis R_k diag(lambda_k) R_k^T basis^T ('exact')
    """
    directions: jax.Array
    delta: jax.Array
    variance: Optional[jax.Array] = None
    basis: Optional[jax.Array] = None
    eigvecs: Optional[jax.Array] = None
    eigvals: Optional[jax.Array] = None


def offset_directions(key, variant, dim, num_components, dtype=jnp.float32):
    """Unit directions u_k [K, D] of one offset set: normalised Gaussian columns (rand, Eq. 9) or the orthonormal
    left singular vectors of the Gaussian O in R^{D x K} (thin SVD; ortho variants, Eq. 10)."""
    o = jax.random.normal(key, (dim, num_components), dtype)
    if variant == 'rand':
        u = o / jnp.linalg.norm(o, axis=0, keepdims=True)
    else:
        u = jnp.linalg.svd(o, full_matrices=False)[0]
    return u.T


def centred_offsets(directions, weights, scale):
    """delta_k = s (u_k - sum_l pi_l u_l) (Eqs. 9, 11): sum_k pi_k delta_k = 0 exactly. directions [..., K, D]."""
    u_bar = jnp.einsum('k,...kd->...d', weights, directions)
    return scale * (directions - u_bar[..., None, :])


def vub_bounds(weights, scale):
    """Eigenvalue upper bounds lambda_k [K] of the shared Delta_k = (1/(K pi_k)) sum_l pi_l delta_l delta_l^T for
    orthonormal u (Eq. 12): sum_l pi_l delta_l delta_l^T = s^2 U (diag(pi) - pi pi^T) U^T <= s^2 max(pi) U U^T."""
    num_components = weights.shape[0]
    return scale ** 2 * jnp.max(weights) / (num_components * weights)


def _diagonal_variance(variant, delta, weights, scale, delta_form, vub_coordinates):
    """diag(Delta_k) [K, D] of one set, or for VUB the bound lambda_k on K coordinates (zeros elsewhere)."""
    num_components, dim = delta.shape
    energy = jnp.einsum('k,kd->d', weights, delta ** 2)                         # diag(sum_l pi_l delta_l delta_l^T)
    if variant in ('ortho_vub', 'vub_star'):
        if vub_coordinates == 'largest':
            coords = jax.lax.top_k(energy, num_components)[1]
        else:
            coords = jnp.arange(num_components)
        mask = jnp.zeros((dim,), delta.dtype).at[coords].set(1.0)
        return vub_bounds(weights, scale)[:, None] * mask[None, :]
    if delta_form == 'component':
        return delta ** 2
    return energy[None, :] / (num_components * weights[:, None])


def _exact_covariance(variant, directions, delta, weights, scale, delta_form):
    """basis Q [D, K] of span(u) and the eigendecomposition of each Delta_k in it: A_k = Q^T Delta_k Q [K, K]."""
    num_components = delta.shape[0]
    basis = jnp.linalg.svd(directions.T, full_matrices=False)[0]               # [D, K]
    if variant in ('ortho_vub', 'vub_star'):
        eye = jnp.eye(num_components, dtype=delta.dtype)
        cov = vub_bounds(weights, scale)[:, None, None] * eye[None]
    else:
        a = delta @ basis                                                        # delta_k in the basis, [K, K]
        if delta_form == 'component':
            cov = a[:, :, None] * a[:, None, :]
        else:
            shared = jnp.einsum('l,li,lj->ij', weights, a, a)
            cov = shared[None] / (num_components * weights)[:, None, None]
    eigvals, eigvecs = jnp.linalg.eigh(cov)
    return basis, eigvecs, jnp.maximum(eigvals, 0.0)


def draw_offsets(key, *, variant, num_sets, dim, num_components, weights, scale, delta_form='shared',
                 covariance='diagonal', vub_coordinates='largest', dtype=jnp.float32):
    """All offset sets of a run (`Offsets`), set j from fold_in(key, j); done once, before the sampling scan."""
    weights = jnp.asarray(weights, dtype)

    def one_set(j):
        directions = offset_directions(jax.random.fold_in(key, j), variant, dim, num_components, dtype)
        delta = centred_offsets(directions, weights, scale)
        if covariance == 'diagonal':
            variance = _diagonal_variance(variant, delta, weights, scale, delta_form, vub_coordinates)
            return Offsets(directions, delta, variance=variance)
        basis, eigvecs, eigvals = _exact_covariance(variant, directions, delta, weights, scale, delta_form)
        return Offsets(directions, delta, basis=basis, eigvecs=eigvecs, eigvals=eigvals)

    return jax.vmap(one_set)(jnp.arange(num_sets))


def component_choice(key, i, weights, batch):
    """k ~ Cat(pi) per sample [B] for step i, from fold_in(fold_in(key, i), COMPONENT_STREAM) (z uses fold_in(key, i))."""
    step_key = jax.random.fold_in(jax.random.fold_in(key, i), COMPONENT_STREAM)
    return jax.random.categorical(step_key, jnp.log(jnp.asarray(weights)), shape=(batch,))


def diagonal_std(sigma_up, c_s, variance):
    """Per-dimension std sqrt(max(sigma_up^2 - c_s^2 diag(Delta_k), 0)) (negative variances clipped, App. A.5)."""
    return jnp.sqrt(jnp.maximum(sigma_up ** 2 - c_s ** 2 * variance, 0.0))


def exact_noise(z, sigma_up, c_s, basis, eigvecs, eigvals):
    """A draw from N(0, sigma_up^2 I - c_s^2 Delta_k) (eigenvalues clipped at 0) for flat z [B, D] ~ N(0, I):
    with Delta_k = V diag(lambda) V^T (V = basis R_k orthonormal), noise = sigma_up z + V (a * V^T z),
    a = sqrt(max(sigma_up^2 - c_s^2 lambda, 0)) - sigma_up: the covariance is sigma_up^2 on V's complement and
    (sigma_up + a)^2 = max(sigma_up^2 - c_s^2 lambda, 0) along V. basis [D, K]; eigvecs [B, K, K]; eigvals [B, K]."""
    a = jnp.sqrt(jnp.maximum(sigma_up ** 2 - c_s ** 2 * eigvals, 0.0)) - sigma_up
    coeffs = jnp.einsum('bji,bj->bi', eigvecs, z @ basis)                      # R_k^T Q^T z
    return sigma_up * z + jnp.einsum('bij,bj->bi', eigvecs, a * coeffs) @ basis.T


DEFAULT_NUM_COMPONENTS = 8


def _gmm_ddim_for_dimension(*, weights, variant, **options):
    """gmm_ddim with K chosen from the data when the sampler first runs (num_components=None)."""
    built = {}

    def for_dim(dim):
        if dim not in built:
            k = len(weights) if weights is not None else DEFAULT_NUM_COMPONENTS
            if variant != 'rand':
                k = max(2, min(k, dim)) if weights is None else k
            built[dim] = gmm_ddim(num_components=k, weights=weights, variant=variant, **options)
        return built[dim]

    probe = gmm_ddim(num_components=2 if weights is None else len(weights), weights=weights, variant=variant,
                     **options)                                                   # checks every option now

    def sampler(denoiser, x_T, sigmas, key=None, return_trajectory=False):
        return for_dim(int(np.prod(np.shape(x_T)[1:])))(denoiser, x_T, sigmas, key=key,
                                                         return_trajectory=return_trajectory)
    return common.Sampler('gmm_ddim', sampler, cost=probe.cost, order=probe.order,
                          options=dict(probe.options, num_components=None, weights=weights))


def _check_options(eta, variant, num_components, scale, weights, delta_form, covariance, vub_coordinates):
    if not (isinstance(eta, (int, float, np.integer, np.floating)) and 0 <= eta <= 1):
        raise ValueError(f'gmm_ddim: eta must be a number in [0, 1], got {eta!r}')
    for name, value, valid in (('variant', variant, VARIANTS), ('delta_form', delta_form, DELTA_FORMS),
                               ('covariance', covariance, COVARIANCES),
                               ('vub_coordinates', vub_coordinates, VUB_COORDINATES)):
        if value not in valid:
            raise ValueError(f'gmm_ddim: {name}={value!r} is not one of {", ".join(valid)}')
    if not (isinstance(num_components, (int, np.integer)) and num_components >= 2):
        raise ValueError(f'gmm_ddim: num_components must be an integer >= 2, got {num_components!r}')
    if not (isinstance(scale, (int, float, np.integer, np.floating)) and np.isfinite(scale) and scale >= 0):
        raise ValueError(f'gmm_ddim: scale must be a finite number >= 0, got {scale!r}')
    if weights is None:
        return np.full((num_components,), 1.0 / num_components)
    weights = np.asarray(weights, np.float64)
    if weights.shape != (num_components,) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f'gmm_ddim: weights must be {num_components} positive numbers (num_components), '
                         f'got {weights.tolist()}')
    return weights / weights.sum()


def gmm_ddim(*, eta=0.0, variant='ortho', num_components=None, scale=1.0, weights=None, delta_form='shared',
             covariance='diagonal', vub_coordinates='largest', last_step_offsets=False, offsets_seed=None):
    """GMM-DDIM sampler (module docstring): K = `num_components`, pi = `weights` (None: uniform), s = `scale`.
    num_components None: 8 (the number of `weights` when given), or the data dimension D when that is smaller and
    the variant's orthogonal offsets need K <= D (2-D data: K = 2).
    One denoiser call per step (NFE = ddim's). Needs a key unless eta = 0 and scale = 0 (then it is ddim).
    With eta = 0 it is stochastic through the offsets only and does not match DDPM's second moments exactly;
    exact moment matching needs eta > 0, a non-VUB variant, covariance='exact' and no clipping."""
    if num_components is None:
        return _gmm_ddim_for_dimension(eta=eta, variant=variant, scale=scale, weights=weights, delta_form=delta_form,
                                       covariance=covariance, vub_coordinates=vub_coordinates,
                                       last_step_offsets=last_step_offsets, offsets_seed=offsets_seed)
    options = dict(eta=eta, variant=variant, num_components=num_components, scale=scale, weights=weights,
                   delta_form=delta_form, covariance=covariance, vub_coordinates=vub_coordinates,
                   last_step_offsets=last_step_offsets, offsets_seed=offsets_seed)
    weights = _check_options(eta, variant, num_components, scale, weights, delta_form, covariance, vub_coordinates)
    stochastic = eta > 0 or scale > 0

    def init(x_T, sigmas, key):
        key = common.require_key('gmm_ddim', key, f'eta={eta}, scale={scale}') if stochastic else None
        batch, dim = x_T.shape[0], int(np.prod(x_T.shape[1:]))
        num_steps = sigmas.shape[0] - 1
        if variant != 'rand' and num_components > dim:
            raise ValueError(f'gmm_ddim: variant {variant!r} needs num_components <= data dimension {dim}, '
                             f'got {num_components}')
        pi = jnp.asarray(weights, x_T.dtype)
        offsets = None
        if scale > 0:
            offsets_key = (jax.random.key(offsets_seed) if offsets_seed is not None
                           else jax.random.fold_in(key, OFFSETS_STREAM))
            offsets = draw_offsets(offsets_key, variant=variant, num_sets=1 if variant == 'vub_star' else num_steps,
                                   dim=dim, num_components=num_components, weights=pi, scale=scale,
                                   delta_form=delta_form, covariance=covariance, vub_coordinates=vub_coordinates,
                                   dtype=x_T.dtype)

        def step(denoiser, state, i, t, t_next):
            x = state.x
            x0_hat, state = common.evaluate(denoiser, x, t, state)
            mean, sigma_up = ddim_step_moments(x, x0_hat, t, t_next, eta)
            if key is None:
                return state._replace(x=mean)
            z = common.step_noise(key, i, x.shape, x.dtype)
            if offsets is None:
                return state._replace(x=mean + sigma_up * z)
            # gate = 0 on the last step unless last_step_offsets: that step is plain DDIM (Eq. 7 is for t > 1)
            gate = jnp.where(jnp.logical_or(last_step_offsets, i < num_steps - 1), 1.0, 0.0).astype(x.dtype)
            c_s = gate * jnp.sqrt(1 + t_next ** 2)
            j = 0 if variant == 'vub_star' else i
            k = component_choice(key, i, pi, batch)
            flat_z = z.reshape(batch, dim)
            if covariance == 'diagonal':
                noise = diagonal_std(sigma_up, c_s, offsets.variance[j][k]) * flat_z
            else:
                noise = exact_noise(flat_z, sigma_up, c_s, offsets.basis[j], offsets.eigvecs[j][k],
                                    offsets.eigvals[j][k])
            return state._replace(x=mean + (c_s * offsets.delta[j][k] + noise).reshape(x.shape))

        return step, ()

    # not stochastic (eta = 0, scale = 0): exactly ddim, i.e. Euler
    return common.fixed_grid('gmm_ddim', init, cost=common.Cost(per_step=1, into_zero=1),
                             order=None if stochastic else 1, options=options)
