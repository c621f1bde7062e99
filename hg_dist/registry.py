"""Named, declared settings: one place that says what a method takes.

A :class:`Setting` declares one setting of a method (or of an example) once: its
name, type, default, valid values (a range or choices), help text and command-line flag.
A :class:`Registry` holds entries
(IHVP methods in :mod:`hg_dist.ihvp.registry`, outer optimizers in
:mod:`hg_dist.outer_optimizers`) that each carry ``name`` and ``settings``, and
turns a *spec* — one plain value such as ``{"name": "nystrom", "rank": 10,
"rho": 0.1}`` — into checked, complete settings. Everything that needs a method's
settings (the Python API, command-line flags, Tune search spaces, results tables,
benchmarks) reads them from here, so a method is described in exactly one place.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["KINDS", "Entry", "Registry", "Setting"]


KINDS = (int, float, str, bool, Path)
"""What a setting may hold: numbers, strings (with or without ``choices``), switches, paths.

A ``Path`` setting holds its value as a ``str`` (``~`` expanded), so configs stay plain JSON."""


@dataclass(frozen=True)
class Setting:
    """One setting of a registered method or example, declared once.

    Attributes:
        name: the keyword, e.g. ``"rank"``.
        kind: ``int``, ``float``, ``str``, ``bool`` (a switch: ``--amp`` / ``--no-amp``) or
            ``pathlib.Path`` (a file or folder, held as a ``str``).
        default: the value used when a spec leaves the setting out; ``None`` makes the
            setting optional (``None`` is then a valid value, and ``help`` says what it means).
        help: one line for ``--help`` and the docs.
        minimum, maximum: bounds of a number (``None``: unbounded).
        exclusive_minimum, exclusive_maximum: whether a bound itself is invalid
            (``rho > 0``: ``minimum=0, exclusive_minimum=True``).
        choices: the only valid values (e.g. ``("cifar", "synthetic")``), or ``None``.
        flag: command-line flag without dashes (default: ``name`` with ``-``),
            shared by every method that has a setting of this name.
        argument: the keyword the method's function takes for it (default
            ``name``); ``None`` for a setting accepted for compatibility only.
        hint: what to do about an invalid value, appended to the error.
    """

    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    flag: str | None = None
    argument: str | None = "="
    hint: str = ""
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TypeError(f"Setting {self.name!r}: kind must be one of int, float, str, bool, pathlib.Path, "
                            f"got {self.kind!r}")
        numeric = self.kind in (int, float)
        if not numeric and (self.minimum is not None or self.maximum is not None):
            raise TypeError(f"Setting {self.name!r}: minimum/maximum apply to int and float settings, not "
                            f"{self.kind.__name__}")
        if self.choices is not None:
            if self.kind in (bool, Path) or not self.choices:
                raise TypeError(f"Setting {self.name!r}: choices must be a non-empty tuple of str, int or float "
                                f"values (not for {self.kind.__name__} settings)")
            object.__setattr__(self, "choices", tuple(self.check(c, "its choices") for c in self.choices))
        self.check(self.default, "its default")

    @property
    def cli_flag(self) -> str:
        """``--rank``, ``--ihvp-iters``, ..."""
        return "--" + (self.flag or self.name.replace("_", "-"))

    @property
    def keyword(self) -> str | None:
        """The keyword of the method's function that receives this setting (``None``: not passed)."""
        return self.name if self.argument == "=" else self.argument

    def bounds(self) -> str:
        """The valid values in words, e.g. ``"> 0"``, ``">= 1 and <= 100"``, ``"one of a, b"``, ``"any"``."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "a switch"
        if self.kind is Path:
            return "a path"
        if self.kind is str:
            return "any text"
        low = None if self.minimum is None else ("> " if self.exclusive_minimum else ">= ") + f"{self.minimum:g}"
        high = None if self.maximum is None else ("< " if self.exclusive_maximum else "<= ") + f"{self.maximum:g}"
        if low and high:
            return f"{low} and {high}"
        return low or high or "any"

    def admits(self, value: float) -> bool:
        """Whether the number ``value`` lies in the valid range (type not checked)."""
        if not math.isfinite(value):
            return False
        if self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum)):
            return False
        if self.maximum is not None and (value > self.maximum or (self.exclusive_maximum and value == self.maximum)):
            return False
        return True

    def check(self, value: Any, owner: str, *, name: str | None = None) -> Any:
        """Return ``value`` converted to :attr:`kind`, or raise naming the setting and ``owner``.

        Args:
            owner: the method it belongs to, e.g. ``"nystrom"`` (named in the message).
            name: the name to use in the message when the caller's keyword differs
                (Neumann's function calls its ``lr`` ``alpha``).

        Raises:
            TypeError: not a value of the right kind (an ``int`` setting refuses ``2.5``
                and ``True``; a ``str`` setting refuses ``3``).
            ValueError: out of range, not finite, not one of the choices, or an empty path.
        """
        name = name or self.name
        suffix = f" ({owner})" + (f"; {self.hint}" if self.hint else "")
        if value is None and self.default is None:
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r}){suffix}")
            return value
        if self.kind is Path:
            if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
                raise TypeError(f"{name} must be a non-empty path, got {type(value).__name__} ({value!r}){suffix}")
            return os.path.expanduser(os.fspath(value))
        if self.kind is str:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__} ({value!r}){suffix}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real) or (
                self.kind is int and not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} must be {'an int' if self.kind is int else 'a real number'}, got "
                            f"{type(value).__name__} ({value!r}){suffix}")
        else:
            value = self.kind(value)
            if not self.admits(value):
                raise ValueError(f"{name} must be {self.bounds()}, got {value!r}{suffix}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name} must be {self.bounds()}, got {value!r}{suffix}")
        return value


class Entry(Protocol):
    """What a registry holds: anything with a ``name`` and its declared ``settings``."""

    name: str
    settings: tuple[Setting, ...]


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """Entries by name; checks specs against their declared settings.

    Args:
        kind: what the entries are, for messages (``"IHVP method"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, E] = {}

    def register(self, entry: E, *, replace: bool = False) -> E:
        """Add ``entry`` under ``entry.name`` and return it.

        Raises:
            ValueError: the name is taken (pass ``replace=True`` to override), or two
                settings share a name, or a setting's flag/type disagrees with a
                setting of the same name in another entry (they share one flag).
        """
        name = entry.name
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{self.kind} name must be an identifier-like string, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to override it")
        names = [s.name for s in entry.settings]
        if "name" in names or len(set(names)) != len(names):
            raise ValueError(f"{self.kind} {name!r}: setting names must be unique and not 'name', got {names}")
        for setting in entry.settings:
            for other in self._entries.values():
                if other.name == name:
                    continue
                twin = next((s for s in other.settings if s.name == setting.name), None)
                if twin is not None and (twin.cli_flag != setting.cli_flag or twin.kind is not setting.kind):
                    raise ValueError(f"{self.kind} {name!r}: setting {setting.name!r} is {setting.kind.__name__} "
                                     f"{setting.cli_flag} but {other.name!r} declares it {twin.kind.__name__} "
                                     f"{twin.cli_flag}; a setting name means one flag and type for every method")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a method of their own clean up with this)."""
        self[name]
        del self._entries[name]

    def __getitem__(self, name: str) -> E:
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; use one of {self.names()}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def settings(self) -> dict[str, Setting]:
        """Every setting name over all entries (first declaration wins; all agree on flag and type)."""
        found: dict[str, Setting] = {}
        for entry in self._entries.values():
            for setting in entry.settings:
                found.setdefault(setting.name, setting)
        return found

    def check_setting_names(self, name: str, keys: Any) -> E:
        """The entry ``name``, after checking that it takes every key in ``keys`` (``"name"`` excepted).

        Raises:
            ValueError: naming the entry, the settings it does not take and the ones it does.
        """
        entry = self[name]
        known = {s.name for s in entry.settings}
        unknown = sorted(set(keys) - known - {"name"})
        if unknown:
            valid = ", ".join(sorted(known)) or "none"
            raise ValueError(f"{self.kind} {name!r} does not take {', '.join(map(repr, unknown))}; its "
                             f"settings are: {valid}")
        return entry

    def normalize(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``{"name": ..., **settings}`` checked and completed with defaults, in declaration order.

        Raises:
            TypeError: ``spec`` is not a mapping, or a value has the wrong type.
            ValueError: unknown name or setting, or a value out of range; the message
                names the entry, the setting and the valid ones.
        """
        if not isinstance(spec, Mapping):
            raise TypeError(f"a {self.kind} spec must be a dict like {{'name': ..., <settings>}}, got "
                            f"{type(spec).__name__} ({spec!r})")
        if "name" not in spec:
            raise ValueError(f"a {self.kind} spec needs a 'name' (one of {self.names()}), got {dict(spec)!r}")
        entry = self.check_setting_names(spec["name"], spec)
        settings = {s.name: s.check(spec.get(s.name, s.default), entry.name) for s in entry.settings}
        return {"name": entry.name, **settings}

    def arguments(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the entry's function for a normalized ``spec``."""
        entry = self[spec["name"]]
        return {s.keyword: spec[s.name] for s in entry.settings if s.keyword is not None}
