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
