"""Discriminator guidance on exact ground truth (Kim et al. 2023, Theorem 1): data = a 2-D Gaussian mixture, the
"model" = the exact denoiser of a deliberately wrong mixture (other weights, shifted means). The exact log ratio
log p_data,sigma - log p_model,sigma turns the wrong model into the data model (weight 1); a discriminator trained by
`jaxdiff.drivers.discriminator_training.train` on exact samples of the wrong mixture vs the data should approach it.

    .venv/bin/python benchmarks/dg_exact.py                   # ~3 min on 2 busy CPU cores
    .venv/bin/python benchmarks/dg_exact.py --steps=6000 --num_samples=16384

Table 1, learned vs exact log ratio over sigma: at x = x0 + sigma z, x0 half data half model, the RMS error of the
learned log r and the relative error of its gradient sigma^2 grad log r (the guidance term), for the discriminator
trained with independent noise and with AOT-paired noise (the two training runs differ only in the pairing).
Table 2, guided sampling: EDM's Heun from the same x_T on EDM's grid (rho 7, 0.002..80) at NFE 35 and 13, guided at
every evaluation ('heun' on the guided denoiser, SPEC.md's transform) or on the first of each step ('heun_dg', the
authors'), weight 0 / 0.5 / 1 / 2, guidance at every sigma (sigma_min 0); distance of the samples to exact data
samples: sliced Wasserstein (SW, metrics.sliced_wasserstein) and the total variation between the frequencies of the
nearest data components and the data weights (TV; the two mixtures differ mostly in their weights). `floor` is SW
between two independent exact data sample sets of that size.
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.scipy.special import logsumexp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import dg_common  # noqa: E402
from jaxdiff.bench.speed import cpu_name  # noqa: E402
from jaxdiff.core import analytic, guidance, metrics, samplers
from jaxdiff.drivers import discriminator_guidance, discriminator_training as dt, mesh as mesh_lib  # noqa: E402
from jaxdiff.core import schedules  # noqa: E402
from jaxdiff.data import synthetic  # noqa: E402

SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
STEPS_OF_NFE = {35: 18, 13: 7}           # Heun: NFE = 2 N - 1 (at 7 NFE the grid error dominates)


def mixtures():
    """(data, model): 4 components in 2-D; the model has reversed weights and means shifted by ~0.3."""
    means = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2], [0.0, -1.2]])
    shift = np.random.default_rng(0).normal(size=means.shape) * 0.3
    stds = np.array([0.25, 0.25, 0.2, 0.3])
    data = analytic.GaussianMixture(means.astype(np.float32), stds.astype(np.float32),
                                    np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    model = analytic.GaussianMixture((means + shift).astype(np.float32), stds.astype(np.float32),
                                     np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    return data, model


def log_density(mixture, x, sigma):
    """log sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I) (the perturbed mixture), x [B, 2], sigma [B]."""
    var = mixture.stds[None] ** 2 + jnp.reshape(sigma, (-1, 1)) ** 2
    sq = jnp.sum((x[:, None] - mixture.means[None]) ** 2, -1)
    return logsumexp(jnp.log(mixture.weights)[None] - 0.5 * sq / var - jnp.log(2 * jnp.pi * var), axis=1)


def train_discriminator(data, model, pairing, args, workdir):
    config = ml_collections.ConfigDict()
    config.data = dict(name='gmm', shape=(2,))
    config.discriminator = dg_common.discriminator(
        model_workdir=None, network=dict(name='mlp', hidden_dim=128, num_layers=3, embedding_dim=64, sigma_data=1.0),
        pairing=pairing, num_generated=args.num_generated, num_heldout=2048, batch_size=128, num_steps=args.steps,
        lr=args.lr, log_every_steps=max(args.steps // 4, 1), eval_every_steps=args.steps,
        checkpoint_every_steps=args.steps)
    source = synthetic.MixtureSource('data', data)
    generated = np.asarray(model.sample(jax.random.key(11), args.num_generated + 2048))
    rows = lambda points: {'image': points, 'label': np.zeros(len(points), np.int32)}
    heldout = {'real': dt.heldout_real({}, source, 2048), 'generated': rows(generated[args.num_generated:])}
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    start = time.perf_counter()
    dt.train(config, workdir, real_source=source, heldout=heldout, generated=rows(generated[:args.num_generated]),
             mesh=mesh)
    print(f'  {pairing}: {args.steps} steps in {time.perf_counter() - start:.0f} s', flush=True)
    return discriminator_guidance.restore(workdir, mesh).logit_fn(None)


def ratio_table(data, model, logits):
    exact = lambda x, sigma: log_density(data, x, sigma) - log_density(model, x, sigma)
    grad = lambda fn: jax.jit(jax.vmap(jax.grad(lambda x, s: fn(x[None], s[None])[0])))
    exact_grad = grad(exact)
    print('\nTable 1: learned vs exact log ratio (x = x0 + sigma z, x0 half data, half model; 4096 points)')
    header = '| sigma | mean abs exact log r | ' + ' | '.join(
        f'{name}: RMS(log r err) | {name}: rel. err of sigma^2 grad log r' for name in logits) + ' |'
    print(header)
    print('|' + '---|' * (2 + 2 * len(logits)))
    for sigma_value in SIGMAS:
        keys = jax.random.split(jax.random.key(int(sigma_value * 1000) + 1), 3)
        x0 = jnp.concatenate([data.sample(keys[0], 2048), model.sample(keys[1], 2048)])
        sigma = jnp.full((4096,), sigma_value, jnp.float32)
        x = x0 + sigma_value * jax.random.normal(keys[2], x0.shape)
        truth, truth_grad = exact(x, sigma), exact_grad(x, sigma)
        cells = [f'{sigma_value:g}', f'{float(jnp.mean(jnp.abs(truth))):.3f}']
        for fn in logits.values():
            rms = float(jnp.sqrt(jnp.mean((fn(x, sigma) - truth) ** 2)))
            g = grad(fn)(x, sigma)
            rel = float(jnp.linalg.norm(g - truth_grad) / jnp.linalg.norm(truth_grad))
            cells += [f'{rms:.3f}', f'{rel:.3f}']
        print('| ' + ' | '.join(cells) + ' |', flush=True)
    return exact


def sampling_table(data, model, ratios, args):
    n = args.num_samples
    key = jax.random.key(5)
    reference = data.sample(jax.random.fold_in(key, 1), n)
    floor = float(metrics.sliced_wasserstein(data.sample(jax.random.fold_in(key, 2), n), reference,
                                             jax.random.key(0), 256))
    x_T_unit = jax.random.normal(jax.random.fold_in(key, 3), (n, 2))

    def tv(samples):
        nearest = jnp.argmin(jnp.sum((samples[:, None] - data.means[None]) ** 2, -1), axis=1)
        frequencies = jnp.bincount(nearest, length=data.means.shape[0]) / samples.shape[0]
        return float(0.5 * jnp.sum(jnp.abs(frequencies - data.weights)))

    print(f'\nTable 2: guided Heun samples vs exact data samples ({n} each; SW floor {floor:.4f}); cells SW / TV')
    print('| log ratio | sampler | NFE | grad calls | ' + ' | '.join(f'w = {w:g}' for w in WEIGHTS) + ' |')
    print('|' + '---|' * (4 + len(WEIGHTS)))
    for name, logit_fn in ratios.items():
        for sampler_name in ('heun', 'heun_dg'):
            for nfe, num_steps in STEPS_OF_NFE.items():
                sigmas = schedules.get('edm', num_steps=num_steps, sigma_min=0.002, sigma_max=80.0)
                sampler = samplers.get(sampler_name)

                @jax.jit
                def run(weight):
                    guided = guidance.discriminator_guided(model.denoiser, logit_fn, weight=weight)
                    x0, info = sampler(guided, sigmas[0] * x_T_unit, sigmas)
                    return x0, info['gradient_evaluations']

                cells = []
                for weight in WEIGHTS:
                    samples, calls = run(jnp.float32(weight))     # a traced weight: every call evaluates a gradient
                    sw = float(metrics.sliced_wasserstein(samples, reference, jax.random.key(0), 256))
                    cells.append(f'{sw:.4f} / {tv(samples):.3f}')
                print(f'| {name} | {sampler_name} | {nfe} | {int(calls)} | ' + ' | '.join(cells) + ' |', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=3000, help='discriminator training steps (batch 128)')
    parser.add_argument('--lr', type=float, default=1e-3, help="Adam lr (the authors' 3e-4 needs more steps)")
    parser.add_argument('--num_generated', type=int, default=20000, help='model samples trained on')
    parser.add_argument('--num_samples', type=int, default=8192, help='guided samples per table cell')
    args = parser.parse_args()
    print(f'dg_exact: {cpu_name()}, load average {os.getloadavg()[0]:.1f}, JAX {jax.__version__}; {vars(args)}')
    data, model = mixtures()
    print('training the discriminators (jaxdiff.drivers.discriminator_training.train, VP importance-sampled sigma):')
    logits = {}
    with tempfile.TemporaryDirectory() as root:
        for pairing in ('independent', 'aot'):
            logits[pairing] = train_discriminator(data, model, pairing, args, os.path.join(root, pairing))
    exact = ratio_table(data, model, logits)
    sampling_table(data, model, {'exact': exact, **{f'learned ({k})': v for k, v in logits.items()}}, args)


if __name__ == '__main__':
    main()
