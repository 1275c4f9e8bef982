"""Multi-process runs on the CPU: two processes on 127.0.0.1 joined by jax.distributed (gloo collectives), 4 CPU
devices each, train toy2d and sample exactly like one process with 8 devices; each reads only its own rows of the
data. The launch scripts parse, print their usage and pass the right ids to each process.

This file is also the data worker: `python tests/test_multiprocess.py data_worker COORDINATOR PROCESS_ID OUT`."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
TIMEOUT = 300  # seconds for one group of processes; they are killed after it
STEP, BATCH = 3, 16  # the data test's global batch


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def cpu_env(num_devices):
    """The environment of a child process: CPU only with `num_devices` devices, this checkout's jaxdiff."""
    env = dict(os.environ)
    flags = [f for f in env.get('XLA_FLAGS', '').split() if 'force_host_platform_device_count' not in f]
    env.update(XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(num_devices),
               PYTHONPATH=REPO + os.pathsep + env.get('PYTHONPATH', ''))
    return env


def run_together(jobs, timeout=TIMEOUT):
    """Starts every (command, env) at once, waits for all (bounded), kills each one's process group at the end.
    Returns the outputs (stdout and stderr together); a non-zero exit fails the test with the outputs."""
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True) for command, env in jobs]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            try:
                outputs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f'{processes.index(process)}: still running after {timeout} s: {process.args}')
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    failed = [(p.args, p.returncode, out) for p, out in zip(processes, outputs) if p.returncode != 0]
    assert not failed, '\n\n'.join(f'{args} exited {code}:\n{out[-4000:]}' for args, code, out in failed)
    return outputs


# ---------------------------------------------------------------- train and sample: 2 x 4 devices == 1 x 8

TOY2D = ['--config.training.batch_size=16', '--config.training.total_images=64',  # 4 steps
         '--config.training.log_every_steps=2', '--config.training.checkpoint_every_steps=4',
         '--config.training.sample_every_steps=0', '--config.sampling.num_samples=24',
         '--config.sampling.batch_size=16']


def two_processes(workdir, *args):
    """launch/local_multiprocess.sh with 2 processes x 4 CPU devices."""
    env = {**cpu_env(4), 'PYTHON': sys.executable, 'DEVICES_PER_PROCESS': '4', 'PORT': str(free_port())}
    return ['bash', os.path.join(LAUNCH, 'local_multiprocess.sh'), '2', workdir, 'configs/toy2d_edm.py', *args], env


def one_process(workdir, *args):
    return [sys.executable, '-m', 'jaxdiff.main', '--config=configs/toy2d_edm.py', f'--workdir={workdir}',
            *args], cpu_env(8)


def read_metrics(workdir):
    import json
    return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def restore_ema(config, workdir, mesh):
    """(step, EMA parameters) of the newest checkpoint in `workdir`."""
    from jaxdiff.drivers import generate
    trained = generate.restore(config, workdir, mesh)
    return trained.step, trained.variables


def test_two_processes_train_and_sample_like_one_process_with_all_devices(tmp_path):
    import jax
    from jaxdiff.drivers import config_files, mesh as mesh_lib

    multi, single = str(tmp_path / 'two_processes'), str(tmp_path / 'one_process')
    run_together([two_processes(multi, *TOY2D), one_process(single, *TOY2D)])
    run_together([two_processes(multi, '--mode=sample', *TOY2D), one_process(single, '--mode=sample', *TOY2D)])

    assert os.path.isfile(os.path.join(multi, 'logs', 'process_1.log'))  # the second process ran
    assert not os.path.exists(os.path.join(multi, 'logs', 'process_0.log'))
    multi_metrics, single_metrics = read_metrics(multi), read_metrics(single)
    assert [m['step'] for m in multi_metrics] == [m['step'] for m in single_metrics] == [2, 4]
    np.testing.assert_allclose([m['loss'] for m in multi_metrics], [m['loss'] for m in single_metrics], rtol=1e-6)

    # the parameters: equal up to the order of float32 sums in the gradient all-reduce (gloo vs in-process)
    config = config_files.load(os.path.join(REPO, 'configs', 'toy2d_edm.py'))
    mesh = mesh_lib.make_mesh()
    trained = []
    for workdir in (multi, single):
        step, ema = restore_ema(config, workdir, mesh)
        assert step == 4
        trained.append(jax.device_get(ema))
    leaves_multi, leaves_single = jax.tree.leaves(trained[0]), jax.tree.leaves(trained[1])
    assert jax.tree.structure(trained[0]) == jax.tree.structure(trained[1])
    for a, b in zip(leaves_multi, leaves_single):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    samples_multi = np.load(os.path.join(multi, 'samples.npz'))
    samples_single = np.load(os.path.join(single, 'samples.npz'))
    assert samples_multi['samples'].shape == (24, 2)  # two batches of 16, the second cut
    np.testing.assert_allclose(samples_multi['samples'], samples_single['samples'], rtol=0, atol=1e-5)
    assert int(samples_multi['nfe']) == int(samples_single['nfe'])


