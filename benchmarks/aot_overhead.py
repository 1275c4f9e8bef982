"""What AOT's pairing costs: `coupling.assign` time vs pool size P, and its share of a CIFAR-10 training step.

    .venv/bin/python benchmarks/aot_overhead.py                          # P = 512, 2048; CIFAR shapes (32x32x3)
    .venv/bin/python benchmarks/aot_overhead.py --pools=512 --repeats=5 --skip=hungarian

For each P: the cost matrix alone (XLA, Euclidean, P x P x 3072 matmul); scipy's linear_sum_assignment alone on
that matrix (the part that stays on the host when the device computes the cost matrix); then the whole
`coupling.assign` (cost matrix + assignment, jitted, median over --repeats) for the exact solvers (scipy on the host
through jax.pure_callback; optax's Hungarian in the compiled program), Sinkhorn (ott-jax, epsilon 0.05 x cost std,
greedy rounding) and the per-class exact assignment with 10 classes (the conditional recipe); plus each method's
share of the independent-to-optimal cost gap that it closes. Images are uniform in [-1, 1], noise N(0, I).

Share of a step: the pool is reused for P / B optimizer steps (the authors' recipe), so one step pays
assign(P) * B / P. The step time at batch 256 is --step_seconds, or by default the quiet-machine CPU figure of
benchmarks/RESULTS.md (DDPM++ 55.7M, fp32, 16.25 s at batch 16) scaled linearly to batch 256; EDM's H100 rates from
the same file (355 / 960 / 1647 img/s for fp32 / tf32 / bf16) give the shares against a GPU step, where the scipy
assignment runs on the host CPU and can overlap the device step.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxdiff.bench.speed import cpu_name, median_time
from jaxdiff.core import coupling

SHAPE = (32, 32, 3)
BATCH = 256
CPU_STEP_AT_16 = 16.25                     # s, benchmarks/RESULTS.md, throughput.py --batch=16 on a quiet machine
EDM_H100_IMAGES_PER_S = {'H100 fp32 (EDM)': 355.0, 'H100 tf32 (EDM)': 960.0, 'H100 bf16 (EDM)': 1647.0}


def gap_closed(C, perm, best):
    """(independent - got) / (independent - optimum) for the float64 cost matrix C."""
    got = C[np.arange(len(C)), np.asarray(perm)].sum()
    independent = np.trace(C)
    return (independent - got) / (independent - best)


def measure(pool_size, repeats, skip, num_classes):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (pool_size,) + SHAPE), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(pool_size,) + SHAPE), jnp.float32)
    labels = jnp.asarray(rng.integers(0, num_classes, pool_size), jnp.int32)
    rows = {}
    cost = jax.jit(lambda x, z: coupling.cost_matrix(x, z, 'euclidean'))
    rows['cost matrix only (XLA)'] = median_time(cost, images, noise, repeats=repeats)
    C = np.asarray(cost(images, noise), np.float64)
    rows['scipy LSA only (host, given C)'] = median_time(linear_sum_assignment, C, repeats=repeats)
    classes = [np.flatnonzero(np.asarray(labels) == k) for k in range(num_classes)]
    per_class_lsa = lambda: [linear_sum_assignment(C[np.ix_(idx, idx)]) for idx in classes]
    rows[f'scipy LSA only, {num_classes} classes'] = median_time(per_class_lsa, repeats=repeats)
    forms = {'exact, scipy (host callback)': dict(method='exact', exact_solver='scipy'),
             'exact, optax hungarian (device)': dict(method='exact', exact_solver='hungarian'),
             'sinkhorn (ott), greedy rounding': dict(method='sinkhorn'),
             f'exact, scipy, {num_classes} classes': dict(method='exact', exact_solver='scipy', per_class=True)}
    perms = {}
    for name, options in forms.items():
        if 'hungarian' in name and 'hungarian' in skip or 'sinkhorn' in name and 'sinkhorn' in skip:
            continue
        per_class = options.pop('per_class', False)
        fn = jax.jit(lambda x, z, l, o=options, c=per_class: coupling.assign(x, z, labels=l if c else None, **o))
        rows[name] = median_time(fn, images, noise, labels, repeats=repeats)
        perms[name] = fn(images, noise, labels)
    best = C[np.arange(pool_size), np.asarray(perms['exact, scipy (host callback)'])].sum()
    quality = {name.split(' (')[0]: gap_closed(C, perm, best) for name, perm in perms.items() if 'classes' not in name}
    return rows, quality


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--pools', default='512,2048')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--num_classes', type=int, default=10)
    parser.add_argument('--skip', default='', help='comma list: hungarian, sinkhorn')
    parser.add_argument('--step_seconds', type=float, default=None,
                        help=f'training step at batch {BATCH}; default: RESULTS.md CPU figure scaled linearly')
    parser.add_argument('--json', default=None, help='append one JSON line with every figure to this file')
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(',')))
    step_seconds = args.step_seconds or CPU_STEP_AT_16 * BATCH / 16
    steps = {('this machine (given)' if args.step_seconds else 'CPU, RESULTS.md x 16 (linear)'): step_seconds}
    steps.update({name: BATCH / rate for name, rate in EDM_H100_IMAGES_PER_S.items()})
    load_start = os.getloadavg()
    print(f'CPU: {cpu_name()}, {os.cpu_count()} cores, JAX {jax.__version__} ({jax.devices()[0].platform}), '
          f'load average {load_start[0]:.1f} at the start; images {SHAPE}, batch {BATCH}')
    print('step times at batch 256: ' + ', '.join(f'{name} {seconds:.3f} s' for name, seconds in steps.items()))
    record = {'cpu': cpu_name(), 'cores': os.cpu_count(), 'jax': jax.__version__, 'load_start': load_start,
              'date': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'batch': BATCH, 'step_seconds': steps, 'pools': {}}
    header = f'{"P":>5}  {"what":34} {"s per pool":>10} {"per step":>9}  ' + '  '.join(
        f'{name[:18]:>18}' for name in steps)
    print('\nshare of a step = assign(P) * B / P / step time (pool reused for P/B steps)\n' + header)
    for pool_size in (int(p) for p in args.pools.split(',')):
        rows, quality = measure(pool_size, args.repeats, skip, args.num_classes)
        for name, seconds in rows.items():
            per_step = seconds * BATCH / pool_size
            shares = '  '.join(f'{100 * per_step / s:17.2f}%' for s in steps.values())
            print(f'{pool_size:5d}  {name:34} {seconds:10.4f} {per_step:9.4f}  {shares}', flush=True)
        print('       gap closed (independent -> optimum): '
              + ', '.join(f'{name} {value:.4f}' for name, value in quality.items()))
        record['pools'][pool_size] = {'seconds': rows, 'gap_closed': quality}
    record['load_end'] = os.getloadavg()
    print(f'\nload average {record["load_end"][0]:.1f} at the end (2 shared cores: figures are noisy when it is > 2)')
    if args.json:
        with open(args.json, 'a') as f:
            f.write(json.dumps(record) + '\n')


if __name__ == '__main__':
    main()
