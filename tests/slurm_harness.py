"""A real single-node SLURM cluster for tests: `scripts/slurm_cluster.sh` installs and runs the daemons, this module
drives it (submit, wait, read final states) and provides the session-scoped `slurm_cluster` fixture.

tests/conftest.py imports the fixture, so every test module shares one cluster per session (started on first use)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_cluster.sh"
# Daemons and admin tools live in /usr/sbin, which a non-login shell's PATH may lack. Appended, not prepended: jobs
# inherit this PATH (sbatch exports the environment), and the caller's entries (a venv's python) should win.
PATH = os.pathsep.join(filter(None, [os.environ.get("PATH"), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]))
DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "munged")
# squeue lists a job while it is in any of these; sacct reports them until the job has really ended.
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING",
          "STAGE_OUT", "STOPPED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT", "PREEMPTED"}


def _run(cmd: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _base_id(job_id: str) -> str:
    """'12_3' and '12_[4-7]' belong to array job 12."""
    return job_id.split("_", 1)[0]


class SlurmCluster:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.env: dict[str, str] = {}

    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether a cluster can be started here: the script needs root (munged runs as `munge`, jobs as root), and
        either the daemons already installed or apt-get to install them."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return False, "a SLURM test cluster needs root"
        missing = [d for d in DAEMONS if not shutil.which(d, path=PATH)]
        if not shutil.which("mariadbd", path=PATH) and not shutil.which("mysqld", path=PATH):
            missing.append("mariadbd")
        if not missing:
            return True, "SLURM installed"
        if shutil.which("apt-get", path=PATH):
            return True, f"root with apt-get (will install {', '.join(missing)})"
        return False, f"{', '.join(missing)} missing and no apt-get to install them"

    def _script(self, *args: str, timeout: float) -> None:
        # Output goes to a file, not a pipe: a daemon that kept an inherited pipe open would block the read.
        log = Path(self.dir.parent if self.dir else tempfile.gettempdir()) / f"slurm_cluster-{args[0]}.log"
        with open(log, "a") as f:
            rc = subprocess.run(["bash", str(SCRIPT), *args], stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, "PATH": PATH}).returncode
        if rc != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"slurm_cluster.sh {' '.join(args)} failed ({rc}), log {log}:\n{tail}")

    def install(self, timeout: float = 900) -> None:
        self._script("install", timeout=timeout)

    def start(self, directory: str | os.PathLike, nodes: int = 1) -> SlurmCluster:
        """nodes=1: this machine is the node; nodes>=2: n1..nN, each a network namespace on a private bridge with
        its own host name and slurmd (scripts/slurm_cluster.sh)."""
        self.dir = Path(directory).resolve()
        self._script("start", str(self.dir), str(nodes), timeout=300)
        self.env = {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf"), "PATH": PATH}
        return self

    def kill_node(self, name: str) -> None:
        """Lose node `name` (clusters of 2+ nodes): SIGKILL its slurmd and everything running in it."""
        self._script("node-kill", str(self.dir), name, timeout=60)

    def start_node(self, name: str) -> None:
        """Bring a lost node back: its slurmd again, until slurmctld has it idle."""
        self._script("node-start", str(self.dir), name, timeout=120)

    def stop(self) -> None:
        if self.dir is not None:
            self._script("stop", str(self.dir), timeout=120)

    def sbatch(self, args: list[str]) -> str:
        """Submit; returns the job id (the array job id for --array)."""
        p = _run(["sbatch", "--parsable", *args], self.env)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed: {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"

    def _listed(self, wanted: set[str]) -> list[tuple[str, str]]:
        """(job or task id, state) for squeue's records of `wanted`: a pending array shows as '12_[0-1]', each
        started task as '12_0'; finished jobs stay listed with `-t all` for MinJobAge (300 s)."""
        p = _run(["squeue", "-h", "-t", "all", "-o", "%F %i %T"], self.env)
        if p.returncode != 0:
            raise RuntimeError(f"squeue failed: {p.stderr.strip()}")
        rows = [line.split() for line in p.stdout.splitlines()]
        return [(i, st) for a, i, st in (r for r in rows if len(r) == 3)
                if a in wanted or i in wanted or _base_id(i) in wanted]

    def active(self, job_ids: list[str]) -> bool:
        """Whether squeue shows any of `job_ids` pending or running."""
        return any(st in ACTIVE for _, st in self._listed({str(j) for j in job_ids}))

    def wait(self, job_ids: list[str], timeout: float = 120) -> None:
        """Until squeue shows none of `job_ids` (array job ids and task ids alike) pending or running."""
        wanted = {str(j) for j in job_ids}
        deadline = time.monotonic() + timeout
        while active := [f"{i} {st}" for i, st in self._listed(wanted) if st in ACTIVE]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still active after {timeout} s: {active}")
            time.sleep(0.5)

    def states(self, job_ids: list[str], timeout: float = 30) -> dict[str, str]:
        """Final state of each job and array task, e.g. {'12_0': 'COMPLETED', '12_1': 'FAILED', '13': 'CANCELLED'}.

        From sacct (slurmdbd), polled until it has a final state for every job and task squeue still lists: slurmdbd
        lags a few seconds behind slurmctld, and meanwhile may show a finished array only as its last task under the
        bare array id ('12'). sacct prints 'CANCELLED by <uid>' for scancel; only the first word is kept. Where
        sacct does not work (accounting down or not configured) the jobcomp/filetxt record is read instead: the same
        state names, written by slurmctld itself as each job ends."""
        wanted = {str(j) for j in job_ids}
        expected = {i for i, _ in self._listed(wanted)}
        deadline = time.monotonic() + timeout
        while True:
            p = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted(wanted))], self.env)
            if p.returncode != 0:
                return self._jobcomp_states(wanted)
            found = {}
            for line in p.stdout.splitlines():
                job, _, state = line.partition("|")
                if job in wanted or _base_id(job) in wanted:
                    found[job] = state.split()[0] if state else ""
            complete = expected <= found.keys() if expected else {_base_id(j) for j in found} >= wanted
            if complete and not ACTIVE & set(found.values()):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"sacct has no final state for all of {sorted(expected or wanted)} after "
                                   f"{timeout} s: {found}")
            time.sleep(0.5)

    def _jobcomp_states(self, wanted: set[str]) -> dict[str, str]:
        """Fallback: one 'Key=Value ...' line per finished job; array tasks carry ArrayJobId/ArrayTaskId."""
        found = {}
        path = self.dir / "log" / "jobcomp.txt"
        for line in path.read_text().splitlines() if path.exists() else []:
            kv = dict(re.findall(r"(\w+)=(\S*)", line))
            job = f"{kv['ArrayJobId']}_{kv['ArrayTaskId']}" if "ArrayTaskId" in kv else kv.get("JobId", "")
            if job in wanted or _base_id(job) in wanted:
                found[job] = kv.get("JobState", "")
        return found


# Two jobs side by side on a 2-core node: one core and a little memory each.
SMALL_JOBS = [f"launcher.{kind}.{key}={value}" for kind in ("generate", "score", "margin", "light", "train")
              for key, value in (("cpus_per_task", 1), ("mem", "3G"), ("time", "00:20:00"))]


def submit_run(cluster: SlurmCluster, env: dict[str, str], *overrides: str) -> list[dict]:
    """`selfplay submit OVERRIDES` against `cluster` with `env` added (the jobs inherit it); the submitted jobs as
    <run>/slurm/jobs.json lists them (name, id, array)."""
    import json
    import sys

    tests = Path(__file__).resolve().parent
    full_env = {**cluster.env, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    out = subprocess.run([sys.executable, "-m", "selfplay.cli", "submit", *overrides], capture_output=True, text=True,
                         env=full_env, cwd=tests.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    values = dict(o.split("=", 1) for o in overrides if o.startswith(("output_root=", "run_name=")))
    return json.loads((Path(values["output_root"]) / values["run_name"] / "slurm" / "jobs.json").read_text())["jobs"]


def _unavailable(reason: str) -> None:
    # CI must never skip the cluster tests silently.
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"SLURM cluster unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"SLURM cluster unavailable: {reason}")


def _session_cluster(tmp_path_factory, nodes: int):
    ok, reason = SlurmCluster.available()
    if not ok:
        _unavailable(reason)
    cluster = SlurmCluster()
    try:
        cluster.install()
        cluster.start(tmp_path_factory.mktemp("slurm") / "cluster", nodes)
    except Exception as e:
        reason = str(e)
        try:
            cluster.stop()  # whatever did start
        except Exception as stop_error:
            reason += f"\nstop also failed: {stop_error}"
        _unavailable(reason)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    yield from _session_cluster(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def slurm_cluster_2nodes(tmp_path_factory):
    """Two nodes, n1 and n2, inside this machine (network + UTS namespaces, one slurmd each)."""
    yield from _session_cluster(tmp_path_factory, 2)
