"""Training the discriminator of discriminator guidance (Kim, Kim, Kwon, Kang, Moon, ICML 2023) on real vs
generated samples (what `--mode=train_discriminator` runs): config.discriminator, the data, the network on its
inputs, and the trainer on the loop of `jaxdiff.drivers.loop`. The perturbation, the loss and the pure steps are
`jaxdiff.core.discriminator`'s; loading a trained discriminator for guided sampling is
`jaxdiff.drivers.discriminator_guidance`'s.

As the authors' train.py does it, in EDM's sigma-space (x = x0 + sigma z):
  data       real rows (target 1) from config.data, stream 0, and the trained model's own unguided samples
             (target 0, WORKDIR/generated.npz); each batch of B holds B/2 of each (the authors shuffle one pool of
             both, which balances them in expectation). Step s reads real rows [s B/2, (s+1) B/2) of the data
             order and generated rows [s B/2, (s+1) B/2) of their epoch permutations (data.sequence_indices).
  sigma, noise, loss    config.discriminator.perturbation ('vp_importance' | 'lognormal') and pairing
             ('independent' | 'aot'; how AOT pairing enters discriminator training is not public, so this is a
             choice): `jaxdiff.core.discriminator`. The pairing changes the perturbed distributions (z is no longer
             independent of x0), for real and generated alike, so d learns the log ratio of the paired-perturbed
             marginals; benchmarks/dg_*.py measure what that does.
  optimizer  Adam, lr 3e-4, weight decay 1e-7 as torch's Adam(weight_decay=...) applies it: L2 added to the
             gradient before the moments (optax.add_decayed_weights then optax.adam; optax.adamw would be the
             decoupled AdamW instead); batch 128
  network    `models.discriminator.build(**config.discriminator.network)` reading x itself (features='none', the
             MLP discriminator for 2-D data) or the frozen trained denoiser's encoder bottleneck
             (features='bottleneck': D.with_aux(x, sigma)[1]['bottleneck'], [B, h, w, C], for the head)
Randomness is fold_in(step key, step); the data of step s is a pure function of s; so a resumed run is
bit-identical to an uninterrupted one, and 8 devices give 1 device's parameters (the batch is sharded over the
mesh, the draws are made for the global batch). Held-out accuracy: real held-out rows (config.data with split
'test' where the set has splits, else fresh rows of another stream) and generated samples not trained on, each
perturbed by a fixed draw of the training distribution with independent noise.

Checkpoints: items 'state' (DiscriminatorState, to resume) and 'ema' (`sampling_item`: {'params':
{'discriminator': ...}, 'model_state': {}}, what guidance reads; the discriminator is not averaged, the item has
the trainer's layout); WORKDIR/discriminator.json holds the network and features, so guidance needs the workdir
alone.
"""
import json
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import data as data_lib
from jaxdiff.core import coupling, discriminator as math_lib
from jaxdiff.core.errors import UserError
from jaxdiff.core.samplers import common
from jaxdiff.drivers import checkpoint as checkpoint_lib
from jaxdiff.drivers import config_check, logger as logger_lib, loop, mesh as mesh_lib, train_step as train_step_lib
from jaxdiff.models import discriminator as discriminator_lib

SETTINGS_FILE = 'discriminator.json'
GENERATED_FILE = 'generated.npz'
GENERATED_STREAM = 7          # data.sequence_indices stream of the generated rows' epoch permutations
HELDOUT_STREAM = 8            # real held-out rows of a set without a 'test' split (synthetic sets: fresh samples)
FEATURES = ('none', 'bottleneck')

