"""Training and sampling throughput, FLOPs and memory of jaxdiff's real training step and Heun sampler.

    .venv/bin/python benchmarks/throughput.py --config=configs/cifar_edm.py --batch=16 --steps=3
    .venv/bin/python benchmarks/throughput.py --config=configs/cifar_edm.py --batch=16 --steps=3 --profile
    python benchmarks/throughput.py --config=configs/cifar_edm.py --precision=bf16 --batch=512      # accelerator
    .venv/bin/python benchmarks/throughput.py --config=configs/cifar_edm.py --accounting_only      # XLA only

Measures, on random data (as EDM's measurement in issue 7) and the devices of the default backend:
  train     `jaxdiff.drivers.train_step`'s step (augmentation, EDM loss, grads, Adam, EMA; state donated), jitted over
            the mesh and compiled once ahead of time; `--warmup` steps, then `--steps` timed steps ended by
            block_until_ready: train images/s, step time, FLOPs/step and per image from the compiled step's
            cost_analysis(), MFU on an accelerator (FLOPs/s over the device's peak for the precision); and the
            optimizer + EMA update (train_step.apply_gradients) timed alone on the same parameters.
  forward   one jitted denoiser call D(x, sigma) (eval mode) at the sampling batch: forward images/s (EDM's CPU
            sampling column) and forward FLOPs per image.
  sample    the full sampler run of config.sampling (EDM's Heun, 18 steps: 35 NFE), one compiled lax.scan, timed
            after a warm-up run: sampling images/s, and its cost in forward passes (sample time * forward
            images/s / batch; NFE when the scan adds nothing).
  convs     every convolution layer of the network (models/layers.py `Conv2d`: 3x3 and 1x1) jitted alone at
            the shapes it sees in the forward pass, with the network's conv algorithm: the sum of their isolated
            times (wall and CPU), for the forward and for the training step (forward + both gradients), and the
            ratio sum / measured time (1.0: the network costs exactly its convolutions).
  accounting  the training step compiled on abstract inputs (jax.ShapeDtypeStruct; nothing runs) at
            `--accounting_batch` (default 512): FLOPs per image against EDM's 3 x 42.4 GFLOP and the compiled
            memory (arguments + outputs - aliased (donated) + temporaries).
  profile   (--profile) the compiled forward and training step once more under jax.profiler: the wall time of
            each executed XLA op, by op kind (3x3 / 1x1 convolution forward and gradients, GroupNorm, SiLU and
            block adds, resampling, attention, dropout, embedding, loss, augmentation, optimizer and EMA, layout
            copies), from the ops' source lines and Flax module names in the compiled HLO.
CPU time: on a CPU the JSON line also holds the process CPU seconds per step / forward call (all threads), a
load-insensitive cost: on an otherwise idle machine with n cores the wall time is at least CPU time / n.
`--edm_train` / `--edm_forward` (EDM's img/s measured on the same machine) add the ratios jaxdiff / EDM.
Peak memory: the device's peak_bytes_in_use where the backend reports it (GPU / TPU), else the process's peak RSS.
Prints a summary and appends one JSON line to `--out` (a .jsonl file, or a directory that gets throughput.jsonl;
default $OUT, else benchmarks/results). XLA:CPU runs one thread per schedulable core; `taskset -c 0,1` pins fewer.
"""
import argparse
import collections
import datetime
import glob
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.drivers import sampling as sampling_lib, trained as trained_lib, mesh as mesh_lib, precision as precision_lib, train_step
from jaxdiff.bench import speed
from jaxdiff.models import layers

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
    p.add_argument('--skip', default='', help='comma list of parts to skip: train,forward,sample,convs,accounting')
    p.add_argument('--conv_repeats', type=int, default=3, help='timed calls per isolated convolution (min taken)')
    p.add_argument('--profile', action='store_true', help='per-op-kind wall time of the forward and training step')
    p.add_argument('--edm_train', type=float, default=None, help="EDM's training img/s on this machine (ratio)")
    p.add_argument('--edm_forward', type=float, default=None, help="EDM's forward img/s on this machine (ratio)")
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
    """(setup, jitted step, policy) of jaxdiff.drivers.train_step for `config` (build applies config.training.precision),
    jitted over the mesh as training does (training.parallelism 'jit').

    remat: the network under jax.checkpoint(policy=dots_saveable): the backward pass keeps only conv / matmul
    outputs and recomputes the elementwise ops (GroupNorm, SiLU, dropout) from them (an experiment for the
    batch-512 memory; not part of jaxdiff.drivers.train_step)."""
    config = config.copy_and_resolve_references()
    config.training.parallelism = 'jit'
    policy = precision_lib.from_config(config)
    setup = train_step.build(config)
    if remat:
        t = config.training

        def networks(model_state):
            network = train_step.make_network(setup.model, model_state)
            return {'model': jax.checkpoint(network, policy=jax.checkpoint_policies.dots_saveable)}
        step_fn = train_step.make_train_step(
            setup.loss, networks, setup.optimizer, seed=t.seed, batch_size=t.batch_size, lr=t.lr,
            lr_rampup_images=t.lr_rampup_images, ema_halflife_images=t.ema_halflife_images,
            ema_rampup_ratio=t.ema_rampup_ratio, augment=train_step.augment_fn(config.get('augment')))
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


