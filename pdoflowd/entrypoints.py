"""Which code a job may run: an entry point resolved to a registered job.

Owns the one rule that stands between a posted string and the code a worker
runs. An entry point names a module and one attribute of it
(``package.module.function`` or ``package.module:function``); the module must
lie under ``jobs.allowed_modules`` before it is imported, and the attribute,
read from the module's own namespace, must be a plain function marked with
``@job`` (or, with ``jobs.allow_unmarked``, any plain function) whose
defining module lies under ``jobs.allowed_modules`` too. Nothing is ever
reached by walking attributes, so names a module merely imported (``os``,
``subprocess``, ``importlib``) cannot be posted. It must not touch the
database or know about processes.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = [
    "JOB_MARKER",
    "EntryPointRefused",
    "is_marked",
    "mark",
    "module_allowed",
    "resolve",
    "split_entry_point",
]

# The attribute @job sets on the function it registers: the function itself,
# so that a wrapper copying __dict__ (functools.wraps) is not taken for it.
JOB_MARKER = "__pdoflowd_job__"

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*")
_ATTRIBUTE = re.compile(_IDENTIFIER)


class EntryPointRefused(Exception):
    """The entry point names nothing a job may run; the text says why."""


def mark(function: Callable[..., Any]) -> None:
    """Mark ``function`` as a job (what ``@job`` does)."""
    setattr(function, JOB_MARKER, function)


def is_marked(function: object) -> bool:
    """Whether ``function`` itself was marked with :func:`mark`."""
    return getattr(function, JOB_MARKER, None) is function


def split_entry_point(entry_point: str) -> tuple[str, str]:
    """(module, attribute) of ``module:attribute`` or ``module.attribute``.

    Raises :class:`EntryPointRefused` for anything else, including a dunder
    attribute (``__builtins__``, ``__loader__``), which is never a job.
    """
    if not isinstance(entry_point, str):
        raise EntryPointRefused(f"{entry_point!r} is not an entry point")
    if ":" in entry_point:
        module, _, attribute = entry_point.partition(":")
    else:
        module, _, attribute = entry_point.rpartition(".")
    if not (_MODULE.fullmatch(module) and _ATTRIBUTE.fullmatch(attribute)):
        raise EntryPointRefused(
            f"{entry_point!r} is not a module and function "
            "(package.module.function or package.module:function)"
        )
    if attribute.startswith("__") and attribute.endswith("__"):
        raise EntryPointRefused(f"{entry_point} names a special attribute")
    return module, attribute


def module_allowed(module: str, allowed: tuple[str, ...]) -> bool:
    """True when ``module`` is one of ``allowed`` or lies under one."""
    return any(
        module == prefix or module.startswith(prefix + ".")
        for prefix in allowed
    )


def _import_module(name: str) -> ModuleType:
    """Import ``name`` one package at a time, refusing a name that goes
    through something other than a package's own submodule (``app.tasks.os``
    where ``app.tasks`` is a module, or merely imported ``os``)."""
    parts = name.split(".")
    module = importlib.import_module(parts[0])
    for depth in range(1, len(parts)):
        parent, child = module, ".".join(parts[: depth + 1])
        if not hasattr(parent, "__path__"):
            raise EntryPointRefused(
                f"{parent.__name__} is a module, not a package: {child} "
                "names one of its attributes"
            )
        found = vars(parent).get(parts[depth])
        if found is not None and getattr(found, "__name__", None) != child:
            raise EntryPointRefused(
                f"{child} names an attribute of {parent.__name__}, not a "
                "module of it"
            )
        module = importlib.import_module(child)
    return module


def resolve(
    entry_point: str,
    allowed: tuple[str, ...],
    *,
    allow_unmarked: bool = False,
) -> Callable[..., Any]:
    """The job function ``entry_point`` names, or :class:`EntryPointRefused`.

    The module is imported only once its name passed the allowlist, and
    only through packages' own submodules; an error while importing it (a
    module missing on this host, say) is raised as it is, for the caller to
    treat as an ordinary failure.
    """
    module_name, attribute = split_entry_point(entry_point)
    if not module_allowed(module_name, allowed):
        raise EntryPointRefused(
            f"{entry_point} is not under jobs.allowed_modules"
        )
    module = _import_module(module_name)
    # The module's own namespace: a module-level __getattr__ is not asked.
    namespace = vars(module)
    if attribute not in namespace:
        raise AttributeError(f"module {module_name} has no {attribute!r}")
    function = namespace[attribute]
    if not inspect.isfunction(function):
        raise EntryPointRefused(
            f"{entry_point} is not a function but {type(function).__name__!r}"
        )
    if not allow_unmarked and not is_marked(function):
        raise EntryPointRefused(
            f"{entry_point} is not marked with @job (set jobs.allow_unmarked "
            "to run plain functions)"
        )
    defined_in = getattr(function, "__module__", None)
    if not isinstance(defined_in, str) or not module_allowed(
        defined_in, allowed
    ):
        raise EntryPointRefused(
            f"{entry_point} is defined in {defined_in}, which is not under "
            "jobs.allowed_modules"
        )
    return function
