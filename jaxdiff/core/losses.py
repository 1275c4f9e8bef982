"""The denoising loss, assembled from three swappable pieces chosen by name (config.loss):

  parameterization  how sigma is drawn for training, how the network is preconditioned and weighted
                    (EDM / VP / VE, EDM Table 1; see precond.py)
  target            what D(x_noisy, sigma) regresses to: `target(x_noisy, sigma, batch) -> y_target`
                    ('x0': the clean image itself; 'stf': the stable target field over batch['reference'])
  pairing           which noise goes with which clean image: `pairing(key, y, batch, params, networks) ->
                    (eps, penalty, metrics)` ('independent': i.i.d. N(0, I); AOT: an OT assignment; Fast-ODE:
                    a learned encoder q(z | y), whose KL term is the penalty)

  loss(params, batch, key) = mean[ lambda(sigma) * (D(y + sigma eps, sigma) - target)^2 ] + penalty   (EDM eq. 8)

A piece may need more than that from the training loop: extra data rows, a pool refreshed every few steps, its own
preparation of the batch, extra trainable networks, a check of the config. It says so through `Hooks`, and the
loop (jaxdiff.drivers.train_step) calls them without knowing which method asked.

EDM sums the squared error over pixels; we average over pixels too, a constant factor that Adam's update is invariant
to (up to its epsilon) and that keeps the logged loss comparable across image sizes. Pure: no Flax, no config objects.
A new piece is a factory added to one of the three registries below; its keyword options come from config.loss.
"""
import functools
import inspect
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxdiff.core import aot, flow, precond, stf
from jaxdiff.core.errors import UserError
from jaxdiff.core.precond import per_example


class Parameterization(NamedTuple):
    precond: Callable        # sigma -> precond.Coefficients
    weight: Callable         # sigma -> lambda(sigma)
    sample_sigma: Callable   # (key, shape) -> sigma ~ p_train


def edm_parameterization(*, sigma_data=0.5, P_mean=-1.2, P_std=1.2):
    """EDM: log-normal sigma, EDM preconditioning and weight (EDM Table 1)."""
    return Parameterization(precond=functools.partial(precond.edm, sigma_data=sigma_data),
                            weight=functools.partial(precond.edm_weight, sigma_data=sigma_data),
                            sample_sigma=functools.partial(precond.edm_sigma, P_mean=P_mean, P_std=P_std))


def vp_parameterization(*, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5, M=1000):
    """VP (DDPM++ of Song et al. 2021) in EDM's formulation (EDM Table 1, VP column)."""
    return Parameterization(precond=functools.partial(precond.vp, beta_d=beta_d, beta_min=beta_min, M=M),
                            weight=precond.vp_weight,
                            sample_sigma=functools.partial(precond.vp_sigma, beta_d=beta_d, beta_min=beta_min,
                                                           epsilon_t=epsilon_t))


def ve_parameterization(*, sigma_min=0.02, sigma_max=100.0):
    """VE (NCSN++ of Song et al. 2021) in EDM's formulation (EDM Table 1, VE column)."""
    return Parameterization(precond=precond.ve, weight=precond.ve_weight,
                            sample_sigma=functools.partial(precond.ve_sigma, sigma_min=sigma_min,
                                                           sigma_max=sigma_max))


def x0_target(x_noisy, sigma, batch):
    """The plain denoising target: the clean image y itself (EDM eq. 2)."""
    del x_noisy, sigma
    return batch['image']


