"""One call for the common path: `adapt(model, spec, *sample_inputs)` gives an adapted model.

`adapt` runs the steps a fine-tune always takes (layouts from a shape-only pass, the LoRA
factors, the labels) and returns an `Adapted`: the model with its params and adapters, which
runs (`adapted(x)`), counts its parameters as PEFT does (`print_trainable_parameters()`), makes
its optimizer, train state and train step, and merges. Each piece stays available (`apply`,
`params`, `adapters`, `labels`, `layouts`) for code that needs the lower-level API.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lorax_ft import quant
from lorax_ft.training import optim, train_step
from lorax_ft.transform import lora, partition, paths
from lorax_ft.transform.factored import factored, infer_layouts, nnx_params
from lorax_ft.transform.factored import model_state as _model_state
from lorax_ft.transform.lora import KernelLayout
from lorax_ft.transform.spec import FROZEN, Spec, SpecError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of an adapted model; `str()` is PEFT's `print_trainable_parameters` line.

    Attributes:
      trainable: scalars trained: LoRA factors and leaves trained fully.
      frozen: scalars of the base params that are not trained (adapted kernels included).
      total: trainable + frozen, the base params plus the adapters (PEFT's "all params").
      lora_params: scalars of the LoRA factors.
      lora_bytes: bytes of the LoRA factors.
    """

    trainable: int
    frozen: int
    total: int
    lora_params: int
    lora_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Adapted:
    """A model with its base params and LoRA adapters; made by `adapt`.

    Attributes:
      apply: the adapted model, `lf.factored(model)`:
        `apply(params, adapters, *inputs, lora_rng=None, **kwargs)`.
      params: the base params (not copied: the caller's arrays; a kernel a PiSSA/OLoRA rule
        adapts is its residual W − s·A·B, a new array).
      adapters: the LoRA factors, a pytree mirroring `params` with a `Factors` at each adapted
        kernel ({} for full fine-tuning).
      model_state: the state the model updates as it runs (`lf.factored`'s `model_state=`): a
        linen model's collections other than "params" (BatchNorm's "batch_stats"), an NNX
        model's non-Param state; {} when there is none.
      labels: 'lora' / 'train' / 'frozen' for each leaf of `variables`.
      layouts: how each kernel's axes split into stacked, input and output axes.
      spec: the rules that made the adapters and labels.
    """

    apply: Callable
    params: PyTree
    adapters: PyTree
    model_state: dict
    labels: PyTree
    layouts: Mapping[str, KernelLayout]
    spec: Spec

    @property
    def variables(self) -> PyTree:
        """`{"params": params, "lora": adapters}`, the tree `labels` labels."""
        return {"params": self.params, "lora": self.adapters}

    def __call__(self, *inputs, **kwargs):
        """Runs the adapted model on `inputs` with its own params and adapters (inference).

        With model state, the state is read and not updated (the outputs alone are returned);
        `apply` gives the updated state too.
        """
        if self.model_state:
            outputs, _ = self.apply(
                self.params, self.adapters, *inputs, model_state=self.model_state, **kwargs
            )
            return outputs
        return self.apply(self.params, self.adapters, *inputs, **kwargs)

    def summary(self) -> Summary:
        """Trainable, frozen and total parameter counts, and the LoRA factors' count and bytes."""
        frozen, trainable = partition.split(self.variables, self.labels)
        n_trainable, n_frozen = lora.count(trainable), lora.count(frozen)
        return Summary(
            trainable=n_trainable,
            frozen=n_frozen,
            total=n_trainable + n_frozen,
            lora_params=lora.count(self.adapters),
            lora_bytes=lora.nbytes(self.adapters),
        )

    def print_trainable_parameters(self) -> None:
        """Prints PEFT's line: `trainable params: ... || all params: ... || trainable%: ...`."""
        print(self.summary())

    def merge(self, adapters: PyTree | train_step.TrainState | None = None) -> PyTree:
        """Plain params with W + s·A·B in each adapted kernel, for export or inference.

        A quantized base (`adapt(..., quantize=...)`) is dequantized first, to each kernel's
        own dtype: the merged params are float, W_q dequantized + s·A·B.

        Args:
          adapters: LoRA factors merged into `self.params` (default `self.adapters`), or a
            `TrainState`: its params (with the leaves trained fully) and its adapters.
        """
        if isinstance(adapters, train_step.TrainState):
            trained = adapters.variables
            return lora.merge(quant.dequantize(trained["params"]), trained["lora"])
        adapters = self.adapters if adapters is None else adapters
        return lora.merge(quant.dequantize(self.params), adapters)

    def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """`tx` on the trainable leaves; frozen leaves get `optax.set_to_zero()` and no state."""
        return optim.make_optimizer(tx, self.labels)

    def init_state(
        self, tx: optax.GradientTransformation, rng: jax.Array | None = None
    ) -> train_step.TrainState:
        """A step-0 `TrainState` for `self.optimizer(tx)`.

        The trainable variables (adapters, leaves trained fully) and the model state are copied
        into the state, so that a step donating them leaves `self` usable; the frozen ones are
        `self.params`' arrays, shared, never copied.

        Args:
          tx: the optimizer, e.g. `optax.adamw(1e-3)`.
          rng: the state's key, for dropout (default `jax.random.key(0)`).
        """
        rng = jax.random.key(0) if rng is None else rng
        variables = jax.tree.map(
            lambda x, label: x if label == FROZEN else jnp.copy(x),
            self.variables,
            self.labels,
            is_leaf=quant.is_quantized,
        )
        # The model state is updated, hence donated, by each step: the state gets a copy too.
        kwargs = (
            {"model_state": jax.tree.map(jnp.copy, self.model_state)} if self.model_state else {}
        )
        return train_step.init_state(variables, self.labels, self.optimizer(tx), rng, **kwargs)

    def train_step(
        self, loss_fn: train_step.LossFn, tx: optax.GradientTransformation, **kwargs
    ) -> Callable[[train_step.TrainState, Any], tuple[train_step.TrainState, dict]]:
        """A jitted `step(state, batch) -> (state, metrics)` for a state from `init_state(tx)`.

        The step donates the state's trainable part and optimizer state but not its frozen part,
        which holds the caller's `params` arrays: it jits an inner function of (frozen, rest of
        the state, batch) with `donate_argnums` on the rest only, and puts the same frozen
        arrays back into the returned state.

        Args:
          loss_fn: `(model, batch, rng) -> (loss, metrics)`; `model(*inputs, **kw)` runs the
            adapted model with the step's variables.
          tx: the optimizer given to `init_state`.
          **kwargs: passed to `lf.make_train_step` (`schedule`, `grad_accum`,
            `skip_nonfinite`).
        """
        step = train_step.make_train_step(self.apply, loss_fn, self.optimizer(tx), **kwargs)

        def inner(frozen, rest, batch):
            state, metrics = step(rest.replace(frozen=frozen), batch)
            return state.replace(frozen=None), metrics

        jitted = jax.jit(inner, donate_argnums=1)

        def run(state: train_step.TrainState, batch):
            rest, metrics = jitted(state.frozen, state.replace(frozen=None), batch)
            return rest.replace(frozen=state.frozen), metrics

        return run


