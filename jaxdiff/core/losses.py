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
A new piece is a factory named in one of the three registries below (`module:factory`, imported on demand, so a
piece's module may import this one for `Hooks` and `Rows`); its keyword options come from config.loss. A
parameterization factory returns a `Parameterization`; a target or pairing factory returns (piece, `Hooks`).
"""
import functools
import importlib
import inspect
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxdiff.core import precond
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


def clean_image_target(x_noisy, sigma, batch):
    """The plain denoising target: the clean image y itself (EDM eq. 2)."""
    del x_noisy, sigma
    return batch['image']


def x0_target():
    """loss.target='x0': `clean_image_target`, no hooks."""
    return clean_image_target, Hooks()


def independent_noise(key, y, batch, params, networks):
    """Noise drawn i.i.d. N(0, I), independent of the clean images y (EDM)."""
    del params, networks
    noise = lambda k, shape: jax.random.normal(k, shape, y.dtype)
    return draw_per_example(key, y.shape, noise, batch), 0.0, {}


def independent_pairing():
    """loss.pairing='independent': `independent_noise`, no hooks."""
    return independent_noise, Hooks()


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
      check           (batch_size, num_devices, parallelism, host_callbacks_in_step) -> None; raises ValueError
                      naming the config field (host_callbacks_in_step: whether the placement can run a host
                      callback inside the sharded step; train_step.Placement says)
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


# Registries: name -> 'module:factory', imported when chosen. factory(**options) -> a Parameterization
# (PARAMETERIZATIONS) or (piece, Hooks) (TARGETS, PAIRINGS).
PARAMETERIZATIONS = {'edm': 'jaxdiff.core.losses:edm_parameterization',
                     'vp': 'jaxdiff.core.losses:vp_parameterization',
                     've': 'jaxdiff.core.losses:ve_parameterization',
                     'flow': 'jaxdiff.core.flow:parameterization'}
TARGETS = {'x0': 'jaxdiff.core.losses:x0_target',
           'stf': 'jaxdiff.core.stf:loss_target'}
PAIRINGS = {'independent': 'jaxdiff.core.losses:independent_pairing',
            'aot': 'jaxdiff.core.aot:aot_pairing',
            'fastode': 'jaxdiff.core.flow:fastode_pairing'}
REGISTRIES = {'parameterization': PARAMETERIZATIONS, 'target': TARGETS, 'pairing': PAIRINGS}


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
        return make_loss(networks, self.pieces)

    def prepare(self, batch, key, augment, step):
        """The step's batch: the minibatch hook (default: augment batch['image'] with `key`), then the
        preparations (with fold_in(key, 1))."""
        batch = (self.hooks.minibatch or augment_minibatch)(batch, key, augment, step)
        if self.hooks.prepare is not None:
            batch = self.hooks.prepare(batch, jax.random.fold_in(key, 1), augment, step)
        return batch

    def check(self, *, batch_size, num_devices, parallelism='jit', host_callbacks_in_step=True):
        self.hooks.check(batch_size, num_devices, parallelism, host_callbacks_in_step)

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


def factory(kind, name):
    """The factory registered as loss.`kind` (parameterization | target | pairing) `name`; ValueError for an unknown
    name, listing the valid ones."""
    registry = REGISTRIES[kind]
    if name not in registry:
        raise ValueError(f'unknown loss.{kind} {name!r}; valid choices: {", ".join(sorted(registry))}')
    module_name, attr = registry[name].split(':')
    return getattr(importlib.import_module(module_name), attr)


def build(*, parameterization='edm', target='x0', pairing='independent', **options):
    """The Loss named by config.loss: three pieces, each built with the options its factory takes, and their hooks.

    An option that no registered piece accepts is a typo and raises ValueError; an option that belongs to another
    choice (e.g. P_mean when parameterization='vp') is ignored, so one config can switch pieces from the command line.
    """
    chosen = {kind: factory(kind, name) for kind, name in (('parameterization', parameterization),
                                                           ('target', target), ('pairing', pairing))}
    others = set(options) - set().union(*map(_options_of, chosen.values()))
    if others:   # options of pieces not chosen, or typos: only these need every registered factory
        known = set().union(*(_options_of(factory(kind, name)) for kind, registry in REGISTRIES.items()
                              for name in registry))
        unknown = sorted(others - known)
        if unknown:
            raise ValueError(f'unknown loss option(s) {", ".join(unknown)}; valid options: '
                             f'{", ".join(sorted(known))}')
    built = {kind: make(**{k: v for k, v in options.items() if k in _options_of(make)})
             for kind, make in chosen.items()}
    (target_piece, target_hooks), (pairing_piece, pairing_hooks) = built['target'], built['pairing']
    return Loss(Pieces(built['parameterization'], target_piece, pairing_piece),
                _merge_hooks([target_hooks, pairing_hooks]))


def make_loss(networks, pieces):
    """loss(params, batch, key) -> (scalar, metrics): the weighted denoising loss (EDM eq. 8) plus any pairing
    penalty, and the pairing's metrics (a dict of scalars, empty for most pairings).

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
        return value, metrics
    return loss