def stf_target(*, reference_size=None, reference_chunk_size=None):
    """The stable target field (Xu et al. 2023, Eq. 3; `jaxdiff.core.stf.target`): sum_j softmax_j(-|x - y_j|^2 /
    (2 sigma^2)) y_j over batch['reference'] [R, ...] (the minibatch's clean images, then R - B others, assembled by
    `stf_reference`). It is an x0-space target, so EDM, VP and VE all regress D to it unchanged. Under jit the
    arrays are global: every sample sees all R images however the batch is sharded. No gradient flows into it.

    Hooks: the input pipeline fetches the R - B extra images (data stream 1) as batch['reference_extra'];
    R >= the batch size and a multiple of the device count; under pmap the reference would be per device."""
    if reference_size is None:
        raise ValueError("loss.target='stf' needs loss.reference_size (R, the global reference batch size)")

    def target(x_noisy, sigma, batch):
        reference = batch.get('reference', batch['image'])      # absent when R = B: the minibatch alone
        return stf.target(x_noisy, sigma, reference, chunk_size=reference_chunk_size)

    def check(batch_size, num_devices, parallelism):
        if not isinstance(reference_size, int) or reference_size < batch_size:
            raise UserError(f'config.loss.reference_size={reference_size} must be an integer >= '
                             f'training.batch_size={batch_size}: the STF reference batch holds the minibatch plus '
                             f'R - B other images')
        if reference_size % num_devices:
            raise UserError(f'config.loss.reference_size={reference_size} is not divisible by the number of '
                             f'devices ({num_devices}); use a multiple of {num_devices}')
        if parallelism != 'jit':
            raise UserError("config.loss.target='stf' needs training.parallelism='jit' (a global reference batch)")

    def rows_for(batch_size):
        return (Rows('reference_extra', reference_size - batch_size, stream=1),) if reference_size > batch_size \
            else ()
    return target, Hooks(rows=rows_for, prepare=stf_reference, check=check)


def stf_reference(batch, key, augment, step=None):
    """STF's reference batch (jaxdiff.core.stf): batch['reference'] = the minibatch's (augmented) clean images, then the
    R - B images of batch['reference_extra'] (data stream 1), augmented like training images, independently per
    image. Their augmentation labels are dropped: the target is a weighted average of augmented clean images and
    never reads labels (as in the authors' code, the weights ignore how each image was augmented)."""
    del step
    if 'reference_extra' not in batch:
        return batch
    extra = batch['reference_extra']
    if augment is not None:
        extra, _ = augment(jax.random.fold_in(key, 1), extra)
    batch = {name: value for name, value in batch.items() if name != 'reference_extra'}
    return {**batch, 'reference': jnp.concatenate([batch['image'], extra])}


def independent_pairing(key, y, batch, params, networks):
    """Noise drawn i.i.d. N(0, I), independent of the clean images y (EDM)."""
    del params, networks
    noise = lambda k, shape: jax.random.normal(k, shape, y.dtype)
    return draw_per_example(key, y.shape, noise, batch), 0.0, {}


# ---------------------------------------------------------------- hooks: what a method may ask of the loop

class Rows(NamedTuple):
    """Extra rows the input pipeline fetches for the step: `size` global examples of data stream `stream`, under
    batch[name]. With period p > 1 the rows of steps k p, ..., k p + p - 1 are one fetch (index k = step // p),
    and `Hooks.refresh` runs once on them (a pool that lasts several steps)."""
    name: str
    size: int
    stream: int = 0
    period: int = 1


class Hooks(NamedTuple):
    """What a piece may need beyond `loss(params, batch, key)`; the loop calls these and never names a method.

      rows            (batch_size) -> tuple of `Rows`: the extra data per step (STF's reference, AOT's pool)
      refresh         (rows, key, augment) -> dict, jittable, once per period of the rows (AOT: augment, draw noise,
                      assign);
                      its output joins every batch of the period; key = fold_in(refresh key, step // period)
      minibatch       (batch, key, augment, step) -> batch: the (augmented) minibatch of the step, inside the
                      jitted step; `augment` is (key, images) -> (images, augment_labels) or None. At most one
                      piece provides it (AOT: a chunk of its pool); the default, `augment_minibatch`, augments
                      batch['image']
      prepare         (batch, key, augment, step) -> batch, after the minibatch and before the loss; the pieces'
                      preparations run in order (STF: assemble the reference batch); each augments what it adds
      check           (batch_size, num_devices, parallelism) -> None; raises ValueError naming the config field
      extra_networks  names of extra trainable networks (params[name], networks[name]; e.g. the Fast-ODE encoder)
    """
    rows: Optional[Callable] = None
    refresh: Optional[Callable] = None
    minibatch: Optional[Callable] = None
    prepare: Optional[Callable] = None
    check: Optional[Callable] = None
    extra_networks: tuple = ()


