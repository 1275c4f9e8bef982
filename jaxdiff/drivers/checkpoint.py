"""Checkpoints in `WORKDIR/checkpoints/<step>/` via orbax's CheckpointManager; the only module that imports orbax.

A checkpoint holds named items, each restorable alone: the training loop saves 'state' (the whole TrainState, to
resume) and 'ema' (the EMA parameters and the model's fixed collections, all that sampling needs: restorable from
the networks' shapes, without building an optimizer).

Saves are asynchronous (orbax's async checkpointing): `save` copies the arrays to host memory and returns (so the
training step may donate the state right after), a background thread writes them; the next `save` first waits for
the previous write, `wait_until_finished` waits for the last. A write that fails in the background is one
`CheckpointWriteFailed` line (naming the step, the path and the cause), raised by `raise_if_failed` (the loop asks
after every step), by the next `save` or by `wait_until_finished`; orbax's own traceback of it is not printed.

Commits are atomic (orbax's): a step is written to `checkpoints/<step>.orbax-checkpoint-tmp*` and renamed to
`checkpoints/<step>` once complete (on a gs:// path, where there is no atomic rename, orbax writes a
`commit_success.txt` marker last instead), and only committed steps are listed and restored. A process killed
(kill -9) at any moment of a save leaves the committed steps and, at most, that uncommitted leftover: the next
`Checkpoints` that may write removes it with one line.

Reading is careful: a checkpoint that cannot be read (a truncated file, a half-written step) is skipped, with one
line saying which and why, for the newest one that reads; none is ever deleted. A checkpoint whose arrays have
other shapes than the config's model is not skipped (every older one would disagree too): that is a one-line
error naming the array and both shapes.
"""
import asyncio
import logging
import os
import sys

import jax
import orbax.checkpoint as ocp

from jaxdiff.core.errors import UserError


ITEMS = ('state', 'ema')
TEMPORARY_SUFFIX = '.orbax-checkpoint-tmp'   # orbax's name for a step directory being written


def directory_of(workdir):
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


def uncommitted_saves(directory):
    """Names of the entries of `directory` that orbax recognises as saves never committed (a temporary
    `<step>.orbax-checkpoint-tmp*` directory; on gs:// a step without its commit marker); [] when there is none."""
    if not os.path.isdir(directory):
        return []
    try:
        from orbax.checkpoint._src.path import temporary_paths   # orbax's own test, the one its cleanup applies
        found = asyncio.run(temporary_paths.all_temporary_paths(directory))
    except Exception:   # another orbax, or inside a running event loop: the name is enough on a file system
        return sorted(name for name in os.listdir(directory) if TEMPORARY_SUFFIX in name)
    return sorted(os.path.basename(str(path.get())) for path in found)


