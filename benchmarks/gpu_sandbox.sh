#!/bin/bash
# Multi-node on real GPUs, on one machine of 2 or 4 GPUs: two network-namespace "servers" joined by
# a bridge (clustertune sandbox up --gpus-per-node G), each with its own GPUs, sshd and eth0.
#
#     bash benchmarks/gpu_sandbox.sh [all|flow|zeropp]     # from the repository root, as root
#
# Needs, carried to the GPU machine (see /work/shared/gpu/README.md and scripts/fetch_gpu_debs.sh):
#   .gpuwheels/  deepspeed, liger-kernel, pydantic (+ their small dependencies) as wheels
#   .gpudebs/    iproute2, openssh server/client, pdsh and their libraries (Debian 12 .debs)
# Nothing is installed into /: the .debs are unpacked with `dpkg -x` into /opt/ctdebs and run
# through wrappers (in /usr/local/bin, where an ssh session's PATH finds them too) that set
# LD_LIBRARY_PATH for those binaries alone; `ip netns exec` hands the caller's own LD_LIBRARY_PATH
# to what it runs inside a namespace. The wheels go to /tmp/site, found by a .pth file (sshd
# sessions start with a clean environment, so PYTHONPATH would not reach the ranks); the sshd
# privilege-separation user `sshd` is created if missing.
#
# flow (G = 2 GPUs per node on 4 GPUs, 1 on 2):
#   sandbox up -> cluster ssh -> cluster doctor (with the interconnect test: NCCL all-reduce and
#   all-gather bus bandwidth between the nodes and inside each) -> launch ZeRO-3 training of the
#   qwen2.5-0.5b shape (random init, the demo's data, packing, Liger, checkpoints every 10 steps)
#   with NCCL_DEBUG=INFO -> the last rank of node2 is SIGKILLed mid-step after the step-10
#   checkpoint -> every process of the run must end within 60 s with that rank named -> launch
#   --resume finishes from the last complete checkpoint -> the loss fell, the export loads with
#   from_pretrained. NCCL's transport lines are summarised: NET/Socket between nodes, P2P inside.
# zeropp: `tc ... tbf rate 10gbit` on both nodes' eth0, then plain ZeRO-3 against ZeRO++
#   (hpz_partition_size = G, quantized weights and gradients), 20 steps each, same seed: tokens/s,
#   peak memory, loss within 1%. If the quantized run fails (its CUDA kernels JIT-compile), hpz alone.
#   ZEROPP_VARIANTS="qwz qgz zeropp": quantized weights alone, quantized gradients alone, then both.
#
# Output: a compact summary on stdout and in $OUT/summary.txt; logs in $OUT (at most 8 files).
# CPU_DRYRUN=1 [CPU_DRYRUN_SLOTS=2]: the same on a CPU machine (tiny model, gloo), to try the script.
# Budget: all of it in under 8 minutes on 4 H100s (estimated, not yet run); `all` skips zeropp if the
# flow took longer than 4 minutes (then run `bash benchmarks/gpu_sandbox.sh zeropp` on its own).
set -uo pipefail
PART=${1:-all}
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu_sandbox}
mkdir -p "$OUT"
WORK=/tmp/gsw
NAME=gs
T0=$(date +%s)
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
SETUP_LOG=$OUT/setup.log
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo "[gpu_sandbox +$(elapsed)s] $*" | tee -a "$SETUP_LOG"; }
fail() { say "FAILED: $*"; finish 1; }

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The GPU image sets an arch-specific TORCH_CUDA_ARCH_LIST ("9.0a") that DeepSpeed's JIT builder cannot
# parse: the quantized ZeRO++ run failed on it (2026-11-26; `launch` now refuses it up front).
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed 's/\([0-9]\)[a-z][a-z]*/\1/g')
PY=$(command -v python3)
MODEL=qwen2.5-0.5b LIGER=on STEPS=30
[ -n "${CPU_DRYRUN:-}" ] && MODEL=tiny LIGER=off STEPS=20
# DeepSpeed JIT-builds its ops under $HOME; every sandbox node has its own HOME, so without this each
# node would build the same op again (minutes), after the launcher's stall clock has started.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$([ -n "${CPU_DRYRUN:-}" ] && echo "$HOME/.cache/torch_extensions" || echo $WORK/torch_extensions)}

