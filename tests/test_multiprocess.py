"""Multi-process runs on the CPU: two processes on 127.0.0.1 joined by jax.distributed (gloo collectives), 4 CPU
devices each, train toy2d and sample exactly like one process with 8 devices; each reads only its own rows of the
data. The launch scripts parse, print their usage and pass the right ids to each process.

Runs that survive a pod (one module fixture, `pod`, runs them in two groups of concurrent processes):
- SIGTERM to process 1 only stops both processes after the same step, both save it and exit 0, and the resumed
  run ends with the parameters of an uninterrupted run, bit for bit: under JAX's preemption sync (every step a
  checkpoint step), and with the service off, where the processes all-gather their stop flags (the stop step then
  between two checkpoint steps).
- A run resumes on another device count: started on 8 devices and resumed on 4 and on 2 processes x 2, started on 4
  and on 2 x 2 and resumed on 8, each equal to the uninterrupted 2 x 4 run up to float32 rounding; a global batch
  that does not divide by the new device count is one error line before anything compiles.
- `--mode=evaluate` (digits metric) on 2 processes gives the numbers of 1 process; process 0 alone writes the file.

This file is also the data worker (`python tests/test_multiprocess.py data_worker COORDINATOR PROCESS_ID OUT`) and
the signal worker (`... signal_worker STEP JAXDIFF_MAIN_ARGS...`: the command line run, SIGTERM sent to itself
when the data of step STEP is read)."""
import os
import shutil
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


# ---------------------------------------------------------------- the pod fixture: two groups of concurrent runs

STEPS, TOY_BATCH = 12, 16
TOY2D = [f'--config.training.batch_size={TOY_BATCH}', f'--config.training.total_images={STEPS * TOY_BATCH}',
         '--config.training.log_every_steps=4', '--config.training.checkpoint_every_steps=4',
         '--config.training.keep_checkpoints=10', '--config.training.sample_every_steps=0',
         f'--config.training.lr_rampup_images={TOY_BATCH}',   # the full lr from step 1: the parameters move
         '--config.sampling.num_samples=24', '--config.sampling.batch_size=16']
SIGNAL_STEP = 4   # process 1 of the interrupted runs sends itself SIGTERM when it reads this step's data
# the digits evaluation: a random-weights MLP on 8 x 8 digits, 16 samples of 2 Heun steps, the digits FD
EVALUATE_CONFIG = """from jaxdiff.drivers import config_files
import ml_collections


def get_config():
    config = config_files.named('toy2d_edm', **{'model.hidden_dim': 16, 'model.num_layers': 1,
                                                 'sampling.batch_size': 8, 'sampling.schedule_options.num_steps': 2})
    config.data = ml_collections.ConfigDict(dict(name='digits', shape=(8, 8, 1), split='train'))
    config.evaluation = ml_collections.ConfigDict(dict(metric='digits', num_samples=16, kid=False))
    return config
"""


def two_processes(workdir, *args, config='configs/toy2d_edm.py'):
    """launch/local_multiprocess.sh with 2 processes x 4 CPU devices."""
    env = {**cpu_env(4), 'PYTHON': sys.executable, 'DEVICES_PER_PROCESS': '4', 'PORT': str(free_port())}
    return ['bash', os.path.join(LAUNCH, 'local_multiprocess.sh'), '2', workdir, config, *args], env


def one_process(workdir, *args, config='configs/toy2d_edm.py', num_devices=8):
    return [sys.executable, '-m', 'jaxdiff.main', f'--config={config}', f'--workdir={workdir}', *args], \
        cpu_env(num_devices)


