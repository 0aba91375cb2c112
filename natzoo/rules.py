"""The vocabulary of config value rules: what a knob accepts, and the checks that apply a table of rules.

A :class:`Rule` describes the accepted values of one knob (:class:`Number`, :class:`Integer`, :class:`Flag`,
:class:`Choice`, :class:`Text`, :class:`ListOf`, :class:`Table`, :class:`Either`). The tables of rules live with the
code that reads the knobs (``natzoo.optim`` for ``optim``/``sched``, ``natzoo.config`` for the shared ones, a task's
``config_rules``), and import from here, so this module depends on nothing of natzoo's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "Choice",
    "Either",
    "Flag",
    "Integer",
    "ListOf",
    "Number",
    "Rule",
    "Table",
    "Text",
    "Texts",
    "check_config",
    "check_settings",
    "plain",
]


def plain(value: Any) -> Any:
    """OmegaConf node -> plain Python containers (resolved); other values unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


class Rule:
    """A check of one config value: :meth:`problem` returns ``(exception type, what was expected)`` or None."""

    nullable: bool = False

    def expected(self) -> str:
        """Human description of the accepted values."""
        raise NotImplementedError

    def accepts_type(self, value: Any) -> bool:
        """Whether ``value`` has an acceptable type (range aside)."""
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (of an acceptable type) is in range."""
        return True

    def problem(self, value: Any) -> tuple[type[Exception], str] | None:
        """None when ``value`` is valid, else the exception type and the description of the valid values."""
        if value is None:
            return None if self.nullable else (TypeError, self.describe())
        if not self.accepts_type(value):
            return TypeError, self.describe()
        if not self.accepts(value):
            return ValueError, self.describe()
        return None

    def describe(self) -> str:
        """:meth:`expected`, plus "or null" for nullable rules."""
        return self.expected() + (" or null" if self.nullable else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Number(Rule):
    """A real number in a range: ``low``/``high`` bounds (None: unbounded), open when ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return _is_number(value)

    def accepts(self, value: Any) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def expected(self) -> str:
        return "a finite number" + self._range()


@dataclass(frozen=True)
class Integer(Number):
    """An integer in a range (bounds inclusive)."""

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def expected(self) -> str:
        return "an integer" + self._range()


@dataclass(frozen=True)
class Flag(Rule):
    """``true`` or ``false``."""

    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, bool)

    def expected(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Choice(Rule):
    """One of fixed values (compared by type and value, so ``1`` is not ``true``)."""

    options: tuple = ()
    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, (str, bool, int, float))

    def accepts(self, value: Any) -> bool:
        return any(type(value) is type(o) and value == o for o in self.options)

    def expected(self) -> str:
        shown = ", ".join(str(o).lower() if isinstance(o, bool) else repr(o) for o in self.options)
        return f"one of {shown}"


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string, optionally checked by ``valid`` (described by ``what``)."""

    nullable: bool = False
    valid: Callable[[str], bool] | None = None
    what: str = "a non-empty string"

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, str)

    def accepts(self, value: Any) -> bool:
        return bool(value) and (self.valid is None or self.valid(value))

    def expected(self) -> str:
        return self.what


@dataclass(frozen=True)
class ListOf(Rule):
    """A list of values each passing ``item``; ``length`` fixes the count (None: any, at least ``min_length``)."""

    item: Rule = Number()
    length: int | None = None
    min_length: int = 0
    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and all(self.item.accepts_type(v) for v in value)

    def accepts(self, value: Any) -> bool:
        count_ok = len(value) == self.length if self.length is not None else len(value) >= self.min_length
        return count_ok and all(self.item.accepts(v) for v in value)

    def expected(self) -> str:
        count = f"{self.length} " if self.length is not None else ""
        return f"a list of {count}values, each {self.item.expected()}"


def Texts(nullable: bool = False) -> ListOf:
    """A list of non-empty strings."""
    return ListOf(item=Text(), nullable=nullable)


@dataclass(frozen=True)
class Table(Rule):
    """A mapping (keyword arguments passed on to a library, checked there)."""

    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, Mapping)

    def expected(self) -> str:
        return "a mapping of keyword arguments"


@dataclass(frozen=True)
class Either(Rule):
    """Any of several rules."""

    rules: tuple[Rule, ...] = ()
    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return any(r.accepts_type(value) for r in self.rules)

    def accepts(self, value: Any) -> bool:
        return any(r.accepts_type(value) and r.accepts(value) for r in self.rules)

    def expected(self) -> str:
        return " or ".join(r.expected() for r in self.rules)


_MISSING = object()


def _raise(key: str, value: Any, problem: tuple[type[Exception], str]) -> None:
    kind, expected = problem
    raise kind(f"{key}={value!r}: expected {expected}")


def check_config(cfg: DictConfig, rules: Mapping[str, Rule]) -> None:
    """Checks every key of ``rules`` that ``cfg`` holds (keys it lacks are not used by that config).

    Raises:
        TypeError: a value has the wrong type (the message names the key, the value and what was expected).
        ValueError: a value is out of range or not one of the choices.
    """
    for key, rule in rules.items():
        try:
            value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
        except OmegaConfBaseException as err:  # an unset mandatory value (???) or a failing interpolation
            raise ValueError(f"{key}: {err}") from None
        if value is _MISSING:
            continue
        value = plain(value)
        problem = rule.problem(value)
        if problem is not None:
            _raise(key, value, problem)


def check_settings(values: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str,
                   required: Sequence[str] = ()) -> None:
    """Checks a settings dictionary (e.g. a module's ``optim``) against ``rules``; ``required`` keys must be present.

    Raises:
        ValueError: a required key is missing, or a value is out of range.
        TypeError: a value has the wrong type.
    """
    for key, value in values.items():
        rule = rules.get(key)
        problem = rule.problem(plain(value)) if rule is not None else None
        if problem is not None:
            _raise(f"{prefix}.{key}", value, problem)
    missing = [k for k in required if k not in values]
    if missing:
        raise ValueError(f"{prefix} settings lack {[f'{prefix}.{k}' for k in missing]} (see configs/{prefix})")
