"""jaxdiff.drivers.progress on a fake clock: exact lines, throttling, rate from the first update, ETA, track()."""
import io

import pytest

from jaxdiff.drivers.progress import Progress, format_seconds


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make(total=10, **options):
    clock, stream = FakeClock(), io.StringIO()
    return Progress('sampling', total, unit='batch', stream=stream, clock=clock, **options), clock, stream


def lines(stream):
    return stream.getvalue().splitlines()


def test_lines_rate_eta_and_throttling():
    progress, clock, stream = make(total=10, interval=5.0)
    clock.now += 30.0  # the first unit (compile) takes long: the rate must not count it
    progress.update()
    assert lines(stream) == ['sampling: 1/10 batch  ? batch/s  elapsed 0:00:30  ETA ?']
    for _ in range(4):  # 1 s per unit: none is due yet (< 5 s since the last line)
        clock.now += 1.0
        progress.update()
    assert len(lines(stream)) == 1
    clock.now += 1.0
    progress.update()  # 6 units, 5 s after the first line: rate 5 / 5 s, 4 left -> ETA 4 s
    assert lines(stream)[-1] == 'sampling: 6/10 batch  1 batch/s  elapsed 0:00:35  ETA 0:00:04'
    clock.now += 2.0
    progress.update(4)  # the total always reports: 9 units in 7 s since the first update
    assert lines(stream)[-1] == 'sampling: 10/10 batch  1.29 batch/s  elapsed 0:00:37'
    progress.close()  # already shown: no repeat
    assert len(lines(stream)) == 3


def test_close_reports_the_last_count_once():
    progress, clock, stream = make(total=None, interval=60.0)
    for _ in range(3):
        clock.now += 0.5
        progress.update(2)
    assert lines(stream) == ['sampling: 2 batch  ? batch/s  elapsed 0:00:00']
    progress.close()
    assert lines(stream)[-1] == 'sampling: 6 batch  4 batch/s  elapsed 0:00:02'  # 4 units in 1 s, no ETA
    progress.close()
    assert len(lines(stream)) == 2


def test_track_counts_items_and_takes_len():
    clock, stream = FakeClock(), io.StringIO()
    seen = []
    for item in Progress.track(['a', 'b', 'c'], 'eval', unit='set', interval=0.0, stream=stream, clock=clock):
        clock.now += 2.0
        seen.append(item)
    assert seen == ['a', 'b', 'c']
    assert lines(stream) == ['eval: 1/3 set  ? set/s  elapsed 0:00:02  ETA ?',
                             'eval: 2/3 set  0.5 set/s  elapsed 0:00:04  ETA 0:00:02',
                             'eval: 3/3 set  0.5 set/s  elapsed 0:00:06']


def test_disabled_prints_nothing_and_default_stream_is_stderr(capsys):
    progress, clock, stream = make(enabled=False)
    progress.update(10)
    progress.close()
    assert stream.getvalue() == '' and progress.count == 10
    with Progress('bench', 2, interval=0.0) as progress:
        progress.update(2)
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err.startswith('bench: 2/2 it  ')
    assert captured.err.count('\n') == 1


def test_format_seconds_and_bad_total():
    assert format_seconds(3725.4) == '1:02:05'
    with pytest.raises(ValueError, match='total'):
        Progress('x', -1)
