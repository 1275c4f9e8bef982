"""TensorBoard and metrics.jsonl: the event files are read back with an independent reader (TFRecord framing with
its CRC-32C checks, then tensorboardX's bundled Event protobuf), after a direct Logger run and a toy2d training."""
import glob
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxdiff.drivers import images
from jaxdiff.drivers import logger as logger_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- an event-file reader (tests only)

def crc32c(data):
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc(data):
    """TFRecord's mask: rotate right by 15 and add 0xa282ead8."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
    """TFRecord framing: uint64 length, uint32 masked CRC of the length, data, uint32 masked CRC of the data."""
    with open(path, 'rb') as f:
        content = f.read()
    records, offset = [], 0
    while offset < len(content):
        header = content[offset:offset + 8]
        (length,), (header_crc,) = struct.unpack('<Q', header), struct.unpack('<I', content[offset + 8:offset + 12])
        assert header_crc == masked_crc(header), f'corrupt length header at byte {offset} of {path}'
        data = content[offset + 12:offset + 12 + length]
        (data_crc,) = struct.unpack('<I', content[offset + 12 + length:offset + 16 + length])
        assert data_crc == masked_crc(data), f'corrupt record at byte {offset} of {path}'
        records.append(data)
        offset += 16 + length
    return records


def read_events(logdir):
    """({tag: [(step, value)]}, {tag: [(step, uint8 pixels)]}) of every event file under logdir."""
    from tensorboardX.proto import event_pb2
    scalars, pictures = {}, {}
    files = sorted(glob.glob(os.path.join(logdir, '**', 'events.out.tfevents.*'), recursive=True))
    assert files, f'no event file under {logdir}'
    for path in files:
        for record in read_records(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.HasField('image'):
                    pixels = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
                    assert pixels.shape[:2] == (value.image.height, value.image.width)
                    pictures.setdefault(value.tag, []).append((event.step, pixels))
                else:
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, pictures


# ---------------------------------------------------------------- Logger

def test_logger_scalars_and_picture_read_back(tmp_path):
    log = logger_lib.Logger(str(tmp_path), total_steps=10, batch_size=4)
    log.start(0)
    log.progress(5, {'loss': 0.25, 'learning_rate': 1e-3})
    log.scalars(7, {'fid': 12.5})
    digits = np.linspace(-1, 1, 6 * 8 * 8).reshape(6, 8, 8, 1)
    grey = images.picture(digits)
    log.image('samples', grey, 5)
    points = images.picture(np.array([[0.0, 0.0], [1.0, -1.0]]))
    log.image('points', points, 10)
    log.close()

    scalars, pictures = read_events(str(tmp_path / logger_lib.TENSORBOARD_DIR))
    assert scalars['loss'] == [(5, 0.25)]
    assert scalars['learning_rate'] == [(5, np.float32(1e-3))]
    assert scalars['fid'] == [(7, 12.5)]
    [(step, rate)] = scalars['images_per_second']
    assert step == 5 and rate > 0
    [(step, pixels)] = pictures['samples']  # a grey grid arrives as RGB with three equal channels
    assert step == 5 and np.array_equal(pixels, np.repeat(grey, 3, axis=-1))
    [(step, pixels)] = pictures['points']
    assert step == 10 and np.array_equal(pixels, points)

    lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert lines[0]['step'] == 5 and lines[0]['loss'] == 0.25 and np.float32(lines[0]['images_per_second']) == rate
    assert lines[1] == {'step': 7, 'fid': 12.5}


def test_disabled_logger_writes_nothing(tmp_path):
    log = logger_lib.Logger(str(tmp_path / 'run'), total_steps=3, batch_size=2, enabled=False)
    log.progress(1, {'loss': 1.0})
    log.image('samples', np.zeros((4, 4, 3), np.uint8), 1)
    log.close()
    assert not (tmp_path / 'run').exists()


def test_tensorboard_off_keeps_metrics_jsonl(tmp_path):
    log = logger_lib.Logger(str(tmp_path), total_steps=3, batch_size=2, tensorboard=False)
    log.scalars(1, {'loss': 2.0})
    log.image('samples', np.zeros((4, 4), np.uint8), 1)
    log.close()
    assert not (tmp_path / logger_lib.TENSORBOARD_DIR).exists()
    assert json.loads(open(tmp_path / 'metrics.jsonl').read()) == {'step': 1, 'loss': 2.0}


def test_as_rgb_rejects_floats_and_bad_shapes():
    assert logger_lib.as_rgb(np.zeros((2, 3), np.uint8)).shape == (2, 3, 3)
    assert logger_lib.as_rgb(np.zeros((2, 3, 4), np.uint8)).shape == (2, 3, 4)
    with pytest.raises(ValueError, match='uint8'):
        logger_lib.as_rgb(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r'\(2, 3, 2\)'):
        logger_lib.as_rgb(np.zeros((2, 3, 2), np.uint8))


# ---------------------------------------------------------------- pictures

def test_grid_picture_places_each_tile_and_upscales():
    tiles = np.stack([np.full((2, 3, 1), value) for value in (-1.0, 0.0, 1.0)])  # pixels 0, 128, 255
    raw = images.grid(tiles, columns=2, padding=1)
    assert raw.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    assert (raw[1:3, 1:4] == 0).all() and (raw[1:3, 5:8] == 128).all() and (raw[4:6, 1:4] == 255).all()
    assert (raw[4:6, 5:8] == 128).all() and (raw[0] == 128).all()  # empty tile and padding are grey
    big = images.grid_picture(tiles, columns=2, min_size=20)  # 9 pixels wide -> scale 3
    assert big.shape == (21, 27, 1) and np.array_equal(big[::3, ::3], raw)


def test_picture_matches_saved_png(tmp_path):
    points = np.random.default_rng(0).normal(size=(50, 2))
    path = images.save_png(str(tmp_path / 'p.png'), points)
    assert np.array_equal(np.asarray(Image.open(path)), images.picture(points))
    with pytest.raises(ValueError, match=r'\(3, 3\)'):
        images.picture(np.zeros((3, 3)))


# ---------------------------------------------------------------- a toy2d training

@pytest.fixture(scope='module')
def toy2d_run(tmp_path_factory):
    """4 steps of configs/toy2d_edm.py through the command line: logs at steps 2 and 4, samples at step 4."""
    workdir = str(tmp_path_factory.mktemp('toy2d'))
    command = [sys.executable, '-m', 'jaxdiff.main', '--config=configs/toy2d_edm.py', f'--workdir={workdir}',
               '--config.training.batch_size=16', '--config.training.total_images=64',
               '--config.training.log_every_steps=2', '--config.training.checkpoint_every_steps=4',
               '--config.training.sample_every_steps=4', '--config.sampling.num_samples=32',
               '--config.sampling.batch_size=32']
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


def test_toy2d_training_writes_tensorboard_scalars(toy2d_run):
    scalars, _ = read_events(os.path.join(toy2d_run, logger_lib.TENSORBOARD_DIR))
    lines = [json.loads(line) for line in open(os.path.join(toy2d_run, 'metrics.jsonl'))]
    assert [line['step'] for line in lines] == [2, 4]
    for name in ('loss', 'learning_rate'):  # the same values as metrics.jsonl, at float32 precision
        assert [step for step, _ in scalars[name]] == [2, 4]
        np.testing.assert_allclose([value for _, value in scalars[name]], [line[name] for line in lines], rtol=1e-6)
    assert [step for step, _ in scalars['images_per_second']] == [2, 4]
    assert all(value > 0 for _, value in scalars['images_per_second'])


def test_toy2d_training_writes_sample_picture(toy2d_run):
    _, pictures = read_events(os.path.join(toy2d_run, logger_lib.TENSORBOARD_DIR))
    [(step, pixels)] = pictures['samples']
    saved = np.asarray(Image.open(os.path.join(toy2d_run, 'samples', 'step_00000004.png')))
    assert step == 4 and np.array_equal(pixels, saved)
