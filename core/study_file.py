"""Reading a study file: YAML → schema merge → dotlist overrides → a frozen `StudySpec`.

Every mistake becomes a `StudyError`: one sentence naming the file, the key and what was
expected, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from stageflow.core.config import StudyError, StudySpec, choice_problem, literal_choices
from stageflow.core.registry import closest


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (e.g. two stages of one name)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key '{key}' (first given on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_yaml(path: Path) -> dict:
    """The YAML mapping in `path`, or a StudyError for a missing, unreadable or malformed file."""
    source = str(path)
    if not path.is_file():
        raise StudyError(source, "", "no such study file (expected a YAML file)")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        line = f"line {mark.line + 1}: " if mark else ""
        raise StudyError(source, "", f"{line}{err.problem} (expected valid YAML)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise StudyError(source, "", f"cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise StudyError(source, "", "expected a YAML mapping of study settings at the top")
    return data


def _schema_level(full_key: str) -> Any:
    """The schema type holding the last part of `full_key` ('stages.inst.lrr' → StageSpec)."""
    node: Any = StudySpec
    for part in re.sub(r"\[\d+\]", "", full_key).split(".")[:-1]:
        if typing.get_origin(node) is dict:  # `part` is a dict key, e.g. a stage name
            node = typing.get_args(node)[1]
        elif dataclasses.is_dataclass(node):
            node = typing.get_type_hints(node).get(part)
        node = _unwrap_optional(node)
    return node


def _schema_keys(full_key: str) -> list[str]:
    """The valid keys at the level of `full_key` ('stages.inst.lrr' → the StageSpec fields)."""
    node = _schema_level(full_key)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _choice_problem(full_key: str, value: Any) -> str | None:
    """The 'unknown <noun> ...' sentence when `full_key` is a Literal field, else None."""
    node, leaf = _schema_level(full_key), full_key.split(".")[-1]
    if not dataclasses.is_dataclass(node):
        return None
    choices = literal_choices(typing.get_type_hints(node).get(leaf))
    nouns = getattr(node, "NOUNS", {})
    return None if choices is None else choice_problem(nouns.get(leaf, "value"), value, choices)


def _unwrap_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _translate(source: str, err: OmegaConfBaseException) -> StudyError:
    key = getattr(err, "full_key", "") or ""
    if isinstance(err, ConfigKeyError):
        valid = _schema_keys(key)
        leaf = key.split(".")[-1]
        hint = closest(leaf, valid)
        expected = f"did you mean '{hint}'?" if hint else "expected one of " + ", ".join(valid)
        return StudyError(source, key, f"unknown key; {expected}")
    if isinstance(err, MissingMandatoryValue):
        return StudyError(source, key, "a value is required here")
    choice = _choice_problem(key, getattr(err, "value", None))
    if isinstance(err, ValidationError) and choice:
        return StudyError(source, key, choice)
    message = str(err).splitlines()[0]
    return StudyError(source, key, f"wrong type: {message}")


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Parse and type-check a study file plus `key=value` overrides (semantic checks: validate)."""
    path = Path(path)
    source = str(path)
    raw = read_yaml(path)
    schema = OmegaConf.structured(StudySpec)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(raw))
    except OmegaConfBaseException as err:
        raise _translate(source, err) from None
    for item in overrides or []:
        if "=" not in item:
            raise StudyError("command line", item, "expected an override of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _translate(f"override '{item}'", err) from None
        except yaml.YAMLError as err:  # the value is parsed as YAML
            key, value = item.split("=", 1)
            problem = str(getattr(err, "problem", None) or err).splitlines()[0]
            raise StudyError(
                "command line",
                key,
                f"'{value}' is not a YAML value ({problem}); expected e.g. 3, [1, 2] or "
                "{a: 1} (a mapping's keys and values separated by ': ', with the space)",
            ) from None
    try:
        missing = _first_missing(merged)
        if missing:
            raise StudyError(source, missing, "a value is required here")
        _absolute_paths(merged)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _translate(source, err) from None


def _absolute_paths(study: DictConfig) -> None:
    """Relative model and data paths made absolute (relative to the working directory the
    study is started from): trials run in other directories, a resume from anywhere."""
    data = [s.get(k) for s in study.stages.values() for k in ("data", "retain")]
    data += [s.data for s in study.evaluation.sets.values()]
    for node in [study.model, *(d for d in data if d is not None)]:
        key = "path" if node is study.model else "file"
        if node[key] is not None:
            with read_write(node):  # a frozen dataclass's node is read-only
                node[key] = str(Path(node[key]).absolute())


def _first_missing(node: DictConfig | ListConfig, prefix: str = "") -> str | None:
    """The full key of the first mandatory value ('???') left unset, if any."""
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
    for key, _ in items:
        full = (
            f"{prefix}.{key}"
            if prefix and isinstance(node, DictConfig)
            else f"{prefix}[{key}]"
            if prefix
            else str(key)
        )
        if OmegaConf.is_missing(node, key):
            return full
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
            found = _first_missing(child, full)
            if found:
                return found
    return None


def spec_to_dict(spec: StudySpec) -> dict:
    """The resolved spec as plain data (for the resolved YAML artifact and MLflow params)."""
    return OmegaConf.to_container(OmegaConf.structured(spec), resolve=True)


def spec_to_yaml(spec: StudySpec) -> str:
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