teardown() {  # also on an unexpected exit: nothing of the sandbox (namespaces, sshd, ranks) survives
    if [ -f /run/clustertune-sandbox/$NAME/state.json ]; then
        "$PY" -m clustertune.cli sandbox down --name $NAME >> "$SETUP_LOG" 2>&1
    fi
}
trap teardown EXIT
finish() {
    say "total $(elapsed) s; exit $1"
    exit "$1"
}

# ------------------------------------------------------------------------------ python packages
setup_python() {
    step "python packages -> /tmp/site (.pth in $($PY -c 'import site; print(site.getsitepackages()[0])'))"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpuwheels/*.whl >> "$SETUP_LOG" 2>&1 || fail "pip install of .gpuwheels"
    # clustertune itself from this checkout: its src on the path, and its metadata (the doctor
    # compares package versions across nodes from metadata)
    mkdir -p /tmp/site/clustertune-0.1.0.dist-info
    printf 'Metadata-Version: 2.1\nName: clustertune\nVersion: 0.1.0\n' > /tmp/site/clustertune-0.1.0.dist-info/METADATA
    local site
    site=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
    printf '/tmp/site\n%s/src\n' "$REPO" > "$site/zz_clustertune_gpu_sandbox.pth"
    "$PY" -c "import deepspeed, liger_kernel, pydantic, clustertune.cli; print('deepspeed', deepspeed.__version__)" \
        >> "$SETUP_LOG" 2>&1 || fail "imports after install (see setup.log)"
}

# --------------------------------------------------------------------- ip, tc, ssh, sshd, pdsh
setup_tools() {  # WRAP_DIR, DEB_PREFIX and FORCE_WRAPPERS=1: to try the wrappers on a machine that has the tools
    local P=${DEB_PREFIX:-/opt/ctdebs} W=${WRAP_DIR:-/usr/local/bin}
    mkdir -p "$W"
    case ":$PATH:" in *":$W:"*) ;; *) export PATH=$W:$PATH ;; esac
    step "unpacking $(ls .gpudebs/*.deb | wc -l) .debs into $P"
    mkdir -p $P
    for f in .gpudebs/*.deb; do dpkg -x "$f" $P || fail "dpkg -x $f"; done
    local L=$P/lib/x86_64-linux-gnu:$P/usr/lib/x86_64-linux-gnu
    have() { [ -z "${FORCE_WRAPPERS:-}" ] && command -v "$1" > /dev/null && [ "$(command -v "$1")" != "$W/$1" ]; }
    find_bin() { for d in $P/usr/sbin $P/usr/bin $P/sbin $P/bin; do [ -x "$d/$1" ] && { echo "$d/$1"; return; }; done; }
    local name real
    for name in tc ssh ssh-keygen ssh-keyscan; do
        real=$(find_bin $name)
        [ -n "$real" ] || fail "$name not in .gpudebs"
        have $name && continue
        printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$L" "$real" > $W/$name
        chmod 755 $W/$name
    done
    if ! have ip; then
        real=$(find_bin ip)
        # `ip netns exec NS CMD`: CMD gets the caller's LD_LIBRARY_PATH (or none), not the .debs' libraries
        cat > $W/ip <<EOF
#!/bin/sh
if [ "\$1" = netns ] && [ "\$2" = exec ]; then
    ns=\$3; shift 3
    if [ -n "\${LD_LIBRARY_PATH+x}" ]; then set -- env "LD_LIBRARY_PATH=\$LD_LIBRARY_PATH" "\$@"
    else set -- env -u LD_LIBRARY_PATH "\$@"; fi
    LD_LIBRARY_PATH=$L exec $real netns exec "\$ns" "\$@"
fi
LD_LIBRARY_PATH=$L exec $real "\$@"
EOF
        chmod 755 $W/ip
    fi
    if ! have pdsh; then
        printf '#!/bin/bash\nexport PDSH_MODULE_DIR=%s PDSH_RCMD_TYPE=${PDSH_RCMD_TYPE:-ssh}\nLD_LIBRARY_PATH=%s exec -a pdsh %s "$@"\n' \
            "$P/usr/lib/x86_64-linux-gnu/pdsh" "$L" "$P/usr/bin/pdsh.bin" > $W/pdsh
        chmod 755 $W/pdsh
        # pdsh finds its rcmd modules only at its compiled-in path (PDSH_MODULE_DIR did not reach
        # the DeepSpeed launcher's pdsh on the GPU machine: "Couldn't load any pdsh modules").
        [ -e /usr/lib/x86_64-linux-gnu/pdsh ] || { mkdir -p /usr/lib/x86_64-linux-gnu &&
            ln -s "$P/usr/lib/x86_64-linux-gnu/pdsh" /usr/lib/x86_64-linux-gnu/pdsh; }
    fi
    # sshd: an absolute path the sandbox is told about (--sshd); it re-executes itself by that path
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$L" "$P/usr/sbin/sshd" > $P/sshd
    chmod 755 $P/sshd
    SSHD=$P/sshd
    id sshd > /dev/null 2>&1 || useradd --system --no-create-home --home-dir /run/sshd --shell /usr/sbin/nologin sshd \
        || echo 'sshd:x:74:65534:sshd privilege separation:/run/sshd:/usr/sbin/nologin' >> /etc/passwd
    for t in ip tc ssh ssh-keygen pdsh; do command -v $t > /dev/null || fail "$t not on PATH after setup"; done
    ip netns list > /dev/null 2>&1 || fail "ip netns does not work here"
    step "tools: $(command -v ip) $(command -v tc) $(command -v ssh) $(command -v pdsh) sshd=$SSHD"
}

# -------------------------------------------------------------------------------------- helpers
wait_step() {  # RUN_DIR STEP TIMEOUT PID: until metrics.jsonl reaches STEP (or the launcher exits)
    local deadline=$(( $(date +%s) + $3 ))
    while [ "$(date +%s)" -lt $deadline ]; do
        if [ -f "$1/metrics.jsonl" ] && "$PY" - "$1/metrics.jsonl" "$2" <<'EOF'
import json, sys
steps = [json.loads(l).get("step", 0) for l in open(sys.argv[1]) if l.strip().startswith("{") and '"loss"' in l]
sys.exit(0 if steps and max(steps) >= int(sys.argv[2]) else 1)
EOF
        then return 0; fi
        kill -0 "$4" 2> /dev/null || return 1
        sleep 0.5
    done
    return 1
}

run_pids() {  # RUN_ID [RANK]: live worker processes of that run (of that rank)
    "$PY" - "$@" <<'EOF'
import os, sys
run_id, rank = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        continue
    if state == "Z" or f"CLUSTERTUNE_RUN_ID={run_id}".encode() not in env:
        continue
    if rank is None or (f"RANK={rank}".encode() in env and b"clustertune.worker" in cmd):
        print(pid)
EOF
}

metrics_summary() {  # RUN_DIR FIRST_STEP: loss at the first and last step, median tokens/s after FIRST_STEP, peak GiB
    "$PY" - "$1/metrics.jsonl" "$2" <<'EOF'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
recs = {r["step"]: r for r in recs if "loss" in r}  # a resumed run appends: the later record of a step wins
steps = sorted(recs)
late = [recs[s]["tokens_per_s"] for s in steps if s > int(sys.argv[2]) and "tokens_per_s" in recs[s]]
print(json.dumps({"first_step": steps[0], "first_loss": recs[steps[0]]["loss"], "last_step": steps[-1],
                  "last_loss": recs[steps[-1]]["loss"], "losses": [round(recs[s]["loss"], 4) for s in steps],
                  "tokens_per_s": statistics.median(late) if late else None,
                  "peak_gib": max((r.get("mem_gib", 0) for r in recs.values()), default=None)}))
EOF
}

write_recipe() {  # FILE OUTPUT_DIR MAX_STEPS CKPT_EVERY [zero lines...]
    local file=$1 out=$2 steps=$3 every=$4
    shift 4
    cat > "$file" <<EOF
[run]
name = "$(basename "$out")"
output_dir = "$out"
env_passthrough = ["NVSHMEM_DISABLE_NVLS"]
collective_timeout_s = 120
stall_timeout_s = 180
[model]
path = "$MODEL"
tokenizer = "$REPO/src/clustertune/demo_assets/tokenizer"
liger = "$LIGER"
attn_implementation = "sdpa"
[data]
train_files = ["$REPO/src/clustertune/demo_assets/train.jsonl"]
max_length = 64
packing = true
[train]
max_steps = $steps
global_batch_size = 64
micro_batch_tokens = 4096
gradient_checkpointing = false
lr = 3e-4
schedule = "constant"
seed = 7
[checkpoint]
every_steps = $every
keep_last = 2
[zero]
stage = 3
EOF
    for line in "$@"; do echo "$line" >> "$file"; done
}

on_node1() { "$PY" -m clustertune.cli sandbox exec node1 --name $NAME -- "$@"; }

# ------------------------------------------------------------------------------------ the sandbox
sandbox_up() {
    local nodes_arg
    if [ -n "${CPU_DRYRUN:-}" ]; then
        G=${CPU_DRYRUN_SLOTS:-1}
        nodes_arg=(--slots $G)
        say "CPU dry run: 2 nodes x $G CPU rank(s), model tiny, gloo"
    else
        NGPU=$(nvidia-smi -L | grep -c '^GPU ')
        [ "$NGPU" -ge 2 ] || fail "needs at least 2 GPUs (nvidia-smi shows $NGPU)"
        G=$(( NGPU >= 4 ? 2 : 1 ))
        nodes_arg=(--gpus-per-node $G)
        say "machine: $NGPU x $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F); sandbox: 2 nodes x $G GPU(s)"
    fi
    "$PY" -m clustertune.cli sandbox down --name $NAME > /dev/null 2>&1
    rm -rf $WORK
    mkdir -p $WORK
    # every node's shell: this machine's PATH (nvcc, nvidia-smi, the wrappers) and NVLink multicast off
    # (what a program started in a fresh environment must keep, see .library/device/KINDS.md)
    local extra=(--env "PATH=$PATH" --env NCCL_NVLS_ENABLE=0 --env TORCH_SYMM_MEM_DISABLE_MULTICAST=1
                 --env NVSHMEM_DISABLE_NVLS=1)
    [ -n "${LD_LIBRARY_PATH:-}" ] && extra+=(--env "LD_LIBRARY_PATH=$LD_LIBRARY_PATH")
    [ -n "${CUDA_HOME:-}" ] && extra+=(--env "CUDA_HOME=$CUDA_HOME")
    "$PY" -m clustertune.cli sandbox up --name $NAME --nodes 2 "${nodes_arg[@]}" --sshd "$SSHD" "${extra[@]}" \
        >> "$SETUP_LOG" 2>&1 || fail "sandbox up (see setup.log)"
    CF=/run/clustertune-sandbox/$NAME/cluster.toml
    cp $CF $WORK/cluster.toml
    step "sandbox up: $(grep -c '^\[\[nodes\]\]' $CF) nodes"
    local boot
    boot=$("$PY" -c "import json; print(json.load(open('/run/clustertune-sandbox/$NAME/state.json'))['bootstrap_key'])")
    (cd $WORK && on_node1 "$PY" -m clustertune.cli cluster ssh --cluster $CF --identity "$boot") >> "$SETUP_LOG" 2>&1 \
        || fail "cluster ssh (see setup.log)"
    "$PY" -m clustertune.cli sandbox revoke-bootstrap --name $NAME >> "$SETUP_LOG" 2>&1
    step "cluster ssh done"
}

# ------------------------------------------------------------------------------------------- flow
flow() {
    local R=$WORK/flow.toml RUN=$WORK/runs/flow
    write_recipe $R $RUN $STEPS 10
    step "doctor"
    (cd $WORK && on_node1 "$PY" -m clustertune.cli cluster doctor --cluster $CF --recipe $R) > $OUT/doctor.txt 2>&1
    local doc=$?
    say "doctor: exit $doc"
    grep -E "^(node|verdict|node1|node2) |interconnect|across all nodes|inside each node|planned step|/ bandwidth|doctor:" \
        $OUT/doctor.txt | sed 's/^/  /' | tee -a "$SUMMARY"

    step "launch (ZeRO-3, packing, Liger, checkpoints every 10 steps; NCCL_DEBUG=INFO)"
    local victim=$(( 2 * G - 1 ))
    (cd $WORK && NCCL_DEBUG=INFO on_node1 "$PY" -m clustertune.cli launch $R --cluster $CF) \
        > $OUT/launch_fault.log 2>&1 &
    local lpid=$!
    wait_step $RUN 12 300 $lpid || { wait $lpid; fail "the run never reached step 12 (launch_fault.log)"; }
    local max_seen
    max_seen=$(metrics_summary $RUN 0 | "$PY" -c "import json,sys; print(json.load(sys.stdin)['last_step'])")
    local run_id pid
    run_id=$("$PY" -c "import json; print(json.load(open('$RUN/launch/run.json'))['run_id'])")
    pid=$(run_pids "$run_id" $victim | head -1)
    [ -n "$pid" ] || fail "no worker process of rank $victim"
    local killed=$(date +%s.%N)
    kill -9 "$pid"
    wait $lpid
    local code=$? ended=$(date +%s.%N)
    local left_wait=0
    while [ -n "$(run_pids "$run_id")" ] && [ $left_wait -lt 60 ]; do sleep 1; left_wait=$((left_wait + 1)); done
    local took
    took=$("$PY" -c "print(f'{$ended - $killed:.1f}')")
    local named
    named=$(grep -m1 -o "run failed: rank $victim on node2[^|]*" $OUT/launch_fault.log)
    say "fault: SIGKILL rank $victim (pid $pid, node2) at step $max_seen -> launcher exit $code after ${took} s; leftovers: $(run_pids "$run_id" | wc -l); '${named:-rank not named!}'"
    if "$PY" -c "import sys; sys.exit(0 if $took < 60 else 1)" && [ $code -ne 0 ] && [ -n "$named" ]; then
        say "fault: OK (every process ended within 60 s, rank $victim named)"
    else
        say "fault: NOT OK"
    fi

    step "NCCL transports"
    grep -h -o "[0-9]*\[[0-9]*\] -> [0-9]*\[[0-9]*\] \(\[[a-z]*\] \)\?via [A-Za-z/0-9_]*" $RUN/logs/node*.log $OUT/launch_fault.log \
        2> /dev/null | sort -u > $OUT/nccl_transport.txt
    "$PY" - $OUT/nccl_transport.txt $G <<'EOF' | tee -a "$SUMMARY"
import re, sys
g = int(sys.argv[2])
within, between = set(), set()
for line in open(sys.argv[1]):
    m = re.match(r"(\d+)\[\d+\] -> (\d+)\[\d+\] (?:\[\w+\] )?via (\S+)", line.strip())
    if m:
        a, b, how = int(m[1]), int(m[2]), m[3]
        (within if a // g == b // g else between).add(how.split("/")[0] + "/" + how.split("/")[1] if "/" in how else how)
print(f"NCCL transports: between nodes {sorted(between) or '-'}; within a node {sorted(within) or '-'}")
ok = between and all(t.startswith("NET/Socket") for t in between) and (g == 1 or (within and all(t.startswith("P2P") for t in within)))
if not within and not between:
    print("NCCL transports: no NCCL connection lines (a CPU dry run, or NCCL_DEBUG did not reach the ranks)")
else:
    print("NCCL transports: " + ("OK (NET/Socket between nodes" + (", P2P within)" if g > 1 else ")") if ok else "NOT as expected"))
EOF

    step "launch --resume"
    (cd $WORK && on_node1 "$PY" -m clustertune.cli launch $R --cluster $CF --resume) > $OUT/launch_resume.log 2>&1
    code=$?
    say "resume: exit $code; $(grep -m1 -o 'resumed from[^|]*' $OUT/launch_resume.log || echo 'no resume line')"
    local m
    m=$(metrics_summary $RUN 15)
    say "train: $m"
    "$PY" -c "import json,sys; m=json.loads(sys.argv[1]); sys.exit(0 if m['last_step'] == $STEPS and m['last_loss'] < 0.9 * m['first_loss'] else 1)" "$m" \
        && say "loss: OK (fell by more than 10%, reached step $STEPS)" || say "loss: NOT OK"
    "$PY" - "$RUN/final" <<'EOF' 2>> "$SETUP_LOG" | tee -a "$SUMMARY"
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(f"export: OK, from_pretrained loads {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
      f"tokenizer of {len(tok)} tokens")
EOF
}

# ----------------------------------------------------------------------------------------- ZeRO++
zeropp() {
    step "ZeRO++: tc tbf rate 10gbit on both nodes' eth0"
    for n in node1 node2; do
        tc -n ct-$NAME-$n qdisc replace dev eth0 root tbf rate 10gbit burst 10mb latency 50ms >> "$SETUP_LOG" 2>&1 \
            || say "tc on $n failed (see setup.log)"
    done
    local hpz=()
    [ "$G" -gt 1 ] && hpz=("hpz_partition_size = $G")
    : > $OUT/zeropp.log
    local variant lines
    # ZEROPP_VARIANTS: which runs besides plain ZeRO-3 (zeropp = hpz + both quantizations; qwz / qgz one each)
    for variant in plain ${ZEROPP_VARIANTS:-zeropp}; do
        lines=()
        case $variant in
            zeropp) lines=("${hpz[@]}" "quantized_weights = true" "quantized_gradients = true") ;;
            qwz) lines=("quantized_weights = true") ;;
            qgz) lines=("quantized_gradients = true") ;;
        esac
        write_recipe $WORK/$variant.toml $WORK/runs/$variant 20 0 "${lines[@]}"
        step "ZeRO++ bench: $variant"
        (cd $WORK && on_node1 "$PY" -m clustertune.cli launch $WORK/$variant.toml --cluster $CF) >> $OUT/zeropp.log 2>&1
        local code=$?
        if [ $code -ne 0 ] && [ $variant = zeropp ] && [ "$G" -gt 1 ]; then
            say "zeropp (hpz + quantized): exit $code; falling back to hpz alone"
            variant=hpz
            write_recipe $WORK/hpz.toml $WORK/runs/hpz 20 0 "${hpz[@]}"
            (cd $WORK && on_node1 "$PY" -m clustertune.cli launch $WORK/hpz.toml --cluster $CF) >> $OUT/zeropp.log 2>&1
            code=$?
        fi
        say "bench $variant: exit $code $( [ $code -eq 0 ] && metrics_summary $WORK/runs/$variant 5)"
    done
    "$PY" - $WORK/runs <<'EOF' | tee -a "$SUMMARY"
import json, statistics, sys
from pathlib import Path
def load(name):
    p = Path(sys.argv[1]) / name / "metrics.jsonl"
    if not p.exists():
        return None
    recs = {r["step"]: r for r in map(json.loads, filter(str.strip, p.read_text().splitlines())) if "loss" in r}
    return recs if recs and max(recs) == 20 else None
plain = load("plain")
others = [(n, r) for n, r in ((n, load(n)) for n in ("zeropp", "hpz", "qwz", "qgz")) if r]
if not plain or not others:
    print("ZeRO++ vs ZeRO-3: no comparison (a run failed; see zeropp.log)")
    sys.exit()
tps = lambda r: statistics.median(r[s]["tokens_per_s"] for s in r if s > 5)
mem = lambda r: max(x.get("mem_gib", 0) for x in r.values())
for name, pp in others:
    rel = [abs(pp[s]["loss"] - plain[s]["loss"]) / plain[s]["loss"] for s in plain if s in pp]
    worst, mean = max(rel), sum(rel) / len(rel)
    print(f"ZeRO++ ({name}) vs ZeRO-3, 10gbit tbf between nodes, 20 steps: tokens/s {tps(pp):,.0f} vs {tps(plain):,.0f} "
          f"(x{tps(pp) / tps(plain):.2f}); peak {mem(pp):.1f} vs {mem(plain):.1f} GiB; "
          f"loss at step 20 {pp[20]['loss']:.4f} vs {plain[20]['loss']:.4f}; step-wise loss difference: mean {mean:.2%}, "
          f"largest {worst:.2%} " + ("(within 1%)" if worst <= 0.01 else "(MORE than 1%)"))
EOF
}

# ------------------------------------------------------------------------------------------- main
step "start: part=$PART, repo $REPO, python $PY"
[ -d .gpuwheels ] && [ -d .gpudebs ] || fail "carry .gpuwheels and .gpudebs (scripts/fetch_gpu_debs.sh) to this machine"
if [ "$PART" = tools ]; then setup_tools; finish 0; fi  # the wrappers alone (tried on a CPU machine)
[ -n "${CPU_DRYRUN:-}" ] || setup_python
setup_tools
sandbox_up
case $PART in
    flow) flow ;;
    zeropp) zeropp ;;
    all)
        flow
        # the quantized run JIT-builds DeepSpeed's quantizer with nvcc first: keep the call under 10 minutes
        if [ "$(elapsed)" -lt 240 ]; then zeropp; else say "zeropp skipped: $(elapsed) s used; run: bash benchmarks/gpu_sandbox.sh zeropp"; fi ;;
    *) fail "unknown part $PART (all|flow|zeropp)" ;;
esac
finish 0
