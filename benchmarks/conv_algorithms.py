"""One 3x3 convolution layer at a time: Winograd (models/winograd.py) against XLA's convolution, forward and
both gradients, at the layer shapes of EDM's DDPM++ CIFAR-10 network.

    .venv/bin/python benchmarks/conv_algorithms.py
    git show 8568c80:jaxdiff/models/winograd.py > /tmp/stacked.py
    .venv/bin/python benchmarks/conv_algorithms.py --extra=stacked=/tmp/stacked.py    # + another implementation

Prints ms per call (the median of --repeats timed calls after a warm-up, each ended by block_until_ready) and the
CPU model. `--extra=NAME=FILE` adds a column for any module file that defines conv3x3(x, w, padding) (e.g. an
earlier winograd.py). The network-level figures are benchmarks/throughput.py's; this isolates one layer.
"""
import argparse
import importlib.util

import jax
import jax.numpy as jnp

from jaxdiff.bench.speed import cpu_name, median_time
from jaxdiff.models import winograd

# (height = width, C_in, C_out) of DDPM++ CIFAR-10's 3x3 layers (channels 128 x (2, 2, 2); decoder inputs concatenated)
SHAPES = ((32, 256, 256), (32, 128, 256), (32, 512, 256), (16, 256, 256), (16, 512, 256), (8, 256, 256))


def xla_conv3x3(x, w, padding=1):
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def load_conv(path):
    spec = importlib.util.spec_from_file_location('extra_conv', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.conv3x3


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--extra', action='append', default=[], help='NAME=FILE: another conv3x3 implementation')
    args = p.parse_args()
    convs = {'winograd': winograd.conv3x3, 'xla': xla_conv3x3}
    for item in args.extra:
        name, _, path = item.partition('=')
        convs[name] = load_conv(path)
    print(f'{cpu_name()}; jax {jax.__version__}; batch {args.batch}; ms per call, forward / both gradients (input and kernel)')
    print('| layer | ' + ' | '.join(convs) + ' |')
    print('|---|' + '---|' * len(convs))
    for size, c_in, c_out in SHAPES:
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (args.batch, size, size, c_in), jnp.float32)
        w = jax.random.normal(keys[1], (3, 3, c_in, c_out), jnp.float32) / (3 * c_in ** 0.5)
        dy = jax.random.normal(keys[2], (args.batch, size, size, c_out), jnp.float32)
        cells = []
        for conv in convs.values():
            forward = jax.jit(lambda x, w, conv=conv: conv(x, w, 1))
            backward = jax.jit(lambda x, w, dy, conv=conv: jax.vjp(lambda x, w: conv(x, w, 1), x, w)[1](dy))
            cells.append(f'{1e3 * median_time(forward, x, w, repeats=args.repeats):.1f} / '
                         f'{1e3 * median_time(backward, x, w, dy, repeats=args.repeats):.1f}')
        print(f'| {size}x{size}, {c_in} -> {c_out} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
