"""`ray up cluster/onprem.yaml` for real: Ray's local provider against an SSH host on this machine.

The SSH host is ``sshd`` in namespaces of its own (``unshare --pid --fork --mount-proc --net``):

- its own PID namespace, so the ``ray stop`` that the shipped file runs on its hosts sees (and ends) only
  the host's processes: every other Ray on the machine (other tests, other users) survives, and a test
  checks that one started beside it does;
- its own network namespace with its own loopback, so the host's fixed ports (22, 6379, 8265: the shipped
  file's) never meet another Ray's; the client commands (``ray up``, ``ray dashboard``, ``ray job``) join
  that network namespace only (``nsenter --net``), as a laptop reaches its cluster's network;
- its own view of ``/tmp/ray`` (Ray's session folder and the local provider's state) and of root's home
  (a copy of /etc/passwd whose root home is a temporary folder), so ``~/revq-ray``, ``~/.ray/auth_token``
  and ``~/.bashrc`` that ``ray up`` writes on the host never touch this machine's.

The cluster file is the shipped one with only these lines changed (derived here, so the two cannot drift):
``head_ip`` -> 127.0.0.1, ``worker_ips`` -> [] (one machine: the local provider names nodes by IP, and a
second node would need a second PID namespace of its own), ``ssh_user`` -> root and ``ssh_private_key`` -> the
key generated here (the test's SSH identity), and the two setup lines that create and install the virtual
environment -> a link to the test's own (already installed) environment.

Then, as README tells users: ``ray up``, ``ray dashboard`` (the SSH tunnel), ``ray job submit`` of the debug
preset with token auth on and the job's checkpoints on an S3 server (moto, tests/cluster/s3server.py, in the
host's network) configured through the job's runtime_env env_vars, ``ray job logs``, ``ray down``; afterwards
no process of the cluster is left in the host's namespace and the Ray beside it still answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "cluster" / "onprem.yaml"
BIN = Path(sys.executable).parent
VENV = Path(sys.prefix)
CLUSTER = "revq-ray-onprem"
TUNNEL_PORT = 18265  # the client's end of `ray dashboard` (8265 is the head's, in the same network namespace)

# What the copy changes: (shipped text, replacement) with {key} and {venv} filled in.
CHANGES = [
    ("  head_ip: 10.0.0.10\n", "  head_ip: 127.0.0.1\n"),
    ("  worker_ips:\n    - 10.0.0.11\n    - 10.0.0.12\n", "  worker_ips: []\n"),
    ("  ssh_user: ubuntu\n", "  ssh_user: root\n"),
    ("  ssh_private_key: ~/.ssh/id_ed25519\n", "  ssh_private_key: {key}\n"),
    (
        "  - test -x ~/revq-venv/bin/python || python3.11 -m venv ~/revq-venv\n"
        "  - ~/revq-venv/bin/pip install -q -e ~/revq-ray\n",
        "  - ln -sfn {venv} ~/revq-venv\n",
    ),
]


def derive_onprem(shipped: str, key: str, venv: str) -> str:
    """The test's copy of cluster/onprem.yaml: the shipped text with exactly the lines of CHANGES replaced."""
    out = shipped
    for old, new in CHANGES:
        assert shipped.count(old) == 1, (
            f"cluster/onprem.yaml no longer holds {old!r} exactly once: update CHANGES in {__file__}"
        )
        out = out.replace(old, new.format(key=key, venv=venv))
    return out