def augment_minibatch(batch, key, augment, step=None):
    """The default preparation: EDM's augmentation of batch['image'] (labels under batch['augment_labels'])."""
    del step
    if augment is None:
        return batch
    image, augment_labels = augment(key, batch['image'])
    return {**batch, 'image': image, 'augment_labels': augment_labels}


def draw_per_example(key, shape, draw, batch):
    """draw(key, shape) for a batch of `shape` [B, ...]. Under pmap each device holds rows batch['index'] of a
    global batch of batch['global_size'] rows (the train step supplies both); it then draws the global array and
    keeps its rows, so every device sees exactly the numbers of the one jitted global draw (threefry's bits are a
    function of the element's position: the draw costs B_global elements, small next to the network)."""
    if 'index' not in batch:
        return draw(key, tuple(shape))
    return draw(key, (batch['global_size'], *shape[1:]))[batch['index']]


# Registries: name -> factory(**options) -> piece, or (piece, Hooks). Other modules add entries.
PARAMETERIZATIONS = {'edm': edm_parameterization, 'vp': vp_parameterization, 've': ve_parameterization,
                     'flow': flow.parameterization}
TARGETS = {'x0': lambda: x0_target, 'stf': stf_target}
PAIRINGS = {'independent': lambda: independent_pairing, 'aot': aot.aot_pairing, 'fastode': flow.fastode_pairing}


class Pieces(NamedTuple):
    parameterization: Parameterization
    target: Callable
    pairing: Callable


class Loss(NamedTuple):
    """A built loss: the pieces, and the hooks of all of them merged (see `Hooks`).

    loss.make(networks) -> loss_fn(params, batch, key) -> (scalar, metrics); networks['model'] is
    network(params['model'], x_in, c_noise, batch, key) -> F, and each name of `extra_networks` has its own entry."""
    pieces: Pieces
    hooks: Hooks

    @property
    def parameterization(self):
        return self.pieces.parameterization

    def make(self, networks):
        return make_loss(networks, self.pieces, with_metrics=True)

    def prepare(self, batch, key, augment, step):
        """The step's batch: the minibatch hook (default: augment batch['image'] with `key`), then the
        preparations (with fold_in(key, 1))."""
        batch = (self.hooks.minibatch or augment_minibatch)(batch, key, augment, step)
        if self.hooks.prepare is not None:
            batch = self.hooks.prepare(batch, jax.random.fold_in(key, 1), augment, step)
        return batch

    def check(self, *, batch_size, num_devices, parallelism='jit'):
        self.hooks.check(batch_size, num_devices, parallelism)

    def rows(self, batch_size):
        return self.hooks.rows(batch_size)


def _merge_hooks(hooks):
    """One Hooks for all pieces: rows, checks and preparations add up; one minibatch and one refresh at most."""
    present = lambda field: [getattr(h, field) for h in hooks if getattr(h, field) is not None]
    minibatches, refreshes = present('minibatch'), present('refresh')
    if len(minibatches) > 1 or len(refreshes) > 1:
        raise ValueError('two loss pieces both provide the minibatch (or a refreshed pool); they do not compose')
    rows, checks, prepares = present('rows'), present('check'), present('prepare')

    def all_rows(batch_size):
        return sum((tuple(r(batch_size)) for r in rows), ())

    def check(*args):
        for c in checks:
            c(*args)

    def prepare(batch, key, augment, step):
        for i, p in enumerate(prepares):
            batch = p(batch, jax.random.fold_in(key, i), augment, step)
        return batch
    return Hooks(rows=all_rows, refresh=refreshes[0] if refreshes else None,
                 minibatch=minibatches[0] if minibatches else None, prepare=prepare if prepares else None,
                 check=check, extra_networks=sum((tuple(h.extra_networks) for h in hooks), ()))


