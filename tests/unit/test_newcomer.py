"""A newcomer's first hour (issue 16): every subcommand driven through `clustertune.cli.main`
with the bad inputs people really type. Each must end in one clear `error:` line naming the key,
file or flag, a non-zero exit code, and no traceback; everything checkable before a worker starts
is checked before (nothing here starts a worker: each case fails in the launcher).

    python -m pytest -q tests/unit/test_newcomer.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from clustertune.cli import build_parser, main
from clustertune.demo import DEMO_TRAIN_FILE

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A scratch working directory with a small data file, no GPUs visible."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    lines = DEMO_TRAIN_FILE.read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def write_recipe(path: Path, *, model: str = "tiny", train: str = "global_batch_size = 8\nmicro_batch_size = 2",
                 extra: str = "", packing: bool | None = None) -> Path:
    """`packing`: data.packing when given (default: the recipe default, packed)."""
    data = "" if packing is None else f"packing = {str(packing).lower()}\n"
    path.write_text(f'[run]\noutput_dir = "runs/x"\n[model]\npath = "{model}"\n'
                    f'[data]\ntrain_files = ["train.jsonl"]\nmax_length = 64\n{data}'
                    f"[train]\nmax_steps = 2\n{train}\n{extra}", encoding="utf-8")
    return path


def fails(capsys, argv: list[str], *expected: str) -> str:
    """main(argv) must exit non-zero with one `error:` message holding every `expected` text."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    text = out + err
    assert code not in (0, None), f"{argv} exited 0:\n{text}"
    assert "Traceback" not in text, text
    assert err.count("error:") == 1, f"expected one error line:\n{err}"
    for piece in expected:
        assert piece in err, f"{piece!r} not in:\n{err}"
    return err