def timed(fn, repeats):
    """(wall seconds, process CPU seconds) per call of fn() (each call ended by block_until_ready)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats, (time.process_time() - cpu_start) / repeats


def time_train(config, mesh, warmup, steps, remat=False):
    """Compiles the step once (AOT), runs `warmup` steps, then times `steps` steps (block_until_ready).
    Returns (setup, state, the compiled step's runner, result fields)."""
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
    carry = {'state': state, 'metrics': metrics, 'i': 0}

    def run_step():   # the state is donated: each step consumes the previous one
        carry['state'], carry['metrics'] = compiled(carry['state'], carry['metrics'], batches[carry['i'] % 2])
        carry['i'] += 1
        return carry['metrics']

    for _ in range(warmup):
        run_step()
    jax.block_until_ready(carry['metrics'])
    seconds, cpu_seconds = timed(run_step, steps)
    metrics = jax.device_get(carry['metrics'])
    loss = float(metrics['loss_sum'] / max(int(metrics['num_steps']), 1))
    flops = cost_flops(compiled)
    memory = memory_bytes(compiled)
    runner = (compiled, run_step)
    return setup, carry['state'], runner, {
        'train_compile_s': round(compile_s, 1), 'train_step_s': seconds, 'train_images_per_s': batch_size / seconds,
        'train_step_cpu_s': cpu_seconds,
        'train_gflop_per_step': None if flops is None else flops / 1e9,
        'train_tflops_per_s': None if flops is None else flops / seconds / 1e12,
        'train_compiled_memory_gib': None if memory is None else memory['total'] / GIB,
        'train_loss_finite': bool(np.isfinite(loss)), 'precision': policy.name}


def time_update(setup, state, repeats=5):
    """(wall, CPU) seconds of the step's optimizer + EMA update (train_step.apply_gradients) alone, on the real
    parameter tree, jitted with the state donated as in the step: what the profile's fused-op attribution cannot
    separate from the backward pass it overlaps."""
    update = jax.jit(lambda state, grads: train_step.apply_gradients(setup.optimizer, state, grads, 0.999),
                     donate_argnums=0)
    grads = jax.tree.map(jnp.ones_like, state.params)
    # only the three updated trees (a donated buffer the update does not return would only draw a warning)
    carry = {'state': jax.tree.map(jnp.copy, state._replace(step=None, model_state=None))}

    def run():
        params, ema_params, opt_state = update(carry['state'], grads)
        carry['state'] = carry['state']._replace(params=params, ema_params=ema_params, opt_state=opt_state)
        return params

    jax.block_until_ready(run())
    return timed(run, repeats)


def sampling_config(config, sample_steps):
    """config.sampling with schedule_options.num_steps = sample_steps (None: the config's own grid)."""
    sampling = config.sampling.copy_and_resolve_references()
    if sample_steps is not None:
        sampling.schedule_options = {**dict(sampling.get('schedule_options') or {}), 'num_steps': sample_steps}
    return sampling


def make_sample_fn(setup, config, policy, sample_batch, sampling):
    """jit(variables, key) -> (x0, nfe) of the configured sampler and grid (one lax.scan), and
    jit(variables, x, sigma) -> D(x, sigma); variables = the EMA item {'params': ..., 'model_state': ...}."""
    sampler, sigmas = sampling_lib.sampler_and_grid(sampling)
    denoiser_fn = trained_lib.denoiser_fn_for(setup.model, setup.loss.parameterization.precond)
    shape = tuple(config.data.shape)
    label_dim = getattr(setup.model, 'label_dim', 0)
    labels = jnp.zeros((sample_batch, label_dim), jnp.float32) if label_dim else None

    def sample(variables, key):
        noise_key, sampler_key = jax.random.split(key)
        x_T = sigmas[0] * jax.random.normal(noise_key, (sample_batch, *shape), jnp.float32)
        x0, info = sampler(denoiser_fn(variables, labels), x_T, sigmas, key=sampler_key)
        return x0, info['nfe']

    def forward(variables, x, sigma):
        return denoiser_fn(variables, labels)(x, sigma)

    wrap = lambda fn: jax.jit(precision_lib.with_matmul_precision(fn, policy))
    return wrap(sample), wrap(forward)


def time_sampling(setup, variables, config, sample_batch, sampling, forward_repeats, sample_repeats, skip):
    """Forward and full-sampling timings; returns (result fields, the compiled forward and its arguments)."""
    policy = precision_lib.from_config(config)
    sample, forward = make_sample_fn(setup, config, policy, sample_batch, sampling)
    result, forward_runner = {'sample_batch': sample_batch}, None
    if 'forward' not in skip:
        x = jax.random.normal(jax.random.key(1), (sample_batch, *config.data.shape), jnp.float32)
        sigma = jnp.full((sample_batch,), 1.0, jnp.float32)
        start = time.perf_counter()
        compiled = forward.lower(variables, x, sigma).compile()
        result['forward_compile_s'] = round(time.perf_counter() - start, 1)
        jax.block_until_ready(compiled(variables, x, sigma))
        seconds, result['forward_cpu_s'] = timed(lambda: compiled(variables, x, sigma), forward_repeats)
        flops = cost_flops(compiled)
        result.update({'forward_s': seconds, 'forward_images_per_s': sample_batch / seconds,
                       'forward_gflop_per_image': None if flops is None else flops / sample_batch / 1e9})
        forward_runner = (compiled, lambda compiled=compiled: compiled(variables, x, sigma))
    if 'sample' not in skip:
        key = jax.random.key(2)
        start = time.perf_counter()
        compiled = sample.lower(variables, key).compile()
        result['sample_compile_s'] = round(time.perf_counter() - start, 1)
        x0, nfe = compiled(variables, key)  # warm-up run
        jax.block_until_ready(x0)
        seconds, result['sample_cpu_s'] = timed(lambda: compiled(variables, key)[0], sample_repeats)
        x0, nfe = compiled(variables, key)
        result.update({'sample_nfe': int(nfe), 'sample_s': seconds, 'sample_images_per_s': sample_batch / seconds,
                       'sample_finite': bool(jnp.all(jnp.isfinite(x0)))})
        if 'forward_s' in result:   # what the run costs in forward passes (NFE when the scan adds nothing)
            result['sample_cost_in_forwards'] = seconds / result['forward_s']
    return result, forward_runner


# ---------------------------------------------------------------- the convolutions in isolation

def conv_layers(model, variables, x, noise_labels):
    """{(input shape, kernel shape, padding, dtype): count} of every Conv2d convolution of one forward pass."""
    found = collections.Counter()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.Conv2d) and context.method_name == '_conv':
            inputs, padding = args
            module = context.module
            kernel = (module.kernel, module.kernel, inputs.shape[-1], module.features)
            found[(tuple(inputs.shape), kernel, padding, jnp.dtype(module.dtype).name)] += 1
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x, c: model.apply(v, x, c), variables, x, noise_labels)
    return found