# config.discriminator: field -> default (configs/*_dg.py list them all)
FIELDS = dict(
    model_workdir=None,              # the trained model's workdir (its checkpoints/): features and samples
    network=None,                    # dict(name='head' | 'mlp', <fields of models.discriminator>)
    features='none',                 # 'none' | 'bottleneck'
    perturbation='vp_importance',    # 'vp_importance' | 'lognormal'
    beta_min=0.1, beta_d=19.9, epsilon_t=1e-5,    # VP: beta_0 = 0.1, beta_1 = 20 (the authors')
    P_mean=-1.2, P_std=1.2,                       # EDM's log-normal
    pairing='independent',           # 'independent' | 'aot'
    coupling_method='exact', coupling_cost='euclidean', coupling_solver='scipy', per_class=False,
    num_generated=50_000, num_heldout=1_000,      # generated samples trained on / held out
    generated_path=None,             # an npz with 'samples' (and 'labels') instead of WORKDIR/generated.npz
    batch_size=128, num_steps=4_000, lr=3e-4, weight_decay=1e-7, seed=0,
    log_every_steps=100, eval_every_steps=500, checkpoint_every_steps=1_000, keep_checkpoints=2,
)
TABLE = {
    'model_workdir': config_check.ANY, 'network': config_check.ANY, 'features': config_check.choice(*FEATURES),
    'perturbation': config_check.choice(*math_lib.PERTURBATIONS),
    'beta_min': config_check.number(), 'beta_d': config_check.number(0.0, open_lower=True),
    'epsilon_t': config_check.number(0.0, 1.0, open_lower=True, open_upper=True),
    'P_mean': config_check.number(), 'P_std': config_check.number(0.0, open_lower=True),
    'pairing': config_check.choice(*math_lib.PAIRINGS), 'coupling_method': config_check.choice(*coupling.METHODS),
    'coupling_cost': config_check.choice(*coupling.COSTS),
    'coupling_solver': config_check.choice(*coupling.EXACT_SOLVERS), 'per_class': config_check.FLAG,
    'num_generated': config_check.integer(1), 'num_heldout': config_check.integer(0),
    'generated_path': config_check.ANY, 'batch_size': config_check.integer(2), 'num_steps': config_check.integer(1),
    'lr': config_check.number(0.0, open_lower=True), 'weight_decay': config_check.number(0.0),
    'seed': config_check.integer(0), 'log_every_steps': config_check.integer(1),
    'eval_every_steps': config_check.integer(1), 'checkpoint_every_steps': config_check.integer(1),
    'keep_checkpoints': config_check.integer(1),
}


# ---------------------------------------------------------------- settings

def settings_of(config):
    """config.discriminator (checked against TABLE) with the defaults filled in; one-line UserErrors naming a bad
    field."""
    s = config_check.section(config, 'discriminator', TABLE, FIELDS,
                             missing='config.discriminator is missing (see configs/toy2d_dg.py)')
    if s['batch_size'] % 2:
        raise UserError(f'config.discriminator.batch_size={s["batch_size"]} must be even (half real, half generated)')
    if not s['network'] or 'name' not in dict(s['network']):
        raise UserError('config.discriminator.network must name a network: dict(name=\'head\' | \'mlp\', ...)')
    s['network'] = dict(s['network'])
    return s


def sigma_sampler(s):
    """(key, shape) -> sigma of config.discriminator's perturbation."""
    return math_lib.sigma_sampler(s['perturbation'], beta_d=s['beta_d'], beta_min=s['beta_min'],
                                  epsilon_t=s['epsilon_t'], P_mean=s['P_mean'], P_std=s['P_std'])


def coupling_options(s):
    return dict(method=s['coupling_method'], cost=s['coupling_cost'], per_class=s['per_class'],
                exact_solver=s['coupling_solver'])


# ---------------------------------------------------------------- the network on its inputs

def _network(fields):
    fields = dict(fields)
    try:
        return discriminator_lib.build(fields.pop('name'), **fields)
    except ValueError as e:
        raise UserError(f'config.discriminator.network: {e}') from e


def discriminator_of(settings):
    """The Discriminator described by a workdir's discriminator.json (network fields, features, label_dim)."""
    network_fields = settings['network']
    return Discriminator(_network(network_fields), settings['features'],
                         int(network_fields.get('label_dim', 0) or 0))


def bottleneck_features(denoiser):
    """(x, sigma) -> the denoiser's encoder bottleneck (its with_aux aux['bottleneck']), differentiable in x."""
    def features_fn(x, sigma):
        _, aux = common.call_with_aux(denoiser, x, sigma)
        if 'bottleneck' not in aux:
            raise UserError("config.discriminator.features='bottleneck' needs a model that exposes its bottleneck "
                            "(Denoiser.with_aux); use features='none'")
        return aux['bottleneck']
    return features_fn


