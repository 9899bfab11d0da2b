"""Pieces the shipped configs share: their argument and the seconds-long `tiny` variant."""


def parse_arg(arg: str | None, name: str) -> tuple[str, bool]:
    """`lora|full[,tiny]` -> (mode, tiny); anything else is an error naming the config."""
    args = set((arg or "lora").split(","))
    if args - {"lora", "full", "tiny"} or {"lora", "full"} <= args:
        raise ValueError(f"{name} arguments are lora|full[,tiny], got {arg!r}")
    return ("full" if "full" in args else "lora"), "tiny" in args


def shrink_to_tiny(config, *, max_length: int, steps: int) -> None:
    """A few short steps on small batches, one eval batch, a checkpoint at the end."""
    config.data.max_length = max_length
    config.train.batch_size = 8  # one example per simulated test device
    config.train.eval_batch_size = 8
    config.train.steps = steps
    config.train.eval_every = 0
    config.train.eval_steps = 1
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.max_new_tokens = 2
    config.schedule.warmup_steps = 1
