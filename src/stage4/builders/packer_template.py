"""One Packer builder description, written out twice: as a legacy JSON template (Packer 1.6.x, the
original `packer build -only=qemu -var-file=base.json <distro>.json`) and as HCL2 (current Packer).

The settings are a plain dict; values that come from variables or name files beside the template are
marked with Var and TemplatePath, which each format spells its own way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True)
class Var:
    """A reference to a user variable: `{{user `x`}}` in JSON, `var.x` in HCL2."""

    name: str


@dataclass(frozen=True)
class TemplatePath:
    """A path relative to the template's directory: `{{template_dir}}/x` in JSON, `${path.root}/x` in HCL2."""

    relative: str


# A value of the builder's settings, of a provisioner or of a variable, as both formats can write it.
Setting: TypeAlias = (
    "str | int | float | bool | Var | TemplatePath | Sequence[Setting] | Mapping[str, Setting]"
)


@dataclass(frozen=True)
class Variable:
    name: str
    type: str  # "string", "number" or "bool"
    default: Setting
    description: str


def variables(values: Mapping[str, Setting], described: Mapping[str, tuple[str, str]]) -> list[Variable]:
    """Template variables with their values, from a table of name -> (type, description)."""
    return [Variable(name, described[name][0], value, described[name][1]) for name, value in values.items()]


# ----- JSON (legacy) ------------------------------------------------------------------------------


def _json_value(value: Setting) -> object:
    if isinstance(value, Var):
        return "{{user `" + value.name + "`}}"
    if isinstance(value, TemplatePath):
        return "{{template_dir}}/" + value.relative
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    return value


def legacy_string(value: Setting) -> str:
    """Legacy JSON user variables (and var files) hold strings only."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_json(
    builder: Mapping[str, Setting],
    variables: list[Variable],
    description: str,
    provisioners: Sequence[Mapping[str, Setting]] = (),
) -> str:
    template: dict[str, object] = {
        "description": description,
        "variables": {variable.name: legacy_string(variable.default) for variable in variables},
        "builders": [_json_value(builder)],
    }
    if provisioners:
        template["provisioners"] = [_json_value(provisioner) for provisioner in provisioners]
    return json.dumps(template, indent=2) + "\n"


def var_file_json(values: Mapping[str, Setting]) -> str:
    return json.dumps({key: legacy_string(value) for key, value in values.items()}, indent=2) + "\n"


# ----- HCL2 ---------------------------------------------------------------------------------------

_HCL_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def hcl_string(text: str) -> str:
    """A quoted HCL2 string literal whose value is exactly `text` (no interpolation happens)."""
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
        .replace("${", "$${")
        .replace("%{", "%%{")
    )
    return f'"{escaped}"'


def _hcl_value(value: Setting, indent: str, top: bool = False) -> str:
    if isinstance(value, Var):
        return f"var.{value.name}"
    if isinstance(value, TemplatePath):
        return '"${path.root}/' + hcl_string(value.relative)[1:]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return hcl_string(value)
    if isinstance(value, list | tuple):
        # A long list of strings (a boot command) gets one item per line; everything else stays inline.
        strings = [item for item in value if isinstance(item, str)]
        if top and len(value) > 1 and len(strings) == len(value) and sum(map(len, strings)) > 60:
            inner = indent + "  "
            return "[\n" + "".join(f"{inner}{_hcl_value(item, inner)},\n" for item in value) + indent + "]"
        return "[" + ", ".join(_hcl_value(item, indent) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as HCL2")


def _attributes(settings: Mapping[str, Setting], indent: str) -> str:
    width = max(len(key) for key in settings)
    return "".join(
        f"{indent}{key.ljust(width)} = {_hcl_value(value, indent, top=True)}\n"
        for key, value in settings.items()
    )


def to_hcl(
    builder: Mapping[str, Setting],
    variables: list[Variable],
    source_name: str,
    description: str,
    provisioners: Sequence[Mapping[str, Setting]] = (),
) -> str:
    """An HCL2 template: the variables, one `source "qemu"` block and a build of it (with `provisioners`,
    each a dict with its "type", in order).

    No `packer { required_plugins }` block: Packer 1.6.x rejects it; current Packer needs the qemu
    plugin installed beforehand (`packer plugins install github.com/hashicorp/qemu`).
    """
    if not _HCL_IDENTIFIER.match(source_name):
        raise ValueError(f"{source_name!r} is not an HCL2 block label")
    settings = {key: value for key, value in builder.items() if key not in ("type", "name")}
    blocks = [f"# {line}\n" for line in description.splitlines()]
    for variable in variables:
        blocks.append(
            f'\nvariable "{variable.name}" {{\n'
            f"  type        = {variable.type}\n"
            f"  default     = {_hcl_value(variable.default, '  ')}\n"
            f"  description = {hcl_string(variable.description)}\n"
            "}\n"
        )
    blocks.append(f'\nsource "qemu" "{source_name}" {{\n{_attributes(settings, "  ")}}}\n')
    body = "".join(
        f'\n  provisioner "{provisioner["type"]}" {{\n'
        + _attributes({k: v for k, v in provisioner.items() if k != "type"}, "    ")
        + "  }\n"
        for provisioner in provisioners
    )
    blocks.append(f'\nbuild {{\n  sources = ["source.qemu.{source_name}"]\n{body}}}\n')
    return "".join(blocks)


def var_file_hcl(values: Mapping[str, Setting]) -> str:
    width = max(len(key) for key in values)
    return "".join(f"{key.ljust(width)} = {_hcl_value(value, '')}\n" for key, value in values.items())