def adapt(
    model: nn.Module | nnx.Module,
    spec: Spec,
    *sample_inputs,
    params: PyTree | None = None,
    variables: Mapping[str, PyTree] | None = None,
    rng: jax.Array | None = None,
    quantize: str = "none",
    double_quant: bool = False,
    quantize_embeddings: bool = False,
    **sample_kwargs,
) -> Adapted:
    """Adapts `model` as `spec` says: LoRA factors, labels, and the factored forward.

    Args:
      model: a Flax linen module (give `params=`, or `variables=`, the whole dict `model.init`
        returns: collections other than "params" become `model_state`), or an NNX module
        (params, `lf.nnx_params(model)`, and the rest of its state are taken from it).
      spec: what is trained, an `lf.Spec`; `lf.FULL_FINETUNE` trains every leaf, with no adapters.
      *sample_inputs: inputs for one shape-only pass of the model (nothing is computed), which
        finds how each adapted kernel's axes split; needed when `spec` adapts a kernel.
      params: a linen model's params.
      variables: a linen model's variables, `{"params": ..., other collections}`.
      rng: key for the factors' initialisation (default `jax.random.key(0)`).
      quantize: "int8" or "nf4" keeps the frozen kernels of supported layers quantized (QLoRA,
        `lorax_ft.quant.quantize`): every kernel but those trained fully, after the adapters
        are made (a PiSSA/OLoRA residual is quantized); "none" (default) leaves them float.
      double_quant: NF4's block scales quantized too (QLoRA's double quantization).
      quantize_embeddings: embedding tables quantized too.
      **sample_kwargs: keyword inputs of that pass (e.g. `deterministic=True`).

    Returns:
      An `Adapted`: `adapted(x)` runs the adapted model; see its methods for training.

    Raises:
      TypeError: `model` is not a linen or NNX module, or its params are missing or given twice.
      SpecError: the spec does not fit the params (see `lf.Spec`).

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import lorax_ft as lf
    >>> model = nn.Dense(8)
    >>> x = jnp.ones((2, 4))
    >>> spec = lf.Spec([("kernel", lf.LoRA(rank=2))])
    >>> adapted = lf.adapt(model, spec, x, variables=model.init(jax.random.key(0), x))
    >>> adapted.print_trainable_parameters()
    trainable params: 24 || all params: 64 || trainable%: 37.5000
    >>> adapted(x).shape
    (2, 8)
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"adapt() takes an lf.Spec (or lf.FULL_FINETUNE) as spec, got {spec!r}")
    params, model_state = _params_and_state(model, params, variables)
    if (spec.lora_targets(params) or quantize != "none") and not (sample_inputs or sample_kwargs):
        raise TypeError(
            "adapt() needs sample inputs, adapt(model, spec, x, ...), to find how each adapted "
            "or quantized kernel is used (a shape-only pass)"
        )
    layouts = {}
    if sample_inputs or sample_kwargs:
        state_kwargs = {"model_state": model_state} if model_state else {}
        layouts = infer_layouts(model, params, *sample_inputs, **sample_kwargs, **state_kwargs)
    rng = jax.random.key(0) if rng is None else rng
    # PiSSA/OLoRA rules make new (residual) kernels; every other leaf stays the caller's array.
    params, adapters = lora.initialize(rng, params, spec, layouts)
    if quantize != "none":
        labels = paths.flatten(spec.labels(params))
        if all(label != FROZEN for label in labels.values()):
            raise SpecError(
                f"quantize={quantize!r} keeps the frozen kernels quantized, and this spec trains "
                "every parameter (full fine-tuning): adapt the kernels with LoRA, or quantize='none'"
            )
        params = quant.quantize(
            params,
            quantize,
            layouts,
            skip={p for p, label in labels.items() if label != FROZEN},
            embeddings=quantize_embeddings,
            double_quant=double_quant,
        )
    return Adapted(
        apply=factored(model),
        params=params,
        adapters=adapters,
        model_state=model_state,
        labels=partition.variable_labels(params, adapters, spec),
        layouts=layouts,
        spec=spec,
    )


def _params_and_state(model, params, variables) -> tuple[PyTree, dict]:
    """(params, model_state) of `model`, checked: one line for each way they can be wrong."""
    if isinstance(model, nnx.Module):
        if params is not None or variables is not None:
            raise TypeError(
                "adapt(): an NNX module carries its own params; update the module "
                "(nnx.update) instead of passing params= or variables="
            )
        return nnx_params(model), _model_state(model)
    if not isinstance(model, nn.Module):
        if callable(model):
            raise TypeError(
                f"adapt() takes a Flax linen or NNX module, got the function {model!r}: a "
                "function fn(params, *inputs) cannot be adapted factored; call lf.factored(fn), "
                "which merges the adapters into the kernels"
            )
        raise TypeError(f"adapt() takes a Flax linen or NNX module, got {type(model).__name__}")
    if params is not None and variables is not None:
        raise TypeError("adapt(): pass params= or variables= for a linen module, not both")
    if variables is not None:
        if "params" not in variables:
            raise TypeError(
                f"adapt(): variables= has no 'params' collection (it has {sorted(variables)}); "
                "pass the dict model.init(...) returns"
            )
        return variables["params"], _model_state(model, variables)
    if params is None:
        raise TypeError(
            f"adapt() of a linen module ({type(model).__name__}) needs its params: "
            "params=variables['params'] or variables=model.init(rng, x)"
        )
    if isinstance(params, Mapping) and set(params) == {"params"}:
        raise TypeError(
            "adapt(): params= looks like the whole variables dict (its only key is 'params'); "
            "pass variables=model.init(...) or params=variables['params']"
        )
    return params, {}