def model_dir(root: Path, *, config: bool = True, weights: bool = True, tokenizer: bool = True) -> Path:
    root.mkdir()
    if config:
        (root / "config.json").write_text('{"model_type": "qwen2"}', encoding="utf-8")
    if weights:
        (root / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (root / "tokenizer.json").write_text("{}", encoding="utf-8")
    return root


# ------------------------------------------------ every subcommand, the plain mistakes

EVERY_SUBCOMMAND = [
    (["demo", "--set", "train.lr=abc"], ["--set train.lr=abc"]),
    (["train", "nofile.toml"], ["nofile.toml: recipe file not found"]),
    (["validate", "bad.toml"], ["bad.toml: not valid TOML"]),
    (["validate", "r.toml", "--set", "train.lr"], ["expected section.key=value"]),
    (["plan", "nofile.toml", "--gpu", "h100"], ["nofile.toml: recipe file not found"]),
    (["plan", "r.toml", "--gpu", "nope"], ["--gpu 'nope': unknown GPU"]),
    (["launch", "r.toml", "--cluster", "nofile.toml"], ["nofile.toml: cluster file not found"]),
    (["export", "nodir"], ["not a clustertune run directory"]),
    (["report", "nodir"], ["nodir"]),
    (["cluster"], ["required"]),
    (["cluster", "init", "--out", "c.toml"], ["--node"]),
    (["cluster", "ssh", "--cluster", "nofile.toml"], ["cluster file not found"]),
    (["cluster", "doctor", "--cluster", "nofile.toml"], ["cluster file not found"]),
    (["cluster", "stop", "runs/x", "--cluster", "nofile.toml"], ["cluster file not found"]),
    (["sandbox"], ["required"]),
    (["sandbox", "down", "--name", "no-such-sandbox-newcomer"], ["no sandbox named 'no-such-sandbox-newcomer'"]),
    (["frobnicate"], ["invalid choice"]),
]


@pytest.mark.parametrize("argv, expected", EVERY_SUBCOMMAND, ids=[" ".join(argv) for argv, _ in EVERY_SUBCOMMAND])
def test_every_subcommand_answers_a_plain_mistake_with_one_line(here, capsys, argv, expected):
    write_recipe(here / "r.toml")
    (here / "bad.toml").write_text("not toml [", encoding="utf-8")
    fails(capsys, argv, *expected)


# ---------------------------------------------------------------- model files (items 2 and 3)

@pytest.mark.parametrize("command", [["validate"], ["validate", "--no-data"], ["train"], ["launch"]])
def test_a_missing_model_directory_is_blamed_on_model_path_before_any_worker(here, capsys, command):
    recipe = write_recipe(here / "r.toml", model="/models/Qwen2.5-1.5B-Instruct")
    err = fails(capsys, [*command, str(recipe)], "model.path", "/models/Qwen2.5-1.5B-Instruct",
                "no such directory")
    assert "model.tokenizer" not in err


def test_a_model_directory_without_config_json_is_one_line_not_a_transformers_traceback(here, capsys):
    model_dir(here / "m", config=False)
    recipe = write_recipe(here / "r.toml", model="m")
    fails(capsys, ["validate", str(recipe)], "model.path 'm'", "no config.json")


def test_a_model_directory_without_weights_or_tokenizer_files(here, capsys):
    model_dir(here / "noweights", weights=False)
    model_dir(here / "notok", tokenizer=False)
    fails(capsys, ["validate", "--no-data", str(write_recipe(here / "a.toml", model="noweights"))], "no weight files")
    fails(capsys, ["validate", "--no-data", str(write_recipe(here / "b.toml", model="notok"))],
          "model.path 'notok'", "no tokenizer files", "model.tokenizer")


def test_a_missing_tokenizer_directory_is_blamed_on_model_tokenizer(here, capsys):
    model_dir(here / "m")
    recipe = write_recipe(here / "r.toml", model="m")
    fails(capsys, ["validate", "--no-data", str(recipe), "--set", "model.tokenizer=nothere"],
          "model.tokenizer 'nothere'", "no such directory")


def test_a_tokenizer_transformers_refuses_is_one_line(here, capsys):
    model = model_dir(here / "m")
    (model / "tokenizer.json").write_text("not json", encoding="utf-8")
    fails(capsys, ["validate", str(write_recipe(here / "r.toml", model="m"))], "model.path 'm'",
          "the tokenizer does not load")


def test_a_complete_model_directory_passes_the_file_checks(here, capsys):
    model_dir(here / "m")
    assert main(["validate", "--no-data", str(write_recipe(here / "r.toml", model="m"))]) == 0
    assert "ok: model files" in capsys.readouterr().err


# ------------------------------------------------------------------ batch arithmetic (item 5)

BATCH_CASES = [
    ("global_batch_size = 30\nmicro_batch_size = 2", "train.global_batch_size (30) must be a multiple of the "
                                                     "world size: 30 % world size (4) = 2 != 0 (world size 4 from "),
    ("global_batch_size = 4\nmicro_batch_size = 8", "train.micro_batch_size (8) > train.global_batch_size (4)"),
    ("global_batch_size = 12\nmicro_batch_size = 2", "train.global_batch_size (12) must be a multiple of "
                                                     "train.micro_batch_size (2) x world size (4) = 8"),
]


@pytest.mark.parametrize("train, message", BATCH_CASES)
@pytest.mark.parametrize("command", [["validate", "--nproc", "4"], ["validate", "--no-data", "--nproc", "4"],
                                     ["train", "--nproc", "4"],
                                     ["plan", "--gpu", "h100", "--nodes", "1", "--gpus-per-node", "4"],
                                     ["launch", "--cluster", "cluster.toml"]])
def test_batch_arithmetic_for_the_real_world_size_fails_before_any_worker(here, capsys, train, message, command):
    (here / "cluster.toml").write_text('[[nodes]]\nname = "a"\naddress = "10.0.0.1"\nslots = 2\n'
                                       '[[nodes]]\nname = "b"\naddress = "10.0.0.2"\nslots = 2\n', encoding="utf-8")
    recipe = write_recipe(here / "r.toml", train=train, packing=False)  # the per-rank sample split of padded batches
    fails(capsys, [*command, str(recipe)], message)
    assert not (here / "runs").exists(), "nothing may be written before the checks pass"


def test_validate_checks_the_world_size_train_would_use_here(here, capsys):
    recipe = write_recipe(here / "r.toml", train="global_batch_size = 3\nmicro_batch_size = 1", packing=False)
    fails(capsys, ["validate", "--no-data", str(recipe)], "world size (2)", "clustertune train")


def test_packed_runs_have_no_per_rank_sample_split_to_check(here, capsys):
    recipe = write_recipe(here / "r.toml", train="global_batch_size = 30\nmicro_batch_size = 2\n"
                                                 "micro_batch_tokens = 64", extra="")
    assert main(["validate", "--no-data", "--nproc", "4", str(recipe), "--set", "data.packing=true"]) == 0


# ---------------------------------------------------------------------- --nproc (item 6)

@pytest.mark.parametrize("value", ["-1", "0", "two"])
@pytest.mark.parametrize("command", ["train", "demo", "validate"])
def test_nproc_below_one_is_an_error_not_a_silent_default(here, capsys, value, command):
    recipe = [str(write_recipe(here / "r.toml"))] if command != "demo" else []
    fails(capsys, [command, *recipe, "--nproc", value], "--nproc")


# ------------------------------------------------------------ usage and help (items 9-11)

def test_bare_clustertune_prints_usage_and_points_to_the_demo(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: clustertune" in out and "clustertune demo" in out
    for command in ("demo", "train", "validate", "plan", "launch", "cluster", "sandbox", "export", "report"):
        assert f"    {command} " in out


def test_train_without_a_recipe_explains_instead_of_starting_the_demo(here, capsys):
    fails(capsys, ["train"], "needs a recipe", "clustertune demo")
    assert not (here / "runs").exists()


def _parsers(parser: argparse.ArgumentParser, prog: str = "clustertune"):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{prog} {name}")


def test_every_subcommand_and_option_has_help_text():
    missing = []
    for prog, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                missing += [f"{prog} {name}" for name in action.choices if name not in helped]
            elif not action.help:
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"no help text: {missing}"


@pytest.mark.parametrize("group, actions", [("cluster", ["init", "ssh", "doctor", "stop"]),
                                            ("sandbox", ["up", "down", "list", "revoke-bootstrap", "exec"])])
def test_cluster_and_sandbox_help_list_their_subcommands(capsys, group, actions):
    with pytest.raises(SystemExit) as exit_:
        main([group, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for action in actions:
        assert f"    {action} " in out, out
    assert f"{group}_args" not in out


def test_plan_gpu_memory_is_in_gib(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "GPU memory per GPU in GiB" in out and " GB" not in out


def test_sandbox_exec_takes_the_command_after_double_dash():
    args = build_parser().parse_args(["sandbox", "exec", "node2", "--name", "s", "--", "sh", "-c", "echo --x"])
    assert (args.action, args.node, args.name, args.exec_command) == ("exec", "node2", "s", ["sh", "-c", "echo --x"])


def test_readme_lists_every_command():
    for prog, _ in _parsers(build_parser()):
        if prog.count(" ") == 1 or prog.startswith("clustertune cluster "):
            assert prog in README, f"README does not mention `{prog}`"
    assert "clustertune sandbox up|down|list|revoke-bootstrap|exec" in README


# ------------------------------------------------------------------- paths (item 12)

def test_validate_a_directory(here, capsys):
    fails(capsys, ["validate", str(here)], "is a directory")


def test_cluster_init_into_a_missing_directory_asks_nothing_and_writes_nothing(here, capsys):
    fails(capsys, ["cluster", "init", "--out", "nodir/x.toml", "--node", "a=10.0.0.1"], "nodir", "does not exist")
    fails(capsys, ["cluster", "init", "--out", str(here), "--node", "a=10.0.0.1"], "is a directory")


def test_export_onto_an_existing_file(here, capsys):
    run = here / "runs" / "x"
    run.mkdir(parents=True)
    write_recipe(run / "recipe.toml")
    (here / "model.bin").write_text("mine")
    fails(capsys, ["export", str(run), "--out", "model.bin"], "--out model.bin", "existing file")
    assert (here / "model.bin").read_text() == "mine"


# ---------------------------------------------------------------- --set blame (item 16)

def test_a_bad_set_value_is_blamed_on_the_set_not_the_file(here, capsys):
    recipe = write_recipe(here / "base.toml")
    err = fails(capsys, ["validate", str(recipe), "--set", "train.lr=abc"], "--set train.lr=abc", "train.lr")
    assert not err.startswith("error: base.toml"), err
    err = fails(capsys, ["validate", str(recipe), "--set", "trian.lr=1"], "unknown key", "--set trian.lr=1")
    assert not err.startswith("error: base.toml"), err


def test_a_bad_file_value_is_still_blamed_on_the_file(here, capsys):
    recipe = write_recipe(here / "base.toml", train="global_batch_size = 8\nlr = \"abc\"")
    err = fails(capsys, ["validate", str(recipe), "--set", "train.seed=1"], "base.toml: invalid recipe", "train.lr")
    assert "from --set" not in err


# ---------------------------------------------------- validate's cache path (item 18)

def test_validate_prints_a_cache_path_that_exists_afterwards(here, capsys):
    assert main(["validate", str(write_recipe(here / "r.toml"))]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if "cached in" in line or "tokenized data from" in line]
    assert lines, out + err
    path = Path(lines[0].rsplit(" ", 1)[1])
    assert path.is_file(), f"validate printed {path}, which does not exist after it exited"
    assert path.resolve().is_relative_to(here / "runs" / ".cache" / "tokenized"), path  # the workers' cache


# ---------------------------------------------- never on the CPU by surprise (item 21)

def test_recipe_less_train_uses_the_gpus_when_present(here, capsys, monkeypatch):
    """The demo recipe pins train.device = "cpu"; the recipe defaults use the GPUs (device auto):
    with 2 visible GPUs the world is the 2 GPUs. (Unpacked, the run stops at the batch check: 3 % 2.)"""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    err = fails(capsys, ["train", "--set", "data.train_files=['train.jsonl']", "--set", "model.path=tiny",
                         "--set", "train.global_batch_size=3", "--set", "train.micro_batch_size=1",
                         "--set", "data.packing=false"],
                "world size (2)", "local GPUs")
    assert "note: training on the CPU" not in err


def test_a_cpu_run_while_gpus_are_visible_says_so_at_start(here, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    recipe = write_recipe(here / "r.toml", train="global_batch_size = 3\nmicro_batch_size = 1\ndevice = \"cpu\"",
                          packing=False)
    for command in (["train"], ["launch"]):
        err = fails(capsys, [*command, str(recipe)], "world size (2)")
        assert "note: training on the CPU although 2 GPU(s) are visible" in err, err
        assert err.index("note:") < err.index("error:")


def test_the_recipe_defaults_use_the_gpus_and_keep_a_length_when_train_keys_are_set():
    from clustertune.config import DEFAULT_MAX_STEPS, default_recipe
    recipe = default_recipe(["data.train_files=['train.jsonl']", "train.lr=1e-4"])
    assert recipe.train.device == "auto" and recipe.train.precision == "auto"
    assert recipe.train.max_steps == DEFAULT_MAX_STEPS and recipe.train.lr == 1e-4
    assert default_recipe(["data.train_files=['t.jsonl']", "train.epochs=2"]).train.max_steps is None


def test_a_cluster_launch_leaves_a_model_that_is_only_on_the_nodes_to_the_doctor(here, capsys):
    """On the launching machine the model may be absent (it lives on the nodes): a note, and the
    checks that need no files (batch arithmetic) still run."""
    (here / "cluster.toml").write_text('[[nodes]]\nname = "a"\naddress = "10.0.0.1"\nslots = 2\n'
                                       '[[nodes]]\nname = "b"\naddress = "10.0.0.2"\nslots = 2\n', encoding="utf-8")
    recipe = write_recipe(here / "r.toml", model="/models/only-on-the-nodes",
                          train="global_batch_size = 30\nmicro_batch_size = 2", packing=False)
    for command in (["launch", "--cluster", "cluster.toml"], ["validate", "--cluster", "cluster.toml"]):
        err = fails(capsys, [*command, str(recipe)], "30 % world size (4)")
        assert "note: model.path '/models/only-on-the-nodes' is not on this machine" in err
