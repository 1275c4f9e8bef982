"""Checkpoints of the train state in `WORKDIR/checkpoints/<step>/` via orbax's CheckpointManager.

The only module that imports orbax. Saves are asynchronous (the arrays are copied to host before `save` returns,
so the training step may donate the state right after); call `wait_until_finished` before reading or exiting.
"""
import os

import jax
import orbax.checkpoint as ocp

from jaxdiff.errors import UserError


def directory_of(workdir):
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpoints:
    """Every `checkpoint_every_steps` steps (or when forced), keeping the newest `keep_checkpoints`."""

    def __init__(self, workdir, *, checkpoint_every_steps=1, keep_checkpoints=3, read_only=False):
        self.directory = directory_of(workdir)
        options = ocp.CheckpointManagerOptions(save_interval_steps=max(int(checkpoint_every_steps), 1),
                                               max_to_keep=keep_checkpoints, create=not read_only,
                                               read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step, state, *, force=False):
        """Saves `state` as step `step` when the interval says so (or `force`); returns whether it saved."""
        return self.manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state, step=None):
        """The state saved at `step` (default: the latest), with the shapes, dtypes and shardings of
        `abstract_state` (a pytree of jax.ShapeDtypeStruct, e.g. from jax.eval_shape). A checkpoint that cannot be
        read (corrupt, or written by a different model config) is a one-line UserError naming its path."""
        step = self.latest_step() if step is None else step
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises many types; the user needs the path and the first line
            raise UserError(f'cannot read checkpoint {os.path.join(self.directory, str(step))}: '
                            f'{type(e).__name__}: {_first_line(e)}') from e

    def wait_until_finished(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def restore_latest(workdir, abstract_state):
    """(step, state) of the newest checkpoint in `workdir`, for sampling; a one-line UserError naming the path
    when there is none or it cannot be read."""
    directory = directory_of(workdir)
    if not os.path.isdir(directory):
        raise UserError(f'no checkpoint found: {directory} does not exist (train first, or check --workdir)')
    try:
        checkpoints = Checkpoints(workdir, read_only=True)
        step = checkpoints.latest_step()
    except Exception as e:  # orbax raises many types for a corrupt directory; the user needs the path
        raise UserError(f'cannot read checkpoints in {directory}: {type(e).__name__}: {_first_line(e)}') from e
    if step is None:
        raise UserError(f'no checkpoint found in {directory} (train first, or check --workdir)')
    try:
        return step, checkpoints.restore(abstract_state, step)
    finally:
        checkpoints.close()


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ''


def abstract_like(tree, sharding):
    """A restore target: the shapes and dtypes of `tree` placed with `sharding` (e.g. replicated over the mesh)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
