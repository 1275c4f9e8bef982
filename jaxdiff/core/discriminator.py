"""The mathematics of training the discriminator of discriminator guidance (Kim, Kim, Kwon, Kang, Moon, ICML 2023)
in EDM's sigma-space (x = x0 + sigma z): the perturbation's sigma distributions, the perturbation of a batch of real
and generated rows (independent or AOT-paired noise), the binary cross-entropy, and the pure train and eval steps.
The network, the optimizer, the data and the loop are `jaxdiff.drivers.discriminator_training`'s.

  sigma      'vp_importance'  the authors' importance sampling: VP time t with density proportional to
                              beta(t) / sigma_vp(t)^2 on [epsilon_t, 1] (`vp_importance_sigma`: in closed form,
                              ln sigma is uniform)
             'lognormal'      EDM's ln sigma ~ N(P_mean, P_std^2) (precond.edm_sigma)
  noise      z ~ N(0, I) independent of the images ('independent'), or paired to them by AOT's exact assignment
             ('aot', Kim et al. 2024): one assignment of the batch's real half to B/2 fresh noises and one of its
             generated half to B/2 others (`aot.pair_pool`), so neither side's noise depends on the other side
  loss       binary cross-entropy of the logit d(x, sigma) against the target (1 real, 0 generated)
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.core import aot, precond

PERTURBATIONS = ('vp_importance', 'lognormal')
PAIRINGS = ('independent', 'aot')


def vp_importance_sigma(key, shape, *, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
    """sigma = sigma(t) for VP time t drawn with density p(t) proportional to beta(t) / sigma_vp(t)^2 on
    [epsilon_t, 1] (the DG authors' importance sampling of t, their `get_diffusion_time(importance_sampling=True)`).

    With B(t) = beta_min t + beta_d t^2 / 2 and sigma_vp(t)^2 = 1 - exp(-B(t)), beta(t) / sigma_vp(t)^2 =
    d/dt ln(exp(B(t)) - 1) = d/dt ln sigma(t)^2 for EDM's VP sigma(t) = sqrt(exp(B(t)) - 1) (Table 1), so the CDF
    is linear in ln sigma(t): ln sigma ~ U(ln sigma(epsilon_t), ln sigma(1)) exactly (the authors invert the CDF by
    bisection)."""
    low, high = (jnp.log(precond.vp_sigma_of_t(jnp.float32(t), beta_d=beta_d, beta_min=beta_min))
                 for t in (epsilon_t, 1.0))
    return jnp.exp(jax.random.uniform(key, shape, jnp.float32, minval=low, maxval=high))


def sigma_sampler(perturbation, *, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5, P_mean=-1.2, P_std=1.2):
    """(key, shape) -> sigma of the perturbation 'vp_importance' (beta_d, beta_min, epsilon_t) or 'lognormal'
    (P_mean, P_std)."""
    if perturbation == 'lognormal':
        return lambda key, shape: precond.edm_sigma(key, shape, P_mean=P_mean, P_std=P_std)
    return lambda key, shape: vp_importance_sigma(key, shape, beta_d=beta_d, beta_min=beta_min, epsilon_t=epsilon_t)


def perturb(key, batch, *, sigma_fn, pairing='independent', coupling_options=None):
    """(x, sigma, target, labels) of a batch {'real', 'real_label', 'generated', 'generated_label'} (B/2 rows
    each): x = x0 + sigma z over the concatenation [real; generated], target 1 for real rows, 0 for generated.
    pairing 'aot': z paired to each half by AOT's assignment (module docstring)."""
    real, generated = batch['real'], batch['generated']
    images = jnp.concatenate([real, generated])
    labels = jnp.concatenate([batch['real_label'], batch['generated_label']])
    target = jnp.concatenate([jnp.ones(real.shape[:1]), jnp.zeros(generated.shape[:1])])
    sigma_key, noise_key = jax.random.split(key)
    sigma = sigma_fn(sigma_key, images.shape[:1])
    if pairing == 'independent':
        z = jax.random.normal(noise_key, images.shape, images.dtype)
    else:
        options = dict(coupling_options or {})
        real_key, generated_key = jax.random.split(noise_key)
        z = jnp.concatenate([aot.pair_pool(real_key, real, batch['real_label'], **options)['noise'],
                             aot.pair_pool(generated_key, generated, batch['generated_label'], **options)['noise']])
    return images + precond.per_example(sigma, images) * z, sigma, target, labels


def bce(logits, target):
    """Binary cross-entropy of logits against targets in [0, 1]: -t log sigmoid(l) - (1 - t) log sigmoid(-l)."""
    target = target.astype(logits.dtype)
    return -target * jax.nn.log_sigmoid(logits) - (1.0 - target) * jax.nn.log_sigmoid(-logits)


# ---------------------------------------------------------------- the steps

class DiscriminatorState(NamedTuple):
    step: Any          # int32 scalar
    params: Any
    opt_state: Any


def root_keys(seed):
    """(init_key, step_key, eval_key); step s draws from fold_in(step_key, s)."""
    return tuple(jax.random.split(jax.random.key(seed), 3))


def zero_metrics():
    return {'loss_sum': jnp.zeros((), jnp.float32), 'accuracy_sum': jnp.zeros((), jnp.float32),
            'num_steps': jnp.zeros((), jnp.int32)}


def make_train_step(discriminator, update, *, seed, sigma_fn, pairing='independent', coupling_options=None):
    """train_step(state, metrics, frozen, batch) -> (state, metrics); pure, to be jitted.

    discriminator: inputs(frozen, x, sigma, labels) -> the network's input, logit(params, inputs, sigma, labels,
    train, key) -> [B]; update(grads, opt_state, params) -> (params, opt_state): one optimizer step. frozen: the
    trained model's variables (the features' network), untouched."""
    _, step_key, _ = root_keys(seed)

    def train_step(state, metrics, frozen, batch):
        perturb_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, state.step))
        x, sigma, target, labels = perturb(perturb_key, batch, sigma_fn=sigma_fn, pairing=pairing,
                                           coupling_options=coupling_options)
        inputs = jax.lax.stop_gradient(discriminator.inputs(frozen, x, sigma, labels))

        def loss_fn(params):
            logits = discriminator.logit(params, inputs, sigma, labels, train=True, key=dropout_key)
            return jnp.mean(bce(logits, target)), jnp.mean((logits > 0) == (target > 0.5))

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state = update(grads, state.opt_state, state.params)
        state = DiscriminatorState(state.step + 1, params, opt_state)
        metrics = {'loss_sum': metrics['loss_sum'] + loss, 'accuracy_sum': metrics['accuracy_sum'] + accuracy,
                   'num_steps': metrics['num_steps'] + 1}
        return state, metrics
    return train_step


def make_eval_step(discriminator, *, sigma_fn):
    """eval_step(params, frozen, key, batch) -> sums over the valid rows: correct real, correct generated, BCE."""
    def eval_step(params, frozen, key, batch):
        x, sigma, target, labels = perturb(key, batch, sigma_fn=sigma_fn)
        logits = discriminator.logit(params, discriminator.inputs(frozen, x, sigma, labels), sigma, labels)
        valid = jnp.concatenate([batch['real_valid'], batch['generated_valid']])
        correct = ((logits > 0) == (target > 0.5)) & valid
        half = batch['real'].shape[0]
        return {'real_correct': jnp.sum(correct[:half]), 'generated_correct': jnp.sum(correct[half:]),
                'bce_sum': jnp.sum(jnp.where(valid, bce(logits, target), 0.0))}
    return eval_step
