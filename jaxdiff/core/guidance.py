"""Denoiser transforms (D -> D' maps that declare their cost per call) and discriminator guidance.

Kim, Kim, Kwon, Kang, Moon, "Refining Generative Process with Discriminator Guidance in Score-based Diffusion
Models" (ICML 2023). Theorem 1: with d*(x, sigma) the optimal discriminator between perturbed data (label 1) and
perturbed model samples (label 0), grad log p_data = grad log p_model + grad log r, log r = log(d* / (1 - d*)).
With Tweedie's D = x + sigma^2 grad log p (EDM eq. 3) the guided model is the denoiser

    D_guided(x, sigma) = D(x, sigma) + w sigma^2 grad_x log r(x, sigma)          (SPEC.md)

and the PF-ODE slope (x - D_guided) / sigma = (x - D) / sigma - w sigma grad_x log r is their corrected d_cur.
Any sampler runs on D_guided. The authors guide only inside a time window (VP time tau >= 0.01, i.e.
sigma >= precond.vp_sigma_of_t(0.01) ~ 0.0447) and, in EDM's Heun, only the first evaluation of each step (their
second-order weight is 0 by default), with w = 2 unconditional, w = 1 plus "boosting" conditional: that sampler is
'heun_dg' (samplers/guided.py), EDM's Heun step with its first evaluation replaced.

Public API:
    Transform: the base every transform follows (discriminator guidance here; classifier-free guidance and
        autoguidance the same way): a denoiser wrapping `.denoiser`, with `with_aux` passed through and
        `evaluations(x, sigma) -> (network, gradient)`, which every sampler counts (samplers/common.py).
    discriminator_guided(denoiser, logit_fn, weight=2.0, sigma_min=0.0, sigma_max=inf) -> GuidedDenoiser
        logit_fn(x, sigma [B]) -> [B] log r; per-example independent (no batch statistics), so the gradient of the
        batch sum is each example's own gradient. The GuidedDenoiser is a plain D(x, sigma) for every sampler and
        also carries .correction(x, sigma) and .denoiser (the unguided one).
    clipped_log_ratio(logit, eps=1e-5): log r of d clipped to [eps, 1 - eps], as the authors compute it.
    classifier_free_guided(denoiser_of, class_labels, weight, sigma_lo=0, sigma_hi=inf) -> ClassifierFreeGuided
        D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null)) in one network call of 2B rows (Ho & Salimans
        2022), inside the guidance interval [sigma_lo, sigma_hi] (Kynkaanniemi et al. 2024)
    autoguided(good, bad, weight, sigma_lo=0, sigma_hi=inf) -> Autoguided
        D_bad + w (D_good - D_bad) (Karras et al. 2024), inside the same kind of interval

A gradient evaluation is one batched evaluation of grad_x logit_fn; it is skipped (lax.cond) when no example of the
batch lies in [sigma_min, sigma_max], and `GuidedDenoiser.evaluations` declares it on the same condition, so
info['gradient_evaluations'] of every sampler counts the ones that ran.
"""
import math

import jax
import jax.numpy as jnp

from jaxdiff.core import precond
from jaxdiff.core.samplers import common


def clipped_log_ratio(logit, eps=1e-5):
    """log(d / (1 - d)) with d = sigmoid(logit) clipped to [eps, 1 - eps] (the authors' `get_log_ratio`): the logit
    clipped to +-log((1 - eps) / eps), so a saturated discriminator gives no gradient."""
    bound = math.log((1 - eps) / eps)
    return jnp.clip(logit, -bound, bound)


