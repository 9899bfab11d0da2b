"""What is trained: an ordered list of `(regex, action)` rules over parameter paths.

The first rule whose regex *fully* matches a leaf's path decides what happens to it (matched by
`lorax_ft.transform.rules`, like every rule table of this library):

* `LoRA(rank, alpha, ...)`: the leaf (a kernel) stays frozen and gets trainable low-rank factors;
* `Train()`: the leaf is updated fully (PEFT's `modules_to_save`, biases, norms, a new head);
* `Freeze()`: the leaf is frozen. Leaves matched by no rule are frozen too.

Full fine-tuning is the spec that trains everything, `FULL_FINETUNE`; it goes through exactly the
same code as LoRA, with no adapters and nothing frozen. Per-rule rank/alpha overrides (PEFT's
`rank_pattern`/`alpha_pattern`) are simply earlier, more specific rules.

>>> import jax.numpy as jnp
>>> params = {"q": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)}}
>>> spec = Spec([(r".*/kernel", LoRA(rank=2, alpha=4)), (r".*/bias", Train())])
>>> spec.labels(params)
{'q': {'bias': 'train', 'kernel': 'frozen'}}
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from lorax_ft.transform import paths
from lorax_ft.transform.rules import RuleError, Rules

PyTree = Any

LORA, TRAIN, FROZEN = "lora", "train", "frozen"
Label = Literal["lora", "train", "frozen"]


class SpecError(RuleError):
    """A spec that does not fit the params it is applied to."""


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Adapt a kernel W with trainable factors: W + scale · A @ B.

    Attributes:
      rank: r, the inner dimension of A (in_features × r) and B (r × out_features).
      alpha: scale numerator; `scale = alpha / rank` (or `alpha / sqrt(rank)` with `rslora`).
        Defaults to `rank`, a scale of 1.
      init: "kaiming" (PEFT's default: A kaiming-uniform with a=√5, B zero), "gaussian"
        (A ~ N(0, 1/r), B zero); embedding tables follow PEFT's convention either way: A zero,
        B random. Or, changing the base: "pissa" (A, B from the top-r singular triplets of W,
        exact SVD), "pissa_niter_<N>" (randomized SVD with N subspace iterations), "olora" (A,
        B from a QR decomposition of W); the base kernel becomes the residual W − s·A·B, so
        these need `lora.initialize`, which returns the new base (PEFT's `init_lora_weights`).
      rslora: rank-stabilised scaling alpha/√r.
      dropout: dropout on the adapter's input while training (PEFT's `lora_dropout`).
      in_axes: how many of the kernel's axes (after any stacked layer axes) are inputs; by
        default it comes from the layer that uses the kernel, else all axes but the last.
      dora: DoRA (PEFT's `use_dora`): a trainable magnitude m per output feature, initialised
        to the column norms ‖W‖, rescales the adapted layer to m·(W + s·A·B)/‖W + s·A·B‖, the
        norm held constant in the backward pass. Computed factored at dense layers (linen
        Dense/DenseGeneral, nnx.Linear/LinearGeneral); refused at embeddings (at `lora.init`)
        and at einsum and conv layers (when the model runs), and with dropout (PEFT computes
        the base term on the dropped-out input, an extra full matmul this library does not do).
    """

    rank: int
    alpha: float | None = None
    init: str = "kaiming"
    rslora: bool = False
    dropout: float = 0.0
    in_axes: int | None = None
    dora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SpecError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        parse_init(self.init)
        if self.alpha is not None and not (
            isinstance(self.alpha, int | float) and 0 < self.alpha < math.inf
        ):
            # alpha 0 would train factors that never change the output; a negative one flips it.
            raise SpecError(f"LoRA alpha must be a number > 0 (or None: rank), got {self.alpha!r}")
        if self.in_axes is not None and (not isinstance(self.in_axes, int) or self.in_axes < 1):
            raise SpecError(f"LoRA in_axes must be an integer >= 1, got {self.in_axes!r}")
        if not isinstance(self.dora, bool):
            raise SpecError(f"LoRA dora must be True or False, got {self.dora!r}")
        if self.dora and self.dropout:
            raise SpecError(
                f"LoRA(dora=True, dropout={self.dropout}) is not supported: PEFT's DoRA computes "
                "the base term on the dropped-out input; use dropout=0 with DoRA"
            )

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def changes_base(self) -> bool:
        """Whether the init moves part of W into the factors (PiSSA, OLoRA)."""
        return parse_init(self.init)[0] in BASE_CHANGING_INITS


INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<N>", "olora")
"""The values of `LoRA.init`."""
BASE_CHANGING_INITS = ("pissa", "olora")


