r"""BBC News topic classification (5 classes) with all-MiniLM-L6-v2: LoRA or full fine-tuning.

    lorax-ft train --config=configs/bbc_minilm.py:lora --workdir=/tmp/bbc_lora
    lorax-ft train --config=configs/bbc_minilm.py:full --workdir=/tmp/bbc_full
    lorax-ft train --config=configs/bbc_minilm.py:lora,tiny --workdir=/tmp/bbc_tiny  # seconds
    lorax-ft train --config=configs/bbc_minilm.py:qlora --workdir=/tmp/bbc_qlora  # NF4 base

Arguments (comma-separated): `lora` (default), `qlora` or `full`; `tiny` for a seconds-long
smoke run. All modes get the same budget (steps, batch, sequence length); only the spec and the
learning rate differ. The classifier head is new, so LoRA trains it fully. `qlora` is `lora` on
the encoder's frozen kernels in 4-bit NF4 (`model.quantize='nf4'`; any mode takes
`--config.model.quantize=int8|nf4`): the head, being trained, stays float.
"""

from lorax_ft.run.config import default_config, parse_variant, shrink_to_tiny

MODES = ("lora", "full", "qlora")


def get_config(arg: str | None = None):
    variant, tiny = parse_variant(arg, "bbc_minilm", MODES)
    mode = "full" if variant == "full" else "lora"

    config = default_config()
    config.model.preset = "all-minilm-l6-v2"
    config.model.task = "classification"
    config.model.classifier_pooling = "mean"  # the sentence-transformers pooling of this model
    if variant == "qlora":
        config.model.quantize = "nf4"  # the frozen encoder kernels in 4-bit NormalFloat

    config.data.kind = "classification"
    config.data.name = "bbc-news"  # 2,225 articles, 5 topics; deterministic train/eval split
    # The headline and first sentences carry the topic: 64 tokens keep both runs of the demo
    # within 10 minutes on 2 CPU cores and still classify well above 90%.
    config.data.max_length = 64

    config.peft.mode = mode
    config.peft.targets = "all-linear"  # q, k, v, attention output, intermediate, output
    config.peft.rank = 8
    config.peft.alpha = 16.0
    config.peft.train = r"classifier/.*"  # the new head is trained fully

    config.optim.name = "adamw"
    config.optim.weight_decay = 0.01
    config.schedule.name = "warmup_linear"
    # LoRA's factors start at zero effect and need a larger step than full fine-tuning does.
    config.schedule.lr = 1e-3 if mode == "lora" else 1e-4
    config.schedule.warmup_steps = 6

    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    config.train.steps = 50  # about 0.8 epoch of the 2,002 training articles
    config.train.log_every = 5
    config.train.checkpoint_every = 25
    config.checkpoint.keep = 1

    if tiny:
        shrink_to_tiny(config, max_length=32, steps=4)
        config.train.eval_batch_size = 16
        config.train.eval_steps = 2
    return config