@pytest.mark.cluster
def test_the_copy_differs_from_the_shipped_file_only_where_it_must():
    shipped = yaml.safe_load(SHIPPED.read_text())
    copy = yaml.safe_load(derive_onprem(SHIPPED.read_text(), "/k", "/v"))
    assert copy["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert copy["auth"] == {"ssh_user": "root", "ssh_private_key": "/k"}
    assert copy["setup_commands"] == ["ln -sfn /v ~/revq-venv", *shipped["setup_commands"][2:]]
    for k in set(shipped) - {"provider", "auth", "setup_commands"}:
        assert copy[k] == shipped[k], k
    # the start commands the test runs are the shipped ones: ray stop, then a token-auth head on loopback
    assert "ray stop" in copy["head_start_ray_commands"][0]
    assert "RAY_AUTH_MODE=token" in copy["head_start_ray_commands"][1]
    assert "--dashboard-host=127.0.0.1" in copy["head_start_ray_commands"][1]


# --------------------------------------------------------------------------------------------- the host
def _missing_tools() -> list[str]:
    tools = ["unshare", "nsenter", "ip", "ssh", "ssh-keygen", "rsync", "/usr/sbin/sshd"]
    return [t for t in tools if shutil.which(t) is None]


def _ns_pids(ns_of: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of every process in the PID namespace of ``ns_of``, from the machine's
    /proc (zombies included: they show what was not reaped, and are left out by the caller)."""
    want = os.readlink(f"/proc/{ns_of}/ns/pid")
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.readlink(p / "ns" / "pid") != want:
                continue
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append((int(p.name), state, cmd))
    return out


class Host:
    """sshd in its own PID, mount and network namespaces (see the module docstring); stop() ends them."""

    def __init__(self, root: Path):
        self.root = root
        self.home, self.client_home = root / "host_home", root / "client_home"
        for d in (self.home / ".sshd", self.client_home / ".ssh", self.client_home / ".ray", root / "raytmp"):
            d.mkdir(parents=True)
        self.key = self.client_home / ".ssh" / "id_ed25519"
        host_key = self.home / ".sshd" / "host_key"
        for k in (host_key, self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
        shutil.copy(f"{self.key}.pub", self.home / ".sshd" / "authorized_keys")
        (self.home / ".bashrc").write_text("")  # a host has one; the shipped setup appends to it
        token = secrets.token_hex(32)
        (self.client_home / ".ray" / "auth_token").write_text(token)  # `ray get-auth-token --generate`
        (self.client_home / ".ray" / "auth_token").chmod(0o600)
        (self.home / ".sshd" / "sshd_config").write_text(
            "Port 22\nListenAddress 127.0.0.1\n"
            f"HostKey {host_key}\nAuthorizedKeysFile {self.home / '.sshd' / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPidFile none\nLogLevel ERROR\n"
        )
        passwd = [
            ":".join([*f.split(":")[:5], str(self.home), *f.split(":")[6:]]) if f.startswith("root:") else f
            for f in Path("/etc/passwd").read_text().splitlines()
        ]
        (root / "passwd").write_text("\n".join(passwd) + "\n")
        Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point of the host's own /tmp/ray
        script = (
            "set -e; ip link set lo up; mkdir -p /run/sshd; "
            f"mount --bind {root / 'passwd'} /etc/passwd; mount --bind {root / 'raytmp'} /tmp/ray; "
            f"exec /usr/sbin/sshd -D -e -f {self.home / '.sshd' / 'sshd_config'}"
        )
        self.log = open(root / "sshd.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--", "bash", "-c", script],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"
        }
        self.env.update(HOME=str(self.client_home), RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ['PATH']}")
        self.s3 = None
        try:
            self.pid = self._sshd_pid()
        except BaseException:
            self.stop()
            raise

    def _sshd_pid(self) -> int:
        import psutil

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ssh = ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o",
                   "UserKnownHostsFile=/dev/null", "root@127.0.0.1", "true"]  # fmt: skip
            for c in psutil.Process(self.proc.pid).children():
                if "sshd" in " ".join(c.cmdline()) and self.run(ssh, c.pid, timeout=20).returncode == 0:
                    return c.pid
            time.sleep(0.5)
        raise AssertionError("sshd did not come up: " + (self.root / "sshd.log").read_text()[-2000:])

    def run(self, argv: list[str], pid: int | None = None, timeout: float = 600, **kw):
        """``argv`` in the host's network namespace (as a client on the cluster's network)."""
        return subprocess.run(
            ["nsenter", f"--net=/proc/{pid or self.pid}/ns/net", "--", *argv],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
            env=kw.pop("env", None) or self.env, **kw,
        )  # fmt: skip

    def popen(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen(
                ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv], stdout=f,
                stderr=subprocess.STDOUT, cwd=ROOT, env=self.env, start_new_session=True,
            )  # fmt: skip

    def start_s3(self) -> dict[str, str]:
        """moto's S3 server on the cluster network's 127.0.0.1:9000, with a bucket ``revq``."""
        self.s3 = subprocess.Popen(
            ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", sys.executable,
             str(ROOT / "tests" / "cluster" / "s3server.py"), "9000", "revq"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        return json.loads(self.s3.stdout.readline())

    def stop(self) -> None:
        for p in (self.s3, self.proc):
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # sshd is PID 1 there: its namespace ends with it
                p.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def host():
    if os.geteuid() != 0:
        pytest.skip("needs root: sshd in its own PID/network namespaces (CI runs as root)")
    missing = _missing_tools()
    if missing:
        pytest.skip(f"missing {missing}: apt-get install -y openssh-server rsync iproute2 (.ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="rqop", dir="/tmp"))
    state = [Path("/tmp/ray") / f"cluster-{CLUSTER}.{s}" for s in ("state", "lock")]
    had_state = [p.exists() for p in state]
    h = Host(root)
    try:
        yield h
    finally:
        h.stop()
        for p, had in zip(state, had_state):
            if not had:  # the client's local-provider state, written by `ray up` on this machine
                p.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ray_beside():
    """A Ray started on this machine outside the SSH host's namespaces (as another user's would be)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    yield ray
    ray.shutdown()


