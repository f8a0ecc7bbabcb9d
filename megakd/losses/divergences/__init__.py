"""The registry of divergence kinds: one module per kind in this package, found automatically.

Each non-private module here (not ``base``, not starting with ``_``) defines exactly one
``Divergence`` subclass; importing the package imports them all and orders them by their
``order`` attribute, then name. Adding a kind is one new file here plus its float64 reference
in ``tests/_losses_reference.py`` (docs/losses.md, "Adding a divergence"); the CLI's
``--kd-loss`` choices and one flag per ``Parameter`` follow from ``DIVERGENCES`` and
``divergence_parameters()``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import MappingProxyType
from typing import Dict, Iterable, Mapping, Tuple, Type

from .base import Block, Divergence, Parameter


def discover(path: Iterable[str], package: str) -> Dict[str, Type[Divergence]]:
    """{name: class} of the kinds in the modules of ``package`` (at ``path``), sorted by
    (``order``, name). Raises ImportError for a module without exactly one ``Divergence``
    subclass or for a name defined twice."""
    found = []
    for info in pkgutil.iter_modules(list(path)):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        kinds = [obj for obj in vars(module).values()
                 if inspect.isclass(obj) and issubclass(obj, Divergence)
                 and obj.__module__ == module.__name__]
        if len(kinds) != 1:
            raise ImportError(f"{module.__name__} must define exactly one Divergence subclass, "
                              f"found {[k.__name__ for k in kinds]}")
        found.append(kinds[0])
    registry: Dict[str, Type[Divergence]] = {}
    for cls in sorted(found, key=lambda c: (c.order, c.name)):
        if cls.name in registry:
            raise ImportError(f"divergence name {cls.name!r} defined twice")
        registry[cls.name] = cls
    return registry


DIVERGENCES: Mapping[str, Type[Divergence]] = MappingProxyType(discover(__path__, __name__))


def divergence_parameters() -> Tuple[Parameter, ...]:
    """Every distinct ``Parameter`` of every kind, in registry order, each once."""
    seen: Dict[str, Parameter] = {}
    for cls in DIVERGENCES.values():
        for param in cls.parameters:
            if param.name in seen and seen[param.name] is not param:
                raise ValueError(f"two different parameters are named {param.name!r}")
            seen.setdefault(param.name, param)
    return tuple(seen.values())


def make_divergence(kind: str, params: Mapping[str, float] = MappingProxyType({})) -> Divergence:
    """The ``kind`` divergence with its own parameters taken from ``params`` (others ignored;
    missing ones at their default). Raises ValueError for an unknown kind or a value outside
    its bounds (the message names the flag)."""
    cls = DIVERGENCES.get(kind)
    if cls is None:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")
    return cls(**{p.name: params[p.name] for p in cls.parameters if p.name in params})


__all__ = ["Block", "DIVERGENCES", "Divergence", "Parameter", "divergence_parameters",
           "make_divergence"]
