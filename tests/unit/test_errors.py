"""One root for user-caused errors (clustertune.errors.UserError), caught once per entry point.

    python -m pytest -q tests/unit/test_errors.py
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import clustertune
from clustertune import cli
from clustertune.errors import UserError

# Exception classes of the package (by class name) that are deliberately not user errors, and why.
NOT_USER_ERRORS = {
    # An internal per-record signal: the reader counts it or raises a DataError with file:line.
    "RecordError",
    # "Another rank failed": the cause, user error or bug, is reported by the rank where it happened.
    "PeerFailed",
}


def _package_exception_classes() -> dict[str, type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(clustertune.__path__, prefix="clustertune."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            # A private class (_Name) is a signal inside its module, never raised out of it.
            if issubclass(obj, BaseException) and obj.__module__ == info.name and not obj.__name__.startswith("_"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_error_a_user_can_cause_subclasses_user_error():
    classes = _package_exception_classes()
    # The walk really sees the package's errors (a broken walk must not pass vacuously).
    assert {"clustertune.config.RecipeError", "clustertune.cluster.inventory.ClusterError",
            "clustertune.secrets.SecretsFileError"} <= set(classes)
    names = {cls.__name__ for cls in classes.values()}
    assert NOT_USER_ERRORS <= names, "an exempted class was renamed or removed: update NOT_USER_ERRORS"
    outside = sorted(name for name, cls in classes.items()
                     if not issubclass(cls, UserError) and cls.__name__ not in NOT_USER_ERRORS)
    assert outside == [], f"subclass clustertune.errors.UserError (or exempt with a reason): {outside}"
    # One root, no second one: `except ValueError` must not catch a user error by accident.
    mixed = sorted(name for name, cls in classes.items()
                   if issubclass(cls, UserError) and issubclass(cls, (ValueError, RuntimeError, OSError)))
    assert mixed == []
    # Never 0 (success), 3 (stalled) or 130 (interrupted): those codes mean something else (README).
    assert all(cls.exit_code not in (0, 3, 130) for cls in classes.values() if issubclass(cls, UserError))


def test_cli_prints_a_user_error_as_one_line_and_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    code = cli.main(["report", str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: {missing}: run directory not found\n"


def test_cli_uses_the_exit_code_of_the_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.HANDLERS, "report", f"{__name__}:_raise_ssh_setup_error")
    assert cli.main(["report", "x"]) == 1
    assert capsys.readouterr().err == "error: node2: HOST KEY CHANGED\n"


def _raise_ssh_setup_error(args) -> int:
    from clustertune.cluster.ssh import SshSetupError
    raise SshSetupError("node2: HOST KEY CHANGED")


def _raise_bug(args) -> int:
    raise FileNotFoundError(2, "No such file or directory", "/internal/path")


def test_cli_lets_any_other_exception_through_as_a_traceback(monkeypatch):
    """A bug must show its traceback, even one that raises FileNotFoundError."""
    monkeypatch.setitem(cli.HANDLERS, "report", f"{__name__}:_raise_bug")
    with pytest.raises(FileNotFoundError):
        cli.main(["report", "x"])


def test_a_model_path_that_is_not_there_is_a_user_error_not_file_not_found():
    from clustertune.config import RecipeError
    from clustertune.shapes import shape_from_model_path
    with pytest.raises(RecipeError, match="model.path '/nope/model' is neither a built-in shape"):
        shape_from_model_path("/nope/model")


def test_export_without_a_checkpoint_is_a_user_error(tmp_path):
    from clustertune.config import LoraSection, ModelSection
    from clustertune.worker.checkpoint import CheckpointError
    from clustertune.worker.export import export_from_checkpoint
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        export_from_checkpoint(tmp_path, tmp_path / "out", model_section=ModelSection(), lora_section=LoraSection(),
                               precision="fp32")


def test_worker_entry_point_turns_a_user_error_into_one_line_and_its_exit_code(tmp_path, capsys, monkeypatch):
    from clustertune.worker.__main__ import main
    monkeypatch.delenv("CLUSTERTUNE_SECRETS_FILE", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert main([str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err == f"error (rank 0): {tmp_path / 'missing.toml'}: recipe file not found\n"


def test_worker_entry_point_reports_an_unsafe_secrets_file_as_one_line(tmp_path, capsys, monkeypatch):
    from clustertune.worker.__main__ import main
    secrets = tmp_path / "secrets.env"
    secrets.write_text("HF_TOKEN=hf_x\n")
    secrets.chmod(0o644)
    monkeypatch.setenv("CLUSTERTUNE_SECRETS_FILE", str(secrets))
    monkeypatch.setenv("RANK", "1")
    assert main([str(tmp_path / "recipe.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error (rank 1): secrets file {secrets} is readable or writable by group/others")
    assert err.count("\n") == 1 and "hf_x" not in err
