"""Registries: every dataset, model, attack, objective, budget, weights, policy and sampler is
registered under a name and can be listed and built from configuration.

Example::

    OBJECTIVES = Registry("objective")

    @OBJECTIVES.register("trades")
    class Trades(Objective): ...

    OBJECTIVES.get("trades")      # the class
    OBJECTIVES.names()            # ['mart', 'pgd_at', 'standard', 'trades']
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError

T = TypeVar("T")


class NoParams(BaseModel):
    """A registry member without parameters."""

    model_config = ConfigDict(extra="forbid")


def first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    para = doc.split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines())


#: every registry made, in order of creation (see :func:`all_registries`)
_ALL: list[Registry[Any]] = []


def all_registries() -> list[Registry[Any]]:
    """Every registry created so far (one per kind of part)."""
    return list(_ALL)


class Registry(Generic[T]):
    """A name → member table with one-line descriptions (the member's docstring's first line)."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self._package = package
        self._members: dict[str, T] = {}
        self._loaded = package is None
        _ALL.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._members and self._members[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._members[name] = obj
            obj.registered_name = name  # type: ignore[attr-defined]
            return obj

        return deco

    def _load(self) -> None:
        """Import every module of the package so that its members register themselves."""
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self._package)  # type: ignore[arg-type]
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self._package}.{info.name}")

    def names(self, pattern: str | None = None) -> list[str]:
        self._load()
        import fnmatch

        names = sorted(self._members)
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._members

    def get(self, name: str) -> T:
        self._load()
        if name not in self._members:
            close = difflib.get_close_matches(name, self._members, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(self.names())}"
            )
        return self._members[name]

    def describe(self) -> dict[str, str]:
        return {n: first_line(self._members[n]) for n in self.names()}

    def params_model(self, name: str) -> type[BaseModel]:
        return getattr(self.get(name), "Params", NoParams)

    def validate(self, spec: Any, where: str) -> dict[str, Any]:
        """Check a ``{name: ..., **params}`` spec; return it with defaults filled in."""
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or "name" not in spec:
            raise UserError(f"{where}: expected a mapping with a 'name' key (one of {self.names()})")
        spec = dict(spec)
        name = spec.pop("name")
        if not isinstance(name, str):
            raise UserError(f"{where}.name: expected a string; choose one of: {self.names()}")
        self.get(name)
        model = self.params_model(name)
        try:
            params = model(**spec)
        except ValidationError as exc:
            raise UserError(format_validation_error(exc, where)) from None
        return {"name": name, **params.model_dump()}

    def build(self, spec: dict[str, Any], **extra: Any) -> Any:
        spec = dict(spec)
        name = spec.pop("name")
        cls: Any = self.get(name)
        params = self.params_model(name)(**spec)
        return cls(params, **extra)


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    """One line naming the first offending field, what was wrong, and what is allowed."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    field = ".".join(p for p in (where, loc) if p) or "config"
    kind = err.get("type", "")
    msg = err.get("msg", "invalid value")
    if kind == "extra_forbidden":
        return f"{field}: unknown key; remove it or check the spelling"
    if kind == "missing":
        return f"{field}: required field is missing"
    msg = msg.removeprefix("Value error, ")
    if not loc:  # a check of the whole model: its input is the whole config, not worth showing
        return f"{field}: {msg}"
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{field}: {msg} (got {shown})"
