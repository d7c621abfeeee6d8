"""`clustertune report`: plots and summary from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from clustertune.cli import main
from clustertune.report import make_report, read_metrics, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int = 20) -> None:
    lines = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 3.0 - 0.1 * step, "lr": 1e-5 * min(1.0, step / 5), "grad_norm": 1.0,
               "tokens_per_s": 100.0 if step <= 2 else 1000.0, "mfu": 0.4, "mem_gb": 40.0 + step % 3,
               "step_time_s": 2.0, "trained_tokens": 4096, "time": 1000.0 + 2.0 * step,
               "unknown_key": "ignored"}
        if step == 7:
            del row["lr"], row["mem_gb"]  # missing keys are fine
        lines.append(json.dumps(row))
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "eval_loss": 2.5 - 0.01 * step, "eval_ppl": 10.0}))
    run_dir.mkdir(parents=True, exist_ok=True)
    # a torn last line, as while the run is still writing
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo', encoding="utf-8")


def test_report_writes_valid_pngs_and_correct_summary(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert main(["report", str(run)]) == 0

    out_dir = run / "report"
    for name in ("loss", "lr", "tokens_per_s", "memory"):
        data = (out_dir / f"{name}.png").read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), name
    summary = (out_dir / "summary.txt").read_text()
    assert summary in capsys.readouterr().out

    s = summarize(read_metrics(run))
    assert s["logged_steps"] == 20 and s["last_step"] == 20
    assert s["first_loss"] == pytest.approx(2.9)
    assert s["last_loss"] == pytest.approx(1.0) and s["min_loss"] == pytest.approx(1.0)
    # warm-up: the first 10% of 20 logged steps (2) are left out -> only the 1000 tokens/s steps
    assert s["mean_tokens_per_s"] == pytest.approx(1000.0)
    # an older worker's file: mem_gb was max_memory_allocated / 1e9; the report shows GiB
    assert s["peak_mem_gib"] == pytest.approx(42.0e9 / 2**30)
    assert "peak memory:      39.1 GiB per GPU" in summary
    assert s["trained_tokens"] == 4096 * 20  # per-step counts (the worker's format), summed
    assert s["total_time_s"] == pytest.approx(38.0)  # time stamps 1002 .. 1040
    assert s["evals"] == 2 and s["last_eval_loss"] == pytest.approx(2.3) and s["min_eval_loss"] == pytest.approx(2.3)
    assert "first 2.9000, last 1.0000, min 1.0000" in summary
    assert "skipped lines:    1" in summary


def test_total_time_falls_back_to_step_times(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 1.0, "step_time_s": 1.5})
                                                 for i in range(4)))
    s = summarize(read_metrics(run))
    assert s["total_time_s"] == pytest.approx(6.0)
    assert s["mean_tokens_per_s"] is None and s["peak_mem_gib"] is None
    text, plots = make_report(run)
    assert [p.name for p in plots] == ["loss.png"]  # nothing else to plot
    assert "tokens/s:         n/a" in text


def test_steady_rates_are_total_work_over_total_time_not_a_mean_of_step_rates(tmp_path):
    # steps of 10k tokens in 0.5 s (20k/s, 40% MFU) and 30k in 1.0 s (30k/s, 60%): 40k tokens in
    # 1.5 s = 26,667 tokens/s and 53.3% MFU, where the plain means would say 25,000 and 50%
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "loss": 2.0, "tokens_per_s": 1.0, "tokens_per_s_per_gpu": 0.5, "mfu": 0.01, "step_time_s": 9.0}]  # warm-up: left out
    for i in range(1, 5):
        t, tokens, mfu = (0.5, 10_000, 0.4) if i % 2 else (1.0, 30_000, 0.6)
        rows.append({"step": i, "loss": 1.0, "tokens_per_s": tokens / t, "tokens_per_s_per_gpu": tokens / t / 2,
                     "mfu": mfu, "step_time_s": t, "world_size": 2})
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    s = summarize(read_metrics(run))
    assert s["mean_tokens_per_s"] == pytest.approx(80_000 / 3)
    assert s["mean_tokens_per_s_per_gpu"] == pytest.approx(40_000 / 3)
    assert s["mean_mfu"] == pytest.approx((0.4 * 1.0 + 0.6 * 2.0) / 3.0)


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "run directory not found"),
    (lambda d: d.mkdir(), "no metrics file"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "no metrics in it"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("not json\n[1, 2]\n")), "no metrics in it"),
])
def test_clear_errors_without_traceback(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    setup(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def worker_record(step: int, *, loss: float, grad_norm: float = 1.5) -> dict:
    """One training line exactly as train.run builds it (keys and meaning; MetricsSink adds "time")."""
    return {"step": step, "loss": loss, "lr": 2e-5, "grad_norm": grad_norm, "tokens": 6000,
            "trained_tokens": 4000, "step_time_s": 0.5, "tokens_per_s": 12000.0, "tokens_per_s_per_gpu": 6000.0,
            "mfu": 0.3, "world_size": 2, "mem_gib": 30.0 + step / 10}


def test_report_on_a_run_dir_written_by_the_worker_sink(tmp_path, capsys):
    """metrics.jsonl written by metrics.MetricsSink, the worker's writer, in its real format:
    log_every 2, a NaN grad norm (DeepSpeed returned none), eval lines, a line of generated
    samples, and a resume from step 4 that redid steps 5-6 (the later lines win)."""
    from clustertune.worker.metrics import MetricsSink

    run = tmp_path / "run"
    sink = MetricsSink(run, enabled=True, total_steps=8)
    for step in (2, 4, 6):
        sink.log(worker_record(step, loss=5.0 - step / 2, grad_norm=float("nan") if step == 2 else 1.5))
    sink.log({"step": 4, "eval_loss": 3.5, "eval_ppl": 33.1, "eval_tokens": 900, "eval_time_s": 1.0})
    sink.log({"step": 4, "samples": [{"prompt": "hi", "output": "ho"}]})
    sink.close()
    resumed = MetricsSink(run, enabled=True, total_steps=8, start_step=4)  # appends
    for step in (6, 8):
        resumed.log(worker_record(step, loss=9.0 if step == 6 else 1.0))
    resumed.log({"step": 8, "eval_loss": 2.0, "eval_ppl": 7.4, "eval_tokens": 900, "eval_time_s": 1.0})
    resumed.close()
    assert (run / "tensorboard").is_dir()

    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    for name in ("loss", "lr", "tokens_per_s", "memory"):
        assert (run / "report" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE), name

    m = read_metrics(run)
    assert [r["step"] for r in m.train] == [2, 4, 6, 8]  # one row per step, samples line left out
    assert m.series("loss")[1] == [4.0, 3.0, 9.0, 1.0]  # step 6 from the resumed run
    s = summarize(m)
    assert s["last_step"] == 8 and s["last_loss"] == 1.0
    assert s["trained_tokens"] == 4 * 4000 and s["trained_tokens_steps"] == 4
    assert s["mean_mfu"] == pytest.approx(0.3)
    assert s["peak_mem_gib"] == pytest.approx(30.8)
    assert s["mean_tokens_per_s_per_gpu"] == pytest.approx(6000.0) and s["world_size"] == 2
    assert "12,000 cluster, 6,000 per GPU, 2 GPUs" in out
    assert "tensorboard --logdir" in out
    assert s["evals"] == 2 and s["last_eval_loss"] == 2.0
    assert "16,000 (loss-bearing, summed over 4 logged steps; steps not logged" in out
    assert "MFU:              30.0%" in out


def test_an_older_multi_gpu_run_gets_per_gpu_figures_and_its_mfu_divided(tmp_path):
    """Before issue 11 the worker logged the cluster's FLOPs over ONE GPU's peak and no per-GPU
    rate; world.json tells the report how many GPUs the run had."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "world.json").write_text(json.dumps({"world_size": 16, "device": "cuda", "precision": "bf16"}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"step": i, "loss": 1.0, "tokens_per_s": 160_000.0, "mfu": 6.4, "mem_gb": 50.0}) for i in range(1, 5)))
    s = summarize(read_metrics(run))
    assert s["mean_tokens_per_s"] == pytest.approx(160_000.0)
    assert s["mean_tokens_per_s_per_gpu"] == pytest.approx(10_000.0)
    assert s["mean_mfu"] == pytest.approx(0.4)
    assert s["peak_mem_gib"] == pytest.approx(50e9 / 2**30)


def test_missing_matplotlib_is_one_clear_line_after_the_summary(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    write_run(run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["report", str(run)]) == 2
    captured = capsys.readouterr()
    assert "steps:" in captured.out  # the summary is still printed and written
    assert (run / "report" / "summary.txt").is_file()
    assert "matplotlib" in captured.err and "pip install matplotlib" in captured.err
    assert "Traceback" not in captured.err


def test_a_run_without_tensorboard_events_says_so(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    text, _ = make_report(run)
    assert "tensorboard:      no events in" in text