def time_convs(model, variables, batch_size, shape, repeats, train):
    """Sum over the forward's convolutions of their isolated (wall, CPU) seconds with the model's algorithm:
    the forward only, or (train) forward + input and kernel gradients, at batch `batch_size`."""
    x = jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32)
    c = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    algorithm = getattr(model, 'conv_algorithm', 'xla')   # resolved per layer, as in the network
    wall = cpu = 0.0
    for (in_shape, kernel, padding, dtype), count in conv_layers(model, variables, x, c).items():
        rng = np.random.default_rng(0)
        inputs = jnp.asarray(rng.standard_normal(in_shape), dtype)
        w = jnp.asarray(rng.standard_normal(kernel) / np.sqrt(np.prod(kernel[:3])), dtype)
        conv = lambda inputs, w: layers.conv2d(inputs, w, padding, algorithm)
        if train:
            def fn(inputs, w):
                y, vjp = jax.vjp(conv, inputs, w)
                return vjp(y)
        else:
            fn = conv
        compiled = jax.jit(fn).lower(inputs, w).compile()
        jax.block_until_ready(compiled(inputs, w))
        best = min((timed(lambda: compiled(inputs, w), 1) for _ in range(repeats)), key=lambda t: t[0])
        wall, cpu = wall + count * best[0], cpu + count * best[1]
    return wall, cpu


