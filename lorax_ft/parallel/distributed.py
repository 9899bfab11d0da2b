"""Joining the job's processes: multi-host training and preemption notices.

Every `lorax-ft train` process calls `initialize` before JAX touches a device. With explicit
`coordinator_address`/`num_processes`/`process_id` (every host runs the same command with its
own `process_id`) those are used; otherwise the cluster environment is read when there is one
(Cloud TPU pod slices, SLURM, Open MPI, Kubernetes: what `jax.distributed.initialize()` detects);
otherwise the process forms a group of one on a free local port. A group of one still matters:
JAX's preemption service (SIGTERM -> `multihost_utils.reached_preemption_sync_point`) runs only
once `jax.distributed` is initialised.

>>> initialize()                                   # doctest: +SKIP
>>> initialize("10.0.0.1:1234", num_processes=2, process_id=1)   # doctest: +SKIP
"""

from __future__ import annotations

import socket

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Initialises `jax.distributed` as the module docstring says; a no-op when it already is.

    Raises:
      ValueError: explicit settings that are incomplete or inconsistent (the message says which).
    """
    if jax.distributed.is_initialized():
        return
    explicit = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in explicit):
        names = ("coordinator_address", "num_processes", "process_id")
        missing = [f"--{n}" for n, value in zip(names, explicit, strict=True) if value is None]
        if missing:
            raise ValueError(f"multi-host flags need all three; missing {', '.join(missing)}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    try:
        # Cluster auto-detection. Nothing detected is a ValueError about the missing coordinator,
        # raised before any connection is attempted; any other failure (a detected cluster that
        # is misconfigured or unreachable) propagates rather than falling back to one process.
        jax.distributed.initialize()
    except ValueError as e:
        if "coordinator_address" not in str(e):
            raise
        # One process: its CPU devices (simulated ones, in tests) keep in-process collectives,
        # which are several times faster than gloo's TCP ones.
        jax.config.update("jax_cpu_collectives_implementation", None)
        # Heartbeats find dead peers, and one process has none: with JAX's 100 s timeout, a
        # machine paused or starved of CPU for longer (a suspended VM) killed a healthy run.
        jax.distributed.initialize(
            f"127.0.0.1:{_free_port()}",
            num_processes=1,
            process_id=0,
            heartbeat_timeout_seconds=_ONE_PROCESS_HEARTBEAT_S,
        )


_ONE_PROCESS_HEARTBEAT_S = 7 * 24 * 3600


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