class Discriminator(NamedTuple):
    """A discriminator network on its inputs: x itself, or the frozen denoiser's features.

    denoiser_fn(frozen_variables, class_labels) -> D (jaxdiff.drivers.trained.Trained.denoiser_fn); None for
    'none'."""
    network: Any
    features: str
    label_dim: int
    denoiser_fn: Callable = None

    def features_fn(self, frozen, class_labels):
        if self.features == 'none':
            return None
        return bottleneck_features(self.denoiser_fn(frozen, class_labels))

    def class_labels(self, labels):
        return jax.nn.one_hot(labels, self.label_dim) if self.label_dim else None

    def inputs(self, frozen, x, sigma, labels):
        features_fn = self.features_fn(frozen, self.class_labels(labels))
        return x if features_fn is None else features_fn(x, sigma)

    def logit(self, params, inputs, sigma, labels, *, train=False, key=None):
        rngs = {'dropout': key} if train else {}
        return self.network.apply({'params': params}, inputs, sigma, class_labels=self.class_labels(labels),
                                  train=train, rngs=rngs)

    def input_shape(self, frozen, sample_shape):
        """Per-example shape of the network's input (features through jax.eval_shape: nothing runs)."""
        x = jax.ShapeDtypeStruct((1, *sample_shape), jnp.float32)
        shapes = jax.eval_shape(lambda frozen, x: self.inputs(frozen, x, jnp.ones((1,)), jnp.zeros((1,), jnp.int32)),
                                frozen, x)
        return tuple(shapes.shape[1:])

    def init(self, key, input_shape):
        class_labels = jnp.zeros((1, self.label_dim)) if self.label_dim else None
        return self.network.init(key, jnp.zeros((1, *input_shape)), jnp.ones((1,)), class_labels)['params']


# ---------------------------------------------------------------- the optimizer