class Transform:
    """A denoiser built from another one, `self.denoiser` (SPEC.md, round 3: guidance and other transforms).

    A transform defines `__call__(x, sigma) -> x0_hat` and declares what one call costs; every sampler runs on it
    as on a plain denoiser and counts the declaration (samplers/common.py `evaluate`). Defaults a transform may
    override:
      with_aux(x, sigma) -> (x0_hat, aux)           the transformed x0_hat with the wrapped denoiser's aux
      evaluations(x, sigma) -> (network, gradient)  the wrapped denoiser's own (int32 scalars)
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x, sigma):
        raise NotImplementedError

    def with_aux(self, x, sigma):
        _, aux = common.call_with_aux(self.denoiser, x, sigma)
        return self(x, sigma), aux

    def evaluations(self, x, sigma):
        return common.declared_evaluations(self.denoiser, x, sigma)


class GuidedDenoiser(Transform):
    """D_guided(x, sigma) = D(x, sigma) + weight sigma^2 grad_x logit_fn(x, sigma) for sigma in [sigma_min,
    sigma_max] (per example), D(x, sigma) elsewhere. Build it with `discriminator_guided`."""

    def __init__(self, denoiser, logit_fn, weight, sigma_min, sigma_max):
        super().__init__(denoiser)
        self.logit_fn = logit_fn
        self.weight, self.sigma_min, self.sigma_max = weight, sigma_min, sigma_max

    @property
    def is_off(self):
        """weight == 0 as a Python number: the guidance is skipped entirely and D_guided is D exactly."""
        return isinstance(self.weight, (int, float)) and self.weight == 0

    def active(self, x, sigma):
        """[B] bool: which examples lie inside the guidance window."""
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        return (sigma >= self.sigma_min) & (sigma <= self.sigma_max)

    def correction(self, x, sigma):
        """(delta, log_ratio): delta = weight sigma^2 grad_x log r inside the window, 0 outside; log_ratio [B] =
        logit_fn(x, sigma) inside, +inf outside (so boosting never picks an unguided example)."""
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        active = self.active(x, sigma)
        unguided = (jnp.zeros_like(x), jnp.full(x.shape[:1], jnp.inf, x.dtype))
        if self.is_off:
            return unguided

        def guided():
            batch_sum = lambda x: (lambda l: (jnp.sum(l), l))(self.logit_fn(x, sigma).astype(x.dtype))
            (_, log_ratio), grad = jax.value_and_grad(batch_sum, has_aux=True)(x)
            delta = self.weight * precond.per_example(sigma, x, x.dtype) ** 2 * grad
            mask = precond.per_example(active, x, x.dtype)
            return jnp.where(mask, delta, 0).astype(x.dtype), jnp.where(active, log_ratio, jnp.inf)

        return jax.lax.cond(self.computes_gradient(x, sigma), guided, lambda: unguided)

    def computes_gradient(self, x, sigma):
        """bool scalar: whether a call at (x, sigma) evaluates grad_x logit_fn (some example inside the window)."""
        return jnp.any(self.active(x, sigma))

    def __call__(self, x, sigma):
        if self.is_off:
            return self.denoiser(x, sigma)
        return self.denoiser(x, sigma) + self.correction(x, sigma)[0]

    def with_aux(self, x, sigma):
        """(D_guided, aux) with the unguided denoiser's aux (samplers/common.py's convention), {} if it has none."""
        x0_hat, aux = common.call_with_aux(self.denoiser, x, sigma)
        if self.is_off:
            return x0_hat, aux
        return x0_hat + self.correction(x, sigma)[0], aux

    def evaluations(self, x, sigma):
        """The wrapped denoiser's evaluations plus one gradient evaluation when the call computes one: weight not a
        Python 0 and some example inside [sigma_min, sigma_max] (the lax.cond of `correction`)."""
        network, gradient = common.declared_evaluations(self.denoiser, x, sigma)
        if self.is_off:
            return network, gradient
        return network, gradient + self.computes_gradient(x, sigma).astype(jnp.int32)


def discriminator_guided(denoiser, logit_fn, weight=2.0, sigma_min=0.0, sigma_max=float('inf')):
    """The guided denoiser of SPEC.md (Kim et al. 2023, Theorem 1): D + weight sigma^2 grad_x logit_fn inside
    [sigma_min, sigma_max], D elsewhere. weight = 0 returns D's values exactly (no gradient is computed)."""
    if not sigma_min <= sigma_max:
        raise ValueError(f'guidance: sigma_min={sigma_min} must not exceed sigma_max={sigma_max}')
    return GuidedDenoiser(denoiser, logit_fn, weight, sigma_min, sigma_max)


# ---------------------------------------------------------------- guidance by the model itself