def processes(workdir, num_devices, *args, signal_step=None, env=None):
    """2 processes of `num_devices` CPU devices each, started directly (each one's output kept apart); process 1
    sends itself SIGTERM when it reads the data of step `signal_step` (the signal worker) when given."""
    coordinator = f'127.0.0.1:{free_port()}'
    jobs = []
    for i in range(2):
        head = ([sys.executable, os.path.abspath(__file__), 'signal_worker', str(signal_step)]
                if i == 1 and signal_step is not None else [sys.executable, '-m', 'jaxdiff.main'])
        jobs.append(([*head, '--config=configs/toy2d_edm.py', f'--workdir={workdir}',
                      '--config.distributed.initialize=True', f'--config.distributed.coordinator_address={coordinator}',
                      '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}', *args],
                     {**cpu_env(num_devices), **(env or {})}))
    return jobs


def start_together(jobs):
    return [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for command, env in jobs]


def wait_together(processes, timeout=TIMEOUT):
    """Waits for every process of `start_together` (bounded), kills each one's process group at the end. Returns the
    outputs (stdout and stderr together); a non-zero exit fails the test with the outputs."""
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


def run_together(jobs, timeout=TIMEOUT):
    """Starts every (command, env) at once and waits for all (`wait_together`)."""
    return wait_together(start_together(jobs), timeout)


def copy_until(source, target, step):
    """A copy of workdir `source` whose newest checkpoint is `step` (the later ones left out)."""
    shutil.copytree(source, target, ignore=lambda directory, names: [
        name for name in names if os.path.basename(directory) == 'checkpoints' and name.isdigit() and int(name) > step])
    return str(target)


def toy_config(steps, sampling=False):
    """TOY2D's config (with its sampling fields when `sampling`)."""
    from jaxdiff.drivers import config_files
    overrides = {'training.batch_size': TOY_BATCH, 'training.total_images': steps * TOY_BATCH,
                 'training.log_every_steps': 4, 'training.checkpoint_every_steps': 4, 'training.keep_checkpoints': 10,
                 'training.sample_every_steps': 0, 'training.lr_rampup_images': TOY_BATCH}
    if sampling:
        overrides.update({'sampling.num_samples': 24, 'sampling.batch_size': 16})
    return config_files.load(os.path.join(REPO, 'configs', 'toy2d_edm.py'), overrides)


def train_in_process(workdir, steps, num_devices):
    """The toy run of TOY2D in this process on its first `num_devices` devices (test sessions have 8)."""
    import jax
    from jaxdiff.modes import train as train_mode
    return train_mode.run(toy_config(steps), str(workdir), devices=jax.devices()[:num_devices])


def final_state(workdir, step=STEPS):
    """The 'state' item (the whole TrainState) of checkpoint `step` of `workdir`, on the host."""
    import jax
    from jaxdiff.drivers import checkpoint, mesh as mesh_lib, train_step
    setup = train_step.build(toy_config(STEPS))
    checkpoints = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        return jax.device_get(checkpoints.restore(setup.abstract_state(mesh_lib.make_mesh()), step))
    finally:
        checkpoints.close()


def stop_steps(output):
    """The steps after which the loop said the stop was agreed."""
    return [int(line.split('after step ')[1].split(' ')[0]) for line in output.splitlines()
            if line.startswith('stop agreed by every process after step ')]