class Checkpoints:
    """Saved when forced (the loop decides when), keeping the newest `keep_checkpoints`. asynchronous=False makes
    `save` return only once the step is committed (benchmarks compare the two). Unless read_only, the leftovers of
    an interrupted save are removed on creation, with one line on stderr (or `log`) from process 0."""

    def __init__(self, workdir, *, keep_checkpoints=3, read_only=False, asynchronous=True, log=None):
        quiet_abandoned_reads()
        quiet_reported_write_errors()
        self.workdir = os.path.abspath(workdir)
        self.directory = directory_of(workdir)
        self._writing = None    # the step of the last save, until it is known to be committed
        leftovers = [] if read_only else uncommitted_saves(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_checkpoints, create=not read_only,
                                               read_only=read_only, enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=bool(leftovers))
        # handlers named up front, so the items' metadata (shapes) can be read before restoring
        handlers = {item: ocp.StandardCheckpointHandler() for item in ITEMS}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        # The loop asks JAX's preemption sync point once per step, with its own call numbers (loop.StopRequest).
        # orbax asks it too, with step numbers, from save() and from its background thread (for logs and metrics
        # only, since every save here is forced): that would move the sync manager's counter under the loop's.
        self.manager.reached_preemption = lambda step: False
        if leftovers and jax.process_index() == 0:
            (log or (lambda line: print(line, file=sys.stderr, flush=True)))(
                f'removing {", ".join(leftovers)} in {self.directory}: the leftover of a save that was interrupted '
                f'before its commit (the committed checkpoints are complete)')

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def save(self, step, state, *, force=True, **items):
        """Saves `state` (item 'state'; None: no 'state' item, e.g. an imported network has only 'ema') and the
        other named `items` of ITEMS (ema=...) as step `step`, in the background (after waiting for the previous
        save; its failure is raised here)."""
        args = {**({'state': ocp.args.StandardSave(state)} if state is not None else {}),
                **{name: ocp.args.StandardSave(item) for name, item in items.items()}}
        with self._reporting_write_errors():
            self.manager.wait_until_finished()
        self._writing = int(step)
        with self._reporting_write_errors():
            return self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)

    def raise_if_failed(self):
        """Raises CheckpointWriteFailed when the last save's background write has failed; returns at once while it
        is still running or once it has succeeded."""
        if self._writing is not None and not self.manager.is_saving_in_progress():
            self.wait_until_finished()

    def _reporting_write_errors(self):
        return _WriteErrors(self)

    def restore(self, abstract, step=None, *, item='state'):
        """Item `item` of step `step` (default: the latest), with the shapes, dtypes and shardings of `abstract`
        (a pytree of jax.ShapeDtypeStruct, e.g. from jax.eval_shape). Failures are one-line UserErrors: a shape
        mismatch (`ShapeMismatch`) names the array and both shapes, anything else (`Unreadable`) the path."""
        step = self.latest_step() if step is None else step
        path = os.path.join(self.directory, str(step))
        mismatch = self._shape_mismatch(step, item, abstract)
        if mismatch:
            raise ShapeMismatch(f'checkpoint {path} was written by another model: {mismatch}')
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(abstract)}))
        except Exception as e:  # orbax raises many types; the user needs the path and the first line
            raise Unreadable(f'cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}') from e
        return restored[item]

    def _shape_mismatch(self, step, item, abstract):
        """'array A has shape S in the checkpoint, T in the config' for the first differing array, else None."""
        try:
            metadata = self.manager.item_metadata(step)[item]
            saved = {_path_name(p): tuple(leaf.shape) for p, leaf in
                     jax.tree_util.tree_flatten_with_path(metadata)[0] if hasattr(leaf, 'shape')}
        except Exception:   # unreadable metadata: let the restore report it
            return None
        wanted = {_path_name(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        for name, shape in wanted.items():
            if name in saved and saved[name] != shape:
                return f'array {name} has shape {saved[name]} there but {shape} in this config{_field_hint(name)}'
        missing = sorted(set(wanted) - set(saved))
        if saved and missing:
            return f'it has no array {missing[0]} (the config builds a different network)'
        return None

    def wait_until_finished(self):
        """Waits for the last save to be committed; CheckpointWriteFailed when its write failed."""
        with self._reporting_write_errors():
            self.manager.wait_until_finished()
        self._writing = None

    def reload(self):
        """Re-reads the step directories (after `restore_latest(..., set_aside=True)` moved one away)."""
        self.manager.reload()

    def close(self):
        self.manager.close()


class _WriteErrors:
    """Turns an exception of orbax's save machinery into one CheckpointWriteFailed line naming the step."""

    def __init__(self, checkpoints):
        self.checkpoints = checkpoints

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, UserError) or not isinstance(error, Exception):
            return False
        checkpoints, step = self.checkpoints, self.checkpoints._writing
        checkpoints._writing = None
        what = f'checkpoint step {step} ({os.path.join(checkpoints.directory, str(step))})' if step is not None \
            else f'a checkpoint in {checkpoints.directory}'
        try:
            latest = checkpoints.manager.latest_step()
        except Exception:   # the directory itself may be what failed
            latest = None
        newest = 'none' if latest is None else os.path.join(checkpoints.directory, str(latest))
        raise CheckpointWriteFailed(f'{what} could not be written: {type(error).__name__}: {_first_line(error)}; '
                                    f'newest complete checkpoint: {newest}') from error


class CheckpointWriteFailed(UserError):
    """A checkpoint's (background) write failed: full disk, lost permissions, an unreachable bucket."""


class ShapeMismatch(UserError):
    """The checkpoint's arrays have other shapes than the config's networks."""


class Unreadable(UserError):
    """The checkpoint's files cannot be read (corrupt, truncated, or not an orbax checkpoint)."""


def restore_latest(workdir, abstract, *, item='state', log=None, set_aside=False):
    """(step, item) of the newest checkpoint in `workdir` that reads. A checkpoint that does not read is skipped
    with one line to stderr (or `log`) naming it and why; never deleted. With `set_aside` (a training run, which
    will write that step again) it is moved to WORKDIR/unreadable_checkpoints/. A one-line UserError naming the
    path when there is none, none reads, or the shapes disagree with the config."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    directory = directory_of(workdir)
    if not os.path.isdir(directory):
        raise UserError(f'no checkpoint found: {directory} does not exist (train first, or check --workdir)')
    try:
        checkpoints = Checkpoints(workdir, read_only=True)
        steps = checkpoints.all_steps()
    except Exception as e:  # orbax raises many types for a corrupt directory; the user needs the path
        raise UserError(f'cannot read checkpoints in {directory}: {type(e).__name__}: {_first_line(e)}') from e
    try:
        if not steps:
            raise UserError(f'no checkpoint found in {directory} (train first, or check --workdir)')
        errors = []
        for step in reversed(steps):
            try:
                return step, checkpoints.restore(abstract, step, item=item)
            except Unreadable as e:
                errors.append(str(e))
                older = [s for s in steps if s < step]
                path = os.path.join(directory, str(step))
                # one process moves it (the others skip it the same way, whether or not it is still there)
                moved = f'; moved to {_set_aside(workdir, path)}' if set_aside and jax.process_index() == 0 else ''
                log(f'skipping checkpoint {path} (unreadable: {_first_line(e.__cause__ or e)[:160]}){moved}; '
                    + (f'trying {os.path.join(directory, str(older[-1]))}' if older else 'no older checkpoint'))
        raise UserError(f'no readable checkpoint in {directory}: {errors[0]}' if len(errors) == 1 else
                        f'none of the {len(errors)} checkpoints in {directory} reads; newest: {errors[0]}')
    finally:
        checkpoints.close()


def _is_abandoned_read(error):
    """True for what TensorStore's reader threads report after orbax gave up on a corrupt checkpoint with other
    reads of it still in flight: 'Event loop is closed' (orbax's asyncio loop ended) and the later read errors of
    that checkpoint, which `restore_latest` has already reported in one line."""
    message = str(error)
    return (isinstance(error, RuntimeError) and message == 'Event loop is closed') or \
        message.startswith('Encountered error while reading array index') or \
        (isinstance(error, ValueError) and 'tensorstore_spec' in message)


class _AbandonedTaskFilter(logging.Filter):
    """Drops asyncio's 'Task exception was never retrieved' records for `_is_abandoned_read`s."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and _is_abandoned_read(error))


def quiet_abandoned_reads():
    """Installs, once per process, filters for `_is_abandoned_read` reports: a sys.unraisablehook (reports from
    threads) and a filter on asyncio's logger (tasks never awaited), passing every other report on. They arrive
    at any later time, from threads, so filtering captured output cannot catch them all."""
    previous = sys.unraisablehook
    if getattr(previous, 'drops_abandoned_reads', False):
        return

    def hook(unraisable):
        if not _is_abandoned_read(unraisable.exc_value):
            previous(unraisable)
    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
    logging.getLogger('asyncio').addFilter(_AbandonedTaskFilter())


class _ReportedWriteErrorFilter(logging.Filter):
    """Drops orbax's ERROR records that carry a traceback (a failed background write, logged from its thread):
    `Checkpoints` reports the failure itself, as one line."""

    def filter(self, record):
        return not (record.levelno >= logging.ERROR and record.exc_info and
                    f'{os.sep}orbax{os.sep}checkpoint{os.sep}' in (record.pathname or ''))


def quiet_reported_write_errors():
    """Installs `_ReportedWriteErrorFilter` on absl's logger (which orbax logs through), once per process."""
    logger = logging.getLogger('absl')
    if not any(isinstance(f, _ReportedWriteErrorFilter) for f in logger.filters):
        logger.addFilter(_ReportedWriteErrorFilter())


def _set_aside(workdir, path):
    """Moves an unreadable step directory to WORKDIR/unreadable_checkpoints/<step>[.N] (kept for inspection)."""
    target_dir = os.path.join(os.path.abspath(workdir), 'unreadable_checkpoints')
    os.makedirs(target_dir, exist_ok=True)
    target, n = os.path.join(target_dir, os.path.basename(path)), 1
    while os.path.exists(target):
        target, n = os.path.join(target_dir, f'{os.path.basename(path)}.{n}'), n + 1
    os.rename(path, target)
    return target


def _path_name(path):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _field_hint(name):
    """A guess at the config field behind a differing array (the model's, or an extra network's)."""
    top = name.split('/')[0]
    section = {'params': 'model', 'ema_params': 'model', 'opt_state': 'model'}.get(top, top)
    parts = name.split('/')
    if len(parts) > 1 and parts[1] in ('model', 'encoder', 'discriminator'):
        section = parts[1]
    return f' (check config.{section}: it must match the run that wrote the workdir)'


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def abstract_like(tree, sharding):
    """A restore target: the shapes and dtypes of `tree` placed with `sharding` (e.g. replicated over the mesh)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

