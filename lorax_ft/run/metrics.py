"""Run metrics: one JSON object per logged step in `metrics.jsonl`, TensorBoard events, and plots.

Only the process that writes (process 0 on multi-host runs) creates a `MetricsWriter` with
`enabled=True`; the others get a writer that drops everything.

Every record is on disk when `write` returns, in both files, so a run killed at any moment
(SIGKILL included) keeps all it logged: the TensorBoard event is written and flushed first, then
the metrics.jsonl line, so every line of metrics.jsonl is also in the event file. The events are
written synchronously (tensorboardX's `SummaryWriter` queues them for a thread that flushes every
two minutes: a kill lost them). A resumed run also tells TensorBoard to drop the events it logged
after the restored step (a SessionLog START, as `SummaryWriter(purge_step=...)` writes), as
metrics.jsonl drops those lines.

>>> writer = MetricsWriter(workdir)                   # doctest: +SKIP
>>> writer.write(10, {"loss": 0.5, "lr": 1e-3})       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _scalar(value: Any) -> float | int | str:
    if isinstance(value, str | int):
        return value
    return float(np.asarray(value))


class MetricsWriter:
    """Appends metrics to `workdir/metrics.jsonl` and to TensorBoard event files."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX.event_file_writer import EventsWriter  # only the writer needs it

            os.makedirs(os.path.join(workdir, "tensorboard"), exist_ok=True)
            self._tb = EventsWriter(os.path.join(workdir, "tensorboard", "events"))

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after `step` (a resumed run repeats those steps)."""
        if self._tb is not None:
            from tensorboardX.proto.event_pb2 import SessionLog

            # TensorBoard hides the events of steps >= this one from earlier event files.
            self._write_event(step + 1, session_log=SessionLog(status=SessionLog.START))
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.enabled:
            if self._tb is not None:
                from tensorboardX.proto.summary_pb2 import Summary

                values = [
                    Summary.Value(tag=key, simple_value=value)
                    for key, value in record.items()
                    if key != "step" and isinstance(value, float | int)
                ]
                self._write_event(record["step"], summary=Summary(value=values))
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def _write_event(self, step: int, **fields) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._tb.write_event(Event(wall_time=time.time(), step=step, **fields))
        self._tb.flush()  # into the OS's hands: it survives the process


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def plot_curves(records: list[dict], out_dir: str | os.PathLike) -> list[str]:
    """One PNG per metric (loss, eval metrics, lr, grad_norm, ...) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k, v in r.items() if k != "step" and _is_number(v)})
    written = []
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r and _is_number(r[key])]
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{key}.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