def wait_for(path, processes, timeout=TIMEOUT):
    """Waits until `path` exists (or one of `processes` has ended)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline and all(p.poll() is None for p in processes):
        time.sleep(0.2)


@pytest.fixture(scope='module')
def pod(tmp_path_factory):
    """Every multi-process run of the tests below, in two groups of concurrent processes (the second resumes what
    the first left; runs in this process fill the waits). Returns their workdirs and the processes' outputs.

    The runs on 2 x 4 devices compile the same programs: the interrupted ones start once the uninterrupted one has
    compiled its step (its first checkpoint is there), so that they read the session's compilation cache."""
    from jaxdiff.drivers import config_files
    from jaxdiff.modes import sample as sample_mode
    from test_evaluate import write_ema_workdir
    root = tmp_path_factory.mktemp('pod')
    w = {name: str(root / name) for name in ('two', 'one', 'preemption_sync', 'all_gather', 'evaluate_two',
                                              'evaluate_one', 'four_to_eight')}
    evaluate_config = str(root / 'evaluate_digits.py')
    with open(evaluate_config, 'w') as f:
        f.write(EVALUATE_CONFIG)
    for name in ('evaluate_two', 'evaluate_one'):
        write_ema_workdir(config_files.load(evaluate_config), w[name])
    started = {
        'two': start_together([two_processes(w['two'], *TOY2D)]),
        'evaluate_two': start_together([two_processes(w['evaluate_two'], '--mode=evaluate', config=evaluate_config)]),
        # the digits classifier depends on the devices of its process (XLA:CPU splits its matmuls by them): the
        # one-process reference has 4 devices too
        'evaluate_one': start_together([one_process(w['evaluate_one'], '--mode=evaluate', config=evaluate_config,
                                                    num_devices=4)]),
    }
    # the 1 x 8 run (as the 2 x 4 one), here; its checkpoint 4 is resumed on 2 processes x 2 devices
    train_in_process(w['one'], STEPS, 8)
    w['eight_to_two_by_two'] = copy_until(w['one'], root / 'eight_to_two_by_two', 4)
    started['eight_to_two_by_two'] = start_together(processes(w['eight_to_two_by_two'], 2, *TOY2D))
    wait_for(os.path.join(w['two'], 'checkpoints', '4'), started['two'])
    every_step = ['--config.training.checkpoint_every_steps=1', '--config.training.keep_checkpoints=3']
    off_cadence = ['--config.training.checkpoint_every_steps=3']
    started['preemption_sync'] = start_together(processes(w['preemption_sync'], 4, *TOY2D, *every_step,
                                                          signal_step=SIGNAL_STEP))
    started['all_gather'] = start_together(processes(w['all_gather'], 4, *TOY2D, *off_cadence,
                                                     signal_step=SIGNAL_STEP,
                                                     env={'JAX_ENABLE_PREEMPTION_SERVICE': 'false'}))
    # meanwhile here: a run started on 4 devices (resumed on 8 below)
    train_in_process(w['four_to_eight'], 4, 4)
    first = {name: wait_together(procs) for name, procs in started.items()}
    # the second group resumes an interrupted run and samples
    started = {
        'preemption_sync': start_together(processes(w['preemption_sync'], 4, *TOY2D)),
        'sample_two': start_together([two_processes(w['two'], '--mode=sample', *TOY2D)]),
    }
    # meanwhile here: 8 -> 4 devices (the 2 x 4 run's checkpoint 4), 4 -> 8, and the 1 x 8 samples
    w['eight_to_four'] = copy_until(w['two'], root / 'eight_to_four', 4)
    train_in_process(w['eight_to_four'], STEPS, 4)
    train_in_process(w['four_to_eight'], STEPS, 8)
    sample_mode.run(toy_config(STEPS, sampling=True), w['one'])
    second = {name: wait_together(procs) for name, procs in started.items()}
    return w, first, second


# ---------------------------------------------------------------- train and sample: 2 x 4 devices == 1 x 8

def read_metrics(workdir):
    import json
    return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def restore_ema(config, workdir, mesh):
    """(step, EMA parameters) of the newest checkpoint in `workdir`."""
    from jaxdiff.drivers import sampling, trained as trained_lib
    trained = trained_lib.restore(config, workdir, mesh)
    return trained.step, trained.variables


def test_two_processes_train_and_sample_like_one_process_with_all_devices(pod):
    import jax
    from jaxdiff.drivers import config_files, mesh as mesh_lib

    w, _, _ = pod
    multi, single = w['two'], w['one']
    assert os.path.isfile(os.path.join(multi, 'logs', 'process_1.log'))  # the second process ran
    assert not os.path.exists(os.path.join(multi, 'logs', 'process_0.log'))
    multi_metrics, single_metrics = read_metrics(multi), read_metrics(single)
    assert [m['step'] for m in multi_metrics] == [m['step'] for m in single_metrics] == [4, 8, 12]
    np.testing.assert_allclose([m['loss'] for m in multi_metrics], [m['loss'] for m in single_metrics], rtol=1e-6)

    # the parameters: equal up to the order of float32 sums in the gradient all-reduce (gloo vs in-process)
    config = config_files.load(os.path.join(REPO, 'configs', 'toy2d_edm.py'))
    mesh = mesh_lib.make_mesh()
    trained = []
    for workdir in (multi, single):
        step, ema = restore_ema(config, workdir, mesh)
        assert step == STEPS
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