def _inside(x, sigma, sigma_lo, sigma_hi):
    """[B] bool: the examples whose sigma lies in the guidance interval [sigma_lo, sigma_hi]."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
    return (sigma >= sigma_lo) & (sigma <= sigma_hi)


def _combine(unguided, guiding, weight, active, x):
    """unguided + w (guiding - unguided) where active (per example), guiding elsewhere: the guided denoiser of CFG
    (Ho & Salimans 2022, Eq. 6, D_uncond + w (D_cond - D_uncond)) and of autoguidance (Karras et al. 2024, Eq. 1,
    D_bad + w (D_good - D_bad)); w = 1 is the guiding model alone."""
    guided = unguided + weight * (guiding - unguided)
    return jnp.where(precond.per_example(active, x, x.dtype), guided, guiding).astype(x.dtype)


class ClassifierFreeGuided(Transform):
    """D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null)) for sigma in [sigma_lo,
    sigma_hi] (the guidance interval of Kynkaanniemi et al. 2024), D(x, sigma, c) elsewhere. The null label is the
    all-zero one-hot row (SPEC.md). Inside the interval both evaluations are one network call on 2B rows, x twice
    with labels [c; null]: 2 network evaluations; outside (no example of the batch inside) only D(x, sigma, c) is
    called (lax.cond): 1. Build it with `classifier_free_guided`."""

    def __init__(self, denoiser_of, class_labels, weight, sigma_lo, sigma_hi):
        super().__init__(denoiser_of(class_labels))
        self.paired = denoiser_of(jnp.concatenate([class_labels, jnp.zeros_like(class_labels)]))
        self.weight, self.sigma_lo, self.sigma_hi = weight, sigma_lo, sigma_hi

    def _guided(self, x, sigma, call):
        """call(denoiser, x, sigma) -> (x0_hat, aux): both evaluations in one call, combined; aux of the c half."""
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
        active = _inside(x, sigma, self.sigma_lo, self.sigma_hi)
        batch = x.shape[0]

        def both():
            x0_hat, aux = call(self.paired, jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]))
            conditional, unconditional = x0_hat[:batch], x0_hat[batch:]
            return (_combine(unconditional, conditional, self.weight, active, x),
                    jax.tree_util.tree_map(lambda a: a[:batch], aux))

        return jax.lax.cond(jnp.any(active), both, lambda: call(self.denoiser, x, sigma))

    def __call__(self, x, sigma):
        return self._guided(x, sigma, lambda denoiser, x, sigma: (denoiser(x, sigma), {}))[0]

    def with_aux(self, x, sigma):
        return self._guided(x, sigma, common.call_with_aux)

    def evaluations(self, x, sigma):
        """2 network evaluations when some example is inside the interval (the paired call), else 1; each the
        wrapped denoiser's own count."""
        network, gradient = common.declared_evaluations(self.denoiser, x, sigma)
        inside = jnp.any(_inside(x, sigma, self.sigma_lo, self.sigma_hi)).astype(jnp.int32)
        return network * (1 + inside), gradient * (1 + inside)


def classifier_free_guided(denoiser_of, class_labels, weight, sigma_lo=0.0, sigma_hi=float('inf')):
    """Classifier-free guidance (Ho & Salimans 2022) of the conditional denoisers denoiser_of(labels [N, label_dim])
    -> D(x [N, ...], sigma) at the one-hot class_labels [B, label_dim]. See `ClassifierFreeGuided`."""
    if class_labels is None:
        raise ValueError('classifier-free guidance needs class labels (a class-conditional model)')
    if not 0 <= sigma_lo <= sigma_hi:
        raise ValueError(f'guidance interval [{sigma_lo}, {sigma_hi}] needs 0 <= sigma_lo <= sigma_hi')
    return ClassifierFreeGuided(denoiser_of, class_labels, weight, sigma_lo, sigma_hi)


class Autoguided(Transform):
    """D_w = D_bad + w (D_good - D_bad) for sigma in [sigma_lo, sigma_hi], D_good elsewhere (Karras et al. 2024,
    "Guiding a diffusion model with a bad version of itself", Eq. 1 in denoiser form). D_bad is evaluated only when
    some example is inside the interval (lax.cond). Build it with `autoguided`."""

    def __init__(self, good, bad, weight, sigma_lo, sigma_hi):
        super().__init__(good)
        self.bad, self.weight, self.sigma_lo, self.sigma_hi = bad, weight, sigma_lo, sigma_hi

    def _guided(self, x, sigma, x0_good):
        active = _inside(x, sigma, self.sigma_lo, self.sigma_hi)
        return jax.lax.cond(jnp.any(active),
                            lambda: _combine(self.bad(x, sigma), x0_good, self.weight, active, x), lambda: x0_good)

    def __call__(self, x, sigma):
        return self._guided(x, sigma, self.denoiser(x, sigma))

    def with_aux(self, x, sigma):
        x0_good, aux = common.call_with_aux(self.denoiser, x, sigma)
        return self._guided(x, sigma, x0_good), aux

    def evaluations(self, x, sigma):
        """The good model's evaluations plus the bad model's when some example is inside the interval."""
        network, gradient = common.declared_evaluations(self.denoiser, x, sigma)
        bad_network, bad_gradient = common.declared_evaluations(self.bad, x, sigma)
        inside = jnp.any(_inside(x, sigma, self.sigma_lo, self.sigma_hi)).astype(jnp.int32)
        return network + inside * bad_network, gradient + inside * bad_gradient


def autoguided(good, bad, weight, sigma_lo=0.0, sigma_hi=float('inf')):
    """Autoguidance of denoiser `good` by the weaker denoiser `bad` of the same data and preconditioning."""
    if not 0 <= sigma_lo <= sigma_hi:
        raise ValueError(f'guidance interval [{sigma_lo}, {sigma_hi}] needs 0 <= sigma_lo <= sigma_hi')
    return Autoguided(good, bad, weight, sigma_lo, sigma_hi)
