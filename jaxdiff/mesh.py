"""Devices for data parallelism: one Mesh axis 'data'; batches sharded on their first axis, state replicated.

Works unchanged on 1 device, N devices and several hosts (each host feeds its own rows of the global batch).
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.errors import UserError

AXIS = 'data'


def initialize_distributed(initialize=False, coordinator_address=None, num_processes=None, process_id=None):
    """`jax.distributed.initialize(...)` when `initialize` (config.distributed). Left None, the coordinator and
    process ids are auto-detected (SLURM, Open MPI, Cloud TPU, ...; JAX_COORDINATOR_ADDRESS); see launch/."""
    if initialize and not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)


def make_mesh(devices=None):
    """A 1-D Mesh with axis 'data' over `devices` (default: every device of every host)."""
    devices = jax.devices() if devices is None else devices
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
