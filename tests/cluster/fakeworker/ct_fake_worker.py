"""A stand-in for `python -m clustertune.worker` in launcher tests: no torch, starts in
milliseconds, and reports what a rank sees (rank env, interface, node address, secrets).

    CLUSTERTUNE_WORKER_MODULE=ct_fake_worker PYTHONPATH=tests/cluster/fakeworker clustertune launch ...

CLUSTERTUNE_FAKE_SHOW=NAME,NAME: also report those variables' values.
CLUSTERTUNE_FAKE_MODE: ok (report, exit 0) | fail:R (rank R exits 3, the others wait) | sleep |
bar (a progress bar on stderr, redrawn with \r as tqdm does, then exit 0)
"""

import hashlib
import json
import os
import socket
import sys
import time


def main(argv):
    from clustertune.secrets import is_secret_name
    recipe = argv[0]
    # What the launcher put in the environment itself, before the secrets file is read.
    secrets_in_environ = sorted(k for k in os.environ if is_secret_name(k))
    secrets_loaded = 0
    if os.environ.get("CLUSTERTUNE_SECRETS_FILE"):
        from clustertune.secrets import load_secrets_file
        secrets_loaded = load_secrets_file(os.environ["CLUSTERTUNE_SECRETS_FILE"])
    token = os.environ.get("HF_TOKEN", "")
    on_cmdline = False
    if token:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        on_cmdline |= token.encode() in f.read()
                except OSError:
                    pass
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((os.environ["MASTER_ADDR"], 9))
    src = s.getsockname()[0]
    s.close()
    report = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                             "MASTER_PORT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
                                             "DS_ACCELERATOR", "NCCL_DEBUG", "CLUSTERTUNE_RUN_ID", "OMP_NUM_THREADS")}
    report.update(src=src, recipe=recipe, argv=argv[1:], secrets_loaded=secrets_loaded,
                  hf_token_sha=hashlib.sha256(token.encode()).hexdigest()[:16] if token else None,
                  my_token_sha=hashlib.sha256(os.environ.get("MY_TOKEN", "").encode()).hexdigest()[:16],
                  secret_on_cmdline=on_cmdline, pid=os.getpid(), secrets_in_environ=secrets_in_environ,
                  env_names=sorted(os.environ),
                  shown={k: os.environ.get(k) for k in os.environ.get("CLUSTERTUNE_FAKE_SHOW", "").split(",") if k})
    print("FAKE " + json.dumps(report), flush=True)
    mode = os.environ.get("CLUSTERTUNE_FAKE_MODE", "ok")
    rank = int(os.environ["RANK"])
    if mode.startswith("fail:"):
        if rank == int(mode.split(":")[1]):
            time.sleep(1.5)
            print("FAKE failing on purpose", flush=True)
            return 3
        mode = "sleep"
    if mode == "bar":
        for i in range(1, 4):
            sys.stderr.write(f"\rbar {i}/3")
            sys.stderr.flush()
            time.sleep(0.1)
        sys.stderr.write("\n")
        return 0
    if mode == "sleep":
        print("FAKE sleeping", flush=True)
        for _ in range(600):
            time.sleep(0.5)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