# ---------------------------------------------------------------- SIGTERM to one process: every process stops

@pytest.mark.parametrize('mechanism', ['preemption_sync', 'all_gather'])
def test_sigterm_to_one_process_stops_both_at_one_step_saved_as_in_an_uninterrupted_run(pod, mechanism):
    """preemption_sync: JAX's preemption sync point, every step a checkpoint step (the stop step's save is the
    regular one, made once); the run resumed from it ends with the uninterrupted run's parameters, bit for bit.
    all_gather (jax_enable_preemption_service=False): the flags all-gathered every 4 steps, checkpoints every 3, so
    the stop step falls between two checkpoint steps and is saved off the cadence; the saved state is the
    uninterrupted run's state at that step, bit for bit (so is a run resumed from it: the preemption_sync case)."""
    import jax
    from jaxdiff.drivers import checkpoint
    w, first, second = pod
    outputs = first[mechanism]
    [stop_0], [stop_1] = stop_steps(outputs[0]), stop_steps(outputs[1])   # said once by each process, the same
    assert stop_0 == stop_1, outputs
    stopped_at = stop_0
    assert 1 <= stopped_at < STEPS
    assert 'SIGTERM' in outputs[1] and 'SIGTERM' not in outputs[0]          # the signal reached process 1 only
    uninterrupted = lambda step: jax.tree.leaves(final_state(w['two'], step))
    if mechanism == 'all_gather':
        assert stopped_at % 4 == 0 and stopped_at % 3 != 0                 # agreed on the cadence, off the saves'
        assert checkpoint.Checkpoints(w[mechanism], read_only=True).latest_step() == stopped_at
        saved = jax.tree.leaves(final_state(w[mechanism], stopped_at))
        assert all(np.array_equal(a, b) for a, b in zip(saved, uninterrupted(stopped_at)))
        return
    for output in second[mechanism]:    # both processes resumed from the step they saved
        assert f'resuming from {w[mechanism]}/checkpoints/{stopped_at}' in output, output[-3000:]
    resumed = jax.tree.leaves(final_state(w[mechanism]))
    assert all(np.array_equal(a, b) for a, b in zip(resumed, uninterrupted(STEPS)))


# ---------------------------------------------------------------- resume on another device count

# The global batch of a step is a function of the step alone (each process reads its rows of it), and so are the
# draws (keys fold_in(step); sigma and noise drawn for the global batch): a resumed run computes the same steps on any
# device count. What differs is the order of the float32 sums in the gradient all-reduce (the per-device partial sums
# and, across processes, gloo's reduction), so the state agrees to float32 rounding, not bit for bit. Measured over
# the 12 steps of Adam at lr 1e-3 on toy2d, every array of the TrainState: at most 4.2e-7 absolute (8 -> 4: 1.2e-7,
# 8 -> 2 x 2: 3.9e-7, 4 -> 8: 4.2e-7), while the 8 steps after the resumed checkpoint move it by up to 0.13; a lost or
# wrong step would be off by ~1e-2. DEVICE_COUNT_ATOL allows 5x the measured rounding.
DEVICE_COUNT_ATOL = 2e-6


