"""The configuration reference (docs/configuration.md), generated from the pydantic schema.

    python -m lepton_ray.config.docs            # print the reference
    python -m lepton_ray.config.docs --write    # regenerate docs/configuration.md
    python -m lepton_ray.config.docs --check    # exit 1 if docs/configuration.md is stale

Only pydantic and ``lepton_ray.config`` are imported (no torch, no Ray), so the check runs in
a second on any machine. The output is deterministic: same schema, same bytes.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from lepton_ray import config as schema

DEFAULT_PATH = Path("docs") / "configuration.md"
REGENERATE = "python -m lepton_ray.config.docs --write"

_CONSTRAINTS = (
    ("gt", ">"),
    ("ge", "≥"),
    ("lt", "<"),
    ("le", "≤"),
    ("multiple_of", "multiple of"),
    ("min_length", "min length"),
    ("max_length", "max length"),
)


# ----------------------------------------------------------------------------- annotations
def _strip(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); ``Annotated[X, ...]`` -> X."""
    if get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(get_args(annotation))
        if len(args) == 1:
            return _strip(args[0])[0], nullable
        return Union[tuple(args)], nullable  # noqa: UP007 - rebuilt from a runtime tuple
    return annotation, False


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field nests (``SplitConfig``, ``X | None``), if any."""
    inner, _ = _strip(annotation)
    if _is_model(inner):
        return inner
    if get_origin(inner) in (Union, types.UnionType):
        models = [a for a in get_args(inner) if _is_model(a)]
        if len(models) == 1:
            return models[0]
    return None


def _mapping_of_model(annotation: Any) -> type[BaseModel] | None:
    """The value model of ``dict[str, Model]`` (e.g. ``tune.space``), if any."""
    inner, _ = _strip(annotation)
    if get_origin(inner) is dict:
        args = get_args(inner)
        if len(args) == 2:
            return _item_model(args[1])
    return None


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of ``Model``, ``list[Model]`` or ``Model | list[Model]`` (a space entry)."""
    if _is_model(annotation):
        return annotation
    if get_origin(annotation) is list:
        return _list_of_model(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        models = {_item_model(a) for a in get_args(annotation)} - {None}
        if len(models) == 1:
            return models.pop()
    return None


def _list_of_model(annotation: Any) -> type[BaseModel] | None:
    inner, _ = _strip(annotation)
    if get_origin(inner) is list:
        args = get_args(inner)
        if len(args) == 1 and _is_model(args[0]):
            return args[0]
    return None


def _choices(annotation: Any) -> list[Any] | None:
    inner, _ = _strip(annotation)
    if get_origin(inner) is Literal:
        return list(get_args(inner))
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        return [member.value for member in inner]
    return None


def _type_name(annotation: Any) -> str:
    inner, _ = _strip(annotation)
    if inner is Any:
        return "any"
    if inner is type(None):
        return "null"
    if _choices(inner) is not None:
        kinds = sorted({type(c).__name__ for c in _choices(inner)})
        return " or ".join(kinds)
    if _is_model(inner):
        return "section"
    if isinstance(inner, type) and issubclass(inner, Path):
        return "path"
    origin = get_origin(inner)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(inner))
    if origin is list:
        args = get_args(inner)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        args = get_args(inner)
        if len(args) == 2:
            return f"mapping {_type_name(args[0])} → {_type_name(args[1])}"
        return "mapping"
    if isinstance(inner, type):
        return inner.__name__
    return str(inner).replace("typing.", "")


