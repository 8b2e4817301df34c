"""Reading `stage4.toml`: TOML into the model; the first problem becomes one line naming the file, the
key and the value."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)
from pydantic_core import ErrorDetails

from stage4.config.fields import DEFAULT_CONFIG_FILE
from stage4.config.model import Config
from stage4.errors import MISSING, ConfigError

# Where a validation error is: keys and list indexes from the top of the file.
Loc = tuple[int | str, ...]


def _dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def _lookup(data: Any, loc: Loc) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return MISSING
    return data


# pydantic's messages for wrong TOML types, in the words of the file.
TYPE_MESSAGES = {
    "missing": "required key is missing",
    "string_type": "expected a string",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "path_type": "expected a path (a string)",
}


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "enum":
        return "must be one of " + str(error["ctx"]["expected"]).replace("'", "")
    if kind in TYPE_MESSAGES:
        return TYPE_MESSAGES[kind]
    if kind == "greater_than_equal":
        return f"must be at least {error['ctx']['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {error['ctx']['le']}"
    return error["msg"].removeprefix("Value error, ")


def from_dict(data: dict[str, Any], source: str) -> Config:
    """Validate parsed TOML; the first problem becomes a ConfigError naming source, key and value."""
    try:
        return Config.model_validate(
            {**data, "source": source}, context={"base_dir": str(Path(source).absolute().parent)}
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = error["loc"]
        if loc and loc[-1] == "[key]":
            loc = loc[:-1]
            what = "component" if loc[-2] == "components" else "image"
            problem = (
                f"{what} name {loc[-1]!r} is not a simple name (a letter or digit, then letters, digits, "
                "'.', '_', '-'; at most 64 characters)"
            )
            raise ConfigError(source, _dotted(loc[:-1]), MISSING, problem) from None
        raise ConfigError(source, _dotted(loc), _lookup(data, loc), _message(error)) from None


def load(path: Path | None = None) -> Config:
    """Read a project file; without one, ./stage4.toml if it exists, else the built-in defaults."""
    if path is None:
        candidate = Path(DEFAULT_CONFIG_FILE)
        if not candidate.exists():
            return Config()
        path = candidate
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "(file)", MISSING, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            str(path),
            "(file)",
            MISSING,
            f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} in line {line}); TOML files are UTF-8",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(file)", MISSING, f"not valid TOML: {exc}") from None
    return from_dict(data, str(path))
