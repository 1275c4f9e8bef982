"""Devices for data parallelism: one Mesh axis 'data'; batches sharded on their first axis, state replicated.

Works unchanged on 1 device, N devices and several hosts (each host feeds its own rows of the global batch).
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.core.errors import UserError

AXIS = 'data'


def initialize_distributed(initialize=False, coordinator_address=None, num_processes=None, process_id=None):
    """`jax.distributed.initialize(...)` when `initialize` (config.distributed), before anything touches a device.

    Fields left None are detected by jax: on Cloud TPU pods, under SLURM (srun), Open MPI (mpirun) and Kubernetes
    (JobSet); launch/ has a script for each case. Elsewhere (several plain machines, or several processes on one)
    give all three: coordinator_address 'HOST:PORT' of process 0, num_processes and this process_id. The process
    then sees every device of every process (jax.devices()) and its own ones (jax.local_devices())."""
    if not initialize or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except RuntimeError as e:
        if 'must be called before' not in str(e):  # e.g. the coordinator is unreachable: jax's own message
            raise
        # this process touched a device before (jax.devices(), a computation)
        raise UserError(f'config.distributed.initialize=True in a process that already used JAX: '
                        f'{str(e).splitlines()[0]} Start a fresh process.') from None
    except ValueError as e:  # no cluster detected and fields missing
        raise UserError(f'config.distributed.initialize=True: {e} No TPU pod, SLURM, Open MPI or Kubernetes '
                        f'environment was detected; set config.distributed.coordinator_address=HOST:PORT, '
                        f'num_processes and process_id (see launch/)') from None


def make_mesh(devices=None):
    """A 1-D Mesh with axis 'data' over `devices` (default: every device of every host), grouped by process
    (each process's own order kept), so that process p's devices hold rows [p * B / P, (p + 1) * B / P) of a
    global batch of B rows: exactly the rows `jaxdiff.data` gives process p of P."""
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda device: device.process_index)  # a stable sort
    return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh):
    """Splits an array's first (batch) axis over the 'data' axis."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh):
    """A full copy on every device (parameters, optimizer state, keys)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size, mesh, field='training.batch_size'):
    """Raises a one-line UserError when the global batch does not split evenly over the devices (and hosts)."""
    num_devices = mesh.devices.size
    if batch_size % num_devices:
        raise UserError(f'{field}={batch_size} is not divisible by the number of devices ({num_devices}); '
                        f'use a multiple of {num_devices}')
    if batch_size % jax.process_count():
        raise UserError(f'{field}={batch_size} is not divisible by the number of hosts ({jax.process_count()})')


def global_batch(local_batch, mesh):
    """This host's rows of a batch (a dict of numpy arrays) -> global jax.Arrays sharded over 'data'.

    On one host this is a device_put; on several, each host passes its own rows and
    `jax.make_array_from_process_local_data` assembles the global array without moving data between hosts.
    """
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}