@pytest.mark.parametrize('name, started, resumed', [
    ('eight_to_four', '2 x 4 devices', '1 x 4 devices'),
    ('eight_to_two_by_two', '1 x 8 devices', '2 x 2 devices'),
    ('four_to_eight', '1 x 4 devices', '1 x 8 devices'),
])
def test_a_run_resumes_on_another_device_count(pod, name, started, resumed):
    import jax
    w, _, _ = pod
    leaves = jax.tree.leaves(final_state(w[name]))
    reference = jax.tree.leaves(final_state(w['two']))   # the uninterrupted run on 2 x 4
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, reference))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(final_state(w['two'], 4)), reference)
                if np.issubdtype(b.dtype, np.floating))
    print(f'{name} ({started} -> {resumed}): max |difference| to the uninterrupted run {worst:.3g} (the last 8 '
          f'steps moved the state by up to {moved:.3g})')
    assert moved > 1e4 * DEVICE_COUNT_ATOL     # the steps after the checkpoint matter far more than the tolerance
    for a, b in zip(leaves, reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=DEVICE_COUNT_ATOL)


def test_a_global_batch_that_does_not_divide_by_the_new_device_count_is_one_line_before_compiling(pod, tmp_path,
                                                                                               monkeypatch):
    import jax
    from jaxdiff.core.errors import UserError
    from jaxdiff.drivers import train_step
    from jaxdiff.modes import train as train_mode
    w, _, _ = pod
    workdir = copy_until(w['two'], tmp_path / 'w', 8)
    monkeypatch.setattr(train_step, 'build', lambda config: pytest.fail('built (and compiled) before the check'))
    with pytest.raises(UserError, match=r'training.batch_size=16 is not divisible by the number of devices \(3\)') \
            as error:
        train_mode.run(toy_config(STEPS), workdir, devices=jax.devices()[:3])
    assert '\n' not in str(error.value)


# ---------------------------------------------------------------- evaluate: 2 processes == 1 process

def test_evaluate_on_two_processes_equals_one_process(pod):
    import json
    w, first, _ = pod
    results = []
    for name in ('evaluate_two', 'evaluate_one'):
        lines = open(os.path.join(w[name], 'evaluation.jsonl')).read().splitlines()
        assert len(lines) == 1, lines            # written once: by process 0 only
        results.append(json.loads(lines[0]))
    two, one = results
    assert two['num_samples'] == one['num_samples'] == 16 and two['nfe'] == one['nfe']
    for field in ('digits_fd', 'digits_data_fd', 'digits_classifier_accuracy'):
        np.testing.assert_allclose(two[field], one[field], rtol=1e-6)
    process_1 = open(os.path.join(w['evaluate_two'], 'logs', 'process_1.log')).read()
    assert '"digits_fd"' not in process_1          # the result line is printed by process 0 only
    assert '"digits_fd"' in first['evaluate_two'][0]


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
    script = ('from jaxdiff.drivers import mesh\ntry:\n    mesh.initialize_distributed(True)\n'
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


class SignalAt:
    """A data source that sends this process SIGTERM when the data of step `step` is read, and from then on reads
    slowly (0.5 s a step: the stop, agreed a second or so later under JAX's preemption sync, comes well before the
    run's end)."""

    def __init__(self, source, step):
        self.source, self.step, self.shape = source, step, source.shape

    def batch(self, step, size, **kwargs):
        if step == self.step:
            print(f'signal worker: sending SIGTERM to this process ({os.getpid()}) at the data of step {step}',
                  flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        if step >= self.step:
            time.sleep(0.5)
        return self.source.batch(step, size, **kwargs)


def signal_worker(step, argv):
    """`python -m jaxdiff.main ARGV` whose data source is wrapped in SignalAt(step)."""
    from jaxdiff import data, main
    build = data.build
    data.build = lambda config: SignalAt(build(config), step)
    sys.argv = ['jaxdiff.main', *argv]
    main.entry()


if __name__ == '__main__':
    if sys.argv[1:2] == ['data_worker']:
        data_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1:2] == ['signal_worker']:
        signal_worker(int(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit(f'usage: {sys.argv[0]} data_worker COORDINATOR PROCESS_ID OUT | signal_worker STEP ARGS...')
