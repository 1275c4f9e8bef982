"""AOT: noise paired with images by an optimal-transport assignment over a pool, as a pairing of the Loss
(config.loss.pairing='aot'; jaxdiff.core.losses).

Kim, Choi, Shin, Hwang, Yoon, "Improving Diffusion-Based Generative Models via Approximated Optimal Transport"
(2024, arXiv:2403.05069), as the authors' EDM fork trains: a pool of P images passes through EDM's augmentation,
P unit Gaussian noises z are drawn, and the assignment minimising sum_i ||y_i - z_perm(i)|| (Euclidean, flattened,
before any sigma scaling; `jaxdiff.core.coupling.assign`) pairs them; the pool is then consumed in consecutive chunks of
the batch size B, each pair used once, and only then is sigma drawn per sample. The loss itself is EDM's (or any
parameterization / target): x = y + sigma z_perm.

    pool k     data rows [k P, (k + 1) P) of stream 0: exactly the minibatches of steps k P/B, ..., (k + 1) P/B - 1,
               so a finite data set is read in the order of a run without AOT (synthetic sets draw the pool fresh)
    refresh    y = augment(pool), z ~ N(0, I) [P, ...], perm = assign(y, z[, per class]): once per pool, keyed by
               fold_in(refresh key, k), on all P images of all devices (one global assignment; the authors solve one
               per GPU), so a run resumed in the middle of a pool rebuilds the same pool bit for bit
    step s     minibatch = chunk s mod (P/B) of (y, labels, augment labels, z_perm); the pairing returns its noise

Options (config.loss; `aot_pairing`): pool_size P (a multiple of training.batch_size; None = B), pool_reuse
(True: P/B steps per pool, the authors' schedule; False: a fresh pool every step: the minibatch plus P - B other
images of data stream 2, augmented alike, of which only the minibatch's pairs are trained on), coupling_method
('exact' | 'sinkhorn'), coupling_cost ('euclidean', the paper's | 'sqeuclidean'), coupling_solver (exact: 'scipy'
on the host | 'hungarian' on the device), coupling_epsilon (Sinkhorn, relative to the cost scale), per_class (one
assignment per class label inside the pool, so noise never pairs across classes: what the authors do for a
class-conditional model; set it together with model.label_dim).

Unlike the authors' code: augmentation off works (the images are paired unaugmented), P must be a multiple of B
(no pool image is dropped), and the pool is rebuilt exactly on resume. Pure: jax, jaxdiff.core.coupling and the
losses' Rows / Hooks.
"""
import jax
import jax.numpy as jnp

from jaxdiff.core import coupling, losses
from jaxdiff.core.errors import UserError

POOL = 'pool'                  # Rows name of the reused pool (period P/B)
POOL_EXTRA = 'pool_extra'      # Rows name of the P - B other images of a fresh per-step pool
EXTRA_STREAM = 2               # data stream of those (stream 1 is STF's reference)
PAIRED = 'aot_'                # prefix of the refreshed pool's arrays in the batch (aot_image, aot_noise, ...)


def pair_pool(key, images, labels, *, augment=None, method='exact', cost='euclidean', per_class=False,
              **assign_options):
    """The pool's pairs: {'image': augmented images y [P, ...], 'label': labels [P], 'noise': z_perm [P, ...] (the
    unit noise paired with each image), 'perm': int32 [P] (z_perm = z[perm]), 'augment_labels': [P, 9] (only with
    `augment`)}. augment: (key, images) -> (images, augment_labels) or None (no augmentation)."""
    augment_key, noise_key = jax.random.split(key)
    out = {'label': labels}
    if augment is not None:
        images, out['augment_labels'] = augment(augment_key, images)
    z = jax.random.normal(noise_key, images.shape, images.dtype)
    perm = coupling.assign(images, z, method=method, cost=cost, labels=labels if per_class else None,
                           **assign_options)
    return {**out, 'image': images, 'noise': z[perm], 'perm': perm}


def aot_noise(key, y, batch, params, networks):
    """The pairing: the noise that the minibatch hook paired with each image (batch['noise']), no penalty."""
    del key, params, networks
    if 'noise' not in batch:
        raise ValueError("loss.pairing='aot' reads batch['noise'], which its minibatch hook provides; prepare the "
                         'batch with Loss.prepare')
    return batch['noise'].astype(y.dtype), 0.0, {}


