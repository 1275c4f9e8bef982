"""The discriminator of discriminator guidance (Kim, Kim, Kwon, Kang, Moon, ICML 2023): its training on real vs
generated samples perturbed in sigma-space (what `--mode=train_discriminator` runs), its checkpoints, and loading
it for guided sampling (`config.sampling.guidance`, read by `jaxdiff.drivers.generate.Generator`).

Training, as the authors' train.py does it, in EDM's sigma-space (x = x0 + sigma z):
  data       real rows (target 1) from config.data, stream 0, and the trained model's own unguided samples
             (target 0, WORKDIR/generated.npz); each batch of B holds B/2 of each (the authors shuffle one pool of
             both, which balances them in expectation). Step s reads real rows [s B/2, (s+1) B/2) of the data
             order and generated rows [s B/2, (s+1) B/2) of their epoch permutations (data.sequence_indices).
  sigma      per example, by config.discriminator.perturbation:
               'vp_importance'  the authors' importance sampling: VP time t with density proportional to
                                beta(t) / sigma_vp(t)^2 on [epsilon_t, 1] (beta(t) = beta_min + beta_d t,
                                sigma_vp(t)^2 = 1 - exp(-B(t)), B(t) = int_0^t beta), sigma = precond.vp_sigma_of_t(t)
                                (`vp_importance_sigma`: in closed form, ln sigma is uniform)
               'lognormal'      EDM's ln sigma ~ N(P_mean, P_std^2) (precond.edm_sigma)
  noise      z ~ N(0, I) independent of the images ('independent'), or paired to them by AOT's exact assignment
             ('aot', Kim et al. 2024; how AOT pairing enters discriminator training is not public, so this is a
             choice): one assignment of the batch's real half to B/2 fresh noises and one of its generated half to
             B/2 others (`aot.pair_pool`: min sum ||x0_i - z_perm(i)||, before sigma scaling), so neither side's
             noise depends on the other side and the two classes are perturbed alike. The pairing changes the
             perturbed distributions (z is no longer independent of x0), for real and generated alike, so d
             learns the log ratio of the paired-perturbed marginals; benchmarks/dg_*.py measure what that does.
  loss       binary cross-entropy of the logit d(x, sigma) against the target
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

Checkpoints: items 'state' (DiscriminatorState, to resume) and 'ema' ({'params': {'discriminator': ...},
'model_state': {}}: what sampling reads; the discriminator is not averaged, the item has the trainer's layout);
WORKDIR/discriminator.json holds the network and features, so guidance needs the workdir alone.

Guidance (config.sampling.guidance = dict(discriminator_workdir, weight, sigma_min, sigma_max,
first_evaluation_only, boosting)): `guidance_from_config` -> (wrap, sampler) for the Generator: wrap makes
`guidance.discriminator_guided(D, logit_fn, weight, sigma_min, sigma_max)`; with EDM's Heun and
first_evaluation_only or boosting the sampler becomes 'heun_dg' (the authors' sampler, samplers/guided.py), every
other sampler runs on the guided denoiser at each of its evaluations. Samplers that do not count their
discriminator-gradient calls get them counted on a probe (`guidance.window_calls`).
"""
import json
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.core import aot, coupling, guidance, precond, samplers
from jaxdiff import data as data_lib
from jaxdiff.drivers import mesh as mesh_lib
from jaxdiff.drivers import checkpoint as checkpoint_lib
from jaxdiff.drivers import logger as logger_lib
from jaxdiff.core.errors import UserError
from jaxdiff.models import discriminator as discriminator_lib
from jaxdiff.core.samplers import common, guided

SETTINGS_FILE = 'discriminator.json'
GENERATED_FILE = 'generated.npz'
GENERATED_STREAM = 7          # data.sequence_indices stream of the generated rows' epoch permutations
HELDOUT_STREAM = 8            # real held-out rows of a set without a 'test' split (synthetic sets: fresh samples)
PERTURBATIONS = ('vp_importance', 'lognormal')
PAIRINGS = ('independent', 'aot')
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
# NumPy in (precond's rule): a module import must not start JAX's backend (jax.distributed.initialize comes later)
GUIDANCE_FIELDS = dict(discriminator_workdir=None, weight=2.0,
                       sigma_min=float(precond.vp_sigma_of_t(np.float64(0.01))), sigma_max=float('inf'),
                       first_evaluation_only=True, boosting=False)


