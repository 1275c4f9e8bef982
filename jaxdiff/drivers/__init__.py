"""Drivers: I/O, devices and config sections (checkpoints, train step, loop skeleton, sampling, evaluation)."""
