"""The loop every trainer runs: resume-or-init, one cadence helper, a stop on SIGTERM/SIGINT agreed by every
process, the asynchronous checkpoint save and a bound on the steps in flight. A trainer supplies its state, its step
function, its batch function and what it does at its cadences; the loop knows no network, loss or method.

    checkpoints = checkpoint.Checkpoints(workdir, keep_checkpoints=K)
    start, state = restore_or_init(checkpoints, abstract_state, init)     # the newest readable checkpoint, or init()
    carry = run(carry, start=start, num_steps=T,
                step_fn=lambda carry, step, batch: ...,      # -> carry; jitted work, dispatched asynchronously
                batch_fn=lambda step: ...,                   # built `prefetch` steps ahead by a background thread
                cadence={'log': 100, 'checkpoint': 1000},    # name -> every n steps (0: never), and the last step
                on_due=lambda carry, done, due: carry,       # the names due after step `done`, in one call
                checkpoints=checkpoints, items=lambda carry: {'state': ..., 'ema': ...},
                max_steps_in_flight=parallel.max_steps_in_flight)

After each step the loop asks the stop request once (`StopRequest.stop_after`: the same answer on every process);
the last step is the final one or the one the stop was agreed at. Every name of `cadence` that is due (`every`) goes
to `on_due` (fetch metrics, log, evaluate, sample; raising stops the run without saving); then, when 'checkpoint' is
due, `checkpoints.save(done, **items(carry))` starts an asynchronous save (training goes on while it is written; the
next save waits for it; the caller's `checkpoints.wait_until_finished()` waits for the last) and a failed background
write stops the run with its one-line error. Randomness and data are functions of the step, so a run resumed from a
checkpoint, on any number of devices and processes, sees the same batches and draws.
"""
import itertools
import os
import queue
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxdiff.drivers import checkpoint as checkpoint_lib

CHECKPOINT = 'checkpoint'


def every(done, n, last=False):
    """True after step `done` when it is a multiple of n or the last step; never for n = 0 or None."""
    return bool(n) and (done % n == 0 or last)


def restore_or_init(checkpoints, abstract, init):
    """(start, state): the newest readable checkpoint of `checkpoints`' workdir restored to `abstract` (a newer
    unreadable one is moved aside to WORKDIR/unreadable_checkpoints/ with one line on stderr), or (0, init()).
    `abstract`'s shardings place the state on this run's devices, whatever the run that wrote it had."""
    if checkpoints.latest_step() is None:
        return 0, init()
    step, state = checkpoint_lib.restore_latest(checkpoints.workdir, abstract, set_aside=True)
    if jax.process_count() > 1:   # process 0 may have moved a step away: every process lists after it did
        multihost_utils.sync_global_devices('jaxdiff.loop.restore_or_init')
    checkpoints.reload()
    print(f'resuming from {checkpoints.directory}/{step}', flush=True)
    return step, state


# Every call of JAX's preemption sync point in this process gets the next number: processes running the same loops
# make the same calls, so the numbers agree across processes whatever step a run resumed from (the sync point is the
# largest number any process had passed when the notice arrived, plus one; a notice before the first call stops
# after the first step). Nothing else may call it: `checkpoint.Checkpoints` stops orbax's CheckpointManager from
# asking it with step numbers.
_sync_calls = itertools.count(1)
AGREE_EVERY = 4   # steps between two flag exchanges when JAX's preemption service is off


def stop_mechanism():
    """How the processes agree on a stop (`StopRequest`): 'local' (one process), 'preemption_sync' (several, JAX's
    preemption service on: the default) or 'all_gather' (several, the service off)."""
    if jax.process_count() == 1:
        return 'local'
    return 'preemption_sync' if jax.config.jax_enable_preemption_service else 'all_gather'


