"""One training process per workdir: `WORKDIR/train.lock`, held with an OS file lock (fcntl.flock).

The lock file names its holder (pid and host). The OS releases the lock when the holder exits in any way
(kill -9 included), so a stale lock file whose process is gone is simply taken over.
"""
import contextlib
import fcntl
import os
import socket

from jaxdiff.core.errors import UserError

LOCK_FILE = 'train.lock'


@contextlib.contextmanager
def hold(workdir, *, enabled=True):
    """Holds WORKDIR/train.lock for the duration; a one-line UserError naming the lock and its holder when another
    live process has it."""
    if not enabled:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    handle = open(path, 'a+')
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or 'another process'
            raise UserError(f'workdir {workdir} is in use: {path} is held by {holder}; wait for it to finish, '
                            f'stop it, or use another --workdir') from None
        handle.seek(0)
        handle.truncate()
        handle.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
        handle.flush()
        yield
    finally:
        handle.close()   # releases the flock
