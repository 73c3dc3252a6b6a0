"""A sweep's search space (``tune.space``) compiled into ordered dimensions: the searcher's
name for each, the config key it sets, the branch it lives under (``when``) and how its
value is derived (``ratio_of``). Pure Python: no Ray, no Optuna; ``tune.space`` turns the
dimensions into Optuna's define-by-run calls."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lepton_ray.config.tune import SearchParam, SpaceEntry, TuneSection

NUMERIC = ("uniform", "loguniform", "int")


@dataclass(frozen=True)
class Dimension:
    name: str
    """The searcher's parameter name: the config key, or the key with its branch (a key
    with several variants) or ``[ratio]`` (a multiplier) appended."""
    key: str
    param: SearchParam
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def kind(self) -> str:
        return "ratio" if self.param.ratio_of else str(self.param.type)

    @property
    def depends_on(self) -> set[str]:
        keys = {key for key, _ in self.when}
        if self.param.ratio_of:
            keys.add(self.param.ratio_of)
        return keys

    def active(self, values: dict[str, Any]) -> bool:
        """Whether this trial took the branch this dimension lives under."""
        return all(key in values and _among(values[key], allowed) for key, allowed in self.when)

    def value(self, sampled: Any, values: dict[str, Any], base: dict[str, Any]) -> Any:
        """The config value of a sampled point (a multiplier times its key's value)."""
        if not self.param.ratio_of:
            p = self.param
            if p.type == "uniform" and p.step:  # on the grid, without float dust (0.05, not
                return round(p.low + round((sampled - p.low) / p.step) * p.step, 12)  # ...01)
            return sampled
        of = (
            values[self.param.ratio_of]
            if self.param.ratio_of in values
            else get_dotted(base, self.param.ratio_of)
        )
        product = sampled * of
        if isinstance(of, int) and float(product).is_integer():
            return int(product)
        return product

    def contains(self, raw: Any) -> bool:
        """Whether a searcher value lies in this dimension (warm start, the config's point)."""
        p = self.param
        if p.values is not None:
            return any(_same(raw, v) for v in p.values)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            return False
        return p.low <= raw <= p.high  # type: ignore[operator]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, bool) or isinstance(b, bool):
            return a is b
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _among(value: Any, allowed: tuple[Any, ...]) -> bool:
    return any(_same(value, a) for a in allowed)


def get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


def _branch(when: dict[str, Any]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    return tuple(
        (key, tuple(value) if isinstance(value, list) else (value,))
        for key, value in sorted(when.items())
    )


def _label(when: tuple[tuple[str, tuple[Any, ...]], ...]) -> str:
    return ",".join(f"{key}={'|'.join(str(v) for v in allowed)}" for key, allowed in when)


def compile_space(space: dict[str, SpaceEntry]) -> list[Dimension]:
    """The dimensions in an order where every branch key and ratio base comes first.
    Raises ValueError (one line, naming the key) on a branch or ratio that cannot hold."""
    dims: list[Dimension] = []
    for key, entry in space.items():
        variants = entry if isinstance(entry, list) else [entry]
        if not variants:
            raise ValueError(f"tune.space.{key}: an empty list of variants")
        if len(variants) > 1 and any(v.when is None for v in variants):
            raise ValueError(
                f"tune.space.{key}: each of its {len(variants)} variants needs a 'when' "
                "saying under which branch it applies"
            )
        for param in variants:
            when = _branch(param.when or {})
            name = key
            if len(variants) > 1:
                name += f"[{_label(when)}]"
            if param.ratio_of:
                name += "[ratio]"
            dims.append(Dimension(name, key, param, when))
    by_key: dict[str, list[Dimension]] = {}
    for dim in dims:
        by_key.setdefault(dim.key, []).append(dim)
    for dim in dims:
        _check_branch(dim, by_key)
    for key, variants in by_key.items():
        _check_exclusive(key, variants)
    return _ordered(dims, by_key)


def _check_branch(dim: Dimension, by_key: dict[str, list[Dimension]]) -> None:
    for key, allowed in dim.when:
        if key == dim.key:
            raise ValueError(f"tune.space.{dim.key}: 'when' names the key itself")
        parents = by_key.get(key)
        if not parents:
            raise ValueError(
                f"tune.space.{dim.key}: 'when' names {key}, which is not searched; "
                f"a branch must be a 'choice' parameter of tune.space"
            )
        for parent in parents:
            if parent.kind not in ("choice", "grid"):
                raise ValueError(
                    f"tune.space.{dim.key}: 'when' names {key}, a '{parent.kind}' parameter; "
                    "a branch must be a 'choice' parameter"
                )
            unknown = [v for v in allowed if not _among(v, tuple(parent.param.values or ()))]
            if unknown:
                raise ValueError(
                    f"tune.space.{dim.key}: 'when' {key} = {unknown[0]!r}, which is not one "
                    f"of its values {parent.param.values}"
                )
    of = dim.param.ratio_of
    if of is not None:
        if of == dim.key:
            raise ValueError(f"tune.space.{dim.key}: 'ratio_of' names the key itself")
        for base in by_key.get(of, []):
            if base.kind == "ratio" or (
                base.kind in ("choice", "grid")
                and not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                    for v in base.param.values or ()
                )
            ):
                raise ValueError(
                    f"tune.space.{dim.key}: 'ratio_of' {of} must be a number, not a "
                    f"{base.kind} parameter"
                )


def _check_exclusive(key: str, variants: list[Dimension]) -> None:
    """Two variants of one key never both apply: some branch key tells them apart."""
    for i, a in enumerate(variants):
        for b in variants[i + 1 :]:
            first, second = dict(a.when), dict(b.when)
            apart = any(
                k in second and not any(_among(v, second[k]) for v in first[k]) for k in first
            )
            if not apart:
                raise ValueError(
                    f"tune.space.{key}: variants [{_label(a.when)}] and [{_label(b.when)}] can "
                    "both apply; give them 'when' values that exclude each other"
                )


def _ordered(dims: list[Dimension], by_key: dict[str, list[Dimension]]) -> list[Dimension]:
    done: set[str] = set()
    out: list[Dimension] = []
    pending = list(dims)
    while pending:
        ready = [d for d in pending if all(k in done or k not in by_key for k in d.depends_on)]
        if not ready:
            cycle = ", ".join(sorted({d.key for d in pending}))
            raise ValueError(f"tune.space: the branches and ratios of {cycle} depend on each other")
        for dim in ready:
            out.append(dim)
            pending.remove(dim)
        done |= {d.key for d in ready} - {d.key for d in pending}
    return out


def resolve(
    dims: list[Dimension], sample: Callable[[Dimension], Any], base: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Walk the dimensions in order, sampling only those whose branch was taken. Returns
    (the searcher's values by name, the config values by key)."""
    raw: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for dim in dims:
        if not dim.active(values):
            continue
        raw[dim.name] = sample(dim)
        values[dim.key] = dim.value(raw[dim.name], values, base)
    return raw, values


def config_point(dims: list[Dimension], base: dict[str, Any]) -> dict[str, Any]:
    """The config's own values as a searcher point (the first trial: a baseline); {} when
    one of them lies outside the space."""

    def own(dim: Dimension) -> Any:
        value = get_dotted(base, dim.key)
        if dim.param.ratio_of:
            of = get_dotted(base, dim.param.ratio_of)
            value = value / of if of else None
        if value is None or not dim.contains(value):
            raise LookupError(dim.name)
        if dim.param.values is not None:  # the listed value itself (1 for 1.0)
            return next(v for v in dim.param.values if _same(value, v))
        return value

    try:
        raw, _ = resolve(dims, own, base)
    except (LookupError, KeyError, TypeError):
        return {}
    return raw


def grid_size(dims: list[Dimension]) -> int:
    return math.prod(len(d.param.values or ()) for d in dims)


def check_space(tune: TuneSection, check_value: Callable[[str, Any], None]) -> list[Dimension]:
    """Everything about ``tune.space`` that can be refused before a trial starts.
    ``check_value(key, value)`` raises ValueError when the config refuses that value."""
    dims = compile_space(tune.space)
    if tune.enabled and not dims:
        raise ValueError(
            "tune.space is empty: add a parameter to search, or set tune.enabled: false "
            "to train once"
        )
    grids = [d for d in dims if d.kind == "grid"]
    if tune.search == "grid":
        loose = [d for d in dims if d.param.values is None]
        if loose:
            raise ValueError(
                f"tune.search: grid enumerates values; tune.space.{loose[0].key} is "
                f"'{loose[0].kind}' (use type: grid or choice)"
            )
        branched = [d for d in dims if d.when]
        if branched:
            raise ValueError(
                f"tune.search: grid takes no conditional parameters (tune.space.{branched[0].key} "
                "has a 'when'); use tpe or random"
            )
        size = grid_size(dims)
        if size > tune.num_samples:
            raise ValueError(
                f"tune.space is a grid of {size} points but tune.num_samples is "
                f"{tune.num_samples}; raise num_samples to {size} or shrink the grid"
            )
    elif grids:
        raise ValueError(
            f"tune.space.{grids[0].key} is a 'grid' parameter, which needs tune.search: grid "
            "(use type: choice to sample among values)"
        )
    if tune.search == "cmaes" and not any(d.kind in NUMERIC for d in dims):
        raise ValueError(
            "tune.search: cmaes needs a numeric parameter (uniform, loguniform or int); "
            "it would sample every choice at random"
        )
    for dim in dims:
        for value in _extremes(dim):
            check_value(dim.key, value)
    return dims


def _extremes(dim: Dimension) -> list[Any]:
    p = dim.param
    if dim.kind == "ratio":
        return []  # a product: checked in each trial, once its base is known
    if p.values is not None:
        return list(p.values)
    if p.type == "int":
        return [int(p.low), int(p.high)]  # type: ignore[arg-type]
    return [p.low, p.high]