def _options_of(factory):
    return {p.name for p in inspect.signature(factory).parameters.values() if p.kind == p.KEYWORD_ONLY}


def _choose(registry, kind, name):
    if name not in registry:
        raise ValueError(f'unknown loss.{kind} {name!r}; valid choices: {", ".join(sorted(registry))}')
    return registry[name]


def build(*, parameterization='edm', target='x0', pairing='independent', **options):
    """The Loss named by config.loss: three pieces, each built with the options its factory takes, and their hooks.

    An option that no registered piece accepts is a typo and raises ValueError; an option that belongs to another
    choice (e.g. P_mean when parameterization='vp') is ignored, so one config can switch pieces from the command line.
    """
    chosen = {'parameterization': _choose(PARAMETERIZATIONS, 'parameterization', parameterization),
              'target': _choose(TARGETS, 'target', target),
              'pairing': _choose(PAIRINGS, 'pairing', pairing)}
    known = set().union(*(_options_of(f) for registry in (PARAMETERIZATIONS, TARGETS, PAIRINGS)
                          for f in registry.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f'unknown loss option(s) {", ".join(unknown)}; valid options: {", ".join(sorted(known))}')
    pieces, hooks = {}, []
    for kind, factory in chosen.items():
        piece = factory(**{k: v for k, v in options.items() if k in _options_of(factory)})
        if isinstance(piece, tuple) and len(piece) == 2 and isinstance(piece[1], Hooks):
            piece, piece_hooks = piece
            hooks.append(piece_hooks)
        pieces[kind] = piece
    return Loss(Pieces(**pieces), _merge_hooks(hooks))


def make_loss(networks, pieces, *, with_metrics=False):
    """loss(params, batch, key) -> scalar, the weighted denoising loss (EDM eq. 8) plus any pairing penalty
    (a tuple (scalar, metrics) when `with_metrics`).

    networks: network(params, x_in, c_noise, batch, key) -> F (the raw network on preconditioned input; it reads
    whatever conditioning it needs from the batch and draws dropout from key), or a dict of such functions with
    the model under 'model' (then params is a dict too, params['model'] feeding networks['model']).
    batch['image'] holds the clean (augmented) images y, [B, ...]; batch['index'] and batch['global_size'], when
    present, place them in a global batch (pmap; see `draw_per_example`).
    """
    pieces = getattr(pieces, 'pieces', pieces)   # a Loss or its Pieces
    if callable(networks):
        networks = {'model': networks}
        split_params = lambda params: (params, {'model': params})
    else:
        split_params = lambda params: (params['model'], params)

    def loss(params, batch, key):
        model_params, all_params = split_params(params)
        y = batch['image']
        sigma_key, noise_key, network_key = jax.random.split(key, 3)
        sigma = draw_per_example(sigma_key, y.shape[:1], pieces.parameterization.sample_sigma, batch)
        eps, penalty, metrics = pieces.pairing(noise_key, y, batch, all_params, networks)
        x_noisy = y + per_example(sigma, y) * eps
        F = lambda x_in, c_noise: networks['model'](model_params, x_in, c_noise, batch, network_key)
        D = precond.apply(F, x_noisy, pieces.parameterization.precond(sigma))
        weight = pieces.parameterization.weight(sigma)
        y_target = pieces.target(x_noisy, sigma, batch)
        value = jnp.mean(per_example(weight, y) * (D - y_target) ** 2) + penalty
        return (value, metrics) if with_metrics else value
    return loss
