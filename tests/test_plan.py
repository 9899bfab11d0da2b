"""`lorax-ft plan`: per-device bytes for a mesh of simulated devices, checked rule by rule."""

import dataclasses
import json
import math

import jax

from lorax_ft.models import BertForSequenceClassification, load_pretrained, logical_axes
from lorax_ft.transform import paths
from tests.test_trainer import lorax_ft

DEVICES = 16


def _fsdp_bytes_per_device(abstract, axes) -> int:
    """Independent FSDP arithmetic: a leaf with an `embed` axis that divides is split 16 ways."""
    total = 0
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for leaf, names in zip(jax.tree.leaves(abstract), flat_axes, strict=True):
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        split = "embed" in names and leaf.shape[tuple(names).index("embed")] % DEVICES == 0
        total += nbytes // DEVICES if split else nbytes
    return total


def test_plan_for_a_16_device_fsdp_mesh_from_a_cpu_machine():
    result = lorax_ft(
        "plan", "--config=configs/bbc_minilm.py:lora,tiny", f"--simulate_devices={DEVICES}",
        "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.train.batch_size=16",
        "--config.train.eval_batch_size=16",
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert f"Plan for {DEVICES} devices, mesh data=1 × fsdp=16 × tensor=1" in result.stdout
    assert list(report) == ["lora", "full"]  # the configured mode first
    for figures in report.values():
        assert figures["mesh"] == {"data": 1, "fsdp": DEVICES, "tensor": 1}
        assert figures["devices"] == DEVICES
        assert figures["temp_bytes"] > 0 and figures["argument_bytes"] > 0

    # The model the config trains: the pretrained encoder plus a 5-way head.
    _, _, encoder_config, _ = load_pretrained("all-minilm-l6-v2", read_weights=False)
    module = BertForSequenceClassification(dataclasses.replace(encoder_config, num_labels=5))
    abstract = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jax.numpy.zeros((1, 8), "int32"))
    )
    from flax import linen as nn

    abstract = nn.unbox(abstract)["params"]
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    per_device = _fsdp_bytes_per_device(abstract, logical_axes(module))
    full, lora = report["full"], report["lora"]
    assert full["total_param_bytes"] == full["total_trainable_bytes"] == total
    assert full["param_bytes"] == full["trainable_bytes"] == per_device
    assert per_device < total / 10  # nearly all of the model is split
    # AdamW: two moments per parameter, each placed like it, plus replicated step counts.
    assert 2 * per_device <= full["opt_state_bytes"] <= 2 * per_device + 64
    assert full["total_opt_state_bytes"] >= 2 * total
    # LoRA: the same frozen base per device, and a trainable set two orders of magnitude smaller.
    assert lora["total_param_bytes"] > total
    assert lora["param_bytes"] > per_device
    assert lora["total_trainable_bytes"] < total / 50
    assert lora["total_opt_state_bytes"] == 2 * lora["total_trainable_bytes"] + 6 * 4
    assert lora["opt_state_bytes"] < full["opt_state_bytes"] / 5


def test_plan_of_an_nf4_base_counts_its_codes_and_shows_the_float_figure():
    """`lorax-ft plan --config=configs/smollm2_shakespeare.py:lora --config.model.quantize=nf4`,
    in process and for LoRA only (one compile): shapes only, no weight read."""
    from lorax_ft.parallel.plan import format_plan, plan
    from lorax_ft.run.config_file import load_config_file

    config = load_config_file("configs/smollm2_shakespeare.py:lora")
    config.model.quantize = "nf4"
    report = plan(config, modes=["lora"])
    figures = report["lora"]
    # Independent arithmetic on the float model's shapes: every linear kernel at NF4's 0.5625
    # bytes a parameter (4-bit codes, a float32 scale per 64), the tied embedding and the norms
    # in float32. The data-parallel mesh holds it whole on every device.
    _, shapes, _, _ = load_pretrained("smollm2-135m-instruct", read_weights=False, scan_layers=True)
    flat = paths.flatten(shapes)
    floats = sum(math.prod(x.shape) * x.dtype.itemsize for x in flat.values())
    kernels = sum(math.prod(x.shape) for p, x in flat.items() if p.endswith("/kernel"))
    assert kernels > 0.75 * floats / 4  # 106M of the 135M parameters
    assert figures["quantize"] == "nf4" and figures["devices"] == jax.device_count()
    assert figures["unquantized_base_bytes"] == floats
    assert figures["base_bytes"] == floats - kernels * 4 + kernels * 9 // 16
    assert figures["unquantized_param_bytes"] == floats + figures["trainable_bytes"]
    ratio = figures["param_bytes"] / figures["unquantized_param_bytes"]
    print(f"nf4 plan: {figures['param_bytes']} of {figures['unquantized_param_bytes']} B: {ratio}")
    assert ratio <= 0.40  # the target (the tied embedding stays float32)
    assert "lora: base params: 165.1 MiB per device (nf4; 513.1 MiB unquantized, 0.32x)" in (
        format_plan(report)
    )
