"""The README against the code: its layout lists every module (and only modules that exist), its
recipe table lists every recipe key (and only real ones), its exit-code table every code the code
uses, and nothing cites a file that is not in the repository.

    python -m pytest -q tests/unit/test_readme.py
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from pydantic import BaseModel

from clustertune.config import Recipe

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "src" / "clustertune"


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def layout_paths(section: str) -> list[str]:
    """Paths of the layout's code block: one entry per line, its first word a name; a name ending
    in '/' is a directory, and the lines indented under it are inside it."""
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "the Layout section has no code block"
    paths: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, directory path)
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack else "") + name
        paths.append(path)
        if name.endswith("/"):
            stack.append((indent, path))
    return paths


def table_keys(section: str) -> list[str]:
    """`section.key` names of the recipe table's first column; a bare `key` after a dotted one in
    the same cell belongs to the same section (`train.lr`, `min_lr_ratio`)."""
    keys = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        current = None
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if "." in name:
                current, _, name = name.partition(".")
            assert current, f"{line!r}: a bare key before any section.key"
            keys.append(f"{current}.{name}")
    return keys


def recipe_keys() -> list[str]:
    keys = []
    for section, field in Recipe.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        keys += [f"{section}.{name}" for name in model.model_fields]
    return keys


def test_layout_lists_every_module_and_only_files_that_exist():
    paths = layout_paths(_section("Layout"))
    assert "src/clustertune/" in paths
    missing_on_disk = [p for p in paths if not (ROOT / p).exists()]
    assert missing_on_disk == [], f"the README layout names files that do not exist: {missing_on_disk}"
    listed = set(paths)
    modules = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    packages = sorted(f"{p.parent.relative_to(ROOT)}/" for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE)
    unlisted = [m for m in modules + packages if m not in listed]
    assert unlisted == [], f"add these to the README's Layout section: {unlisted}"


def test_recipe_table_lists_every_recipe_key_and_no_other():
    documented = table_keys(_section("Recipe reference"))
    real = recipe_keys()
    assert len(documented) == len(set(documented)), "a key is listed twice"
    assert sorted(set(real) - set(documented)) == [], "add these keys to the README's recipe table"
    assert sorted(set(documented) - set(real)) == [], "the README's recipe table lists keys the recipe does not have"


def test_exit_code_table_lists_the_codes_the_code_uses():
    from clustertune.errors import UserError
    from clustertune.watchdog import STALL_EXIT_CODE

    def all_subclasses(cls):
        return {cls} | {s for sub in cls.__subclasses__() for s in all_subclasses(sub)}

    import clustertune
    for info in pkgutil.walk_packages(clustertune.__path__, prefix="clustertune."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)  # so that every UserError subclass is defined
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", _section("Exit codes"), re.M)}
    used = {0, 130, STALL_EXIT_CODE} | {cls.exit_code for cls in all_subclasses(UserError)}
    assert used <= documented, f"document exit codes {sorted(used - documented)} in the README"


def test_no_reference_to_a_file_that_is_not_in_the_repository():
    stale = []
    texts = [ROOT / "README.md", *ROOT.glob("benchmarks/*.md"), *ROOT.glob("benchmarks/*.py"),
             *ROOT.glob("configs/*.toml"), *PACKAGE.rglob("*.py")]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        for cited in sorted(set(re.findall(r"\bconfigs/[\w.+-]+\.toml\b", text))):
            if not (ROOT / cited).is_file():
                stale.append(f"{path.relative_to(ROOT)}: {cited}")
        if not (ROOT / "DESIGN.md").exists() and "DESIGN.md" in text:
            stale.append(f"{path.relative_to(ROOT)}: DESIGN.md")
    assert stale == []
