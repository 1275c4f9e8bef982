"""Training progress: a one-line summary on stdout (step, loss, images/s, ETA), scalars to `WORKDIR/metrics.jsonl`
and, by default, scalars and sample pictures to TensorBoard event files in `WORKDIR/tensorboard`.

    log = Logger(workdir, total_steps=T, batch_size=B, enabled=jax.process_index() == 0)
    log.start(step)                          # after the first compiled step: time origin of images/s and ETA
    log.progress(step, {'loss': l, 'learning_rate': lr})   # stdout line + scalars (images_per_second added)
    log.scalars(step, {'name': value})        # scalars only
    log.image('samples', images.picture(samples), step)    # a uint8 picture [H, W, C] or [H, W]
    log.close()

TensorBoard files are written with tensorboardX (a dependency: numpy, protobuf and packaging only, no TensorFlow);
`tensorboard --logdir WORKDIR/tensorboard` shows them. Without tensorboardX importable, a one-line warning says so
and metrics.jsonl is still written.
"""
import datetime
import json
import os
import sys
import time

import numpy as np

TENSORBOARD_DIR = 'tensorboard'


def tensorboard_writer(logdir):
    """tensorboardX's SummaryWriter on `logdir`, or None (with a warning on stderr) when it is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        print(f'warning: no TensorBoard files ({e}); pip install tensorboardX to get them', file=sys.stderr)
        return None
    return SummaryWriter(logdir)


def as_rgb(pixels):
    """A uint8 picture [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> [H, W, 3 or 4] (grey repeated to RGB)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f'a picture must be uint8 pixels (jaxdiff.drivers.images.picture), got dtype {pixels.dtype}')
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
        raise ValueError(f'a picture must be [H, W] or [H, W, C] with C in 1, 3, 4, got shape {pixels.shape}')
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


class Logger:
    """Writes only on process 0 (pass `enabled=False` elsewhere); `tensorboard=False` writes metrics.jsonl only."""

    def __init__(self, workdir, *, total_steps, batch_size, enabled=True, tensorboard=True):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.enabled = enabled
        self._last = None  # (step, time) of the previous report
        self._writer = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
            if tensorboard:
                self._writer = tensorboard_writer(os.path.join(workdir, TENSORBOARD_DIR))

    def start(self, step):
        """Marks the time origin for images/s and ETA (call after the first compiled step, so compile time is out)."""
        self._last = (step, time.perf_counter())

    def scalars(self, step, scalars):
        """Appends {'step': step, **scalars} to metrics.jsonl and adds each scalar to TensorBoard."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
        self._jsonl.flush()
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), int(step))
            self._writer.flush()

    def image(self, name, pixels, step):
        """Adds a uint8 picture ([H, W] or [H, W, C], e.g. `jaxdiff.drivers.images.picture(samples)`) to TensorBoard."""
        if not self.enabled or self._writer is None:
            return
        self._writer.add_image(name, as_rgb(pixels), int(step), dataformats='HWC')
        self._writer.flush()

    def progress(self, step, scalars):
        """Logs `step N/T  loss L  I img/s  ETA h:mm:ss` and records the scalars with images/s added."""
        now = time.perf_counter()
        scalars = dict(scalars)
        if self._last is not None and step > self._last[0]:
            seconds_per_step = (now - self._last[1]) / (step - self._last[0])
            scalars['images_per_second'] = self.batch_size / seconds_per_step
            eta = datetime.timedelta(seconds=round(seconds_per_step * (self.total_steps - step)))
        else:
            eta = '?'
        self._last = (step, now)
        self.scalars(step, scalars)
        if self.enabled:
            rate = scalars.get('images_per_second')
            rate = f'{rate:.1f}' if rate is not None else '?'
            print(f'step {step}/{self.total_steps}  loss {scalars.get("loss", float("nan")):.4f}  {rate} img/s  '
                  f'ETA {eta}', flush=True)

    def close(self):
        if self.enabled:
            self._jsonl.close()
            if self._writer is not None:
                self._writer.close()
