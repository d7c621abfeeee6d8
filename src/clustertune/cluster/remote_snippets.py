"""Self-contained programs that run on a node, sent as the stdin of `ssh NODE python3 -`.

The remote command line is always the constant `python3 -`: no user data is ever interpolated
into a remote shell string. The arguments travel inside the program as one JSON document in a
Python string literal (see `program()`), and the answer comes back as one JSON line after a
marker, so login banners or shell rc noise cannot be mistaken for it.

Standard library only, Python >= 3.8 on the remote side, and nothing here imports torch: the
version probe reads package metadata (importlib.metadata) without importing the packages.
This file is also importable locally, so every function is unit-testable without ssh.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

MARKER = "@@CLUSTERTUNE-RESULT@@"


def _emit(result):
    sys.stdout.write("\n" + MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def _cluster_dir(name):
    return os.path.join(os.path.expanduser("~"), ".clustertune", "clusters", name)


def _write_atomic(path, content, mode):
    """Write `content` to `path` with `mode` from the first byte (O_EXCL temp file + rename)."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, content.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ install

def install(a):
    """Give this node the cluster key, ssh config and known_hosts, and authorize the cluster key."""
    d = _cluster_dir(a["cluster"])
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(os.path.dirname(d)), 0o700)
    os.chmod(d, 0o700)
    written = []
    for f in a["files"]:
        content = f["content"].replace("@CLUSTER_DIR@", d) if f.get("template") else f["content"]
        path = os.path.join(d, f["name"])
        try:
            with open(path, encoding="utf-8") as handle:
                same = handle.read() == content
        except OSError:
            same = False
        if not same or (os.stat(path).st_mode & 0o777) != f["mode"]:
            _write_atomic(path, content, f["mode"])
            written.append(f["name"])
    ssh_dir = os.path.join(os.path.expanduser("~"), ".ssh")
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    auth = os.path.join(ssh_dir, "authorized_keys")
    key = a["authorized_key"].strip()
    blob = key.split()[1]
    try:
        with open(auth, encoding="utf-8") as handle:
            present = any(len(line.split()) > 1 and blob in line.split() for line in handle)
    except FileNotFoundError:
        present = False
    if not present:
        fd = os.open(auth, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size:
                with open(auth, "rb") as handle:
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        os.write(fd, b"\n")
            os.write(fd, (key + "\n").encode("utf-8"))
        finally:
            os.close(fd)
    return {"home": os.path.expanduser("~"), "dir": d, "written": written,
            "authorized": "present" if present else "added", "python3": sys.executable}


# ------------------------------------------------------------------------------------- matrix

def _ssh_check(config, peer, timeout):
    argv = ["ssh", "-F", config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=%d" % timeout, peer, "true"]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout + 10)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timed out"}
    except FileNotFoundError:
        return {"ok": False, "error": "ssh client not installed"}
    err = [line for line in p.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    error = "" if p.returncode == 0 else (err[-1] if err else "exit %d" % p.returncode)
    return {"ok": p.returncode == 0, "error": error, "stderr": "\n".join(err[-5:])}


def matrix(a):
    """ssh (BatchMode, this node's own cluster config) from this node to every peer."""
    config = os.path.join(_cluster_dir(a["cluster"]), "ssh_config")
    if not os.path.exists(config):
        return {"error": "no cluster ssh config at %s (run `clustertune cluster ssh`)" % config}
    results = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, _ssh_check(config, p, a["timeout"])))
               for p in a["peers"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"peers": results}


# -------------------------------------------------------------------------------------- probe

_VERSIONS = r"""
import json, sys
try:
    from importlib import metadata
except ImportError:
    metadata = None
out = {"python_version": "%d.%d.%d" % sys.version_info[:3], "executable": sys.executable}
for name in ("torch", "deepspeed", "transformers", "clustertune"):
    try:
        out[name] = metadata.version(name) if metadata else None
    except Exception:
        out[name] = None
if out["clustertune"] is None:  # on PYTHONPATH without being installed: its own version (no torch import)
    try:
        import clustertune
        out["clustertune"] = getattr(clustertune, "__version__", None)
    except Exception:
        pass
print(json.dumps(out))
"""