# ---------------------------------------------------------------------------- field values
def _yaml_value(value: Any) -> str:
    """A value as a user would type it in the YAML file."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value, sort_keys=True, default=str)}`"


def _default(field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        return _yaml_value(field.default)
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:  # a factory that takes the validated data: no static default
            return "computed"
        if isinstance(value, BaseModel):
            return "see below"
        return _yaml_value(value)
    return "**required**"


def _constraints(field: FieldInfo) -> list[str]:
    found = []
    for item in field.metadata:
        for attr, symbol in _CONSTRAINTS:
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{symbol} {value}")
        pattern = getattr(item, "pattern", None)
        if pattern is not None:
            found.append(f"matches `{pattern}`")
    choices = _choices(field.annotation)
    if choices is not None:
        found.append("one of " + ", ".join(f"`{c}`" for c in choices))
    if _strip(field.annotation)[1]:
        found.append("may be `null`")
    return found


def _text(text: str | None) -> str:
    """One table cell: rST literals as Markdown, no newlines, pipes escaped."""
    if not text:
        return ""
    text = " ".join(text.replace("``", "`").split())
    return text.replace("|", "\\|")


# --------------------------------------------------------------------------------- walking
def _extra_rules() -> dict[str, str]:
    """Rules the validators enforce that no field annotation shows (read from the schema)."""
    rules = {}
    metrics = getattr(schema, "REPORTED_METRICS", None)
    if metrics:
        rules["tune.metric"] = "one of " + ", ".join(f"`{m}`" for m in sorted(metrics))
    reason = getattr(schema, "UNTUNABLE_REASON", None)
    if reason:
        rules["tune.space"] = reason
    aliases = getattr(schema, "MODEL_ALIASES", None)
    if aliases:
        rules["model.name"] = "aliases: " + ", ".join(f"`{a}`" for a in sorted(aliases))
    return rules


def _section(
    model: type[BaseModel],
    prefix: str,
    title: str,
    rules: dict[str, str],
    out: list[str],
    depth: int = 0,
) -> None:
    """One heading and table for ``model``, then one per nested section, depth first."""
    out += ["", f"{'#' * min(2 + max(depth - 1, 0), 4)} {title}", ""]
    doc = (model.__doc__ or "").strip()
    if doc and model.__doc__ is not BaseModel.__doc__:
        out += [_text(doc.split("\n\n")[0]), ""]
    nested: list[tuple[str, type[BaseModel], str]] = []
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = _section_model(field.annotation)
        if sub is not None:
            nested.append((key, sub, f"`{key}`"))
            where = f"see `{key}` below"
            default = f"**required**, {where}" if field.is_required() else where
            rows.append((key, "section", default, [], field.description))
            continue
        # dict[str, Model] (tune.space) and list[Model]: the items get a table of their own.
        mapped, listed = _mapping_of_model(field.annotation), _list_of_model(field.annotation)
        if mapped is not None:
            nested.append((f"{key}.<key>", mapped, f"`{key}.<key>`"))
        elif listed is not None:
            nested.append((f"{key}[]", listed, f"`{key}[]`"))
        constraints = _constraints(field)
        if key in rules:
            constraints.append(rules[key])
        rows.append(
            (key, _type_name(field.annotation), _default(field), constraints, field.description)
        )
    if rows:
        out += [
            "| key | type | default | constraints | description |",
            "| --- | --- | --- | --- | --- |",
        ]
        for key, kind, default, constraints, description in rows:
            cells = [f"`{key}`", _text(kind), default.replace("|", "\\|")]
            cells.append(_text("; ".join(constraints)))
            out.append("| " + " | ".join([*cells, _text(description)]) + " |")
    for key, sub, heading in nested:
        _section(sub, key, heading, rules, out, depth + 1)


def render_reference() -> str:
    """The Markdown reference of every key of ``ExperimentConfig``."""
    root = schema.ExperimentConfig
    sections = [
        name
        for name, field in root.model_fields.items()
        if _section_model(field.annotation) is not None
    ]
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from lepton_ray/config/ by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "One YAML file per experiment (`experiments/*.yaml`). Every section rejects unknown keys, "
        "and any key can be overridden on the command line with its dotted name, e.g. "
        "`lepton-ray run experiments/quickstart.yaml --set train.lr=1e-3 "
        "--set data.split.validation=0.2`. Relative paths are resolved against the directory "
        "the command runs from.",
        "",
        "Sections: " + ", ".join(f"[`{s}`](#{s})" for s in sections) + ".",
    ]
    _section(root, "", "Top level", _extra_rules(), out)
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"


# ------------------------------------------------------------------------------------- CLI
def check_file(path: Path) -> str | None:
    """None when ``path`` holds the current reference; otherwise what differs."""
    expected = render_reference()
    if not path.is_file():
        return f"{path} does not exist; run `{REGENERATE}`"
    actual = path.read_text(encoding="utf-8")
    if actual == expected:
        return None
    diff = difflib.unified_diff(
        actual.splitlines(), expected.splitlines(), str(path), "generated", lineterm="", n=0
    )
    shown = "\n".join(list(diff)[:20])
    return f"{path} is out of date with lepton_ray/config/; run `{REGENERATE}`\n{shown}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lepton_ray.config.docs", description=__doc__.splitlines()[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the reference to --path")
    mode.add_argument("--check", action="store_true", help="exit 1 if --path is stale")
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help=f"(default {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    if args.check:
        problem = check_file(args.path)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{args.path} is up to date")
        return 0
    text = render_reference()
    if args.write:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(text, encoding="utf-8")
        print(f"wrote {args.path}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