# ---------------------------------------------------------------- settings

def settings_of(config):
    """config.discriminator with the defaults filled in; one-line UserErrors naming a bad field."""
    if 'discriminator' not in config:
        raise UserError('config.discriminator is missing (see configs/toy2d_dg.py)')
    given = dict(config.discriminator)
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise UserError(f'config.discriminator has no field {unknown[0]}; valid fields: {", ".join(sorted(FIELDS))}')
    s = {**FIELDS, **given}
    for field, valid in (('features', FEATURES), ('perturbation', PERTURBATIONS), ('pairing', PAIRINGS),
                         ('coupling_method', coupling.METHODS), ('coupling_cost', coupling.COSTS),
                         ('coupling_solver', coupling.EXACT_SOLVERS)):
        if s[field] not in valid:
            raise UserError(f'config.discriminator.{field}={s[field]!r}; valid choices: {", ".join(valid)}')
    for field in ('num_generated', 'num_heldout', 'batch_size', 'num_steps', 'log_every_steps', 'eval_every_steps',
                  'checkpoint_every_steps', 'keep_checkpoints'):
        value = s[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == 'num_heldout' else 1):
            raise UserError(f'config.discriminator.{field}={value!r} must be a positive integer')
    if s['batch_size'] % 2:
        raise UserError(f'config.discriminator.batch_size={s["batch_size"]} must be even (half real, half generated)')
    for field in ('lr', 'P_std', 'beta_d', 'epsilon_t'):
        if not s[field] > 0:
            raise UserError(f'config.discriminator.{field}={s[field]!r} must be > 0')
    if not s['weight_decay'] >= 0 or not 0 < s['epsilon_t'] < 1:
        raise UserError(f'config.discriminator.weight_decay={s["weight_decay"]!r} must be >= 0 and epsilon_t='
                        f'{s["epsilon_t"]!r} in (0, 1)')
    if not s['network'] or 'name' not in dict(s['network']):
        raise UserError('config.discriminator.network must name a network: dict(name=\'head\' | \'mlp\', ...)')
    s['network'] = dict(s['network'])
    return s


def _network(fields):
    fields = dict(fields)
    try:
        return discriminator_lib.build(fields.pop('name'), **fields)
    except ValueError as e:
        raise UserError(f'config.discriminator.network: {e}') from e


# ---------------------------------------------------------------- the perturbation

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


def sigma_sampler(s):
    """(key, shape) -> sigma of config.discriminator.perturbation."""
    if s['perturbation'] == 'lognormal':
        return lambda key, shape: precond.edm_sigma(key, shape, P_mean=s['P_mean'], P_std=s['P_std'])
    return lambda key, shape: vp_importance_sigma(key, shape, beta_d=s['beta_d'], beta_min=s['beta_min'],
                                                  epsilon_t=s['epsilon_t'])


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


# ---------------------------------------------------------------- the network on its inputs

def bottleneck_features(denoiser):
    """(x, sigma) -> the denoiser's encoder bottleneck (its with_aux aux['bottleneck']), differentiable in x."""
    def features_fn(x, sigma):
        _, aux = common.call_denoiser(denoiser, x, sigma, with_aux=True)
        if 'bottleneck' not in aux:
            raise UserError("config.discriminator.features='bottleneck' needs a model that exposes its bottleneck "
                            "(Denoiser.with_aux); use features='none'")
        return aux['bottleneck']
    return features_fn


class Discriminator(NamedTuple):
    """A discriminator network on its inputs: x itself, or the frozen denoiser's features.

    denoiser_fn(frozen_variables, class_labels) -> D (jaxdiff.drivers.generate.Trained.denoiser_fn); None for 'none'."""
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


# ---------------------------------------------------------------- one step

class DiscriminatorState(NamedTuple):
    step: Any          # int32 scalar
    params: Any
    opt_state: Any


