"""Does bf16 training track fp32? Trains the same small digits model twice, precision fp32 and bf16, from the same
initial parameters on the same batches and noise, and writes both loss curves (CSV + PNG).

    .venv/bin/python benchmarks/precision_curves.py --steps=300 --out=benchmarks/results

Model: configs/quickstart.py's DDPM++ shrunk for a shared CPU (--model_channels, one block per level, no
attention; 16x16x1 digits, batch --batch). Each point is the mean training loss over --every steps (the loop's
on-device accumulator, fetched every --every steps). The steps are `jaxdiff.drivers.train_step`'s (augmentation off, EDM
loss, Adam with EDM's ramp, EMA), built by `jaxdiff.bench.speed.train_step` with the precision policy.
"""
import argparse
import csv
import os
import sys
import time

import jax
import numpy as np

from jaxdiff import data as data_lib
from jaxdiff.drivers import mesh as mesh_lib, train_step
from jaxdiff.bench import speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--every', type=int, default=10, help='steps per logged point')
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--model_channels', type=int, default=16)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--precisions', default='fp32,bf16')
    p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results'))
    return p.parse_args(argv)


def curve(config, precision, steps, every, mesh):
    """[(step, mean loss over the last `every` steps)] of `steps` training steps at `precision`."""
    config = config.copy_and_resolve_references()
    config.training.precision = precision
    setup, step = speed.train_step(config, mesh)
    shape, batch_size, seed = tuple(config.data.shape), config.training.batch_size, config.training.seed
    # the same initial parameters for every precision: they are float32 whatever the compute dtype
    state = jax.device_put(train_step.init_state(setup.modules, setup.optimizer, shape, train_step.root_keys(seed)[0]),
                           mesh_lib.replicated(mesh))
    metrics = jax.device_put(train_step.zero_metrics(), mesh_lib.replicated(mesh))
    source = data_lib.build(config.data)
    points, start = [], time.perf_counter()
    for s in range(steps):
        state, metrics = step(state, metrics, mesh_lib.global_batch(source.batch(s, batch_size, seed=seed), mesh))
        if (s + 1) % every == 0:
            fetched = jax.device_get(metrics)
            points.append((s + 1, float(fetched['loss_sum'] / fetched['num_steps'])))
            metrics = jax.device_put(train_step.zero_metrics(), mesh_lib.replicated(mesh))
    print(f'{precision}: {steps} steps in {time.perf_counter() - start:.0f} s, final loss {points[-1][1]:.4f}',
          flush=True)
    return points


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = speed.load_config(os.path.join(ROOT, 'configs', 'quickstart.py'))
    config.model = dict(name='ddpmpp', model_channels=args.model_channels, channel_mult=(1, 2), num_blocks=1,
                        attn_resolutions=(), dropout=0.0, augment_dim=0, label_dim=0)
    config.training.batch_size = args.batch
    config.training.lr = args.lr
    config.training.lr_rampup_images = args.batch * 20
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    precisions = args.precisions.split(',')
    curves = {p: curve(config, p, args.steps, args.every, mesh) for p in precisions}

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, 'precision_curves.csv')
    with open(csv_path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['step'] + [f'loss_{p}' for p in precisions])
        for rows in zip(*(curves[p] for p in precisions)):
            writer.writerow([rows[0][0]] + [f'{loss:.6f}' for _, loss in rows])
    losses = {p: np.array([loss for _, loss in curves[p]]) for p in precisions}
    tail = max(1, len(losses[precisions[0]]) // 3)
    for p in precisions[1:]:
        gap = np.abs(losses[p] - losses[precisions[0]]) / losses[precisions[0]]
        print(f'{p} vs {precisions[0]}: mean |relative loss gap| {gap.mean():.4f} over all points, '
              f'{gap[-tail:].mean():.4f} over the last third; mean loss over the last third '
              f'{losses[p][-tail:].mean():.4f} vs {losses[precisions[0]][-tail:].mean():.4f}')

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for p in precisions:
        steps, values = zip(*curves[p])
        ax.plot(steps, values, label=p)
    ax.set_xlabel('step')
    ax.set_ylabel(f'training loss (mean over {args.every} steps)')
    ax.set_yscale('log')
    ax.set_title(f'digits 16x16, DDPM++ {args.model_channels} ch, batch {args.batch}')
    ax.legend()
    fig.tight_layout()
    png_path = os.path.join(args.out, 'precision_curves.png')
    fig.savefig(png_path, dpi=120)
    print(f'wrote {csv_path} and {png_path}')
    return curves


if __name__ == '__main__':
    main()
