"""Discriminator guidance on trained models: does guiding a trained model with a discriminator trained on its own
samples bring its samples closer to the data, and does AOT pairing in the discriminator's training help?

    .venv/bin/python benchmarks/dg_trained.py                               # toy2d (~9 min on 2 busy CPU cores)
    .venv/bin/python benchmarks/dg_trained.py --problems=toy2d,digits       # + digits (much longer on a CPU)

Per problem, everything runs through the library's entry points, as the commands of configs/toy2d_dg.py do:
  model          `modes.train.run` on the recipe (toy2d: configs/toy2d_dg.py = toy2d_edm's MLP, trained for 300
                 steps (visibly imperfect) and for 2000 steps (close to the data) of batch 256; digits:
                 configs/quickstart.py's small DDPM++, --digits_steps of batch 32)
  discriminator  `modes.train_discriminator.run` twice on the same generated samples (the first run writes them,
                 the second reads them): independent noise and AOT-paired noise ('aot'), nothing else different;
                 toy2d: the MLP discriminator on x; digits: the head on the frozen model's 8x8 bottleneck
  sampling       `generate.Generator` with config.sampling.guidance, from the same x_T for every row: EDM's Heun
                 on EDM's grid at NFE 35 (18 steps) and 13 (7 steps); guided rows use the authors' sampler
                 (heun_dg: first evaluation of each step, sigma >= 0.0447) at w = 2, plain Heun guided at both
                 evaluations at w = 1, and heun_dg with the guidance window closed above sigma = 1 (the sigma^2 in
                 D + w sigma^2 grad log r turns a small spurious gradient of a nearly-chance logit at large sigma
                 into a large drift)
  distance       toy2d: sliced Wasserstein (SW) to exact samples of the mixture and the fraction of samples more
                 than 4 mode stds from every mode (off); digits: digits FD (jaxdiff.drivers.digits_metric) against the
                 training digits, with its floor (the 297 held-out digits)
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import dg_common, quickstart  # noqa: E402
from jaxdiff.bench.speed import cpu_name  # noqa: E402
from jaxdiff.drivers import config_files, discriminator_training as dt, generate, sampling, trained as trained_lib, mesh as mesh_lib
from jaxdiff import data
from jaxdiff.core import metrics  # noqa: E402
from jaxdiff.modes import train as train_mode, train_discriminator  # noqa: E402

STEPS_OF_NFE = {35: 18, 13: 7}
ROWS = (   # label, discriminator pairing, weight, first evaluation only, sigma_max
    ('unguided', None, None, None, None),
    ('DG independent, heun_dg w=2', 'independent', 2.0, True, float('inf')),
    ('DG aot, heun_dg w=2', 'aot', 2.0, True, float('inf')),
    ('DG independent, heun w=1', 'independent', 1.0, False, float('inf')),
    ('DG aot, heun w=1', 'aot', 1.0, False, float('inf')),
    ('DG independent, heun_dg w=2, sigma <= 1', 'independent', 2.0, True, 1.0),
    ('DG aot, heun_dg w=2, sigma <= 1', 'aot', 2.0, True, 1.0))


def toy2d_config(args, steps):
    return config_files.named('toy2d_dg', **{
        'training.total_images': 256 * steps, 'training.sample_every_steps': 0,
        'training.checkpoint_every_steps': steps, 'training.log_every_steps': max(steps // 4, 1),
        'sampling.num_samples': args.num_samples, 'sampling.batch_size': 2048,
        'discriminator.num_steps': args.discriminator_steps, 'discriminator.lr': args.lr,
        'discriminator.log_every_steps': max(args.discriminator_steps // 4, 1),
        'discriminator.eval_every_steps': args.discriminator_steps,
        'discriminator.checkpoint_every_steps': args.discriminator_steps})


def digits_config(args, steps):
    config = quickstart.get_config()
    config.training.sample_every_steps = 0
    config.training.total_images = config.training.batch_size * steps
    config.training.checkpoint_every_steps = steps
    config.sampling.num_samples = args.num_samples
    config.sampling.batch_size = 250
    return dg_common.add(config, discriminator_fields=dict(
        model_workdir=None, network=dict(name='head', model_channels=32, num_blocks=1, num_heads=1),
        features='bottleneck', num_generated=args.digits_generated, num_heldout=297, num_steps=args.discriminator_steps,
        lr=args.lr, log_every_steps=max(args.discriminator_steps // 4, 1),
        eval_every_steps=args.discriminator_steps, checkpoint_every_steps=args.discriminator_steps))


class Toy2dDistance:
    def __init__(self, config, n):
        self.mixture = data.build(config.data).mixture
        self.truth = self.mixture.sample(jax.random.key(123), n)
        self.floor = float(metrics.sliced_wasserstein(self.mixture.sample(jax.random.key(124), n), self.truth,
                                                      jax.random.key(0), 256))
        self.header = f'SW (floor {self.floor:.4f}) / off'

    def __call__(self, samples):
        sw = float(metrics.sliced_wasserstein(jnp.asarray(samples), self.truth, jax.random.key(0), 256))
        distance = jnp.min(jnp.linalg.norm(samples[:, None] - self.mixture.means[None], axis=-1), axis=1)
        off = float(jnp.mean(distance > 4 * self.mixture.stds[0]))
        return f'{sw:.4f} / {off:.4f}'


class DigitsDistance:
    def __init__(self, config, n):
        from jaxdiff.drivers import digits_metric
        self.metric = digits_metric.get(resolution=config.data.shape[0])
        self.header = f'digits FD (floor {self.metric.data_fd:.3f})'

    def __call__(self, samples):
        return f'{self.metric.fd(samples):.3f}'


def run_problem(name, config, distance_cls, args, root):
    model_dir, start = os.path.join(root, f'{name}_model'), time.perf_counter()
    train_mode.run(config, model_dir)
    print(f'[{name}] model trained in {time.perf_counter() - start:.0f} s', flush=True)
    with config.unlocked():
        config.discriminator.model_workdir = model_dir
    disc_dirs = {}
    for pairing in ('independent', 'aot'):
        disc_dirs[pairing] = os.path.join(root, f'{name}_disc_{pairing}')
        with config.unlocked():
            config.discriminator.pairing = pairing
            if pairing == 'aot':       # the same generated samples as the independent run
                config.discriminator.generated_path = os.path.join(disc_dirs['independent'], dt.GENERATED_FILE)
        start = time.perf_counter()
        train_discriminator.run(config, disc_dirs[pairing])
        print(f'[{name}] discriminator ({pairing}) trained in {time.perf_counter() - start:.0f} s', flush=True)

    mesh = mesh_lib.make_mesh()
    trained = trained_lib.restore(config, model_dir, mesh)
    distance = distance_cls(config, args.num_samples)
    print(f'\n[{name}] {args.num_samples} samples per cell, same x_T per column; {distance.header}')
    print('| sampler / guidance | ' + ' | '.join(f'NFE {nfe}' for nfe in STEPS_OF_NFE) + ' | gradient calls |')
    print('|' + '---|' * (len(STEPS_OF_NFE) + 2))
    for label, pairing, weight, first_only, sigma_max in ROWS:
        cells, calls = [], []
        for nfe, num_steps in STEPS_OF_NFE.items():
            row = config.copy_and_resolve_references()
            with row.unlocked():
                row.sampling.schedule_options.num_steps = num_steps
                row.sampling.guidance.discriminator_workdir = disc_dirs[pairing] if pairing else None
                row.sampling.guidance.weight = weight or 0.0
                row.sampling.guidance.first_evaluation_only = bool(first_only)
                row.sampling.guidance.sigma_max = sigma_max or float('inf')
            generator = sampling.generator(row, mesh, trained.denoiser_fn)
            samples = generator(trained.variables, args.num_samples)
            assert generator.nfe == nfe, (generator.nfe, nfe)
            cells.append(distance(samples))
            calls.append(str(generator.info.get('gradient_evaluations', 0)))
        print(f'| {label} | ' + ' | '.join(cells) + f' | {" / ".join(calls)} |', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--problems', default='toy2d', help='comma-separated: toy2d, digits')
    parser.add_argument('--toy2d_steps', default='300,2000', help='toy2d model training steps (batch 256), a list')
    parser.add_argument('--digits_steps', default='1500', help="digits model steps (quickstart's 1500), a list")
    parser.add_argument('--digits_generated', type=int, default=3000, help='digits samples the discriminator trains on')
    parser.add_argument('--discriminator_steps', type=int, default=3000, help='discriminator steps (batch 128)')
    parser.add_argument('--lr', type=float, default=1e-3, help="discriminator Adam lr (configs/toy2d_dg.py's)")
    parser.add_argument('--num_samples', type=int, default=8192)
    parser.add_argument('--workdir', default=None, help='keep the models here (default: a temporary directory)')
    args = parser.parse_args()
    print(f'dg_trained: {cpu_name()}, load average {os.getloadavg()[0]:.1f}, JAX {jax.__version__}, '
          f'{len(jax.devices())} device(s); {vars(args)}', flush=True)
    problems = {'toy2d': (toy2d_config, Toy2dDistance, args.toy2d_steps),
                'digits': (digits_config, DigitsDistance, args.digits_steps)}
    with tempfile.TemporaryDirectory() as temporary:
        root = args.workdir or temporary
        for name in args.problems.split(','):
            make_config, distance_cls, budgets = problems[name]
            for steps in map(int, budgets.split(',')):
                run_problem(f'{name}_{steps}', make_config(args, steps), distance_cls, args, root)


if __name__ == '__main__':
    main()
