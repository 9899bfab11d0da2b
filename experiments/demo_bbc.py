"""README's `make demo`: fine-tune all-MiniLM-L6-v2 on BBC News with LoRA, QLoRA and fully.

    python -m experiments.demo_bbc [--workdir runs/demo] [--tiny]

The runs use `configs/bbc_minilm.py` with the same budget; only `:lora` / `:qlora` (LoRA on the
encoder quantized to NF4) / `:full` differ. Prints trainable parameters, the frozen base's bytes,
optimizer-state bytes, checkpoint size, median step time, eval accuracy before and after and
wall time side by side, and writes `summary.md` (with each run's plots) into the workdir.
`--tiny` runs the seconds-long variants instead.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from absl import logging

from configs import bbc_minilm
from lorax_ft.run.trainer import train_and_evaluate


def _quantized(summary: dict) -> str:
    q = summary.get("quantization")
    if not q:
        return "—"
    return f"{q['kernels']} {q['method']}, {q['bytes_per_param']:.4g} B/param"


ROWS = [
    ("trainable params", lambda s: f"{s['trainable_params']:,}"),
    ("trainable % of total", lambda s: f"{s['trainable_percent']:.2f}%"),
    ("quantized base kernels", _quantized),
    ("optimizer state (MiB)", lambda s: f"{s['optimizer_state_bytes'] / 2**20:.2f}"),
    ("checkpoint size (MiB)", lambda s: f"{s['checkpoint_bytes'] / 2**20:.2f}"),
    ("median step (s)", lambda s: f"{s['median_step_s']:.3f}"),
    ("eval accuracy before", lambda s: f"{s['eval_before']['eval_accuracy']:.4f}"),
    ("eval accuracy after", lambda s: f"{s['eval_after']['eval_accuracy']:.4f}"),
    ("eval macro-F1 after", lambda s: f"{s['eval_after']['eval_macro_f1']:.4f}"),
    ("wall time (s)", lambda s: f"{s['wall_s']:.0f}"),
]


def table(summaries: dict[str, dict]) -> list[str]:
    lines = ["| | " + " | ".join(summaries) + " |", "|---|" + "---|" * len(summaries)]
    for label, cell in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(s) for s in summaries.values()) + " |")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    root = Path(args.workdir)
    summaries = {}
    for mode in ("lora", "qlora", "full"):
        workdir = root / mode
        shutil.rmtree(workdir, ignore_errors=True)  # a demo starts fresh, it never resumes
        config = bbc_minilm.get_config(f"{mode},tiny" if args.tiny else mode)
        print(f"== {mode}: training {config.train.steps} steps into {workdir}", file=sys.stderr)
        summaries[mode] = train_and_evaluate(config, workdir)
    title = "# all-MiniLM-L6-v2 on BBC News: LoRA, QLoRA (NF4 base) and full fine-tuning"
    lines = [title, "", *table(summaries), ""]
    for mode in summaries:
        lines.append(f"## {mode}\n\n![loss]({mode}/plots/loss.png) "
                     f"![eval_accuracy]({mode}/plots/eval_accuracy.png)\n")  # fmt: skip
    (root / "summary.md").write_text("\n".join(lines))
    print("\n".join(table(summaries)))
    reports = ", ".join(f"{root}/{mode}/summary.md" for mode in summaries)
    print(f"\nreports: {root / 'summary.md'}, {reports}")
    return summaries


if __name__ == "__main__":
    main()
