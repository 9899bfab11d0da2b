r"""SmolLM2-135M-Instruct, LoRA on Shakespeare's plays as packed plain text (causal LM).

    lorax-ft train --config=configs/smollm2_shakespeare.py --workdir=/tmp/shakespeare
    lorax-ft train --config=configs/smollm2_shakespeare.py:qlora --workdir=/tmp/shakespeare_q

Arguments (comma-separated): `lora` (default), `full` or `qlora`; `tiny` for a short smoke run.
`qlora` is `lora` trained on the GGUF file's Q4_1 blocks as stored (`model.quantize='gguf'`):
the frozen kernels stay 4-bit in memory instead of being dequantized to float32.
"""

from lorax_ft.run.config import default_config, parse_variant, shrink_to_tiny

MODES = ("lora", "full", "qlora")


def get_config(arg: str | None = None):
    variant, tiny = parse_variant(arg, "smollm2_shakespeare", MODES)
    mode = "full" if variant == "full" else "lora"
    config = default_config()
    config.model.preset = "smollm2-135m-instruct"
    config.model.task = "causal_lm"
    config.model.scan_layers = True
    if variant == "qlora":
        config.model.quantize = "gguf"  # the file's blocks: its Q4_1 kernels stay 4-bit

    config.data.kind = "text"
    config.data.name = "shakespeare"  # 42 plays; eval = the last 10% of each
    config.data.max_length = 128

    config.peft.mode = mode
    config.peft.targets = "all-linear"
    config.peft.rank = 16
    config.peft.alpha = 32.0

    config.schedule.name = "warmup_cosine"
    config.schedule.lr = 5e-4 if config.peft.mode == "lora" else 5e-5
    config.schedule.warmup_steps = 20
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.steps = 500
    config.train.eval_every = 100
    config.train.eval_steps = 20  # 20 × 32 × 128 tokens: a stable perplexity, not the whole 10%
    config.train.checkpoint_every = 100
    config.train.sample_prompts = ("ROMEO:\n", "To be, or not to be")
    config.train.max_new_tokens = 32

    if tiny:
        shrink_to_tiny(config, max_length=16, steps=2)
        # Parameters split over the devices (FSDP): the tests run tiny variants on 8 simulated
        # devices, where 8 replicas of the 135M model would take 5 GB more memory.
        config.mesh.update(data=1, fsdp=-1)
        config.train.sample_prompts = ("ROMEO:",)
    return config
