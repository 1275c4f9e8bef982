"""XLA:CPU's in-process collectives with several simulated devices: when do they deadlock?

    python benchmarks/cpu_collectives.py --devices=8 --load=2 --seconds=40 --windows=2,8,32

Each case runs in its own process (a deadlock aborts the process: XLA's rendezvous gives up after
--terminate_s seconds): a small training-like step (replicated state of 30 arrays, a sharded batch, an
all-reduce) in a loop, dispatched
  jit, unbounded       as fast as Python goes (jax's asynchronous dispatch; nothing waits)
  jit, window K        waiting for step n - K before dispatching step n (--windows; `Placement.max_steps_in_flight`)
  pmap + x[0]          pmap, then x[0] of every leaf (the old `Pmap.get_state`: a gather over all devices per leaf)
  pmap + host copy     pmap, then device 0's shard through the host (the current `Pmap.get_state`)
while --load processes multiply matrices on the same cores (a busy CI machine). Prints, per case, the steps done
and whether the process ended or was aborted by the rendezvous timeout.
"""
import argparse
import os
import subprocess
import sys
import time


def cases(windows):
    return {'jit, unbounded': ('jit', 0), **{f'jit, window {k}': ('jit', k) for k in windows},
            'pmap + x[0]': ('pmap_gather', 0), 'pmap + host copy': ('pmap_host', 0)}


def load(seconds):
    import numpy as np
    a = np.random.default_rng(0).random((1500, 1500), dtype=np.float32)
    end = time.time() + seconds
    while time.time() < end:
        a = a @ a
        a /= np.abs(a).max()


def case(kind, window, seconds):
    """One case in this process; prints 'steps N' every 10 steps and at the end."""
    import collections

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.drivers import mesh as mesh_lib, train_step

    mesh = mesh_lib.make_mesh()
    replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    pmap = train_step.parallel('pmap', mesh)        # the training loop's pmap layout and get_state
    n = mesh.devices.size
    batch = jax.device_put(np.ones((8 * n, 16), np.float32), sharded)
    update = lambda w, g: w * 0.99 + g * 0.01
    if kind == 'jit':
        state = {f'w{i}': jax.device_put(np.full((16, 16), i, np.float32), replicated) for i in range(30)}

        def step(state, batch):
            state = jax.tree.map(lambda w: update(w, jnp.mean(jnp.tanh(batch @ w), axis=0)), state)
            return state, state['w0'][0, 0]             # a token that is not donated, to wait on
        step = jax.jit(step, out_shardings=replicated, donate_argnums=0)
    else:
        state = pmap.put_state({f'w{i}': np.full((16, 16), i, np.float32) for i in range(30)})

        def step(state, batch):
            state = jax.tree.map(lambda w: update(w, jax.lax.pmean(jnp.tanh(w), train_step.PMAP_AXIS)), state)
            return state, state['w0'][0, 0]
        step = jax.pmap(step, axis_name=train_step.PMAP_AXIS, devices=pmap.devices, donate_argnums=0)
        batch = pmap.put_batch({'x': np.ones((8 * n, 16), np.float32)})
    tokens, steps, end = collections.deque(), 0, time.time() + seconds
    while time.time() < end:
        state, token = step(state, batch)
        if kind == 'pmap_gather':
            jax.tree.map(lambda x: x[0], state)
        elif kind == 'pmap_host':
            pmap.get_state(state)
        tokens.append(token)
        if window and len(tokens) > window:
            jax.block_until_ready(tokens.popleft())
        steps += 1
        if steps % 10 == 0:
            print(f'steps {steps}', flush=True)
    jax.block_until_ready(state)
    print(f'steps {steps}', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--devices', type=int, default=8)
    parser.add_argument('--load', type=int, default=2, help='processes multiplying matrices meanwhile')
    parser.add_argument('--seconds', type=float, default=40.0, help='per case')
    parser.add_argument('--windows', default='2,8,32', help='the jit cases with a bound on steps in flight')
    parser.add_argument('--terminate_s', type=int, default=15, help="XLA's rendezvous termination timeout")
    parser.add_argument('--case', default=None, help=argparse.SUPPRESS)  # internal: run one case here
    args = parser.parse_args()
    if args.case:
        kind, window = args.case.split(':')
        return case(kind, int(window), args.seconds)
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={args.devices} '
                        f'--xla_cpu_collective_call_terminate_timeout_seconds={args.terminate_s}'}
    print(f'{args.devices} CPU devices, {args.load} load processes, {args.seconds:.0f} s per case, '
          f'rendezvous timeout {args.terminate_s} s')
    for name, (kind, window) in cases([int(k) for k in args.windows.split(',')]).items():
        loaders = [subprocess.Popen([sys.executable, '-c', f'import cpu_collectives as c; c.load({args.seconds + 30})'],
                                    cwd=os.path.dirname(os.path.abspath(__file__))) for _ in range(args.load)]
        run = subprocess.run([sys.executable, __file__, f'--case={kind}:{window}', f'--seconds={args.seconds}'],
                             env=env, capture_output=True, text=True, timeout=args.seconds + 4 * args.terminate_s + 120)
        for loader in loaders:
            loader.kill()
        steps = ([line.split()[1] for line in run.stdout.splitlines() if line.startswith('steps ')] or ['0'])[-1]
        outcome = 'ended' if run.returncode == 0 else f'ABORTED (rc {run.returncode}: rendezvous timeout)' \
            if 'Termination timeout' in run.stderr else f'failed (rc {run.returncode}): {run.stderr[-300:]}'
        print(f'{name:18s} {steps:>6s} steps  {outcome}', flush=True)


if __name__ == '__main__':
    main()
