"""Recipe loading: typed validation, unknown keys, overrides, impossible combinations."""

from pathlib import Path

import pytest

from clustertune.config import RecipeError, load_recipe, parse_override, recipe_from_dict, recipe_to_toml

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))
RECIPES = [p for p in CONFIGS if not p.name.startswith("cluster")]


DATA = '[data]\ntrain_files = ["train.jsonl"]\n'


def write(tmp_path, text: str, *, with_data: bool = True) -> Path:
    """A recipe file; a [data] section with one file is added unless the text has one."""
    path = tmp_path / "recipe.toml"
    path.write_text(text + ("\n" + DATA if with_data and "[data]" not in text else ""))
    return path


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, "[train]\nmax_steps = 3\n"))
    assert recipe.train.max_steps == 3
    assert recipe.zero.stage == "auto"  # resolved by the launcher (clustertune.auto, tests/unit/test_auto.py)
    assert recipe.model.path == "tiny"


def test_unknown_key_is_named_with_file(tmp_path):
    path = write(tmp_path, "[train]\nmax_steps = 3\nlearning_rate = 1e-4\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value)
    assert "train.learning_rate: unknown key" in str(err.value)


def test_wrong_type_is_rejected_not_coerced(tmp_path):
    with pytest.raises(RecipeError, match=r"zero.stage"):
        load_recipe(write(tmp_path, '[train]\nmax_steps = 3\n[zero]\nstage = "3"\n'))
    with pytest.raises(RecipeError, match=r"train.lr"):
        load_recipe(write(tmp_path, '[train]\nmax_steps = 3\nlr = "high"\n'))


@pytest.mark.parametrize("text, fragment", [
    ("[train]\nmax_steps = 3\n[zero]\nstage = 2\noffload_params = true\n", "offload_params needs zero.stage = 3"),
    ("[train]\nmax_steps = 3\n[zero]\nstage = 2\nsub_group_size = 100000000\n",
     "zero.sub_group_size needs zero.stage = 3 or \"auto\" (got stage 2)"),
    ("[train]\nmax_steps = 3\nepochs = 1.0\n", "exactly one of train.max_steps and train.epochs"),
    ("[train]\nmax_steps = 3\nmicro_batch_tokens = 512\n[data]\ntrain_files = [\"t.jsonl\"]\npacking = true\nmax_length = 1024\n",
     "micro_batch_tokens (512) must be >= data.max_length (1024)"),
    ("[train]\nmax_steps = 0\n", "train.max_steps"),
    ("[zero]\nstage = 5\n[train]\nmax_steps = 1\n", "zero.stage"),
    ("[train]\nmax_steps = 3\nprofile_kernels_only = true\n", "profile_kernels_only = true needs train.profile_step"),
])
def test_impossible_combinations(tmp_path, text, fragment):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text))
    assert fragment in str(err.value)


def test_overrides_parse_toml_literals():
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override("zero.stage=3") == (["zero", "stage"], 3)
    assert parse_override("lora.enabled=true") == (["lora", "enabled"], True)
    assert parse_override("model.path=/models/qwen") == (["model", "path"], "/models/qwen")
    assert parse_override('data.train_files=["a.jsonl","b.jsonl"]')[1] == ["a.jsonl", "b.jsonl"]


def test_override_applies_and_is_validated(tmp_path):
    path = write(tmp_path, "[train]\nmax_steps = 3\n")
    assert load_recipe(path, ["zero.stage=3", "train.lr=0.5"]).zero.stage == 3
    with pytest.raises(RecipeError, match="zero.nonsense: unknown key"):
        load_recipe(path, ["zero.nonsense=1"])
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(path, ["zero.stage"])


def test_resolved_recipe_round_trips_through_toml(tmp_path):
    recipe = load_recipe(write(tmp_path, "[train]\nmax_steps = 7\n[lora]\nenabled = true\nr = 4\n"))
    again = load_recipe(write(tmp_path, recipe_to_toml(recipe)))
    assert again == recipe


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[train\n"))


def test_data_files_are_required(tmp_path):
    with pytest.raises(RecipeError, match="data: Field required"):
        load_recipe(write(tmp_path, "[train]\nmax_steps = 3\n", with_data=False))
    with pytest.raises(RecipeError, match="data.train_files"):
        load_recipe(write(tmp_path, "[train]\nmax_steps = 3\n[data]\ntrain_files = []\n"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe_from_dict(recipe.to_toml_dict()) == recipe
