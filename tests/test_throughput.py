"""benchmarks/throughput.py end to end on CPU with a tiny SongUNet: every part runs and its JSON line is complete
and self-consistent (no timing assertions: speed figures are the benchmark's output, not a test's)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location('throughput', os.path.join(ROOT, 'benchmarks', 'throughput.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_writes_a_complete_json_line(tmp_path, capsys):
    throughput = load_benchmark()
    out = tmp_path / 'results.jsonl'
    tiny = ['model.model_channels=8', 'model.channel_mult=(1, 2)', 'model.num_blocks=1', 'model.attn_resolutions=()']
    argv = ['--config', os.path.join(ROOT, 'configs', 'quickstart.py'), '--batch=8', '--sample_batch=4',
            '--sample_steps=4', '--warmup=1', '--steps=2', '--forward_repeats=1', '--devices=1',
            '--accounting_batch=16', '--conv_repeats=1', '--profile', '--edm_train=2.0', '--edm_forward=4.0',
            f'--out={out}'] + [f'--override={o}' for o in tiny]
    result = throughput.main(argv)
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads(json.dumps(result))
    r = json.loads(lines[0])
    assert (r['platform'], r['precision'], r['batch'], r['num_devices']) == ('cpu', 'fp32', 8, 1)
    assert r['command'].startswith('python benchmarks/throughput.py') and r['jax'] and r['date'] and r['cpu_model']
    assert r['conv_algorithm'] in ('xla', 'winograd')
    assert len(r['load_average_start']) == 3
    for field in ('train_images_per_s', 'train_step_s', 'forward_images_per_s', 'sample_images_per_s',
                  'peak_memory_gib', 'train_memory_gib', 'train_gflop_per_image'):
        assert r[field] > 0, field
    assert r['train_images_per_s'] == pytest.approx(8 / r['train_step_s'])
    assert r['train_update_s'] > 0 and r['train_update_cpu_s'] >= 0   # optimizer + EMA timed alone
    assert r['sample_nfe'] == 2 * 4 - 1 and r['sample_finite'] and r['train_loss_finite']
    assert r['sample_cost_in_forwards'] == pytest.approx(r['sample_s'] / r['forward_s'])
    assert r['train_ratio_vs_edm'] == pytest.approx(r['train_images_per_s'] / 2.0)
    assert r['forward_ratio_vs_edm'] == pytest.approx(r['forward_images_per_s'] / 4.0)
    # the network's convolutions timed alone, and the measured time's share they explain
    for part, seconds in (('forward', r['forward_s']), ('train', r['train_step_s'])):
        assert r[f'{part}_convs_isolated_s'] > 0 and r[f'{part}_convs_isolated_cpu_s'] > 0
        assert r[f'{part}_convs_share'] == pytest.approx(r[f'{part}_convs_isolated_s'] / seconds)
    # per-op-kind profile: every executed op is attributed, convolutions and GroupNorm found by their source
    forward_kinds, train_kinds = r['forward_profile_s'], r['train_profile_s']
    assert all(v >= 0 for v in [*forward_kinds.values(), *train_kinds.values()])
    assert any(kind.startswith('3x3 conv') for kind in forward_kinds) and 'GroupNorm' in forward_kinds
    assert any(kind.startswith('3x3 conv') and kind.endswith('grad') for kind in train_kinds)
    assert {'GroupNorm grad', 'optimizer, EMA'} <= set(train_kinds)
    # XLA's FLOPs per image do not depend on the batch, and a training step costs about 3 forward passes
    # (forward + backward through activations and weights; the first conv needs no input gradient)
    assert r['accounting_gflop_per_image'] == pytest.approx(r['train_gflop_per_image'], rel=0.05)
    assert 2.5 < r['train_gflop_per_image'] / r['forward_gflop_per_image'] < 3.6
    assert r['train_flop_ratio_vs_edm'] == pytest.approx(r['accounting_gflop_per_image'] / (3 * 42.4))
    memory = r['train_memory_bytes']   # donation: the state's input buffers are reused by the outputs
    assert memory['alias'] > 0.9 * memory['output']
    assert 'mfu' not in r              # no MFU on a CPU
    assert 'train ' in capsys.readouterr().out


def test_unknown_precision_is_rejected_before_compiling():
    throughput = load_benchmark()
    with pytest.raises(SystemExit):
        throughput.main(['--config', os.path.join(ROOT, 'configs', 'quickstart.py'), '--precision=fp16'])
