"""A progress line for long work outside the training loop (sampling many batches, evaluation, discriminator and
AMED training, benchmarks): count, rate and ETA on stderr, one full line per report, at most one report every
`interval` seconds plus the last, so it reads the same in a terminal, a log file or a notebook.

    progress = Progress('sampling', total=num_batches, unit='batch')
    for i in range(num_batches):
        ...                               # one batch
        progress.update()                 # or update(n): n more units done
    progress.close()                      # the final line, if not printed yet

    for batch in Progress.track(batches, 'evaluating', total=len(batches)):   # the same around an iterable
        ...

prints e.g.  `sampling: 12/50 batch  3.41 batch/s  elapsed 0:00:04  ETA 0:00:11`.
The rate counts from the first update on, so the first unit's compile time does not distort it. In a
multi-process run, pass `enabled=jax.process_index() == 0`.
"""
import datetime
import sys
import time


def format_seconds(seconds):
    """h:mm:ss, rounded to whole seconds."""
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Counts units of work and reports `name: count[/total] unit  rate unit/s  elapsed  [ETA]`.

    interval: the least number of seconds between two reports (the first update and the last one always report);
    stream: where lines go (default sys.stderr); clock: seconds as a float (default time.monotonic)."""

    def __init__(self, name, total=None, *, unit='it', interval=5.0, enabled=True, stream=None, clock=None):
        if total is not None and total < 0:
            raise ValueError(f'total must be >= 0 or None, got {total}')
        self.name, self.total, self.unit, self.interval = name, total, unit, interval
        self.enabled = enabled
        self.count = 0
        self._stream = stream
        self._clock = clock or time.monotonic
        self._start = self._clock()
        self._first = None        # (time, count) at the first update: the rate's origin
        self._last_report = None  # time of the last printed line
        self._reported_count = None

    def rate(self, now=None):
        """Units per second since the first update (None before a second update moved the count)."""
        now = self._clock() if now is None else now
        if self._first is None or self.count == self._first[1] or now <= self._first[0]:
            return None
        return (self.count - self._first[1]) / (now - self._first[0])

    def line(self, now=None):
        """The progress line for the current count."""
        now = self._clock() if now is None else now
        count = f'{self.count}/{self.total}' if self.total is not None else f'{self.count}'
        parts = [f'{self.name}: {count} {self.unit}']
        rate = self.rate(now)
        parts.append(f'{rate:.3g} {self.unit}/s' if rate is not None else f'? {self.unit}/s')
        parts.append(f'elapsed {format_seconds(now - self._start)}')
        if self.total is not None and self.count < self.total:
            parts.append(f'ETA {format_seconds((self.total - self.count) / rate)}' if rate else 'ETA ?')
        return '  '.join(parts)

    def update(self, n=1):
        """Adds n done units; prints a line on the first update, at the total, or `interval` s after the last."""
        self.count += n
        now = self._clock()
        if self._first is None:
            self._first = (now, self.count)
        due = (self._last_report is None or now - self._last_report >= self.interval
               or (self.total is not None and self.count >= self.total))
        if due:
            self._report(now)

    def close(self):
        """Prints the final line unless the last printed one already showed the final count."""
        if self._reported_count != self.count:
            self._report(self._clock())

    def _report(self, now):
        self._last_report, self._reported_count = now, self.count
        if self.enabled:
            stream = self._stream or sys.stderr
            stream.write(self.line(now) + '\n')
            stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @classmethod
    def track(cls, iterable, name, total=None, **options):
        """Yields the items of `iterable`, counting one unit after each (total defaults to len(iterable))."""
        if total is None and hasattr(iterable, '__len__'):
            total = len(iterable)
        with cls(name, total, **options) as progress:
            for item in iterable:
                yield item
                progress.update()