# ---------------------------------------------------------------- each process reads only its own rows

def data_worker(coordinator, process_id, out):
    """Process `process_id` of 2: records the example indices it reads, assembles the global batch and gathers it."""
    import jax
    from jax.experimental import multihost_utils
    from jaxdiff.drivers import mesh as mesh_lib
    from jaxdiff.data import digits, synthetic

    mesh_lib.initialize_distributed(True, coordinator, 2, process_id)
    mesh = mesh_lib.make_mesh()
    source = digits.Digits(shape=(8, 8, 1))
    read = []
    get = source.get
    source.get = lambda indices: (read.append(np.asarray(indices)), get(indices))[1]
    results = {}
    for name, src in (('digits', source), ('gaussians', synthetic.eight_gaussians())):
        local = src.batch(STEP, BATCH, seed=0, process_index=jax.process_index(), process_count=jax.process_count())
        global_batch = mesh_lib.global_batch(local, mesh)
        image = global_batch['image']
        shards = sorted(image.addressable_shards, key=lambda shard: shard.index[0].start)
        results[f'{name}_local'] = local['image']
        results[f'{name}_on_my_devices'] = np.concatenate([np.asarray(shard.data) for shard in shards])
        results[f'{name}_my_rows'] = np.concatenate([np.arange(BATCH)[shard.index[0]] for shard in shards])
        results[f'{name}_gathered'] = np.asarray(multihost_utils.process_allgather(image, tiled=True))
        results[f'{name}_gathered_label'] = np.asarray(
            multihost_utils.process_allgather(global_batch['label'], tiled=True))
    np.savez(out, read=np.concatenate(read), process_index=jax.process_index(),
             process_count=jax.process_count(), num_devices=jax.device_count(), **results)


def test_each_process_reads_only_its_own_rows(tmp_path):
    from jaxdiff import data
    from jaxdiff.data import digits, synthetic

    coordinator = f'127.0.0.1:{free_port()}'
    outs = [str(tmp_path / f'process_{i}.npz') for i in range(2)]
    run_together([([sys.executable, os.path.abspath(__file__), 'data_worker', coordinator, str(i), outs[i]],
                   cpu_env(4)) for i in range(2)])
    results = [np.load(out) for out in outs]

    source = digits.Digits(shape=(8, 8, 1))
    indices = data.sequence_indices(source.num_examples, 0, 0, STEP * BATCH, (STEP + 1) * BATCH)
    references = {'digits': source.batch(STEP, BATCH, seed=0),
                  'gaussians': synthetic.eight_gaussians().batch(STEP, BATCH, seed=0)}
    half = BATCH // 2
    for i, result in enumerate(results):
        assert (int(result['process_index']), int(result['process_count']), int(result['num_devices'])) == (i, 2, 8)
        mine = slice(i * half, (i + 1) * half)
        # a finite set: the process asked for its own examples only, rows [i B/2, (i+1) B/2) of the global batch
        np.testing.assert_array_equal(result['read'], indices[mine])
        for name, reference in references.items():
            np.testing.assert_array_equal(result[f'{name}_my_rows'], np.arange(BATCH)[mine])
            np.testing.assert_array_equal(result[f'{name}_local'], reference['image'][mine])
            np.testing.assert_array_equal(result[f'{name}_on_my_devices'], reference['image'][mine])
            # together the processes hold exactly the one-process batch
            np.testing.assert_array_equal(result[f'{name}_gathered'], reference['image'])
            np.testing.assert_array_equal(result[f'{name}_gathered_label'], reference['label'])
    assert not set(results[0]['read']) & set(results[1]['read'])


def test_initialize_errors_are_one_line_user_errors():
    import jax
    from jaxdiff.drivers import mesh as mesh_lib
    from jaxdiff.core.errors import UserError
    jax.devices()  # this process has used JAX: too late to join a distributed run
    with pytest.raises(UserError, match='already used JAX') as error:
        mesh_lib.initialize_distributed(True, '127.0.0.1:1', 2, 0)
    assert '\n' not in str(error.value)
    mesh_lib.initialize_distributed(False)  # off: nothing happens

    # a fresh process without a cluster to detect (no SLURM / Open MPI / TPU / Kubernetes variables) or fields
    env = {name: value for name, value in cpu_env(1).items()
           if not name.startswith(('SLURM_', 'OMPI_', 'PMI_', 'TPU_', 'MEGASCALE_', 'JAX_COORDINATOR', 'JOBSET_'))}
    script = ('from jaxdiff import mesh\ntry:\n    mesh.initialize_distributed(True)\n'
              'except mesh.UserError as e:\n    print(e)\n')
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)
    [line] = result.stdout.splitlines()
    assert 'coordinator_address' in line and 'launch/' in line


