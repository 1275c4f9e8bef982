"""Training and sampling throughput, FLOPs and memory of jaxdiff's real training step and Heun sampler.

    .venv/bin/python benchmarks/throughput.py --config=configs/cifar_edm.py --batch=16 --steps=3
    python benchmarks/throughput.py --config=configs/cifar_edm.py --precision=bf16 --batch=512      # accelerator
    .venv/bin/python benchmarks/throughput.py --config=configs/cifar_edm.py --accounting_only      # XLA only

Measures, on random data (as EDM's measurement in issue 7) and the devices of the default backend:
  train     `jaxdiff.train_step`'s jitted step (augmentation, EDM loss, grads, Adam, EMA; state donated), compiled once
            ahead of time; `--warmup` steps, then `--steps` timed steps ended by block_until_ready:
            train images/s, step time, FLOPs/step and per image from the compiled step's cost_analysis(), MFU on
            an accelerator (FLOPs/s over the device's peak for the precision, `--peak_tflops` overrides).
  forward   one jitted denoiser call D(x, sigma) (eval mode) at the sampling batch: forward images/s (EDM's CPU
            sampling column) and forward FLOPs per image.
  sample    the full Heun run of config.sampling (18 steps: 35 NFE), one compiled lax.scan, timed after a
            warm-up run: sampling images/s.
  accounting  the training step compiled on abstract inputs (jax.ShapeDtypeStruct; nothing runs) at
            `--accounting_batch` (default 512): FLOPs per image against EDM's 3 x 42.4 GFLOP and the compiled
            memory (arguments + outputs - aliased (donated) + temporaries).
CPU time: on a CPU the JSON line also holds the process CPU seconds per step / forward call (all threads), a
load-insensitive cost: on an otherwise idle machine with n cores the wall time is at least CPU time / n.
Peak memory: the device's peak_bytes_in_use where the backend reports it (GPU / TPU), else the process's peak RSS.
Prints a summary and appends one JSON line to `--out` (a .jsonl file, or a directory that gets throughput.jsonl;
default $OUT, else benchmarks/results). XLA:CPU runs one thread per schedulable core (2 on the dev machine, as
EDM's 2-thread torch measurement); `taskset -c 0,1` pins fewer cores.
"""
import argparse
import ast
import datetime
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import config_files, losses, mesh as mesh_lib, precision as precision_lib, samplers, schedules, train_step
from jaxdiff.denoiser import Denoiser

