"""Warm stage processes for `imgclf run`: a preloaded fork server for the DVC stage commands.

Each stage is still `python -m tasks.<stage>`, run by DVC (which decides what is stale and writes dvc.lock).
Under `imgclf run`, the command hands its working folder, environment, arguments and stdin/stdout/stderr to a
host process that imported the heavy libraries once (Great Expectations, pandas, torch, MLflow, ONNX; seconds
per stage otherwise). The host forks a child that runs the stage's `main` exactly as the command would, and the
command exits with the child's exit status. The stage's own code (tasks/, flows/) is imported fresh in the
child, from the command's working folder, so DVC experiments' copies run their own code.

The host is used only where fork is safe and cheap (Linux), never touches CUDA before forking, and stops when
the run ends. Its socket lives in a private (0700) temporary folder. If it cannot be reached the command runs the stage itself, as `dvc repro` always does.
`IMGCLF_WARM_STAGES=0` switches it off."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

ENV = "IMGCLF_STAGE_HOST"  # the host's socket path, set by `imgclf run` for the stage commands it starts
SWITCH = "IMGCLF_WARM_STAGES"  # "0" / "false" / "off": every stage starts its own interpreter

# In the order the stages need them: validate and split (contract), then train, then evaluate (ONNX).
PRELOAD = ("numpy", "PIL.Image", "pandas", "great_expectations", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.pyfunc", "torch", "torchvision", "torch._dynamo", "torch._inductor.config", "matplotlib.figure",
           "onnx", "onnxruntime")

# What a stage waits for before it is forked (the last PRELOAD entry it uses); unlisted: the whole list.
READY_AFTER = {"tasks.validate": "great_expectations", "tasks.split": "great_expectations",
               "tasks.tracking": "mlflow.store.tracking.sqlalchemy_store", "tasks.train": "matplotlib.figure"}

_HEADER = struct.Struct("!I")


def enabled() -> bool:
    """Warm stages are possible here: fork exists and is safe (Linux) and the user did not switch them off."""
    return sys.platform == "linux" and os.environ.get(SWITCH, "1").lower() not in {"0", "false", "off", "no"}


# ---------------------------------------------------------------------------------------------- the command


def check_no_arguments(module: str, argv: list[str] | None = None) -> None:
    """A stage command takes no arguments (DVC runs it with none; it reads params.yaml): `--help` describes it
    and exits, and any other argument is an error (exit 2) instead of being ignored by a stage that then runs."""
    import argparse

    main = sys.modules.get("__main__")
    doc = main.__doc__ if main is not None and getattr(main, "__spec__", None) and main.__spec__.name == module \
        else getattr(sys.modules.get(module), "__doc__", None)
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A DVC stage (dvc.yaml): it reads params.yaml and takes no arguments. Run it with `dvc repro` or "
               "`imgclf run`; change params for one run with `imgclf run --set` or `dvc exp run -S`.")
    parser.parse_args(sys.argv[1:] if argv is None else argv)


def run_main(module: str, main: Callable[[], None]) -> None:
    """A stage module's `__main__`: hand the stage to the run's host when there is one, else call main()."""
    code = forward(module)
    if code is None:
        main()
        return
    sys.exit(code)


def forward(module: str) -> int | None:
    """Run `python -m module` in the host; its exit status, or None when there is no host to run it."""
    path = os.environ.get(ENV)
    if not path or not _std_streams_open():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None  # the run's host is gone (or on another machine): run here
    request = json.dumps({"module": module, "argv": sys.argv[1:], "cwd": os.getcwd(),
                          "env": dict(os.environ)}).encode()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with conn:
        socket.send_fds(conn, [_HEADER.pack(len(request))], [0, 1, 2])
        conn.sendall(request)
        answer = _recv_all(conn)
    if not answer:
        print(f"imgclf: the stage host lost {module} without an exit status", file=sys.stderr)
        return 1
    code = int(answer)
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def _std_streams_open() -> bool:
    """fds 0-2 are all open (a closed stdin, as under some schedulers, cannot be handed over)."""
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return False
    return True


def _recv_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------------- the host


class StageHost:
    """This run's host process, started on demand (start(): idempotent, thread-safe) and stopped by stop().

    Until it starts, its socket does not exist and a command runs its stage itself."""

    def __init__(self, root: Path, preload: tuple[str, ...] = PRELOAD) -> None:
        import tempfile
        import threading

        self.root, self.preload = root, preload
        self.folder = tempfile.mkdtemp(prefix="imgclf-host-")  # private (0700); a socket path is <= 107 bytes
        self.path = os.path.join(self.folder, "host.sock")
        self.process: "subprocess.Popen[bytes] | None" = None
        self._lock = threading.Lock()

    def start(self) -> None:
        import subprocess

        with self._lock:
            if self.process is not None:
                return
            # Listening before the host process runs: a command connecting now waits in the backlog. Only the
            # host keeps the socket open, so once it is gone a command is refused and runs its stage itself.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(self.path)
                listener.listen(64)
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "tasks.stagehost", str(listener.fileno()), ",".join(self.preload)],
                    cwd=str(self.root), stdin=subprocess.PIPE, pass_fds=[listener.fileno()])

    def stop(self) -> None:
        import subprocess

        with self._lock:
            if self.process is not None:
                self.process.stdin.close()  # the host stops (and ends any stage still running) on EOF
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            for leftover in (self.path, self.folder):
                try:
                    (os.unlink if leftover == self.path else os.rmdir)(leftover)
                except OSError:
                    pass


_current: StageHost | None = None


@contextmanager
def serving(root: Path, preload: tuple[str, ...] = PRELOAD, *, start: bool = True) -> Iterator[StageHost | None]:
    """A host for this run's stage commands (ENV is set for them), stopped afterwards; with start=False it
    starts only when start() or start_current() is called (a run in which nothing changes never pays its
    imports).

    Yields it, or None when warm stages are off, unavailable or already served by an outer run."""
    global _current

    if not enabled() or os.environ.get(ENV):
        yield None
        return
    host = StageHost(root, preload)
    if start:
        host.start()
    os.environ[ENV] = host.path
    _current = host
    try:
        yield host
    finally:
        _current = None
        os.environ.pop(ENV, None)
        host.stop()


def start_current() -> None:
    """Start the host of the run in progress in this process, if there is one and it has not started yet."""
    host = _current
    if host is not None:
        host.start()


class Host:
    """The fork server: accepts requests, forks one child per stage once the libraries it needs are imported,
    and reports each child's exit status."""

    def __init__(self, listener: socket.socket, preload: tuple[str, ...] = PRELOAD):
        self.listener = listener
        self.preload = preload
        self.loaded = 0  # how many of `preload` have been imported (or failed to)
        # The preload thread imports only while no fork is wanted, and a fork waits for the import in progress:
        self.turn = threading.Condition()
        self.importing = False
        self.forks_wanted = 0
        self.waiting: list[tuple[socket.socket, dict, list[int]]] = []  # requests not forked yet
        self.children: dict[int, socket.socket] = {}  # pid -> the command's connection
        self.wake_r: int | None = None
        self.wake_w: int | None = None

    def serve(self) -> None:
        """Import the preload list in a background thread while serving, until stdin (the run's pipe) closes.

        The imports go on beside running stages: on a few cores they fill the time a single-threaded stage
        (split, the tail of each stage) leaves idle, and the stage a request waits for starts as soon as its
        libraries are in. The loop stays free to hand a finished stage's status straight back to its command.
        A fork waits for the import in progress to finish, and the next import waits for the fork: a child
        never inherits a half-imported module or a lock held by the preload thread."""
        # A stage's end wakes the loop at once (its status goes straight back to the command): SIGCHLD writes
        # to this pipe, which the loop watches; so does the preload thread after each import.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        threading.Thread(target=self._preload, name="preload", daemon=True).start()
        while self.step(timeout=0.5):
            pass

    def _preload(self) -> None:
        import importlib

        for name in self.preload:
            with self.turn:
                self.turn.wait_for(lambda: not self.forks_wanted)
                self.importing = True
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001  (not installed / broken: the stage imports it and says so)
                pass
            finally:
                with self.turn:
                    self.importing = False
                    self.loaded += 1
                    self.turn.notify_all()
            try:
                os.write(self.wake_w, b"\0")  # a waiting stage may be ready now
            except OSError:  # the pipe is full (the loop wakes anyway) or closed (the host is stopping)
                pass

    @contextmanager
    def no_import_running(self) -> Iterator[None]:
        """Wait for the preload thread's import in progress to finish; it starts no other until the block ends
        (a plain lock would let it take the next turn straight away, and a fork would wait for the whole list)."""
        with self.turn:
            self.forks_wanted += 1
            self.turn.wait_for(lambda: not self.importing)
            try:
                yield
            finally:
                self.forks_wanted -= 1
                self.turn.notify_all()

    def needs(self, module: str) -> int:
        """How much of the preload list a stage waits for: validate and split up to Great Expectations, train
        up to matplotlib (not ONNX), the rest all of it (importing a library twice, in the host and in a child
        that did not wait, costs more than the wait: each import is CPU-bound)."""
        last = READY_AFTER.get(module, self.preload[-1] if self.preload else None)
        return self.preload.index(last) + 1 if last in self.preload else 0

    def step(self, timeout: float) -> bool:
        """One round of the loop; False once the run is over."""
        watched = {c.fileno(): ("child", pid) for pid, c in self.children.items()}
        watched.update({c.fileno(): ("waiting", i) for i, (c, _, _) in enumerate(self.waiting)})
        conns = [*self.children.values(), *(c for c, _, _ in self.waiting)]
        wake = [self.wake_r] if self.wake_r is not None else []
        readable, _, _ = select.select([self.listener, sys.stdin, *wake, *conns], [], [], timeout)
        gone: list[int] = []
        for item in readable:
            if item == self.wake_r:
                os.read(self.wake_r, 4096)
            elif item is sys.stdin:
                if not os.read(0, 4096):
                    self.stop()
                    return False
            elif item is self.listener:
                self.receive()
            else:  # the command went away (killed, timed out): its stage goes too
                kind, key = watched[item.fileno()]
                if kind == "child":
                    self._signal(key, signal.SIGTERM)
                else:
                    gone.append(key)
        for i in sorted(gone, reverse=True):
            conn, _, fds = self.waiting.pop(i)
            conn.close()
            for fd in fds:
                os.close(fd)
        self.launch_ready()
        self.reap()
        return True

    def receive(self) -> None:
        conn, _ = self.listener.accept()
        try:
            header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
            (size,) = _HEADER.unpack(header)
            body = b""
            while len(body) < size:
                chunk = conn.recv(size - len(body))
                if not chunk:
                    raise ConnectionError("request cut short")
                body += chunk
            request = json.loads(body)
        except (OSError, ValueError, struct.error):
            conn.close()
            return
        self.waiting.append((conn, request, fds))

    def launch_ready(self) -> None:
        for item in [w for w in self.waiting if self.needs(w[1]["module"]) <= self.loaded]:
            self.waiting.remove(item)
            self.fork(*item)

    def fork(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        with self.no_import_running():
            pid = os.fork()
        if pid == 0:
            if self.wake_r is not None:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(self.wake_r)
                os.close(self.wake_w)
            self.listener.close()
            for other in [*self.children.values(), *(c for c, _, _ in self.waiting), conn]:
                other.close()
            _run_child(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn

    def reap(self) -> None:
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = self.children.pop(pid)
                try:
                    conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
                except OSError:
                    pass
                conn.close()

    def stop(self) -> None:
        for conn, _, fds in self.waiting:
            conn.close()
            for fd in fds:
                os.close(fd)
        self.waiting.clear()
        for pid in list(self.children):
            self._signal(pid, signal.SIGTERM)
        for pid in list(self.children):
            os.waitpid(pid, 0)
            self.children.pop(pid).close()
        self.listener.close()

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python -m <module>` for the command, run it, exit with its status."""
    import atexit
    import io
    import runpy
    import traceback

    code = 1
    try:
        for fd, target in zip(fds, (0, 1, 2)):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any interpreter (the host ignores it)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=os.isatty(1))
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                      errors="backslashreplace")
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(ENV, None)  # a stage's own subprocesses are ordinary processes
        for name in [m for m in sys.modules if m.split(".")[0] in {"tasks", "flows"}]:
            del sys.modules[name]  # the command's code, from its working folder
        sys.path[0] = request["cwd"]
        sys.argv = [request["module"], *request["argv"]]
        code = 0
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 128 + signal.SIGINT
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _exit_code(value: object) -> int:
    """What the interpreter would exit with for SystemExit(value)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def main() -> None:
    """`python -m tasks.stagehost FD [MODULE,MODULE...]`, started by serving() with the listening socket as FD:
    runs until its stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stages (same process group); the run
    preload = tuple(filter(None, sys.argv[2].split(","))) if len(sys.argv) > 2 else PRELOAD
    host = Host(socket.socket(fileno=int(sys.argv[1])), preload)  # stops the host by closing its stdin
    try:
        host.serve()
    finally:
        host.listener.close()
    # Exit without finalising: the host ran no stage code itself (its children did, and they are gone), so there
    # is nothing to write, while tearing down torch, MLflow and Great Expectations takes ~0.3 s at the end of
    # every run, and a preload still in progress is not waited for.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
