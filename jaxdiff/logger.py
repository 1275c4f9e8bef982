"""Training progress: a one-line summary on stdout (step, loss, images/s, ETA), scalars to `WORKDIR/metrics.jsonl` (always)
and to TensorBoard when a summary writer is importable (tensorboardX or torch's; none is required)."""
import datetime
import json
import os
import time


def _tensorboard_writer(logdir):
    for module, name in (('tensorboardX', 'SummaryWriter'), ('torch.utils.tensorboard', 'SummaryWriter')):
        try:
            return getattr(__import__(module, fromlist=[name]), name)(logdir)
        except Exception:  # not installed (or broken): TensorBoard is optional
            continue
    return None


class Logger:
    """Writes only on process 0 (pass `enabled=False` elsewhere)."""

    def __init__(self, workdir, *, total_steps, batch_size, enabled=True):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.enabled = enabled
        self._last = None  # (step, time) of the previous report
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
            self._writer = _tensorboard_writer(os.path.join(workdir, 'tensorboard'))

    def start(self, step):
        """Marks the time origin for images/s and ETA (call after the first compiled step, so compile time is out)."""
        self._last = (step, time.perf_counter())

    def scalars(self, step, scalars):
        """Appends {'step': step, **scalars} to metrics.jsonl (and TensorBoard)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
        self._jsonl.flush()
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), int(step))

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