EDM_FORWARD_GFLOP = 42.4              # EDM's DDPM++ CIFAR-10 forward pass per image (issue 7; 2 FLOPs per MAC)
EDM_TRAIN_GFLOP = 3 * EDM_FORWARD_GFLOP
# Dense peak TFLOP/s per device by precision (vendor specs, SXM parts); MFU uses these unless --peak_tflops.
PEAK_TFLOPS = {
    'H100': {'fp32': 66.9, 'tf32': 494.7, 'bf16': 989.4},
    'H200': {'fp32': 66.9, 'tf32': 494.7, 'bf16': 989.4},
    'A100': {'fp32': 19.5, 'tf32': 156.0, 'bf16': 312.0},
}
GIB = 2 ** 30


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', required=True, help='a configs/*.py file')
    p.add_argument('--precision', default=None, choices=sorted(precision_lib.POLICIES),
                   help='overrides config.training.precision (default: the config\'s, else fp32)')
    p.add_argument('--batch', type=int, default=None, help='training batch (default: config.training.batch_size)')
    p.add_argument('--sample_batch', type=int, default=None, help='sampling batch (default: --batch)')
    p.add_argument('--sample_steps', type=int, default=None,
                   help='Heun grid steps (default: config.sampling.num_steps; 18 = 35 NFE)')
    p.add_argument('--warmup', type=int, default=2, help='untimed training steps after compilation')
    p.add_argument('--steps', type=int, default=10, help='timed training steps')
    p.add_argument('--forward_repeats', type=int, default=3, help='timed forward calls')
    p.add_argument('--sample_repeats', type=int, default=1, help='timed full sampling runs')
    p.add_argument('--devices', type=int, default=None, help='use the first N devices (default: all)')
    p.add_argument('--skip', default='', help='comma list of parts to skip: train,forward,sample,accounting')
    p.add_argument('--accounting_only', action='store_true', help='only the abstract compile (skip the rest)')
    p.add_argument('--accounting_batch', type=int, default=512)
    p.add_argument('--remat', action='store_true',
                   help='network under jax.checkpoint(dots_saveable): recompute elementwise ops in the backward')
    p.add_argument('--peak_tflops', type=float, default=None, help='device peak for MFU (default: table)')
    p.add_argument('--label', default='', help='free text stored with the result (e.g. the machine load)')
    p.add_argument('--out', default=None, help='results .jsonl file or directory (default $OUT or benchmarks/results)')
    p.add_argument('--override', action='append', default=[],
                   help='config override SECTION.FIELD=PYTHON_LITERAL, repeatable (e.g. model.num_blocks=1)')
    return p.parse_args(argv)


def load_config(path, overrides=()):
    """The config file with `--set FIELD=VALUE` overrides; VALUE a Python literal (1, (1, 2), 'bf16') or a string."""
    parsed = {}
    for item in overrides:
        field, _, value = item.partition('=')
        try:
            parsed[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[field] = value  # a bare string
    return config_files.load(path, parsed)


def results_path(out):
    out = out or os.environ.get('OUT') or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
    if out.endswith('.jsonl'):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        return out
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, 'throughput.jsonl')


# ---------------------------------------------------------------- inputs

def random_batch(key, batch_size, shape, mesh):
    """A device batch in jaxdiff's data convention (images in [-1, 1], int32 labels), sharded over 'data'."""
    image = jax.random.uniform(key, (batch_size, *shape), jnp.float32, -1.0, 1.0)
    local = {'image': np.asarray(image), 'label': np.zeros((batch_size,), np.int32)}
    return mesh_lib.global_batch(local, mesh)


def abstract_batch(batch_size, shape, mesh):
    sharding = mesh_lib.batch_sharding(mesh)
    return {'image': jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32, sharding=sharding),
            'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)}


def build_step(config, mesh, remat=False):
    """(setup, jitted step, policy) of jaxdiff.train_step for `config` (build applies config.training.precision).

    remat: the network under jax.checkpoint(policy=dots_saveable): the backward pass keeps only conv / matmul
    outputs and recomputes the elementwise ops (GroupNorm, SiLU, dropout) from them (an experiment for the
    batch-512 memory; not part of jaxdiff.train_step)."""
    policy = precision_lib.from_config(config)
    setup = train_step.build(config)
    if remat:
        def networks(model_state):
            network = train_step.make_network(setup.model, model_state)
            return {'model': jax.checkpoint(network, policy=jax.checkpoint_policies.dots_saveable)}
        t = config.training
        step_fn = train_step.make_train_step(
            setup.loss, networks, setup.optimizer, seed=t.seed,
            batch_size=t.batch_size, lr=t.lr, lr_rampup_images=t.lr_rampup_images,
            ema_halflife_images=t.ema_halflife_images, ema_rampup_ratio=t.ema_rampup_ratio,
            augment=train_step.augment_fn(config.get('augment')))
        setup = setup._replace(train_step=precision_lib.with_matmul_precision(step_fn, policy))
    return setup, train_step.Jit(mesh).compile(setup.train_step), policy


# ---------------------------------------------------------------- XLA accounting

def cost_flops(compiled):
    """Total FLOPs of a compiled executable from XLA's cost analysis (None when the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return None if not cost or 'flops' not in cost else float(cost['flops'])


def memory_bytes(compiled):
    """Compiled footprint: arguments + outputs - aliased (donated) + temporaries (XLA's buffer assignment)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return {'argument': m.argument_size_in_bytes, 'output': m.output_size_in_bytes,
            'alias': m.alias_size_in_bytes, 'temp': m.temp_size_in_bytes,
            'total': m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes}


def accounting(config, mesh, batch_size, remat=False):
    """The training step compiled on abstract inputs at `batch_size` (nothing is allocated or run)."""
    config = config.copy_and_resolve_references()
    config.training.batch_size = batch_size
    setup, step, _ = build_step(config, mesh, remat)
    state = train_step.abstract_state(config, setup.modules, setup.optimizer, mesh)
    metrics = jax.eval_shape(train_step.zero_metrics)
    metrics = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=mesh_lib.replicated(mesh)),
                           metrics)
    start = time.perf_counter()
    compiled = step.lower(state, metrics, abstract_batch(batch_size, tuple(config.data.shape), mesh)).compile()
    seconds = time.perf_counter() - start
    flops = cost_flops(compiled)
    memory = memory_bytes(compiled)
    return {'accounting_batch': batch_size, 'accounting_compile_s': round(seconds, 1),
            'accounting_gflop_per_image': None if flops is None else flops / batch_size / 1e9,
            'train_flop_ratio_vs_edm': None if flops is None else flops / batch_size / 1e9 / EDM_TRAIN_GFLOP,
            'train_memory_gib': None if memory is None else memory['total'] / GIB,
            'train_memory_bytes': memory}


# ---------------------------------------------------------------- timing

def peak_memory():
    """(bytes, source): the device's peak where reported (GPU/TPU), else this process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        return stats['peak_bytes_in_use'], 'device peak_bytes_in_use'
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process peak RSS'


def time_train(config, mesh, warmup, steps, remat=False):
    """Compiles the step once (AOT), runs `warmup` steps, then times `steps` steps (block_until_ready)."""
    setup, step, policy = build_step(config, mesh, remat)
    shape, batch_size = tuple(config.data.shape), config.training.batch_size
    init = jax.jit(lambda key: train_step.init_state(setup.modules, setup.optimizer, shape, key),
                   out_shardings=mesh_lib.replicated(mesh))
    state = init(train_step.root_keys(config.training.seed)[0])
    metrics = jax.jit(train_step.zero_metrics, out_shardings=mesh_lib.replicated(mesh))()
    batches = [random_batch(jax.random.key(i), batch_size, shape, mesh) for i in range(2)]
    start = time.perf_counter()
    compiled = step.lower(state, metrics, batches[0]).compile()
    compile_s = time.perf_counter() - start
    for i in range(warmup):
        state, metrics = compiled(state, metrics, batches[i % 2])
    jax.block_until_ready((state, metrics))
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(steps):
        state, metrics = compiled(state, metrics, batches[i % 2])
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    cpu_seconds = (time.process_time() - cpu_start) / steps
    loss = float(jax.device_get(metrics['loss_sum']) / max(int(jax.device_get(metrics['num_steps'])), 1))
    flops = cost_flops(compiled)
    memory = memory_bytes(compiled)
    return setup, state, {
        'train_compile_s': round(compile_s, 1), 'train_step_s': seconds, 'train_images_per_s': batch_size / seconds,
        'train_step_cpu_s': cpu_seconds,
        'train_gflop_per_step': None if flops is None else flops / 1e9,
        'train_tflops_per_s': None if flops is None else flops / seconds / 1e12,
        'train_compiled_memory_gib': None if memory is None else memory['total'] / GIB,
        'train_loss_finite': bool(np.isfinite(loss)), 'precision': policy.name}


def make_sample_fn(setup, config, policy, sample_batch, sigmas):
    """jit(params, key) -> x0 of the configured sampler over `sigmas` (one lax.scan), and jit(params, x, sigma) -> D."""
    precond = setup.pieces.parameterization.precond
    sampler = samplers.get(config.sampling.sampler)
    shape = tuple(config.data.shape)
    label_dim = getattr(setup.model, 'label_dim', 0)
    labels = jnp.zeros((sample_batch, label_dim), jnp.float32) if label_dim else None

    def generate(params, key):
        x_T = sigmas[0] * jax.random.normal(key, (sample_batch, *shape), jnp.float32)
        x0, info = sampler(Denoiser(setup.model.apply, params, precond, class_labels=labels), x_T, sigmas)
        return x0, info['nfe']

    def forward(params, x, sigma):
        return Denoiser(setup.model.apply, params, precond, class_labels=labels)(x, sigma)

    wrap = lambda fn: jax.jit(precision_lib.with_matmul_precision(fn, policy))
    return wrap(generate), wrap(forward)


def time_sampling(setup, params, config, sample_batch, sample_steps, forward_repeats, sample_repeats, skip):
    policy = precision_lib.from_config(config)
    s = config.sampling
    sigmas = schedules.get(s.schedule, num_steps=sample_steps, sigma_min=s.sigma_min, sigma_max=s.sigma_max,
                           rho=s.rho)
    generate, forward = make_sample_fn(setup, config, policy, sample_batch, sigmas)
    result = {'sample_batch': sample_batch}
    if 'forward' not in skip:
        x = jax.random.normal(jax.random.key(1), (sample_batch, *config.data.shape), jnp.float32)
        sigma = jnp.full((sample_batch,), 1.0, jnp.float32)
        start = time.perf_counter()
        compiled = forward.lower(params, x, sigma).compile()
        result['forward_compile_s'] = round(time.perf_counter() - start, 1)
        jax.block_until_ready(compiled(params, x, sigma))
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(forward_repeats):
            out = compiled(params, x, sigma)
        jax.block_until_ready(out)
        seconds = (time.perf_counter() - start) / forward_repeats
        result['forward_cpu_s'] = (time.process_time() - cpu_start) / forward_repeats
        flops = cost_flops(compiled)
        result.update({'forward_s': seconds, 'forward_images_per_s': sample_batch / seconds,
                       'forward_gflop_per_image': None if flops is None else flops / sample_batch / 1e9})
    if 'sample' not in skip:
        key = jax.random.key(2)
        start = time.perf_counter()
        compiled = generate.lower(params, key).compile()
        result['sample_compile_s'] = round(time.perf_counter() - start, 1)
        x0, nfe = compiled(params, key)  # warm-up run
        jax.block_until_ready(x0)
        start = time.perf_counter()
        for _ in range(sample_repeats):
            x0, nfe = compiled(params, key)
        jax.block_until_ready(x0)
        seconds = (time.perf_counter() - start) / sample_repeats
        result.update({'sample_nfe': int(nfe), 'sample_s': seconds, 'sample_images_per_s': sample_batch / seconds,
                       'sample_finite': bool(jnp.all(jnp.isfinite(x0)))})
    return result


def mfu(result, device_kind, precision, peak_tflops):
    """Model FLOPs utilisation of the training step (accelerators only)."""
    if peak_tflops is None:
        peak_tflops = next((p[precision] for name, p in PEAK_TFLOPS.items() if name in device_kind), None)
    if peak_tflops is None or result.get('train_tflops_per_s') is None:
        return None, peak_tflops
    return result['train_tflops_per_s'] / peak_tflops, peak_tflops


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    skip = {part.strip() for part in args.skip.split(',') if part.strip()}
    if args.accounting_only:
        skip |= {'train', 'forward', 'sample'}
    config = load_config(args.config, args.override)
    if args.precision is not None:
        config.training.precision = args.precision
    if args.batch is not None:
        config.training.batch_size = args.batch
    precision_lib.from_config(config)  # validates the field before anything compiles
    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    mesh = mesh_lib.make_mesh(devices)
    mesh_lib.check_batch_size(config.training.batch_size, mesh)
    device = devices[0]
    load = os.getloadavg()
    result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'command': 'python benchmarks/throughput.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
              'config': os.path.basename(args.config), 'platform': device.platform, 'device': device.device_kind,
              'num_devices': len(devices), 'host': platform.node(), 'cpu_count': os.cpu_count(),
              'jax': jax.__version__, 'batch': config.training.batch_size,
              'precision': precision_lib.from_config(config).name, 'remat': args.remat, 'label': args.label,
              'load_average_start': [round(x, 2) for x in load]}

    if 'train' not in skip:
        setup, state, timing = time_train(config, mesh, args.warmup, args.steps, args.remat)
        result.update(timing)
        result['train_gflop_per_image'] = (None if timing['train_gflop_per_step'] is None
                                           else timing['train_gflop_per_step'] / config.training.batch_size)
        params = state.ema_params['model']
    else:
        setup, _, _ = build_step(config, mesh)
        shape = tuple(config.data.shape)
        params = jax.jit(lambda key: train_step.init_state(setup.modules, setup.optimizer, shape, key).params['model'])(
            jax.random.key(0))
    if not {'forward', 'sample'} <= skip:
        sample_batch = args.sample_batch or config.training.batch_size
        sample_steps = args.sample_steps or config.sampling.num_steps
        result.update(time_sampling(setup, params, config, sample_batch, sample_steps, args.forward_repeats,
                                    args.sample_repeats, skip))
    if 'accounting' not in skip:
        result.update(accounting(config, mesh, args.accounting_batch, args.remat))
    result['model_parameters'] = int(sum(x.size for x in jax.tree.leaves(params)))
    memory, source = peak_memory()
    result.update({'peak_memory_gib': memory / GIB, 'peak_memory_source': source})
    if device.platform != 'cpu':
        result['mfu'], result['peak_tflops'] = mfu(result, device.device_kind, result['precision'], args.peak_tflops)
    result['load_average_end'] = [round(x, 2) for x in os.getloadavg()]

    path = results_path(args.out)
    with open(path, 'a') as f:
        f.write(json.dumps(result) + '\n')
    print(summary(result))
    print(f'appended to {path}')
    return result


def summary(r):
    def fmt(name, unit='', digits=3):
        value = r.get(name)
        return '-' if value is None else f'{value:.{digits}g}{unit}'
    lines = [f'{r["config"]} {r["precision"]} batch {r["batch"]} on {r["num_devices"]} x {r["device"]} '
             f'(jax {r["jax"]}, load {r["load_average_start"][0]})']
    if 'train_step_s' in r:
        lines.append(f'  train   {fmt("train_images_per_s")} img/s, step {fmt("train_step_s", " s")}, '
                     f'{fmt("train_gflop_per_image")} GFLOP/img, {fmt("train_tflops_per_s", " TFLOP/s")}, '
                     f'MFU {fmt("mfu")}, compile {fmt("train_compile_s", " s")}')
    if 'forward_s' in r:
        lines.append(f'  forward {fmt("forward_images_per_s")} img/s at batch {r["sample_batch"]}, '
                     f'{fmt("forward_gflop_per_image")} GFLOP/img')
    if 'sample_s' in r:
        lines.append(f'  sample  {fmt("sample_images_per_s")} img/s (Heun, {r["sample_nfe"]} NFE, batch '
                     f'{r["sample_batch"]}), {fmt("sample_s", " s")} per batch')
    if 'accounting_batch' in r:
        lines.append(f'  XLA     {fmt("accounting_gflop_per_image")} GFLOP per training image = '
                     f'{fmt("train_flop_ratio_vs_edm")} x EDM\'s 3 x {EDM_FORWARD_GFLOP}; compiled step at batch '
                     f'{r["accounting_batch"]}: {fmt("train_memory_gib", " GiB")}')
    lines.append(f'  peak memory {fmt("peak_memory_gib", " GiB")} ({r["peak_memory_source"]})')
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
