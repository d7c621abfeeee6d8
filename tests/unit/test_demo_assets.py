"""The embedded demo's assets and helpers: tokenizer, task data, recipe, held-out exact match.

    pytest tests/unit/test_demo_assets.py -q
"""

from __future__ import annotations

import importlib.util
import json
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clustertune import demo
from clustertune.config import recipe_from_dict
from clustertune.shapes import SHAPES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.demo_tokenizer_dir(), local_files_only=True)


def _load_script():
    spec = importlib.util.spec_from_file_location("make_demo_assets", ROOT / "scripts" / "make_demo_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_module_imports_without_torch():
    code = ("import sys, clustertune.demo, clustertune.config; "
            "clustertune.config.load_recipe(None); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_committed_assets_match_the_generator():
    files = _load_script().all_files()
    stale = [rel for rel, text in files.items() if (demo.DEMO_ASSETS / rel).read_text(encoding="utf-8") != text]
    assert not stale, f"run `python scripts/make_demo_assets.py` and commit: stale {stale}"


def test_tokenizer_loads_offline_with_the_tiny_vocab(tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == SHAPES["tiny"].vocab_size == 128
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert max(tokenizer.get_vocab().values()) == len(tokenizer) - 1


def test_tokenizer_round_trips_one_token_per_character(tokenizer):
    text = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "") + "  two  spaces\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    # Outside the ASCII alphabet: dropped, as Qwen2Tokenizer does for bytes missing from its vocab.
    assert tokenizer.decode(tokenizer("héllo", add_special_tokens=False).input_ids) == "hllo"


def test_tokenizer_survives_save_and_reload_next_to_a_qwen2_config(tokenizer, tmp_path):
    """An HF export holds config.json (model_type qwen2) next to the saved tokenizer; transformers 5
    then loads it as Qwen2Tokenizer whatever tokenizer_config says. It must still tokenize alike."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["tiny"].hf_config_dict()))
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    msgs = [{"role": "user", "content": "reverse: abc def"}, {"role": "assistant", "content": "fed cba"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False) + "\tit's 1+2=3!\n\n"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.decode(reloaded(text).input_ids) == text
    assert (len(reloaded), reloaded.eos_token_id, reloaded.pad_token_id) == (
        len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert reloaded.apply_chat_template(msgs, tokenize=False) == tokenizer.apply_chat_template(msgs, tokenize=False)


def test_special_tokens_are_single_ids_and_skipped_on_decode(tokenizer):
    ids = tokenizer("<|im_start|>ab<|im_end|><|endoftext|>", add_special_tokens=False).input_ids
    assert len(ids) == 5
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_chat_template_renders_chatml(tokenizer):
    msgs = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nreverse: abc<|im_end|>\n<|im_start|>assistant\ncba<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nreverse: abc<|im_end|>\n<|im_start|>assistant\n"
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}] + msgs[:1],
                                                tokenize=False)
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_datasets_parse_are_correct_and_disjoint(tokenizer):
    train = demo.load_pairs(demo.DEMO_TRAIN_FILE)
    heldout = demo.load_heldout()
    assert len(train) >= 1000 and 100 <= len(heldout) <= 500
    assert not {p for p, _ in train} & {p for p, _ in heldout}
    for prompt, answer in train + heldout:
        word = prompt.removeprefix("reverse: ")
        assert word.isalpha() and word.islower() and answer == word[::-1]
    max_length = demo.demo_recipe_dict()["data"]["max_length"]
    longest = max(train + heldout, key=lambda pa: len(pa[0]) + len(pa[1]))
    msgs = [{"role": "user", "content": longest[0]}, {"role": "assistant", "content": longest[1]}]
    n_tokens = len(tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids)
    assert n_tokens <= max_length


def test_demo_data_lines_are_messages_format():
    with open(demo.DEMO_TRAIN_FILE, encoding="utf-8") as fh:
        row = json.loads(fh.readline())
    assert list(row) == ["messages"]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_demo_recipe_validates():
    tree = demo.demo_recipe_dict()
    recipe = recipe_from_dict(tree, "<demo recipe>")
    assert recipe.model.path == "tiny"
    assert recipe.zero.stage == 2
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in recipe.data.train_files)
    assert recipe.train.global_batch_size == 2 * recipe.train.micro_batch_size  # 2 CPU ranks
    assert demo.demo_recipe_dict() == tree  # a fresh dict each call, nothing shared


def _tiny_model():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa"))


def test_exact_match_of_random_model_is_low_and_fast(tokenizer):
    pairs = demo.load_heldout()
    model = _tiny_model()
    t0 = time.perf_counter()
    acc, results = demo.exact_match(model, tokenizer, pairs)
    elapsed = time.perf_counter() - t0
    assert acc <= 0.05
    assert len(results) == len(pairs) and [r[:2] for r in results] == pairs
    assert elapsed < 20, f"exact_match took {elapsed:.1f}s for {len(pairs)} prompts"
    assert model.training and tokenizer.padding_side == "right"  # state restored


class _OracleModel:
    """Stands in for a trained model: 'generates' the reversed word (plus eos) for each row of a
    left-padded batch, or a wrong answer when `wrong` is set."""

    def __init__(self, tokenizer, wrong=False):
        import torch

        self.tok, self.wrong, self.training = tokenizer, wrong, False
        self._param = torch.zeros(1)

    def parameters(self):
        yield self._param

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, attention_mask, generation_config):
        import torch

        assert self.tok.padding_side == "left" and (input_ids[:, -1] != self.tok.pad_token_id).all()
        rows = []
        for ids in input_ids:
            text = self.tok.decode(ids, skip_special_tokens=True)
            word = text.split("reverse: ")[1].split("assistant")[0].strip()
            answer = word if self.wrong else word[::-1]
            rows.append(self.tok(answer + "<|im_end|>", add_special_tokens=False).input_ids)
        width = max(map(len, rows))
        new = [r + [self.tok.pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)


def test_exact_match_scores_correct_generations(tokenizer):
    pairs = demo.load_heldout()[:20]
    acc, results = demo.exact_match(_OracleModel(tokenizer), tokenizer, pairs, batch_size=7)
    assert acc == 1.0 and all(got == expected for _, expected, got in results)
    acc, _ = demo.exact_match(_OracleModel(tokenizer, wrong=True), tokenizer, pairs)
    assert acc == 0.0