def aot_pairing(*, pool_size=None, pool_reuse=True, coupling_method='exact', coupling_cost='euclidean',
                coupling_solver='scipy', coupling_epsilon=0.05, per_class=False):
    """AOT's pairing and its hooks (see the module docstring). pool_size None = the batch size."""
    for field, value, valid in (('coupling_method', coupling_method, coupling.METHODS),
                                ('coupling_cost', coupling_cost, coupling.COSTS),
                                ('coupling_solver', coupling_solver, coupling.EXACT_SOLVERS)):
        if value not in valid:
            raise UserError(f'config.loss.{field}={value!r}; valid choices: {", ".join(valid)}')
    if not isinstance(per_class, bool) or not isinstance(pool_reuse, bool):
        raise UserError(f'config.loss.per_class={per_class!r} and config.loss.pool_reuse={pool_reuse!r} must be '
                        'True or False')
    options = dict(method=coupling_method, cost=coupling_cost, per_class=per_class, exact_solver=coupling_solver,
                   epsilon=coupling_epsilon)

    def size_of(batch_size):
        return batch_size if pool_size is None else pool_size

    def period_of(batch_size):
        return size_of(batch_size) // batch_size if pool_reuse else 1

    def check(batch_size, num_devices, parallelism, host_callbacks_in_step):
        P = size_of(batch_size)
        if isinstance(P, bool) or not isinstance(P, int) or P < batch_size or P % batch_size:
            raise UserError(f'config.loss.pool_size={pool_size!r} must be a multiple of training.batch_size='
                            f'{batch_size} (AOT consumes the pool in whole minibatches)')
        if parallelism != 'jit':
            raise UserError(f"config.loss.pool_size={pool_size!r}: loss.pairing='aot' needs training.parallelism="
                            f"'jit' (one global pool; got {parallelism!r})")
        if period_of(batch_size) == 1 and coupling_method == 'exact' and coupling_solver == 'scipy' \
                and not host_callbacks_in_step:
            # scipy's assignment is a host callback inside the sharded step, which this placement cannot run
            raise UserError("config.loss.coupling_solver='scipy' pairs inside the training step when each pool "
                            f'serves one step, which cannot run on these {num_devices} devices; use '
                            "coupling_solver='hungarian', pool_reuse=True with pool_size > batch_size, or one device")

    def rows(batch_size):
        P, period = size_of(batch_size), period_of(batch_size)
        if period > 1:
            return (losses.Rows(POOL, P, stream=0, period=period),)
        return (losses.Rows(POOL_EXTRA, P - batch_size, stream=EXTRA_STREAM),) if P > batch_size else ()

    def refresh(fetched, key, augment):
        pairs = pair_pool(key, fetched[POOL], fetched[POOL + '_label'], augment=augment, **options)
        return {PAIRED + name: value for name, value in pairs.items()}

    def minibatch(batch, key, augment, step):
        B = batch['image'].shape[0]
        rest = {name: value for name, value in batch.items()
                if not (name.startswith(PAIRED) or name.startswith(POOL_EXTRA))}
        if PAIRED + 'image' in batch:            # a reused pool: chunk step mod (P / B)
            period = batch[PAIRED + 'image'].shape[0] // B
            start = (jnp.asarray(step) % period) * B
            chunk = lambda x: jax.lax.dynamic_slice_in_dim(x, start, B)
            names = [n for n in ('image', 'label', 'noise', 'augment_labels') if PAIRED + n in batch]
            return {**rest, **{n: chunk(batch[PAIRED + n]) for n in names}}
        images, labels = batch['image'], batch['label']
        if POOL_EXTRA in batch:                  # a fresh pool: the minibatch first, then P - B others
            images = jnp.concatenate([images, batch[POOL_EXTRA]])
            labels = jnp.concatenate([labels, batch[POOL_EXTRA + '_label']])
        pairs = pair_pool(key, images, labels, augment=augment, **options)
        del pairs['perm']
        return {**rest, **{name: value[:B] for name, value in pairs.items()}}

    return aot_noise, losses.Hooks(rows=rows, refresh=refresh, minibatch=minibatch, check=check)