def make_optimizer(*, lr, weight_decay):
    """torch.optim.Adam(lr, weight_decay) (the authors'): g + weight_decay * p, then Adam (0.9, 0.999, 1e-8)."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8))


def root_keys(seed):
    """(init_key, step_key, eval_key); step s draws from fold_in(step_key, s)."""
    return tuple(jax.random.split(jax.random.key(seed), 3))


def zero_metrics():
    return {'loss_sum': jnp.zeros((), jnp.float32), 'accuracy_sum': jnp.zeros((), jnp.float32),
            'num_steps': jnp.zeros((), jnp.int32)}


def bce(logits, target):
    return optax.sigmoid_binary_cross_entropy(logits, target)


def make_train_step(discriminator, optimizer, *, seed, sigma_fn, pairing='independent', coupling_options=None):
    """train_step(state, metrics, frozen, batch) -> (state, metrics); pure, to be jitted. frozen: the trained
    model's EMA item (the features' network), untouched."""
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
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        state = DiscriminatorState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
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


# ---------------------------------------------------------------- the loop

def _compile(mesh, fn, num_replicated, donate=()):
    replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(replicated,) * num_replicated + (sharded,), donate_argnums=donate)


def describe(s, input_shape, model_workdir=None, model_step=None):
    """WORKDIR/discriminator.json: what loading the discriminator needs, and how it was trained."""
    return dict(network=s['network'], features=s['features'], input_shape=list(input_shape),
                model_workdir=os.path.abspath(model_workdir) if model_workdir else None,
                model_step=None if model_step is None else int(model_step),
                training={k: s[k] for k in ('perturbation', 'pairing', 'batch_size', 'num_steps', 'lr',
                                            'weight_decay', 'seed')})


def train(config, workdir, *, real_source, heldout, generated, frozen=None, denoiser_fn=None, mesh=None,
          model_step=None, should_stop=lambda: False):
    """Trains (or resumes) the discriminator of config.discriminator in `workdir`; returns the final
    DiscriminatorState. real_source: a jaxdiff.data source; heldout: {'real': {'image', 'label'}, 'generated':
    {...}}; generated: {'image', 'label'} trained on; frozen / denoiser_fn: the trained model (for 'bottleneck'
    features); should_stop() -> True saves and stops (SIGTERM)."""
    s = settings_of(config)
    mesh = mesh_lib.make_mesh() if mesh is None else mesh
    half = s['batch_size'] // 2
    if half % mesh.devices.size or half % jax.process_count():
        raise UserError(f'config.discriminator.batch_size={s["batch_size"]}: each half ({half}) must split over '
                        f'the {mesh.devices.size} devices; use a multiple of {2 * mesh.devices.size}')
    label_dim = int(s['network'].get('label_dim', 0) or 0)
    if s['features'] == 'bottleneck' and denoiser_fn is None:
        raise UserError("config.discriminator.features='bottleneck' needs the trained model "
                        '(config.discriminator.model_workdir)')
    discriminator = Discriminator(_network(s['network']), s['features'], label_dim, denoiser_fn)
    frozen = {} if s['features'] == 'none' else frozen
    sample_shape = tuple(config.data.shape)
    input_shape = discriminator.input_shape(frozen, sample_shape)
    optimizer = make_optimizer(lr=s['lr'], weight_decay=s['weight_decay'])
    init_key, _, eval_key = root_keys(s['seed'])

    def init_state(key):
        params = discriminator.init(key, input_shape)
        return DiscriminatorState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, SETTINGS_FILE), 'w') as f:
            json.dump(describe(s, input_shape, s['model_workdir'], model_step), f, indent=1)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep_checkpoints=s['keep_checkpoints'])
    try:
        if checkpoints.latest_step() is not None:
            abstract = checkpoint_lib.abstract_like(jax.eval_shape(init_state, init_key), mesh_lib.replicated(mesh))
            step, state = checkpoint_lib.restore_latest(workdir, abstract, set_aside=True)
            checkpoints.reload()
            print(f'resuming from {checkpoints.directory}/{step}', flush=True)
        else:
            state = jax.jit(init_state, out_shardings=mesh_lib.replicated(mesh))(init_key)
        return _loop(s, workdir, discriminator, optimizer, state, checkpoints, mesh, frozen, real_source, heldout,
                     generated, eval_key, is_main, should_stop)
    finally:
        checkpoints.wait_until_finished()
        checkpoints.close()


def _loop(s, workdir, discriminator, optimizer, state, checkpoints, mesh, frozen, real_source, heldout, generated,
          eval_key, is_main, should_stop):
    sigma_fn = sigma_sampler(s)
    coupling_options = dict(method=s['coupling_method'], cost=s['coupling_cost'], per_class=s['per_class'],
                            exact_solver=s['coupling_solver'])
    train_step = _compile(mesh, make_train_step(discriminator, optimizer, seed=s['seed'], sigma_fn=sigma_fn,
                                                pairing=s['pairing'], coupling_options=coupling_options),
                          3, donate=(0, 1))
    eval_step = _compile(mesh, make_eval_step(discriminator, sigma_fn=sigma_fn), 3)
    eval_step_of = lambda params, batch, index: eval_step(params, frozen, jax.random.fold_in(eval_key, index), batch)
    reset = jax.jit(zero_metrics, out_shardings=mesh_lib.replicated(mesh))
    metrics = reset()
    make_batch = make_batch_fn(real_source, generated['image'], generated['label'], batch_size=s['batch_size'],
                               seed=s['seed'])
    half = s['batch_size'] // 2
    chunks = eval_batches(heldout['real'], heldout['generated'], half) if s['num_heldout'] else []
    num_steps = s['num_steps']
    start = int(jax.device_get(state.step))
    count = sum(x.size for x in jax.tree.leaves(state.params))
    print(f'discriminator ({s["network"]["name"]}, {s["features"]} features, {count:,} parameters): steps '
          f'{start}..{num_steps}, batch {s["batch_size"]} (half real, half generated of {len(generated["image"])}), '
          f'{s["perturbation"]} sigma, {s["pairing"]} noise, on {mesh.devices.size} device(s), in {workdir}',
          flush=True)
    log = logger_lib.Logger(workdir, total_steps=num_steps, batch_size=s['batch_size'], enabled=is_main)

    def evaluate(done):
        rows = slice(*data_lib.host_slice(half, jax.process_index(), jax.process_count()))
        totals = {'real_correct': 0, 'generated_correct': 0, 'bce_sum': 0.0}
        for index, chunk in enumerate(chunks):
            local = {k: v[rows] for k, v in chunk.items()}
            out = jax.device_get(eval_step_of(state.params, mesh_lib.global_batch(local, mesh), index))
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
        return result

    in_flight = mesh_lib.max_steps_in_flight(mesh)
    try:
        for step in range(start, num_steps):
            state, metrics = train_step(state, metrics, frozen, mesh_lib.global_batch(make_batch(step), mesh))
            done = step + 1
            if step == start:
                jax.block_until_ready(state)
                log.start(done)
            elif in_flight and done % in_flight == 0:
                jax.block_until_ready(state)
            stop = should_stop()
            last = done == num_steps or stop
            if done % s['log_every_steps'] == 0 or last:
                fetched = jax.device_get(metrics)
                num = max(int(fetched['num_steps']), 1)
                log.progress(done, {'loss': fetched['loss_sum'] / num, 'accuracy': fetched['accuracy_sum'] / num})
                metrics = reset()
            if chunks and (done % s['eval_every_steps'] == 0 or last):
                evaluate(done)
            if done % s['checkpoint_every_steps'] == 0 or last:
                checkpoints.save(done, state, ema=sampling_item(state.params))
            if stop:
                break
    finally:
        log.close()
    return state


def sampling_item(params):
    """The 'ema' item of a discriminator checkpoint (the trainer's layout): what guidance restores."""
    return {'params': {'discriminator': params}, 'model_state': {}}


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


# ---------------------------------------------------------------- loading for guidance

class TrainedDiscriminator(NamedTuple):
    discriminator: Discriminator
    params: Any
    step: int
    settings: dict

    def logit_fn(self, denoiser, class_labels=None):
        """logit_fn(x, sigma) -> [B] for guidance.discriminator_guided, the features read from `denoiser` (the
        model being guided) when the discriminator was trained on them."""
        features_fn = bottleneck_features(denoiser) if self.discriminator.features == 'bottleneck' else None
        return discriminator_lib.make_logit_fn(self.discriminator.network.apply, self.params, features_fn,
                                               class_labels if self.discriminator.label_dim else None)


def restore(workdir, mesh):
    """The discriminator of `workdir` (discriminator.json + the 'ema' item of its newest readable checkpoint)."""
    path = os.path.join(workdir, SETTINGS_FILE)
    if not os.path.exists(path):
        raise UserError(f'no trained discriminator in {workdir}: {path} does not exist (run --mode='
                        'train_discriminator with this --workdir first)')
    with open(path) as f:
        settings = json.load(f)
    network_fields = settings['network']
    discriminator = Discriminator(_network(network_fields), settings['features'],
                                  int(network_fields.get('label_dim', 0) or 0))
    shapes = jax.eval_shape(lambda key: discriminator.init(key, tuple(settings['input_shape'])), jax.random.key(0))
    abstract = checkpoint_lib.abstract_like(sampling_item(shapes), mesh_lib.replicated(mesh))
    step, item = checkpoint_lib.restore_latest(workdir, abstract, item='ema')
    return TrainedDiscriminator(discriminator, item['params']['discriminator'], step, settings)


def guidance_settings(sampling):
    """config.sampling.guidance with defaults, or None when it is absent or names no discriminator_workdir."""
    given = sampling.get('guidance')
    if not given:
        return None
    given = dict(given)
    unknown = sorted(set(given) - set(GUIDANCE_FIELDS))
    if unknown:
        raise UserError(f'config.sampling.guidance has no field {unknown[0]}; valid fields: '
                        f'{", ".join(sorted(GUIDANCE_FIELDS))}')
    g = {**GUIDANCE_FIELDS, **given}
    if not g['discriminator_workdir']:
        return None
    if isinstance(g['weight'], bool) or not isinstance(g['weight'], (int, float)):
        raise UserError(f'config.sampling.guidance.weight={g["weight"]!r} must be a number')
    if not 0 <= g['sigma_min'] <= g['sigma_max']:
        raise UserError(f'config.sampling.guidance.sigma_min={g["sigma_min"]!r} and sigma_max={g["sigma_max"]!r} '
                        'must satisfy 0 <= sigma_min <= sigma_max')
    for field in ('first_evaluation_only', 'boosting'):
        if not isinstance(g[field], bool):
            raise UserError(f'config.sampling.guidance.{field}={g[field]!r} must be True or False')
    return g


def guided_sampler(sampling, sampler, g):
    """The sampler guidance runs with: EDM's Heun becomes 'heun_dg' when the guidance asks for the first
    evaluation only or boosting (and the weight is not 0); 'heun_dg' takes them as defaults of its options;
    any other sampler is returned as it is (guided at every evaluation; boosting is Heun's only)."""
    name = getattr(sampler, 'name', sampling.sampler)
    options = dict(sampling.get('sampler_options') or {})
    special = dict(first_evaluation_only=g['first_evaluation_only'], boosting=g['boosting'])
    if name == 'heun_dg':
        return samplers.get('heun_dg', **{**special, **options})
    if name == 'heun' and g['weight'] != 0 and (g['first_evaluation_only'] or g['boosting']):
        unsupported = sorted(k for k in ('afs', 'denoise_to_zero') if options.get(k))
        if unsupported:
            raise UserError(f'config.sampling.sampler_options.{unsupported[0]}: the guided Heun (heun_dg) has no '
                            'such option; set config.sampling.guidance.first_evaluation_only=False to guide '
                            'plain Heun at both evaluations')
        return samplers.get('heun_dg', **{k: v for k, v in options.items() if k not in ('afs', 'denoise_to_zero')},
                            **special)
    if g['boosting']:
        raise UserError(f'config.sampling.guidance.boosting=True needs sampler heun or heun_dg (got {name!r})')
    return sampler


def guidance_from_config(config, mesh, sampler, sigmas):
    """(wrap, sampler) for the Generator: wrap(denoiser, variables, class_labels) -> the guided denoiser of
    config.sampling.guidance, and the sampler to run, which reports info['guidance_calls']; (None, sampler) when
    no discriminator_workdir is set."""
    g = guidance_settings(config.sampling)
    if g is None:
        return None, sampler
    trained = restore(g['discriminator_workdir'], mesh)
    weight, sigma_min, sigma_max = float(g['weight']), float(g['sigma_min']), float(g['sigma_max'])

    def wrap(denoiser, variables, class_labels):
        del variables        # the features come from the denoiser being guided
        return guidance.discriminator_guided(denoiser, trained.logit_fn(denoiser, class_labels), weight=weight,
                                             sigma_min=sigma_min, sigma_max=sigma_max)

    sampler = guided_sampler(config.sampling, sampler, g)
    if getattr(sampler, 'name', None) != 'heun_dg' and getattr(sampler, 'cost', True) is not None:
        # (a sampler that picks its own steps, cost None, is data-dependent: no probe can count for it)
        calls = 0 if weight == 0 else guidance.window_calls(sampler, tuple(config.data.shape), sigmas, sigma_min,
                                                            sigma_max, key=jax.random.key(0))
        sampler = guided.reporting_guidance_calls(sampler, calls)
    return wrap, sampler