# ---------------------------------------------------------------- per-op profile

def _stack_frames(text):
    """{stack_frame_id: [(file, function, line), ... innermost first]} from the tables of compiled HLO text
    (FileNames, FunctionNames, FileLocations, StackFrames; a frame's parent_frame_id p is frame p - 1)."""
    tables, current = collections.defaultdict(dict), None
    for line in text.splitlines():
        if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
            current = line
            continue
        m = re.match(r'^(\d+) (.*)$', line) if current else None
        if not m:
            current = None if not line.strip() else current
            continue
        tables[current][int(m.group(1))] = m.group(2).strip()
    names = {k: v.strip('"') for k, v in tables['FileNames'].items()}
    functions = {k: v.strip('"') for k, v in tables['FunctionNames'].items()}
    fields = lambda text: dict((k, int(v)) for k, v in re.findall(r'(\w+)=(-?\d+)', text))
    locations = {k: fields(v) for k, v in tables['FileLocations'].items()}
    frames = {k: fields(v) for k, v in tables['StackFrames'].items()}

    def stack(frame_id):
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            location = locations.get(frames[frame_id].get('file_location_id'), {})
            out.append((names.get(location.get('file_name_id'), ''),
                        functions.get(location.get('function_name_id'), ''), location.get('line', 0)))
            frame_id = frames[frame_id].get('parent_frame_id', 0) - 1
        return out
    return {frame_id: stack(frame_id) for frame_id in frames}


