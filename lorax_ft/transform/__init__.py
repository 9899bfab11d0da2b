"""The transform: parameter paths and rules, the spec, LoRA factors, labels and the
frozen/trainable split, each layer kind's factored delta and the factored forward pass."""
