"""Set a few scalar keys in a TOML file's text, keeping everything else as the user wrote it:
comments, blank lines, key order, quoting, untouched keys. `clustertune plan --write` uses it.

    text = set_scalars(text, {("zero", "stage"): 3, ("train", "gradient_checkpointing"): True})

Line edits, section-aware: a key is found under its `[section]` header (or as a dotted
`section.key` before the first header) and only its value is replaced, a trailing comment kept;
a key the file lacks is appended at the end of its section (or a new `[section]` at the end of the
file). The result is parsed again and must equal the old document with exactly these keys changed:
anything this small editor cannot do safely (an inline table, a multi-line value) is an error,
never a silently wrong file. Standard library only.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from clustertune.errors import UserError


class TomlEditError(UserError):
    """The file cannot be edited in place; the message says which key to set by hand."""


_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_ARRAY_HEADER = re.compile(r"^\s*\[\[")
# A simple scalar value (what plan writes: integers and booleans; "auto", which they replace) and
# what may follow it.
_SCALAR_VALUE = re.compile(r"""^(?P<value>true|false|"auto"|'auto'|[+-]?\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)"""
                           r"(?P<rest>\s*(?:#.*)?)$")


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"toml_edit writes booleans and integers only (got {value!r})")


def _table_name(line: str) -> str | None:
    if _ARRAY_HEADER.match(line):
        return "[[array]]"  # never a section we edit
    match = _HEADER.match(line)
    if not match:
        return None
    return ".".join(part.strip().strip('"') for part in match.group(1).split("."))


def _key_pattern(key: str) -> re.Pattern[str]:
    return re.compile(rf'^(?P<lead>\s*(?:{re.escape(key)}|"{re.escape(key)}")\s*=\s*)(?P<tail>.*)$')


def _sections(lines: list[str]) -> list[str]:
    """The table each line belongs to ("" before the first header; a header line belongs to its table)."""
    current, owners = "", []
    for line in lines:
        name = _table_name(line)
        if name is not None:
            current = name
        owners.append(current)
    return owners


def _set_one(lines: list[str], section: str, key: str, literal: str, where: str) -> list[str]:
    owners = _sections(lines)
    candidates = [(i, _key_pattern(key)) for i, owner in enumerate(owners) if owner == section]
    candidates += [(i, _key_pattern(f"{section}.{key}")) for i, owner in enumerate(owners) if owner == ""]
    for index, pattern in candidates:
        match = pattern.match(lines[index])
        if not match:
            continue
        value = _SCALAR_VALUE.match(match.group("tail"))
        if not value:
            raise TomlEditError(f"{where}:{index + 1}: {section}.{key} has a value this editor does not rewrite "
                                f"({match.group('tail').strip()!r}); set {section}.{key} = {literal} by hand")
        lines = list(lines)
        lines[index] = match.group("lead") + literal + value.group("rest")
        return lines
    new_line = f"{key} = {literal}"
    header_rows = [i for i, line in enumerate(lines) if _table_name(line) == section]
    if not header_rows:
        tail = [] if not lines or not lines[-1].strip() else [""]
        return lines + tail + [f"[{section}]", new_line]
    # After the section's last key line: blank lines and comments before the next header stay
    # with that header.
    last = header_rows[0]
    for i in range(header_rows[0] + 1, len(lines)):
        if owners[i] != section or _table_name(lines[i]) is not None:
            break
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("#"):
            last = i
    return lines[: last + 1] + [new_line] + lines[last + 1:]


def set_scalars(text: str, values: dict[tuple[str, str], Any], *, where: str = "<toml>") -> str:
    """`text` with each (section, key) set to its value; checked by parsing both documents."""
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TomlEditError(f"{where}: not valid TOML ({err}); not edited") from None
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines()
    for (section, key), value in values.items():
        lines = _set_one(lines, section, key, toml_literal(value), where)
    edited = newline.join(lines) + (newline if text.endswith(("\n", "\r")) or not text else "")
    expected = {name: dict(table) if isinstance(table, dict) else table for name, table in before.items()}
    for (section, key), value in values.items():
        expected.setdefault(section, {})[key] = value
    try:
        after = tomllib.loads(edited)
    except tomllib.TOMLDecodeError as err:
        raise TomlEditError(f"{where}: editing {', '.join(f'{s}.{k}' for s, k in values)} in place would not give "
                            f"valid TOML ({err}); set them by hand") from None
    if after != expected:
        raise TomlEditError(f"{where}: the edited file would not read back as the original with only "
                            f"{', '.join(f'{s}.{k}' for s, k in values)} changed; set them by hand")
    return edited
