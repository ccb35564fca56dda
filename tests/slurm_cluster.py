"""A single-host SLURM cluster for tests: Debian's slurmctld, slurmd and munge, started as processes
the test owns (in the foreground, each stopped by its PID), with configuration, keys, sockets,
state and logs under one temporary folder.

`ensure_installed()` installs the Debian packages when the machine lacks them (as root, the way
CI runs). The configuration keeps to what runs anywhere: `proctrack/linuxproc`, `task/none`, no
accounting, no GPUs (an sbatch recipe's GPU request is overridden on sbatch's command line).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from sara_megatron.distributed import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "sinfo", "munged")
NODE = "localhost"


def ensure_installed(timeout: int = 600) -> None:
    """Install Debian's SLURM and munge packages unless their commands are already here."""
    if all(shutil.which(c) or Path("/usr/sbin", c).exists() for c in COMMANDS):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"SLURM is not installed and this is not root: apt-get install "
                           f"{' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=timeout,
                   capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                   check=True, env=env, timeout=timeout, capture_output=True)


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """One node (`localhost`) with `cpus` CPUs in one partition; `env` points SLURM's clients at
    it. Use as a context manager: the daemons stop (by PID) when it exits."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = root
        self.cpus = cpus
        self.processes: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def __enter__(self) -> "SlurmCluster":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        root = self.root
        for name in ("munge", "state", "spool", "log"):
            (root / name).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "munge", 0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = root / "munge" / "munge.socket"
        self._spawn([_sbin("munged"), "--foreground", "--force", f"--key-file={key}",
                     f"--socket={self.munge_socket}", f"--pid-file={root / 'munge/munged.pid'}",
                     f"--log-file={root / 'log/munged.log'}",
                     f"--seed-file={root / 'munge/munged.seed'}"])
        _wait_for(lambda: self.munge_socket.exists(), 20, "munged's socket", root / "log")
        self.conf.write_text(self._config())
        self._spawn([_sbin("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._spawn([_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", NODE])
        _wait_for(self._node_idle, 60, "the node to be idle", root / "log")

    def _config(self) -> str:
        root = self.root
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        lines = {
            "ClusterName": "saratest",
            "SlurmctldHost": NODE,
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "MpiDefault": "none",
            "SchedulerType": "sched/backfill",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "ReturnToService": 2,
            "StateSaveLocation": root / "state",
            "SlurmdSpoolDir": root / "spool",
            "SlurmctldPidFile": root / "state/slurmctld.pid",
            "SlurmdPidFile": root / "spool/slurmd.pid",
            "SlurmctldLogFile": root / "log/slurmctld.log",
            "SlurmdLogFile": root / "log/slurmd.log",
            "SlurmctldTimeout": 30,
            "SlurmdTimeout": 30,
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += (f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                 f"RealMemory={memory_mb} State=UNKNOWN\n")
        text += f"PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n"
        return text

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / (Path(cmd[0]).name + ".out"), "ab")
        self.processes.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log,
                                               stdin=subprocess.DEVNULL))

    def _node_idle(self) -> bool:
        for proc in self.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; logs in "
                                   f"{self.root / 'log'}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                             text=True, timeout=10)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
        """`sbatch --wait ARGS` (returns when the job ends); the completed process."""
        return subprocess.run(["sbatch", "--wait", *args], cwd=cwd, env={**self.env, **(env or {})},
                               capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """Stop the daemons this cluster started, newest first, by PID."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.processes = []


def _wait_for(ready, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}; logs in {logs}")
        time.sleep(0.3)


def hostname_resolves(name: str = NODE) -> bool:
    try:
        socket.gethostbyname(name)
    except OSError:
        return False
    return True