def _versions(python):
    try:
        p = subprocess.run([python, "-c", _VERSIONS], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"error": str(err)}
    if p.returncode != 0:
        return {"error": p.stderr.decode("utf-8", "replace").strip()[-300:]}
    return json.loads(p.stdout.decode().strip().splitlines()[-1])


def _iface_of_address(addr):
    try:
        p = subprocess.run(["ip", "-o", "addr", "show"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           timeout=10)
        for line in p.stdout.decode().splitlines():
            parts = line.split()
            if len(parts) > 3 and parts[3].split("/")[0] == addr:
                return parts[1].split("@")[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


def route_to(addr):
    """The interface and source address this node uses to reach `addr` (`ip route get`); when
    `addr` is one of this node's own addresses (the master itself), the interface holding it."""
    dev = src = None
    try:
        p = subprocess.run(["ip", "-o", "route", "get", addr], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=10)
        words = p.stdout.decode().split()
        if "dev" in words:
            dev = words[words.index("dev") + 1]
        if "src" in words:
            src = words[words.index("src") + 1]
        if p.returncode != 0:
            return {"dev": None, "src": None, "error": p.stderr.decode().strip()}
    except (OSError, subprocess.TimeoutExpired):
        try:  # no iproute2: ask the kernel which source address it would use
            s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
            s.connect((addr, 9))
            src = s.getsockname()[0]
            s.close()
        except OSError as err:
            return {"dev": None, "src": None, "error": str(err)}
    if dev in (None, "lo") and src:
        dev = _iface_of_address(addr if dev == "lo" else src) or dev
    return {"dev": dev, "src": src, "error": None}


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _gpu_memory(smi):
    """[name, MiB] of the node's smallest GPU (what train.micro_batch_tokens "auto" is planned for),
    None when nvidia-smi does not say."""
    try:
        p = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        rows = [line.rsplit(",", 1) for line in p.stdout.decode().splitlines() if "," in line]
        gpus = [[name.strip(), float(mib)] for name, mib in rows]
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return min(gpus, key=lambda g: g[1]) if p.returncode == 0 and gpus else None


def probe(a):
    out = {"hostname": socket.gethostname(), "home": os.path.expanduser("~"), "uid": os.getuid()}
    py = a["python"]
    out["python_exists"] = os.path.isfile(py) and os.access(py, os.X_OK)
    out["versions"] = _versions(py) if out["python_exists"] else None
    out["paths"] = {p: os.path.exists(p) for p in a.get("paths", [])}
    out["pdsh"] = shutil.which("pdsh")
    smi = shutil.which("nvidia-smi")
    out["gpus"] = None
    if smi:
        try:
            p = subprocess.run([smi, "-L"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
            out["gpus"] = sum(1 for line in p.stdout.decode().splitlines() if line.startswith("GPU "))
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # a node restricted to some GPUs (the sandbox's)
            if visible is not None:
                out["gpus"] = min(out["gpus"], len([d for d in visible.split(",") if d.strip() not in ("", "-1")]))
            if p.returncode != 0:
                out["gpu_error"] = p.stderr.decode("utf-8", "replace").strip()[-200:]
            out["gpu_memory"] = _gpu_memory(smi)
        except (OSError, subprocess.TimeoutExpired) as err:
            out["gpu_error"] = str(err)
    out["route"] = route_to(a["master_addr"])
    try:
        out["nics"] = sorted(name for _, name in socket.if_nameindex())
    except OSError:
        out["nics"] = []
    disk_at = _nearest_existing(a["output_dir"])
    usage = shutil.disk_usage(disk_at)
    out["disk"] = {"path": disk_at, "free": usage.free}
    try:
        st = os.statvfs("/dev/shm")
        out["shm"] = st.f_blocks * st.f_frsize
    except OSError:
        out["shm"] = None
    token = a.get("write_token")
    if token:
        token_path = os.path.join(_nearest_existing(a["output_dir"]), token)
        try:
            _write_atomic(token_path, "clustertune shared-filesystem probe\n", 0o644)
            out["token_path"] = token_path
        except OSError as err:
            out["token_error"] = str(err)
    return out


# --------------------------------------------------------------------- master port listen/connect

def listen(a):
    """Listen on the master address/port; print READY; record the node name sent by each
    connection until every expected node has connected (or the timeout); then remove the
    shared-filesystem token and report. (stdin carries this program, so it cannot signal "stop".)"""
    srv = socket.socket(socket.AF_INET6 if ":" in a["addr"] else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind((a["addr"], a["port"]))
        srv.listen(64)
    except OSError as err:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        _remove(a.get("token_path"))
        return {"bound": False, "error": "%s (errno %s)" % (err.strerror, err.errno), "seen": []}
    seen = []
    expect = set(a.get("expect", []))
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    deadline = time.time() + a.get("timeout", 30)
    srv.settimeout(0.2)
    while time.time() < deadline and not expect.issubset(seen):
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        try:
            conn.settimeout(5)
            conn.sendall(a["nonce"].encode() + b"\n")
            seen.append(conn.recv(256).decode("utf-8", "replace").strip())
        except OSError:
            pass
        finally:
            conn.close()
    srv.close()
    _remove(a.get("token_path"))
    return {"bound": True, "seen": seen}


def _remove(path):
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def connect(a):
    out = {}
    if a.get("token_path"):  # before connecting: the master removes its token once all have connected
        out["token_seen"] = os.path.exists(a["token_path"])
    try:
        s = socket.create_connection((a["addr"], a["port"]), timeout=a.get("timeout", 5))
        s.settimeout(5)
        got = s.recv(256).decode("utf-8", "replace").strip()
        s.sendall(a["name"].encode() + b"\n")
        s.close()
        out["port_ok"] = got == a["nonce"]
        out["port_error"] = None if out["port_ok"] else "something else answered on this port"
    except OSError as err:
        out["port_ok"] = False
        out["port_error"] = err.strerror or str(err)
    if a.get("peers"):
        out["matrix"] = matrix({"cluster": a["cluster"], "peers": a["peers"], "timeout": a.get("ssh_timeout", 5)})
    return out


# ------------------------------------------------------------------------------ run staging/kill

def stage(a):
    """Write a run's files (recipe, env file, secrets file) at the same absolute paths as on the
    launching host, unless identical files are already there (a shared filesystem)."""
    written = []
    for f in a["files"]:
        path = f["path"]
        try:
            with open(path, encoding="utf-8") as handle:
                if handle.read() == f["content"]:
                    continue
        except OSError:
            pass
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, f["content"], f["mode"])
        written.append(path)
    for path in a.get("remove", []):
        _remove(path)
    return {"written": written}


def _run_pids(run_id):
    marker = ("CLUSTERTUNE_RUN_ID=%s" % run_id).encode()
    uid, me = os.getuid(), os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat("/proc/" + entry).st_uid != uid:
                continue
            with open("/proc/%s/environ" % entry, "rb") as handle:
                if marker in handle.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_run(a):
    """Stop every process of one run on this node: exactly the processes of this user whose
    environment carries CLUSTERTUNE_RUN_ID=<run id> (set for this run only), TERM then KILL."""
    pids = _run_pids(a["run_id"])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + a.get("grace", 5)
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    killed = []
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return {"terminated": pids, "killed": killed}


def list_run(a):
    return {"pids": [p for p in _run_pids(a["run_id"]) if _alive(p)]}


COMMANDS = {"install": install, "matrix": matrix, "probe": probe, "listen": listen, "connect": connect,
            "stage": stage, "kill_run": kill_run, "list_run": list_run}


def _main(payload):
    args = json.loads(payload)
    try:
        result = COMMANDS[args["command"]](args["args"])
    except Exception as err:  # report, never hang: the caller shows this as the node's error
        result = {"exception": "%s: %s" % (type(err).__name__, err)}
    _emit(result)
