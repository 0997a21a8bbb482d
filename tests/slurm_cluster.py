"""A real one-node Slurm cluster on this machine, for tests and for trying the Slurm presets.

    python tests/slurm_cluster.py start /tmp/treeffn-slurm   # prints the SLURM_CONF line to export
    python tests/slurm_cluster.py stop /tmp/treeffn-slurm

Needs Debian's slurm-wlm and munge packages (apt-get install -y slurm-wlm munge) and root
(slurmd starts every job as its submitter). Everything lives in the one folder: slurm.conf, a
munge key and socket of its own, state, spool, logs and pid files; the two ports are picked free.
Nothing in /etc or /run is used, so it can run beside another munge or Slurm.

It is a plain cluster with accounting off (no slurmdbd), so `sacct` cannot answer: submitit then
learns that a job is done only from the result file the job writes, and waits on a job killed
before writing one. Slurm itself (sbatch, squeue, scancel, arrays, signals) is the real thing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol", "srun")


def unavailable() -> str | None:
    """Why a local cluster cannot start here (None when it can)."""
    missing = [p for p in DAEMONS + CLIENTS if not shutil.which(p)
               and not Path("/usr/sbin", p).exists()]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}); "
                f"install with: apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts jobs as their submitter)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


class LocalSlurm:
    def __init__(self, folder: Path, cpus: int | None = None):
        self.folder = Path(folder).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.folder / "slurm.conf"
        self.host = socket.gethostname()

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: what sbatch/squeue (and submitit, and its jobs) need."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------- start / stop
    def start(self, timeout: float = 60) -> "LocalSlurm":
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        for sub in ("munge", "state", "spool", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        env = self.env
        for daemon in ("slurmctld", "slurmd"):  # both fork into the background once running
            subprocess.run([_binary(daemon)], env=env, check=True, capture_output=True, timeout=30)
        self._wait_idle(timeout)
        return self

    def _start_munge(self) -> None:
        munge = self.folder / "munge"
        munge.chmod(0o700)
        key = munge / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        # --force: munged refuses root and loose folder permissions otherwise
        subprocess.run([_binary("munged"), "--force", f"--socket={munge / 'munge.socket'}", f"--key-file={key}",
                        f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
                        f"--seed-file={munge / 'munged.seed'}"], check=True, capture_output=True, timeout=30)

    def _write_conf(self) -> None:
        f = self.folder
        memory = max(512, int(_memory_mb() * 0.8))
        self.conf.write_text("\n".join([
            "# Written by tests/slurm_cluster.py: a one-node cluster in one folder, accounting off.",
            "ClusterName=treeffn-local",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={f / 'munge' / 'munge.socket'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",          # seconds between SIGTERM and SIGKILL when a job is cancelled
            "MinJobAge=600",       # finished jobs stay visible to squeue/scontrol for 10 minutes
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}",
            f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN",
            "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            state = out.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the local Slurm node did not become idle in {timeout:.0f} s (sinfo: {state!r}); "
                           f"see {self.folder / 'log'}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end the three daemons this helper started (by pid file)."""
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "--quiet", "--user", str(os.getuid())], env=self.env,
                           capture_output=True, timeout=30)
            self.wait_empty(timeout=30)
        for pid_file in (self.folder / "slurmd.pid", self.folder / "slurmctld.pid",
                         self.folder / "munge" / "munged.pid"):
            _end(pid_file)

    # ---------------------------------------------------------------- queries
    def jobs(self) -> list[dict]:
        """This cluster's queue: [{array_job, task, state, job}] (%F array job id, %K task id,
        %T state, %A the job id a running array task has of its own)."""
        out = subprocess.run(["squeue", "-h", "-o", "%F|%K|%T|%A"], env=self.env, capture_output=True, text=True)
        rows = []
        for line in out.stdout.splitlines():
            array_job, task, state, job = line.split("|")
            rows.append({"array_job": array_job, "task": task, "state": state, "job": job})
        return rows

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not [j for j in self.jobs() if j["state"] not in ("COMPLETED", "FAILED", "CANCELLED")]:
                return True
            time.sleep(1)
        return False


def _end(pid_file: Path, grace: float = 10) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        raise SystemExit("usage: python tests/slurm_cluster.py start|stop <folder>")
    cluster = LocalSlurm(Path(sys.argv[2]))
    if sys.argv[1] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
