"""The worker's metrics sink: TensorBoard missing is said, not silently skipped (issue 16 #1)."""

import json
import sys

from clustertune.worker.metrics import MetricsSink


def test_missing_tensorboard_is_reported_once_and_jsonl_still_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    sink = MetricsSink(tmp_path, enabled=True, total_steps=2)
    sink.log({"step": 1, "loss": 2.0, "tokens_per_s": 10.0, "tokens_per_s_per_gpu": 5.0, "mem_gib": 1.5})
    sink.close()
    err = capsys.readouterr().err
    assert err.count("TensorBoard events are not written") == 1 and "pip install tensorboard" in err
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["mem_gib"] == 1.5
    assert not (tmp_path / "tensorboard").exists()


def test_allocator_retries_are_named_once_with_what_gives_headroom():
    from clustertune.worker.metrics import alloc_retry_warning
    assert alloc_retry_warning(step=3, retries=0, warned=False) is None  # no retry: nothing to say
    line = alloc_retry_warning(step=13, retries=2, warned=False)
    assert line.startswith("warning: by step 13 ") and "2 time(s)" in line
    assert "train.micro_batch_tokens" in line and "clustertune plan" in line and "alloc_retries" in line
    assert alloc_retry_warning(step=14, retries=5, warned=True) is None  # said once per run
