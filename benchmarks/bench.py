"""One command for the GPU benchmark: the seed's HF Trainer + DeepSpeed baseline and clustertune,
side by side, in the same call on the same card; writes results JSON and a markdown table.

    python3 benchmarks/bench.py --suite w1 --out $OUT          # on the GPU machine
    python3 benchmarks/bench.py --suite w1,w2,w3,gate --out $OUT

Each case runs in its own process (fresh CUDA context, its own peak-memory counter) with a
time limit; a failed case is recorded (OOM included) and the rest go on.
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


STEPS = ["--steps", "20"]


def baseline(*args):
    args = args if "--steps" in args else (*args, *STEPS)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29611",
            str(HERE / "hf_trainer.py"), *args]


def ours(*args):
    args = args if "--steps" in args else (*args, *STEPS)
    return [sys.executable, str(HERE / "bench_clustertune.py"), *args]


SUITES = {
    # W1: Qwen2.5-1.5B, SFT-like lengths (lognormal, median ~500, cap 4096), grad ckpt on.
    "w1": [
        ("W1 baseline ZeRO-2", baseline("--shape", "1.5b", "--stage", "2", "--mode", "var", "--seq", "4096", "--mbs", "4", "--gc", "--tag", "w1z2")),
        ("W1 clustertune ZeRO-2", ours("--stage", "2", "--mode", "var", "--seq", "4096", "--batch", "32", "--budget", "16384", "--gc", "--tag", "w1z2")),
        ("W1 baseline ZeRO-3", baseline("--shape", "1.5b", "--stage", "3", "--mode", "var", "--seq", "4096", "--mbs", "4", "--gc", "--tag", "w1z3")),
        ("W1 clustertune ZeRO-3", ours("--stage", "3", "--mode", "var", "--seq", "4096", "--batch", "32", "--budget", "16384", "--gc", "--persist", "100000000", "--tag", "w1z3")),
    ],
    # W2: same shape, fixed 2048-token sequences, ZeRO-3.
    "w2": [
        ("W2 baseline ZeRO-3", baseline("--shape", "1.5b", "--stage", "3", "--mode", "fixed", "--seq", "2048", "--mbs", "4", "--gc", "--tag", "w2")),
        ("W2 clustertune ZeRO-3 gc", ours("--stage", "3", "--mode", "fixed", "--seq", "2048", "--batch", "16", "--budget", "16384", "--gc", "--persist", "100000000", "--tag", "w2")),
        ("W2 clustertune ZeRO-3 no-gc", ours("--stage", "3", "--mode", "fixed", "--seq", "2048", "--batch", "16", "--budget", "8192", "--persist", "100000000", "--tag", "w2nogc")),
    ],
    # W3: Qwen2.5-7B width truncated to 8 layers (what the baseline's shape table fits), ZeRO-3.
    "w3": [
        ("W3 baseline ZeRO-3", baseline("--shape", "7b-8l", "--stage", "3", "--mode", "fixed", "--seq", "2048", "--mbs", "4", "--gc", "--tag", "w3")),
        ("W3 clustertune ZeRO-3", ours("--shape", "qwen2.5-7b", "--layers", "8", "--stage", "3", "--mode", "fixed", "--seq", "2048", "--batch", "16", "--budget", "16384", "--gc", "--persist", "100000000", "--tag", "w3")),
    ],
    # Where W1's time goes (torch profiler over one step), and more tokens per step.
    "w1prof": [
        ("W1 clustertune ZeRO-2 profiled", ours("--stage", "2", "--mode", "var", "--seq", "4096", "--batch", "32", "--budget", "16384", "--gc", "--tag", "w1z2prof", "--profile", "OUTDIR/profile_w1_zero2.txt")),
        ("W1 clustertune ZeRO-2 64/step 32k", ours("--stage", "2", "--mode", "var", "--seq", "4096", "--batch", "64", "--budget", "32768", "--gc", "--tag", "w1z2big")),
    ],
    # Call 4: native GQA in varlen attention, twice the tokens per row and per step.
    "big": [
        ("W2 baseline ZeRO-3 (call 4)", baseline("--shape", "1.5b", "--stage", "3", "--mode", "fixed", "--seq", "2048", "--mbs", "4", "--gc", "--tag", "w2")),
        ("W2 clustertune ZeRO-3 gc 32/step 32k", ours("--stage", "3", "--mode", "fixed", "--seq", "2048", "--batch", "32", "--budget", "32768", "--gc", "--persist", "100000000", "--tag", "w2big")),
        ("W3 baseline ZeRO-3 (call 4)", baseline("--shape", "7b-8l", "--stage", "3", "--mode", "fixed", "--seq", "2048", "--mbs", "4", "--gc", "--tag", "w3")),
        ("W3 clustertune ZeRO-3 32/step 32k", ours("--shape", "qwen2.5-7b", "--layers", "8", "--stage", "3", "--mode", "fixed", "--seq", "2048", "--batch", "32", "--budget", "32768", "--gc", "--persist", "100000000", "--tag", "w3big")),
    ],
    # Which attention for packed rows: varlen flash (auto) vs sdpa with the block-diagonal mask
    # transformers derives from position ids vs flex_attention with a document mask.
    "attn": [
        ("ATTN varlen", ours("--stage", "2", "--mode", "var", "--seq", "4096", "--batch", "32", "--budget", "16384", "--gc", "--steps", "12", "--tag", "attn_varlen")),
        ("ATTN sdpa", ours("--stage", "2", "--mode", "var", "--seq", "4096", "--batch", "32", "--budget", "16384", "--gc", "--steps", "12", "--attn", "sdpa", "--tag", "attn_sdpa")),
        ("ATTN flex", ours("--stage", "2", "--mode", "var", "--seq", "4096", "--batch", "32", "--budget", "16384", "--gc", "--steps", "12", "--attn", "flex_attention", "--tag", "attn_flex")),
    ],
    # Memory at the same tokens per micro-batch as the baseline (4 x 2048 = 8192).
    "mem": [
        ("MEM clustertune ZeRO-3 8192 tok/micro", ours("--stage", "3", "--mode", "fixed", "--seq", "2048", "--batch", "4", "--budget", "8192", "--gc", "--tag", "mem")),
        # planner prediction (not yet measured): the step's gradient copies shrink from the whole
        # partition to one sub-group, 28.7 -> ~24.7 GiB
        ("MEM clustertune ZeRO-3 8192 tok/micro sub_group 2.3e8", ours("--stage", "3", "--mode", "fixed", "--seq", "2048", "--batch", "4", "--budget", "8192", "--gc", "--subgroup", "230000000", "--tag", "mem_subgroup")),
    ],
}


def gate_cases(init_dir: str):
    common = ["--stage", "2", "--mode", "var", "--seq", "4096", "--steps", "20", "--lr", "1e-4", "--tag", "gate"]
    return [
        ("GATE baseline", baseline("--init", init_dir, "--mbs", "4", "--gc", *common)),
        ("GATE clustertune", ours("--shape", init_dir, "--batch", "4", "--budget", "16384", "--gc", *common)),
    ]


def make_init(path: str) -> None:
    code = ("import torch; from transformers import Qwen2Config, Qwen2ForCausalLM; import sys; sys.path.insert(0, 'src');"
            "from clustertune.shapes import SHAPES; torch.manual_seed(0);"
            "m = Qwen2ForCausalLM(Qwen2Config(**SHAPES['qwen2.5-1.5b'].hf_config_dict()));"
            f"m.save_pretrained({path!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def run_case(name, cmd, timeout, log_dir: Path):
    started = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", PYTHONPATH=f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += "\nTIMEOUT"
    (log_dir / (name.replace(" ", "_").replace("/", "_") + ".log")).write_text(out)
    result = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    if result is None:
        oom = "OutOfMemoryError" in out or "CUDA out of memory" in out
        result = {"error": "OOM" if oom else "failed", "tail": out[-1500:]}
    result.update(name=name, wall_s=round(time.time() - started, 1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "tail")}), flush=True)
    if "error" in result:
        print(result["tail"][-800:], flush=True)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="w1"); ap.add_argument("--out", default="bench_out")
    ap.add_argument("--timeout", type=int, default=240)
    a = ap.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    results = []
    for suite in a.suite.split(","):
        if suite == "gate":
            init = "/tmp/ct_init_1.5b"
            if not Path(init, "config.json").exists():
                make_init(init)
            cases = gate_cases(init)
        else:
            cases = SUITES[suite]
        for name, cmd in cases:
            cmd = [c.replace("OUTDIR", str(out)) for c in cmd]
            results.append(run_case(name, cmd, a.timeout, out))
            (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| case | tokens/s | MFU | peak GB | step s | tokens/step |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | {r['error']} | | | | |")
        else:
            print(f"| {r['name']} | {r['tok_per_s']:,} | {100 * r['mfu']:.1f}% | {r['peak_mem_gb']} | {r['step_s']} | {r['tokens_per_step']:,} |")


if __name__ == "__main__":
    main()