class StopRequest:
    """SIGTERM or SIGINT, delivered to any subset of the processes, stops every process after the same step.

      one process                 a Python handler sets a flag; `stop_after` reads it (no cost)
      several processes           JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`,
                                  what orbax's CheckpointManager uses): jax.distributed.initialize installs a SIGTERM
                                  notifier in each process; a notice on any process starts a protocol through the
                                  coordination service that fixes the sync point one call past the furthest process,
                                  and `stop_after` is True at that call on every process. A local check per step
                                  (no communication); the notice is polled once a second, so the stop comes a second
                                  or so after the signal. SIGINT is forwarded to the notifier as a SIGTERM.
      several, service off        (jax_enable_preemption_service=False) Python handlers set a local flag, and every
                                  `every` steps the processes all-gather their flags (one tiny collective) and stop
                                  if any is set
    Handlers are installed only from the main thread; the previous ones come back on exit."""

    def __init__(self, every=AGREE_EVERY):
        self.every = every
        self.requested = False
        self._previous = {}
        self.mechanism = stop_mechanism()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # under JAX's preemption service SIGTERM belongs to its notifier: a Python handler would replace it
            signums = (signal.SIGINT,) if self.mechanism == 'preemption_sync' else (signal.SIGTERM, signal.SIGINT)
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.mechanism == 'preemption_sync':
            print(f'received {name}: asking every process to save a checkpoint and stop', flush=True)
            os.kill(os.getpid(), signal.SIGTERM)   # to JAX's notifier
            return
        print(f'received {name}: saving a checkpoint and stopping' +
              (' (with every process)' if self.mechanism == 'all_gather' else ''), flush=True)
        self.requested = True

    def stop_after(self, done):
        """Whether step `done` is the last one (it is then saved); called once after every step, by every
        process."""
        if self.mechanism == 'local':
            return self.requested
        if self.mechanism == 'preemption_sync':
            stop = multihost_utils.reached_preemption_sync_point(next(_sync_calls))
        elif done % self.every == 0:
            flags = multihost_utils.process_allgather(np.asarray([self.requested], np.int32))
            stop = bool(np.any(flags))
        else:
            return False
        if stop:
            print(f'stop agreed by every process after step {done} (a signal reached some of them): saving it and '
                  'stopping', flush=True)
        return stop

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class NoStop:
    """The stop request of a run with nowhere to save: signals keep their handlers (Ctrl-C interrupts)."""
    requested = False

    def __enter__(self):
        return self

    def stop_after(self, done):
        return False

    def __exit__(self, *exc):
        return None


class Prefetcher:
    """Yields the batches of steps start, start+1, ... built by a background thread, `size` ahead."""

    def __init__(self, make_batch, start, stop, size=2):
        self._queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_batch, start, stop), daemon=True)
        self._thread.start()

    def _run(self, make_batch, start, stop):
        for step in range(start, stop):
            try:
                item = make_batch(step)
            except Exception as e:  # handed to the loop, which re-raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, Exception):
                return

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join()


def run(carry, *, start, num_steps, step_fn, batch_fn, cadence, on_due=None, checkpoints=None, items=None,
        max_steps_in_flight=None, on_first_step=None, prefetch=2):
    """Steps start .. num_steps - 1; returns the last carry.

    carry: what step_fn threads (a pytree of arrays, e.g. (state, metrics)); step_fn(carry, step, batch) -> carry;
    batch_fn(step) -> the batch of `step`. cadence: {name: every n steps}; on_due(carry, done, due) -> carry gets
    the set of due names. With `checkpoints`, the name 'checkpoint' saves items(carry) ({'state': ..., 'ema': ...})
    as step `done` (asynchronously), and SIGTERM/SIGINT to any process save and stop every process after the same
    step (`StopRequest`); without, signals are left alone. The first step is waited for (compile time stays out of
    the timings: on_first_step(done) is called then); with max_steps_in_flight = K every K-th step waits for its
    result, so at most K steps are queued."""
    batches = Prefetcher(batch_fn, start, num_steps, size=prefetch)
    try:
        with (StopRequest(every=max_steps_in_flight or AGREE_EVERY) if checkpoints is not None
              else NoStop()) as stop:
            for step in range(start, num_steps):
                carry = step_fn(carry, step, next(batches))
                done = step + 1
                if step == start:
                    jax.block_until_ready(carry)
                    if on_first_step is not None:
                        on_first_step(done)
                elif max_steps_in_flight and done % max_steps_in_flight == 0:
                    jax.block_until_ready(carry)
                stopping = stop.stop_after(done)   # asked once: a signal arriving later in this step waits
                last = done == num_steps or stopping
                due = {name for name, n in cadence.items() if every(done, n, last)}
                if due and on_due is not None:
                    carry = on_due(carry, done, due)
                if checkpoints is not None:
                    if CHECKPOINT in due:
                        checkpoints.save(done, **items(carry))
                    else:
                        checkpoints.raise_if_failed()
                if stopping:
                    break
    finally:
        batches.close()
    return carry