def test_importing_jaxdiff_starts_no_backend():
    """jax.distributed.initialize() must run before JAX's backend starts: no module may compute at import
    (a module-level jnp value started it once, and every multi-process run stopped with 'already used JAX')."""
    script = ('import importlib, pkgutil, jaxdiff\n'
              'for m in pkgutil.walk_packages(jaxdiff.__path__, "jaxdiff."):\n'
              '    importlib.import_module(m.name)\n'
              'from jax._src import xla_bridge\n'
              'print(sorted(xla_bridge._backends) if hasattr(xla_bridge, "_backends") else "unknown")\n')
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=cpu_env(1), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if result.stdout.splitlines()[-1] == 'unknown':     # jax's private registry moved: nothing to read
        pytest.skip('this jax keeps no xla_bridge._backends')
    assert result.stdout.splitlines()[-1] == '[]', result.stdout


# ---------------------------------------------------------------- the launch scripts

SCRIPTS = ('local_multiprocess.sh', 'slurm_gpu.sbatch', 'tpu_pod.sh')


@pytest.mark.parametrize('script', SCRIPTS)
def test_launch_script_parses_and_prints_usage(script):
    path = os.path.join(LAUNCH, script)
    subprocess.run(['bash', '-n', path], check=True, timeout=30)
    result = subprocess.run(['bash', path], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f'launch/{script} ' in result.stdout and '#' not in result.stdout  # the usage, comment marks stripped


FAKE_SLURM = {
    'scontrol': '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n',
    # srun: run the command once per task, with the task's SLURM ids, one after the other
    'srun': ('#!/bin/bash\n[ "$1" = --kill-on-bad-exit=1 ] && shift\n'
             'per_node=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))\n'
             'for ((t = 0; t < SLURM_NTASKS; t++)); do\n'
             '  SLURM_PROCID=$t SLURM_LOCALID=$((t % per_node)) "$@" || exit\n'
             'done\n'),
    # python: record what the task would run
    'python': ('#!/bin/bash\necho "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS $*" >> "$RECORD"\n'),
}


@pytest.mark.parametrize('tasks_per_node, visible, device_ids', [
    (1, '0,1,2,3', ['0,1,2,3', '0,1,2,3']),       # one process per node drives all its GPUs
    (4, '0,1,2,3', ['0', '1', '2', '3'] * 2),     # one per GPU, every GPU visible: the task's own
    (4, '2', ['0'] * 8),                          # one per GPU, SLURM bound one GPU to each task
])
def test_slurm_script_gives_each_task_its_ids_and_gpus(tmp_path, tasks_per_node, visible, device_ids):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / 'record.txt'
    num_tasks = 2 * tasks_per_node
    env = {**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', 'RECORD': str(record),
           'SLURM_JOB_ID': '4242', 'SLURM_JOB_NODELIST': 'gpu-a[17-18]', 'SLURM_NTASKS': str(num_tasks),
           'SLURM_JOB_NUM_NODES': '2', 'SLURM_SUBMIT_DIR': str(tmp_path), 'CUDA_VISIBLE_DEVICES': visible}
    env.pop('PYTHON', None)
    subprocess.run(['bash', os.path.join(LAUNCH, 'slurm_gpu.sbatch'), 'runs/x', 'configs/digits_edm.py',
                    '--config.training.batch_size=64'], env=env, cwd=tmp_path, check=True, timeout=60,
                   capture_output=True)
    lines = record.read_text().splitlines()
    assert len(lines) == num_tasks
    port = 4242 % 4096 + 61440
    for task, (line, ids) in enumerate(zip(lines, device_ids)):
        assert line == (f'JAX_LOCAL_DEVICE_IDS={ids} -m jaxdiff.main --config=configs/digits_edm.py '
                        f'--workdir=runs/x --config.training.batch_size=64 --config.distributed.initialize=True '
                        f'--config.distributed.coordinator_address=gpu-a17:{port} '
                        f'--config.distributed.num_processes={num_tasks} --config.distributed.process_id={task}')


def test_tpu_pod_script_runs_the_same_command_on_every_worker():
    env = {**os.environ, 'DRY_RUN': '1', 'PROJECT': 'my-project'}
    env.pop('SETUP', None), env.pop('BUCKET', None), env.pop('PYTHON', None)
    result = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_pod.sh'), 'pod-1', 'us-central2-b', '/mnt/b/run',
                             'configs/cifar_edm.py', '--config.training.batch_size=512'],
                            env=env, capture_output=True, text=True, check=True, timeout=30)
    [line] = result.stdout.splitlines()
    assert line.split()[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod-1']
    assert '--zone=us-central2-b --project=my-project --worker=all' in line
    # the remote command, as the worker's shell will read it: the same on every worker, no process ids
    remote = subprocess.run(['bash', '-c', f'printf "%s" {line.split(" --command=", 1)[1]}'],
                            capture_output=True, text=True, check=True).stdout
    assert remote == ('cd jaxdiff && python3 -m jaxdiff.main --config=configs/cifar_edm.py --workdir=/mnt/b/run '
                      '--config.distributed.initialize=True --config.training.batch_size=512 ')


if __name__ == '__main__':
    if sys.argv[1:2] == ['data_worker']:
        data_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f'usage: {sys.argv[0]} data_worker COORDINATOR PROCESS_ID OUT')
