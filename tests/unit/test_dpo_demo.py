"""The DPO demo's assets and recipe: preference pairs derived from the bundled task, up to date,
and a recipe that validates.

    python -m pytest tests/unit/test_dpo_demo.py -q
"""

from __future__ import annotations

import json
import random

from clustertune import demo
from clustertune.config import recipe_from_dict


def test_preference_assets_are_up_to_date():
    stale = [p.name for p, text in demo.preference_asset_texts().items() if p.read_text(encoding="utf-8") != text]
    assert not stale, ("regenerate with python -c 'from clustertune.demo import write_preference_assets; "
                       f"write_preference_assets()' and commit: stale {stale}")


def test_pairs_prefer_the_correct_answer_over_a_corrupted_one_of_the_same_length():
    heldout = demo.load_pairs(demo.DEMO_HELDOUT_FILE)
    records = [json.loads(line) for line in demo.DEMO_DPO_HELDOUT_FILE.read_text().splitlines()]
    assert len(records) == len(heldout) == 200
    for (prompt, answer), record in zip(heldout, records):
        assert record["prompt"] == prompt and record["chosen"] == answer
        assert len(record["rejected"]) == len(answer) and record["rejected"] != answer
        assert 1 <= sum(a != b for a, b in zip(answer, record["rejected"])) <= 2
    train_prompts = {json.loads(line)["prompt"] for line in demo.DEMO_DPO_TRAIN_FILE.read_text().splitlines()}
    assert len(train_prompts) == demo.DEMO_DPO_TRAIN_PAIRS
    assert not train_prompts & {p for p, _ in heldout}  # held out means held out


def test_corruption_is_deterministic():
    assert demo.corrupt_answer("abcdef", random.Random(1)) == demo.corrupt_answer("abcdef", random.Random(1))


def test_dpo_demo_recipe_validates():
    recipe = recipe_from_dict(demo.demo_dpo_recipe_dict())
    assert recipe.train.objective == "dpo" and recipe.data.eval_files == [str(demo.DEMO_DPO_HELDOUT_FILE)]