def _hlo_ops(text):
    """{instruction name: (opcode, fused body text, op_name, call stack)} of every instruction of compiled HLO."""
    stacks = _stack_frames(text)
    computations, current = {}, None
    for line in text.splitlines():
        header = re.match(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
        if header and not line.startswith(' '):
            current = header.group(1)
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    ops = {}
    for lines in computations.values():
        for line in lines:
            m = re.match(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\(', line)
            if not m:
                continue
            called = re.search(r'calls=%?([\w.\-]+)', line)
            body = '\n'.join(computations.get(called.group(1), [])) if called else line
            op_name = re.search(r'op_name="([^"]*)"', line)
            frame = re.search(r'stack_frame_id=(\d+)', line) or re.search(r'stack_frame_id=(\d+)', body)
            ops[m.group(1)] = (m.group(2), body, op_name.group(1) if op_name else '',
                               stacks.get(int(frame.group(1)), []) if frame else [])
    return ops


# Conv2d modules of SongUNet with 3x3 kernels (the others are 1x1: skip, qkv, proj, aux_skip)
CONV3 = re.compile(r'/(conv0|conv1|enc_\d+x\d+_conv|dec_\d+x\d+_aux_conv|enc_\d+x\d+_aux_residual)/')


def op_kind(opcode, body, op_name, stack):
    """The kind of one executed HLO op from its fused body, its op_name (Flax module path, 'transpose(' for the
    backward pass) and its Python call stack (innermost first)."""
    grad = ' grad' if 'transpose(' in op_name else ''
    ours = [(os.path.basename(f), function) for f, function, _ in stack if '/jaxdiff/' in f]
    files = {f for f, _ in ours}
    functions = [function for _, function in ours]
    has = lambda *names: any(name in function for function in functions for name in names)
    if 'winograd.py' in files:
        return '3x3 conv (Winograd)' + grad
    if ' convolution(' in body or opcode == 'convolution' or (has('conv2d') and 'dot(' in body):
        kind = '3x3 conv' if CONV3.search(op_name + '/') else '1x1 conv'
        if has('upsample', 'downsample') and 'feature_group_count' in body:
            return 'resampling'
        window = re.search(r'window=\{size=(\d+)x', body)
        if grad:
            return kind + (' grad (weights)' if window and int(window.group(1)) > 3 else ' grad')
        return kind
    if has('upsample', 'downsample', '_up_axis', '_down_axis'):
        return 'resampling'
    if has('group_norm', 'GroupNorm', '_group_statistics'):
        return 'GroupNorm' + grad
    if has('_attention'):
        return 'attention' + grad
    if 'Dropout' in op_name:
        return 'dropout'
    if has('UNetBlock.__call__'):
        return 'SiLU, adds (blocks)' + grad
    if has('_embedding', 'FourierEmbedding', 'positional_embedding', 'Dense'):
        return 'embedding, dense' + grad
    if has('SongUNet', 'MLP'):
        return 'concat, SiLU (SongUNet)' + grad
    if 'augment.py' in files:
        return 'augmentation'
    if files & {'losses.py', 'precond.py', 'denoiser.py'}:
        return 'loss, preconditioning' + grad
    if 'train_step.py' in files or any('/optax/' in f for f, _, _ in stack):
        return 'optimizer, EMA'
    if 'copy' in opcode or 'transpose' in opcode or 'copy' in body.split('(')[0]:
        return 'layout copies'
    if 'rng' in body or 'threefry' in op_name or 'random' in op_name:
        return 'random numbers'
    return 'other'


def profile(compiled, run, repeats=1):
    """{op kind: wall seconds per call} of `run()` (which executes `compiled`) under jax.profiler.

    Each executed op's share is the wall time from its start to the next op's start on any thread (XLA:CPU's
    library calls run asynchronously, so their trace events end before their work does); the shares add up to
    the call's wall time."""
    ops = _hlo_ops(compiled.as_text())
    jax.block_until_ready(run())
    directory = tempfile.mkdtemp(prefix='jaxdiff_profile_')
    jax.profiler.start_trace(directory)
    for _ in range(repeats):
        jax.block_until_ready(run())
    jax.profiler.stop_trace()
    from jax.profiler import ProfileData
    events = []
    for path in glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for trace_line in plane.lines:
                for event in trace_line.events:
                    if event.name in ops:
                        events.append((event.start_ns, event.start_ns + event.duration_ns, event.name))
    events.sort()
    kinds = collections.Counter()
    for (start, end, name), following in zip(events, events[1:] + [None]):
        stop = end if following is None else following[0]
        kinds[op_kind(*ops[name])] += (stop - start) / 1e9 / repeats
    return dict(kinds.most_common())


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
        skip |= {'train', 'forward', 'sample', 'convs'}
    config = speed.load_config(args.config, args.override)
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
    cpu_model = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                      if line.startswith('model name')), platform.processor()) if os.path.exists('/proc/cpuinfo') \
        else platform.processor()
    result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'command': 'python benchmarks/throughput.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
              'config': os.path.basename(args.config), 'platform': device.platform, 'device': device.device_kind,
              'cpu_model': cpu_model, 'num_devices': len(devices), 'host': platform.node(),
              'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'batch': config.training.batch_size,
              'precision': precision_lib.from_config(config).name, 'remat': args.remat, 'label': args.label,
              'load_average_start': [round(x, 2) for x in load]}

    train_runner = None
    if 'train' not in skip:
        setup, state, train_runner, timing = time_train(config, mesh, args.warmup, args.steps, args.remat)
        result.update(timing)
        result['train_gflop_per_image'] = (None if timing['train_gflop_per_step'] is None
                                           else timing['train_gflop_per_step'] / config.training.batch_size)
        result['train_update_s'], result['train_update_cpu_s'] = time_update(setup, state)
        variables = train_step.ema_item(state)
    else:
        setup, _, _ = build_step(config, mesh)
        shape = tuple(config.data.shape)
        variables = jax.jit(lambda key: train_step.ema_item(
            train_step.init_state(setup.modules, setup.optimizer, shape, key)))(jax.random.key(0))
    result['conv_algorithm'] = layers.resolve_conv_algorithm(getattr(setup.model, 'conv_algorithm', 'xla'),
                                                             getattr(setup.model, 'dtype', jnp.float32))
    sample_batch = args.sample_batch or config.training.batch_size
    forward_runner = None
    if not {'forward', 'sample'} <= skip:
        sampling = sampling_config(config, args.sample_steps)
        timing, forward_runner = time_sampling(setup, variables, config, sample_batch, sampling,
                                               args.forward_repeats, args.sample_repeats, skip)
        result.update(timing)
    if 'convs' not in skip:
        model_variables = {'params': variables['params']['model'], **variables['model_state']}
        shape = tuple(config.data.shape)
        if 'forward_s' in result:
            wall, cpu = time_convs(setup.model, model_variables, sample_batch, shape, args.conv_repeats, train=False)
            result.update({'forward_convs_isolated_s': wall, 'forward_convs_isolated_cpu_s': cpu,
                           'forward_convs_share': wall / result['forward_s']})
        if 'train_step_s' in result:
            wall, cpu = time_convs(setup.model, model_variables, config.training.batch_size, shape,
                                   args.conv_repeats, train=True)
            result.update({'train_convs_isolated_s': wall, 'train_convs_isolated_cpu_s': cpu,
                           'train_convs_share': wall / result['train_step_s']})
    if args.profile:
        if forward_runner is not None:
            result['forward_profile_s'] = profile(*forward_runner)
        if train_runner is not None:
            result['train_profile_s'] = profile(*train_runner)
    if args.edm_train and 'train_images_per_s' in result:
        result['train_ratio_vs_edm'] = result['train_images_per_s'] / args.edm_train
    if args.edm_forward and 'forward_images_per_s' in result:
        result['forward_ratio_vs_edm'] = result['forward_images_per_s'] / args.edm_forward
    if 'accounting' not in skip:
        result.update(accounting(config, mesh, args.accounting_batch, args.remat))
    result['model_parameters'] = int(sum(x.size for x in jax.tree.leaves(variables['params'])))
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
             f'({r["cpu_model"]}; jax {r["jax"]}, load {r["load_average_start"][0]}), convs: {r["conv_algorithm"]}']
    if 'train_step_s' in r:
        lines.append(f'  train   {fmt("train_images_per_s")} img/s, step {fmt("train_step_s", " s")} '
                     f'(CPU {fmt("train_step_cpu_s", " s")}), {fmt("train_gflop_per_image")} GFLOP/img, '
                     f'{fmt("train_tflops_per_s", " TFLOP/s")}, MFU {fmt("mfu")}, compile {fmt("train_compile_s", " s")}'
                     f'{", " + fmt("train_ratio_vs_edm") + " x EDM" if "train_ratio_vs_edm" in r else ""}')
    if 'train_update_s' in r:
        lines.append(f'  update  optimizer + EMA alone {fmt("train_update_s", " s")} (CPU {fmt("train_update_cpu_s", " s")})'
                     f' = {100 * r["train_update_s"] / r["train_step_s"]:.2g} % of the step')
    if 'forward_s' in r:
        lines.append(f'  forward {fmt("forward_images_per_s")} img/s at batch {r["sample_batch"]} '
                     f'(CPU {fmt("forward_cpu_s", " s")} per call), {fmt("forward_gflop_per_image")} GFLOP/img'
                     f'{", " + fmt("forward_ratio_vs_edm") + " x EDM" if "forward_ratio_vs_edm" in r else ""}')
    if 'sample_s' in r:
        lines.append(f'  sample  {fmt("sample_images_per_s")} img/s ({r["sample_nfe"]} NFE, batch '
                     f'{r["sample_batch"]}), {fmt("sample_s", " s")} per batch = {fmt("sample_cost_in_forwards")} '
                     f'forward passes')
    for part in ('forward', 'train'):
        if f'{part}_convs_isolated_s' in r:
            lines.append(f'  convs   {part}: the convolutions alone take {fmt(part + "_convs_isolated_s", " s")} '
                         f'(CPU {fmt(part + "_convs_isolated_cpu_s", " s")}) = {fmt(part + "_convs_share")} of the '
                         f'measured {part}')
    for part in ('forward', 'train'):
        if f'{part}_profile_s' in r:
            table = r[f'{part}_profile_s']
            total = sum(table.values())
            lines.append(f'  profile {part} ({total:.3g} s):')
            lines += [f'    {kind:36s} {seconds:8.3f} s {100 * seconds / total:5.1f} %' for kind, seconds in table.items()]
    if 'accounting_batch' in r:
        lines.append(f'  XLA     {fmt("accounting_gflop_per_image")} GFLOP per training image = '
                     f'{fmt("train_flop_ratio_vs_edm")} x EDM\'s 3 x {EDM_FORWARD_GFLOP}; compiled step at batch '
                     f'{r["accounting_batch"]}: {fmt("train_memory_gib", " GiB")}')
    lines.append(f'  peak memory {fmt("peak_memory_gib", " GiB")} ({r["peak_memory_source"]})')
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