def make_optimizer(*, lr, weight_decay):
    """torch.optim.Adam(lr, weight_decay) (the authors'): g + weight_decay * p, then Adam (0.9, 0.999, 1e-8)."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8))


def make_update(optimizer):
    """update(grads, opt_state, params) -> (params, opt_state): one step of `optimizer` (core's step builders)."""
    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return update


# ---------------------------------------------------------------- data

def make_batch_fn(real_source, generated, generated_labels, *, batch_size, seed):
    """make_batch(step) -> this host's rows of step `step` (numpy): {'real', 'real_label', 'generated',
    'generated_label'}, B/2 global rows each (module docstring: the data order)."""
    half = batch_size // 2
    process_index, process_count = jax.process_index(), jax.process_count()
    start, stop = data_lib.host_slice(half, process_index, process_count)

    def make_batch(step):
        real = real_source.batch(step, half, seed=seed, process_index=process_index, process_count=process_count)
        rows = data_lib.sequence_indices(len(generated), seed, GENERATED_STREAM, step * half + start,
                                         step * half + stop)
        return {'real': np.asarray(real['image'], np.float32), 'real_label': np.asarray(real['label'], np.int32),
                'generated': np.asarray(generated[rows], np.float32),
                'generated_label': np.asarray(generated_labels[rows], np.int32)}
    return make_batch


def heldout_real(data_config, source, num):
    """{'image', 'label'}: `num` held-out real rows: the 'test' split of a set with splits (all of it when it is
    smaller), else rows of stream HELDOUT_STREAM (synthetic sets: fresh samples)."""
    fields = dict(data_config)
    if 'split' in fields:
        test = data_lib.build({**fields, 'split': 'test'})
        rows = test.get(np.arange(min(num, test.num_examples)))
    else:
        rows = source.batch(0, num, seed=0, stream=HELDOUT_STREAM)
    return {'image': np.asarray(rows['image'], np.float32), 'label': np.asarray(rows['label'], np.int32)}


def eval_batches(real, generated, half):
    """Equal-sized chunks of half rows of both held-out sets, padded, with validity masks."""
    num_chunks = max(1, math.ceil(max(len(real['image']), len(generated['image'])) / half))

    def padded(rows, name):
        n = len(rows['image'])
        index = np.arange(num_chunks * half)
        take = np.minimum(index, max(n - 1, 0))
        return {name: rows['image'][take], name + '_label': rows['label'][take], name + '_valid': index < n}
    both = {**padded(real, 'real'), **padded(generated, 'generated')}
    return [{k: v[i * half:(i + 1) * half] for k, v in both.items()} for i in range(num_chunks)]


# ---------------------------------------------------------------- the trainer

def describe(s, input_shape, model_workdir=None, model_step=None):
    """WORKDIR/discriminator.json: what loading the discriminator needs, and how it was trained."""
    return dict(network=s['network'], features=s['features'], input_shape=list(input_shape),
                model_workdir=os.path.abspath(model_workdir) if model_workdir else None,
                model_step=None if model_step is None else int(model_step),
                training={k: s[k] for k in ('perturbation', 'pairing', 'batch_size', 'num_steps', 'lr',
                                            'weight_decay', 'seed')})


def sampling_item(params):
    """The 'ema' item of a discriminator checkpoint (the trainer's layout): what guidance restores."""
    return {'params': {'discriminator': params}, 'model_state': {}}


def train(config, workdir, *, real_source, heldout, generated, frozen=None, denoiser_fn=None, mesh=None,
          model_step=None):
    """Trains (or resumes) the discriminator of config.discriminator in `workdir`; returns the final
    DiscriminatorState. real_source: a jaxdiff.data source; heldout: {'real': {'image', 'label'}, 'generated':
    {...}}; generated: {'image', 'label'} trained on; frozen / denoiser_fn: the trained model (for 'bottleneck'
    features). SIGTERM/SIGINT save and stop (`loop.run`)."""
    s = settings_of(config)
    sample_shape = tuple(config.data.shape)
    mesh = mesh_lib.make_mesh() if mesh is None else mesh
    placement = train_step_lib.parallel('jit', mesh)
    half = s['batch_size'] // 2
    if half % placement.num_devices or half % jax.process_count():
        raise UserError(f'config.discriminator.batch_size={s["batch_size"]}: each half ({half}) must split over '
                        f'the {placement.num_devices} devices; use a multiple of {2 * placement.num_devices}')
    label_dim = int(s['network'].get('label_dim', 0) or 0)
    if s['features'] == 'bottleneck' and denoiser_fn is None:
        raise UserError("config.discriminator.features='bottleneck' needs the trained model "
                        '(config.discriminator.model_workdir)')
    discriminator = Discriminator(_network(s['network']), s['features'], label_dim, denoiser_fn)
    frozen = {} if s['features'] == 'none' else frozen
    input_shape = discriminator.input_shape(frozen, sample_shape)
    optimizer = make_optimizer(lr=s['lr'], weight_decay=s['weight_decay'])
    init_key, _, eval_key = math_lib.root_keys(s['seed'])

    def init_state(key):
        params = discriminator.init(key, input_shape)
        return math_lib.DiscriminatorState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, SETTINGS_FILE), 'w') as f:
            json.dump(describe(s, input_shape, s['model_workdir'], model_step), f, indent=1)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=s['keep_checkpoints'])
    try:
        abstract = checkpoint_lib.abstract_like(jax.eval_shape(init_state, init_key), mesh_lib.replicated(mesh))
        start, state = loop.restore_or_init(
            checkpoints, abstract, lambda: jax.jit(init_state, out_shardings=mesh_lib.replicated(mesh))(init_key))
        return _train(s, discriminator, optimizer, state, start, checkpoints, placement, frozen, real_source,
                      heldout, generated, eval_key, is_main)
    finally:
        checkpoints.wait_until_finished()
        checkpoints.close()