def parse_init(init: Any) -> tuple[str, int | None]:
    """`LoRA.init` -> (method, randomized-SVD iterations or None); SpecError names the valid ones.

    >>> parse_init("pissa_niter_4")
    ('pissa', 4)
    """
    if isinstance(init, str):
        if init in ("kaiming", "gaussian", "pissa", "olora"):
            return init, None
        match = re.fullmatch(r"pissa_niter_(\d+)", init)
        if match:
            return "pissa", int(match.group(1))
    raise SpecError(f"LoRA init must be one of {', '.join(INITS)}, got {init!r}")


@dataclasses.dataclass(frozen=True)
class Train:
    """Update this leaf fully."""


@dataclasses.dataclass(frozen=True)
class Freeze:
    """Keep this leaf fixed (the default for leaves no rule matches)."""


Action = LoRA | Train | Freeze
Rule = tuple[str, Action]

# Leaf names that are never weight matrices, even when a scanned layer stack makes them 2-D.
_NOT_KERNELS = ("bias", "scale", "mean", "var")


@dataclasses.dataclass(frozen=True)
class Spec:
    """Ordered `(regex, action)` rules; first full match wins, unmatched leaves are frozen.

    Attributes:
      rules: the rules, in priority order: `(regex, action)` pairs, or a `{regex: action}` dict
        (its insertion order is the priority).
      strict: require every leaf to be matched by some rule (add `(".*", Freeze())` last to
        freeze the rest explicitly).
    """

    rules: Sequence[Rule]
    strict: bool = False

    def __post_init__(self):
        rules = self.rules
        if isinstance(rules, Mapping):  # {regex: action}, in insertion order
            rules = rules.items()
        if isinstance(rules, str | bytes) or not isinstance(rules, Iterable):
            raise SpecError(
                f"Spec takes (regex, action) rules or a {{regex: action}} dict, got {rules!r}"
            )
        rules = tuple(rules)
        for rule in rules:
            if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
                raise SpecError(
                    f"Spec rule {rule!r} is not a (regex, action) pair, e.g. "
                    "('.*/kernel', LoRA(rank=8))"
                )
        rules = tuple((pattern, action) for pattern, action in rules)
        for pattern, action in rules:
            if not isinstance(action, LoRA | Train | Freeze):
                raise SpecError(
                    f"rule {pattern!r}: action {action!r} is not one of LoRA(...), Train(), Freeze()"
                )
        try:
            table = Rules(rules)
        except RuleError as e:
            raise SpecError(str(e)) from None
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "_table", table)  # not a field: equality is by the rules

    def resolve(self, params: PyTree) -> dict[str, Action]:
        """`{path: action}` for every leaf, after validating the spec against `params`.

        Raises:
          SpecError: a rule matches no leaf; LoRA targets a leaf that is not a kernel; with
            `strict`, a leaf that no rule matches. (A rank larger than min(in, out) is caught by
            `lora.init`, which knows how the kernel's axes split into inputs and outputs.)
        """
        flat = paths.flatten(params)
        try:
            actions: dict[str, Action | None] = self._table.match(flat)
        except RuleError as e:
            raise SpecError(str(e)) from None
        for path, action in actions.items():
            if action is None and self.strict:
                raise SpecError(
                    f"parameter {path!r} is matched by no rule and the spec is strict; "
                    "add a rule for it, e.g. (r'.*', Freeze()) last"
                )
            actions[path] = Freeze() if action is None else action
        for path, action in actions.items():
            if isinstance(action, LoRA):
                _check_lora_target(path, flat[path])
        return actions

    def labels(self, params: PyTree) -> PyTree:
        """A pytree like `params` of `'train'` / `'frozen'` (adapted kernels are frozen)."""
        actions = self.resolve(params)
        return paths.map_with_path(
            lambda p, _: TRAIN if isinstance(actions[p], Train) else FROZEN, params
        )

    def lora_targets(self, params: PyTree) -> dict[str, LoRA]:
        """`{path: LoRA}` for the kernels this spec adapts."""
        return {p: a for p, a in self.resolve(params).items() if isinstance(a, LoRA)}


FULL_FINETUNE = Spec([(".*", Train())])
"""Train every leaf: full fine-tuning, through the same code path as LoRA."""


def _check_lora_target(path: str, leaf: Any) -> None:
    shape = tuple(getattr(leaf, "shape", ()))
    name = path.rsplit("/", 1)[-1]
    if len(shape) < 2 or name in _NOT_KERNELS:
        raise SpecError(
            f"LoRA targets {path!r} with shape {shape}, which is not a kernel (LoRA adapts "
            "weight matrices, conv kernels and embedding tables; train biases and norm scales "
            "with Train())"
        )