def _clean(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.cluster
@pytest.mark.extended
@pytest.mark.timeout(1800)
def test_ray_up_job_submit_and_down_on_an_ssh_host(host, ray_beside, tmp_path):
    import psutil

    beside = ray_beside.remote(lambda: os.getpid())
    beside_pid = ray_beside.get(beside.remote())
    gcs = ray_beside._private.worker._global_node.all_processes["gcs_server"][0].process.pid

    cfg = host.root / "onprem.yaml"
    cfg.write_text(derive_onprem(SHIPPED.read_text(), str(host.key), str(VENV)))
    up = host.run([str(BIN / "ray"), "up", "-y", "--no-config-cache", "--disable-usage-stats", str(cfg)])
    assert up.returncode == 0, _clean(up.stdout[-4000:] + up.stderr[-4000:])
    # the head runs inside the host's PID namespace, with token auth and its dashboard on loopback
    head = [c for _, s, c in _ns_pids(host.pid) if s != "Z" and "gcs_server" in c]
    assert head, _ns_pids(host.pid)

    tunnel = host.popen([str(BIN / "ray"), "dashboard", "--port", str(TUNNEL_PORT), str(cfg)],
                        tmp_path / "dashboard.log")  # fmt: skip
    try:
        address = f"http://127.0.0.1:{TUNNEL_PORT}"
        deadline = time.monotonic() + 120
        while True:
            listed = host.run([str(BIN / "ray"), "job", "list", "--address", address], timeout=60)
            if listed.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert listed.returncode == 0, _clean(listed.stderr[-3000:])
        # token auth is on: without the token the job API refuses the client
        anon = {**host.env, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}
        refused = host.run([str(BIN / "ray"), "job", "list", "--address", address], env=anon, timeout=60)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 and re.search(r"401|unauthori[sz]ed|token", said, re.I), said[-2000:]

        creds = host.start_s3()
        env_vars = {
            "AWS_ENDPOINT_URL": creds["endpoint"], "AWS_ACCESS_KEY_ID": creds["key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret"], "AWS_DEFAULT_REGION": "us-east-1",
            # the machine's DeepSpeed op cache (a fresh host builds its ops once, minutes on 2 cores)
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "revq_ray" / "torch_extensions")
            ),
        }  # fmt: skip
        job = host.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
             "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
             "python", "-m", "revq_ray.train", "--config", "configs/debug.yaml",
             "--set", "output_dir=s3://revq/runs", "--set", "train.epochs=1"],
            timeout=1200,
        )  # fmt: skip
        said = _clean(job.stdout + job.stderr)
        assert job.returncode == 0 and re.search(r"Job '\S+' succeeded", said), said[-5000:]
        job_id = re.search(r"Job '(\S+)' submitted successfully", said).group(1)
        logs = host.run([str(BIN / "ray"), "job", "logs", "--address", address, job_id], timeout=120)
        assert logs.returncode == 0, logs.stderr[-2000:]
        tail = logs.stdout[-3000:]
        assert "joined Ray cluster" in logs.stdout and "finished debug: step 15" in logs.stdout, tail
        assert "run dir s3://revq/runs/debug" in logs.stdout
        # the checkpoint, the export and the metrics are in the bucket
        listing = host.run(
            [sys.executable, "-c", "import pyarrow.fs as f, sys; fs = f.FileSystem.from_uri('s3://revq')[0]; "
             "print('\\n'.join(i.path for i in fs.get_file_info(f.FileSelector('revq/runs/debug', "
             "recursive=True))))"],
            env={**os.environ, **env_vars}, timeout=60,
        )  # fmt: skip
        keys = listing.stdout.split()
        assert any(re.match(r"revq/runs/debug/checkpoint_step\d+/trainer_state.json", k) for k in keys), keys
        for f in ("export/best/model.safetensors", "metrics.csv"):
            assert f"revq/runs/debug/{f}" in keys, keys
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tunnel.pid, signal.SIGTERM)
        tunnel.wait(timeout=30)

    down = host.run([str(BIN / "ray"), "down", "-y", str(cfg)])
    assert down.returncode == 0, _clean(down.stdout[-3000:] + down.stderr[-3000:])
    deadline = time.monotonic() + 60
    while True:  # ray stop ends the processes; give the kernel a moment to reap them
        left = [(p, c) for p, s, c in _ns_pids(host.pid) if s != "Z" and not c.startswith("sshd:")]
        # the closed tunnel's remote shell may linger a moment
        left = [x for x in left if "sleep" not in x[1] and "while true" not in x[1]]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, left
    # the Ray beside the host: same processes, still answering
    assert psutil.pid_exists(gcs) and psutil.pid_exists(beside_pid)
    assert ray_beside.get(beside.remote()) == beside_pid