def _train(s, discriminator, optimizer, state, start, checkpoints, placement, frozen, real_source, heldout,
           generated, eval_key, is_main):
    workdir = checkpoints.workdir
    sigma_fn = sigma_sampler(s)
    train_step = placement.jit(
        math_lib.make_train_step(discriminator, make_update(optimizer), seed=s['seed'], sigma_fn=sigma_fn,
                                 pairing=s['pairing'], coupling_options=coupling_options(s)),
        num_replicated=3, donate=(0, 1))
    eval_step = placement.jit(math_lib.make_eval_step(discriminator, sigma_fn=sigma_fn), num_replicated=3)
    reset = placement.jit_replicated(math_lib.zero_metrics)
    make_batch = make_batch_fn(real_source, generated['image'], generated['label'], batch_size=s['batch_size'],
                               seed=s['seed'])
    half = s['batch_size'] // 2
    chunks = eval_batches(heldout['real'], heldout['generated'], half) if s['num_heldout'] else []
    num_steps = s['num_steps']
    count = sum(x.size for x in jax.tree.leaves(state.params))
    print(f'discriminator ({s["network"]["name"]}, {s["features"]} features, {count:,} parameters): steps '
          f'{start}..{num_steps}, batch {s["batch_size"]} (half real, half generated of {len(generated["image"])}), '
          f'{s["perturbation"]} sigma, {s["pairing"]} noise, on {placement.num_devices} device(s), in {workdir}',
          flush=True)
    log = logger_lib.Logger(workdir, total_steps=num_steps, batch_size=s['batch_size'], enabled=is_main)

    def evaluate(params, done):
        rows = slice(*data_lib.host_slice(half, jax.process_index(), jax.process_count()))
        totals = {'real_correct': 0, 'generated_correct': 0, 'bce_sum': 0.0}
        for index, chunk in enumerate(chunks):
            local = {k: v[rows] for k, v in chunk.items()}
            out = jax.device_get(eval_step(params, frozen, jax.random.fold_in(eval_key, index),
                                           placement.put_batch(local)))
            for name in totals:
                totals[name] += out[name]
        num_real, num_generated = len(heldout['real']['image']), len(heldout['generated']['image'])
        result = {'heldout_accuracy_real': totals['real_correct'] / max(num_real, 1),
                  'heldout_accuracy_generated': totals['generated_correct'] / max(num_generated, 1),
                  'heldout_bce': totals['bce_sum'] / max(num_real + num_generated, 1)}
        result['heldout_accuracy'] = (totals['real_correct'] + totals['generated_correct']) / max(
            num_real + num_generated, 1)
        log.scalars(done, result)
        if is_main:
            print(f'held-out step {done}: accuracy {result["heldout_accuracy"]:.4f} (real '
                  f'{result["heldout_accuracy_real"]:.4f} of {num_real}, generated '
                  f'{result["heldout_accuracy_generated"]:.4f} of {num_generated}), BCE {result["heldout_bce"]:.4f}',
                  flush=True)

    def on_due(carry, done, due):
        state, metrics = carry
        if 'log' in due:
            fetched = jax.device_get(metrics)
            num = max(int(fetched['num_steps']), 1)
            log.progress(done, {'loss': fetched['loss_sum'] / num, 'accuracy': fetched['accuracy_sum'] / num})
            metrics = reset()
        if 'evaluate' in due:
            evaluate(state.params, done)
        return state, metrics

    try:
        state, _ = loop.run(
            (state, reset()), start=start, num_steps=num_steps,
            step_fn=lambda carry, step, batch: train_step(*carry, frozen, batch),
            batch_fn=lambda step: placement.put_batch(make_batch(step)),
            cadence={'log': s['log_every_steps'], 'evaluate': s['eval_every_steps'] if chunks else 0,
                     loop.CHECKPOINT: s['checkpoint_every_steps']},
            on_due=on_due, checkpoints=checkpoints,
            items=lambda carry: {'state': carry[0], 'ema': sampling_item(carry[0].params)},
            max_steps_in_flight=placement.max_steps_in_flight, on_first_step=log.start)
    finally:
        log.close()
    return state


# ---------------------------------------------------------------- generated samples

def load_generated(path, num):
    """{'image', 'label'} of the first `num` samples of an npz with 'samples' (and 'labels'), or None when the file
    does not exist; a one-line UserError when it holds fewer."""
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        samples = np.asarray(f['samples'], np.float32)
        labels = np.asarray(f['labels'], np.int32) if 'labels' in f else np.zeros(len(samples), np.int32)
    if len(samples) < num:
        raise UserError(f'{path} holds {len(samples)} samples but config.discriminator needs {num} '
                        '(num_generated + num_heldout): delete it to generate them, or lower those fields')
    return {'image': samples[:num], 'label': labels[:num]}
