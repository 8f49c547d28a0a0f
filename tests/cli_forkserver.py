"""The real `selfplay` command, started many times for the price of one interpreter start.

A test suite that runs `python -m selfplay.cli ...` a few hundred times spends most of its processor time importing
torch, transformers and TRL again in every process (about 5 s of CPU each on a 2-core machine). This module keeps one
server process per test process that has imported them once; each command is a child forked from it that runs
`selfplay.cli.main(argv)` exactly as the console script does, in its own session (so it can be signalled or killed
like any process), with the command's own environment, working directory, stdin from /dev/null and stdout/stderr to
files. What the child does after the fork is the real command: only the interpreter start and the imports are shared.

Fork safety: the server imports and never computes, and it refuses to serve (the client then starts ordinary
processes) if importing left any thread running, since a forked child only has the thread that forked it.

SELFPLAY_TEST_FORKSERVER=0 turns it off: every command is then an ordinary `python -m selfplay.cli` process.
A command whose environment differs from the server's in a variable read when a library is imported (see
`IMPORT_TIME_ENV`) also gets an ordinary process.

Protocol (one connection per command, a JSON line each way): the client sends {argv, env, cwd, stdout, stderr}; the
server answers {"pid": N} once the child runs, then {"returncode": R} when it ends (R < 0: killed by signal -R).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
# Imported once by the server: what a run imports before its first stage does any work.
PRELOAD = ["selfplay.cli", "torch", "transformers", "trl", "datasets", "pandas", "pyarrow.parquet", "accelerate",
           "safetensors.torch", "peft", "matplotlib.pyplot", "selfplay.stages.train", "selfplay.stages.generate",
           "selfplay.stages.margin", "selfplay.stages.score", "selfplay.stages.eval"]
# Read once, when a library is imported (OpenMP's thread count when libgomp loads, hub settings when
# huggingface_hub does): a command that sets one of these differently needs a fresh interpreter.
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE",
                   "PYTHONHASHSEED", "CUDA_VISIBLE_DEVICES", "VLLM_TARGET_DEVICE", "MPLBACKEND")


def _threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


def _run_child(request: dict) -> NoReturn:
    """In the forked child: become the command. It returns or raises out of `serve` to the interpreter's top level,
    which exits as `python -m selfplay.cli` would: the exit status, a traceback for an uncaught exception, and the
    interpreter's exit handlers (Ray's shutdown, temp directories)."""
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        # A foreground interpreter's Ctrl-C: KeyboardInterrupt, whatever the server inherited.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # `python -m` puts the working directory first, then PYTHONPATH's entries.
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [request["cwd"], *extra, *[p for p in sys.path[1:] if p not in extra]]
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = ["selfplay", *request["argv"]]
        from selfplay.cli import main
    except BaseException:  # noqa: BLE001 (the command never started: say why, exit 1)
        traceback.print_exc()
        os._exit(1)
    sys.exit(main(request["argv"]))


def serve(address: str) -> None:
    """The server's loop: fork a child per request, report its pid and then its exit status."""
    import importlib
    import threading

    # numpy's OpenBLAS and pyarrow's jemalloc start native threads when loaded, and both re-arm them in a forked
    # child (pthread_atfork), as every DataLoader worker relies on; any other thread makes forking unsafe.
    import numpy  # noqa: F401
    import pyarrow  # noqa: F401

    fork_safe_threads = _threads()
    for name in PRELOAD:
        importlib.import_module(name)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address + ".tmp")
    listener.listen(64)
    if threading.active_count() != 1 or _threads() != fork_safe_threads:  # a fork copies only this thread
        Path(address + ".refused").write_text(f"{_threads()} threads after imports ({fork_safe_threads} from "
                                              f"numpy and pyarrow; Python threads: {threading.active_count()})")
        return
    os.rename(address + ".tmp", address)  # ready: the client waits for this name
    waiting: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener], [], [], 0.02)
        if readable:
            conn, _ = listener.accept()
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                line += chunk
            if not line.endswith(b"\n"):
                conn.close()
                continue
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in waiting.values():
                    other.close()
                conn.close()
                _run_child(request)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
                conn.close()
        if os.getppid() != parent:  # the test process is gone: so are we
            return


class ForkedCommand:
    """A command run by the server, with the parts of subprocess.Popen the tests use."""

    def __init__(self, conn: socket.socket, argv: list[str], out: Path, err: Path, text: bool) -> None:
        self._conn, self.args, self._out, self._err, self._text = conn, argv, out, err, text
        self._buffer = b""
        self.returncode: int | None = None
        self.pid = int(self._message(None)["pid"])

    def _message(self, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._conn], [], [], left)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout)
            chunk = self._conn.recv(65536)
            if not chunk:
                raise RuntimeError("the selfplay fork server went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.wait(timeout=0)
            except subprocess.TimeoutExpired:
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = int(self._message(timeout)["returncode"])
            self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str] | tuple[bytes, bytes]:
        out, err = self._out.read_bytes(), self._err.read_bytes()
        return (out.decode(errors="replace"), err.decode(errors="replace")) if self._text else (out, err)

    def communicate(self, timeout: float | None = None):
        self.wait(timeout)
        return self.output()


class ForkServer:
    """One server per test process, started on first use and stopped with the process."""

    def __init__(self) -> None:
        self.dir: Path | None = None  # made on first use: a process that never forks (xdist's controller) leaves none
        self._proc: subprocess.Popen | None = None
        self._count = 0
        self.refused: str | None = None

    def directory(self) -> Path:
        """This process's folder for the server's socket and the commands' output files (plain ones too)."""
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="selfplay-fork-", dir="/tmp"))
        return self.dir

    def _ensure(self) -> bool:
        if self.refused is not None:
            return False
        if self._proc is None:
            self._address = str(self.directory() / "sock")
            self._proc = subprocess.Popen([sys.executable, __file__, self._address], cwd=ROOT, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=open(self.dir / "server.log", "w"))  # noqa: SIM115
            deadline = time.monotonic() + 300
            while not os.path.exists(self._address):
                if os.path.exists(self._address + ".refused") or self._proc.poll() is not None:
                    self.refused = (Path(self._address + ".refused").read_text()
                                    if os.path.exists(self._address + ".refused")
                                    else (self.dir / "server.log").read_text()[-2000:])
                    return False
                if time.monotonic() > deadline:
                    self.refused = "not ready after 300 s"
                    return False
                time.sleep(0.05)
        return True

    def start(self, argv: list[str], env: dict[str, str], cwd: Path | str = ROOT, text: bool = True) -> ForkedCommand | None:
        """The command forked from the server, or None where it must be a fresh interpreter."""
        if os.environ.get("SELFPLAY_TEST_FORKSERVER", "1") == "0":
            return None
        if any(env.get(k) != os.environ.get(k) for k in IMPORT_TIME_ENV) or not self._ensure():
            return None
        self._count += 1
        out, err = self.dir / f"{self._count}.out", self.dir / f"{self._count}.err"
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self._address)
        request = {"argv": list(argv), "env": dict(env), "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        conn.sendall(json.dumps(request).encode() + b"\n")
        return ForkedCommand(conn, list(argv), out, err, text)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self.dir is not None:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])
