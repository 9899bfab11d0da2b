"""One rule mechanism: ordered `(regex, value)` rules over `/`-joined parameter paths.

The first rule whose regex *fully* matches a path decides that path's value. What is trained
(`lorax_ft.transform.spec.Spec`), where parameters live (`sharding.param_specs`' path rules) and the
optimizer's learning-rate and weight-decay multipliers (`optim.lr_mults`, `optim.wd_mults`) are
all tables of such rules, resolved here, so they share one meaning and one error: a rule that
matches no path raises `RuleError` naming the rule and the closest paths, because a misspelt rule
would otherwise silently do nothing.

>>> rules = Rules([(r".*/bias", 0.0), (r"encoder/.*", 0.5)], what="optim.wd_mults")
>>> rules.match(["encoder/dense/kernel", "encoder/dense/bias", "head/kernel"], default=1.0)
{'encoder/dense/kernel': 0.5, 'encoder/dense/bias': 0.0, 'head/kernel': 1.0}
>>> try:
...     Rules([(r"decoder/.*", 0.5)], what="optim.lr_mults").match(["encoder/kernel"])
... except RuleError as e:
...     print(e)  # doctest: +ELLIPSIS
optim.lr_mults: rule 'decoder/.*' matches no parameter (...); closest paths: ['encoder/kernel']
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from lorax_ft.errors import UserError

V = TypeVar("V")


class RuleError(UserError, ValueError):
    """A rule that is not a valid regex, matches no parameter, or (strict) a path no rule covers."""


class Rules(Generic[V]):
    """Ordered `(regex, value)` rules, compiled once; the first full match wins.

    Args:
      rules: `(regex, value)` pairs in priority order.
      what: what the rules are for (a config key such as `"sharding.path_rules"`); it prefixes
        every error message.

    Raises:
      RuleError: a regex that does not compile, naming the rule.
    """

    def __init__(self, rules: Iterable[tuple[str, V]], *, what: str = ""):
        self.what = what
        self.rules: tuple[tuple[str, V], ...] = tuple((pattern, value) for pattern, value in rules)
        self._regexes = tuple(self._compile(pattern) for pattern, _ in self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def index(self, path: str) -> int | None:
        """The index of the first rule whose regex fully matches `path`, or None."""
        return next((i for i, regex in enumerate(self._regexes) if regex.fullmatch(path)), None)

    def match(
        self,
        paths: Iterable[str],
        default: Any = None,
        *,
        strict: bool = False,
        check: bool = True,
    ) -> dict[str, V]:
        """`{path: value}` for every path: the first matching rule's value, else `default`.

        Args:
          paths: the `/`-joined paths the rules are meant for.
          default: the value of a path no rule matches.
          strict: raise for a path that no rule matches instead of using `default`.
          check: raise for a rule that matches no path (a rule that only ever loses to earlier
            rules still counts as matching). False allows tables shared by several models.

        Raises:
          RuleError: with `check`, a rule that matches none of `paths`, listing the closest
            paths; with `strict`, a path that no rule matches.
        """
        paths = list(paths)
        values, used = {}, set()
        for path in paths:
            index = self.index(path)
            if index is not None:
                used.add(index)
                values[path] = self.rules[index][1]
            elif strict:
                raise self._error(
                    f"parameter {path!r} is matched by no rule; add a rule for it, e.g. "
                    "('.*', value) last"
                )
            else:
                values[path] = default
        for index, regex in enumerate(self._regexes):
            if check and index not in used and not any(regex.fullmatch(p) for p in paths):
                pattern = self.rules[index][0]
                close = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.0)
                raise self._error(
                    f"rule {pattern!r} matches no parameter (regexes must match the whole "
                    f"'/'-joined path); closest paths: {close}"
                )
        return values

    def _compile(self, pattern: Any) -> re.Pattern:
        try:
            return re.compile(pattern)
        except (re.error, TypeError) as e:
            raise self._error(f"rule {pattern!r}: not a valid regex ({e})") from None

    def _error(self, message: str) -> RuleError:
        return RuleError(f"{self.what}: {message}" if self.what else message)
