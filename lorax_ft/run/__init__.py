"""Running an experiment: config files, tasks, the built experiment, the trainer loop,
checkpoints, metrics and the `lorax-ft` command."""
