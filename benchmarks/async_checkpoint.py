"""What a checkpoint save costs a training loop, asynchronous (orbax's async checkpointing, jaxdiff's default) and
synchronous, on the CPU: for the toy2d state and for the 55.7M-parameter CIFAR-10 state of configs/cifar_edm.py
(zeros of the TrainState's shapes from jax.eval_shape: nothing is trained).

    python benchmarks/async_checkpoint.py                                   # both configs, 3 repeats
    python benchmarks/async_checkpoint.py --configs=configs/cifar_edm.py --repeats=5 --dir=/tmp/ckpt_bench

The loop runs a stand-in step that reads and writes every array of the state once (an optimizer update's memory
traffic, no network; each step waited for) and saves the state the way the training loop does (`Checkpoints.save`:
items 'state' and 'ema'). Per save it prints
  blocking   the time inside save(): the loop stands still (for async: the copy to host memory and orbax's
             bookkeeping; for sync: the whole write and commit)
  write      from save() to the step being committed (async: in a background thread while the loop goes on)
  cost       the extra wall time of the loop's N steps with one save over N steps without: what the save costs the
             run (for async: blocking + the slowdown of the steps that share the cores with the write); N is long
             enough for the asynchronous write to end within it
each the median of --repeats, with the CPU's model name.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.bench import speed
from jaxdiff.drivers import checkpoint as checkpoint_lib, mesh as mesh_lib, train_step as train_step_lib


def zero_state(config, mesh):
    """The TrainState of `config` as zeros (shapes from jax.eval_shape), replicated over the mesh."""
    setup = train_step_lib.build(config)
    abstract = setup.abstract_state(mesh)
    state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), abstract)
    return state, sum(x.size for x in jax.tree.leaves(state.params))


def stand_in_step():
    """Reads and writes every array once (floats scaled, integers incremented), donating the state."""
    update = lambda x: x * np.asarray(0.999, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x + 1
    return jax.jit(lambda state: jax.tree.map(update, state), donate_argnums=0)


def loop_time(step, state, num_steps, save_at, checkpoints):
    """(seconds of num_steps steps, blocking seconds, write seconds, state): one save after step save_at (none
    without `checkpoints`); the write's end is waited for after the loop."""
    blocking = write = 0.0
    start = time.perf_counter()
    for done in range(1, num_steps + 1):
        state = jax.block_until_ready(step(state))
        if checkpoints is not None and done == save_at:
            save_start = time.perf_counter()
            checkpoints.save(done, state, ema=train_step_lib.ema_item(state))
            blocking = time.perf_counter() - save_start
    seconds = time.perf_counter() - start
    if checkpoints is not None:
        checkpoints.wait_until_finished()
        write = time.perf_counter() - save_start
    return seconds, blocking, write, state


def measure(config_path, directory, repeats):
    config = speed.load_config(config_path)
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    state, num_params = zero_state(config, mesh)
    size = sum(x.nbytes for x in jax.tree.leaves(state)) + sum(
        x.nbytes for x in jax.tree.leaves(train_step_lib.ema_item(state)))
    step = stand_in_step()
    state = jax.block_until_ready(step(state))                      # compiled
    times = []
    for _ in range(5):
        start = time.perf_counter()
        state = jax.block_until_ready(step(state))
        times.append(time.perf_counter() - start)
    step_seconds = statistics.median(times)

    def fresh(asynchronous):
        shutil.rmtree(directory, ignore_errors=True)
        return checkpoint_lib.Checkpoints(directory, keep_checkpoints=1, asynchronous=asynchronous)

    # a first synchronous save sizes the loop: the asynchronous write must end within the steps after it
    checkpoints = fresh(False)
    _, _, sync_write, state = loop_time(step, state, 1, 1, checkpoints)
    checkpoints.close()
    save_at = 2
    num_steps = save_at + max(3, int(np.ceil(2.5 * sync_write / step_seconds)))
    rows = {'async': [], 'sync': []}
    for _ in range(repeats):
        baseline, _, _, state = loop_time(step, state, num_steps, save_at, None)
        for mode, asynchronous in (('async', True), ('sync', False)):
            checkpoints = fresh(asynchronous)
            seconds, blocking, write, state = loop_time(step, state, num_steps, save_at, checkpoints)
            checkpoints.close()
            rows[mode].append((blocking, write, seconds - baseline))
    shutil.rmtree(directory, ignore_errors=True)
    medians = {mode: [statistics.median(column) for column in zip(*values)] for mode, values in rows.items()}
    return dict(config=os.path.basename(config_path), num_params=num_params, size=size, step=step_seconds,
                num_steps=num_steps, **medians)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--configs', default='configs/toy2d_edm.py,configs/cifar_edm.py')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--dir', default=None, help='where the checkpoints are written (default: a temporary dir)')
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix='async_checkpoint_')
    print(f'{speed.cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}; '
          f'checkpoints in {root}; median of {args.repeats}', flush=True)
    print('| state | parameters | checkpoint (state + ema) | stand-in step | steps | async: blocking / write / '
          'cost per save | sync: blocking / cost per save |')
    print('| --- | ---: | ---: | ---: | ---: | --- | --- |')
    for path in args.configs.split(','):
        r = measure(path, os.path.join(root, os.path.basename(path)), args.repeats)
        (a_block, a_write, a_cost), (s_block, s_write, s_cost) = r['async'], r['sync']
        print(f"| {r['config']} | {r['num_params']:,} | {r['size'] / 2**20:.1f} MiB | {r['step'] * 1e3:.1f} ms | "
              f"{r['num_steps']} | {a_block * 1e3:.0f} ms / {a_write * 1e3:.0f} ms / {a_cost * 1e3:.0f} ms | "
              f"{s_block * 1e3:.0f} ms / {s_cost * 1e3:.0f} ms |", flush=True)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
