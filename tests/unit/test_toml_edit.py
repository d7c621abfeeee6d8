"""The minimal TOML editor behind `plan --write` (issue 16 #8): only the changed keys change."""

import tomllib

import pytest

from clustertune.toml_edit import TomlEditError, set_scalars

RECIPE = """\
# my recipe: keep this comment
[model]
path = "qwen2.5-1.5b"   # the base

[train]
max_steps = 10
gradient_checkpointing = true  # memory!

# --- ZeRO below
[zero]
stage = 3 # was 2 last week

# trailing comment of the file
"""


def test_changes_only_the_values_and_keeps_comments_and_layout():
    out = set_scalars(RECIPE, {("zero", "stage"): 1, ("train", "gradient_checkpointing"): False})
    assert out == RECIPE.replace("stage = 3 # was", "stage = 1 # was").replace(
        "gradient_checkpointing = true  # memory!", "gradient_checkpointing = false  # memory!")


def test_missing_keys_go_to_the_end_of_their_section_and_missing_sections_to_the_end():
    out = set_scalars(RECIPE, {("zero", "offload_optimizer"): True, ("checkpoint", "keep_last"): 2})
    lines = out.splitlines()
    assert lines[lines.index("stage = 3 # was 2 last week") + 1] == "offload_optimizer = true"
    assert out.endswith("# trailing comment of the file\n\n[checkpoint]\nkeep_last = 2\n")
    data = tomllib.loads(out)
    assert data["zero"] == {"stage": 3, "offload_optimizer": True}
    # the comment before the next section stays with it
    edited = set_scalars(RECIPE, {("train", "lr_is_not_real"): 1})
    assert "lr_is_not_real = 1\n\n# --- ZeRO below\n[zero]" in edited


def test_dotted_keys_at_the_top_and_quoted_keys():
    text = 'zero.stage = 2\n"train".max_steps = 3\n[model]\npath = "x"\n'
    assert set_scalars(text, {("zero", "stage"): 3}).startswith("zero.stage = 3\n")
    quoted = '[zero]\n"stage" = 2\n'
    assert set_scalars(quoted, {("zero", "stage"): 3}) == '[zero]\n"stage" = 3\n'


def test_what_it_cannot_edit_is_an_error_not_a_wrong_file():
    with pytest.raises(TomlEditError, match="by hand"):
        set_scalars('zero = {stage = 2}\n', {("zero", "stage"): 3})
    with pytest.raises(TomlEditError, match="not valid TOML"):
        set_scalars("[zero\n", {("zero", "stage"): 3})


def test_crlf_files_stay_crlf():
    out = set_scalars("[zero]\r\nstage = 2\r\n", {("zero", "stage"): 3})
    assert out == "[zero]\r\nstage = 3\r\n"
