"""Parallelism: the device mesh, parameter and factor shardings, sharded steps,
multi-host start-up and the memory plan."""
