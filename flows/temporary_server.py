"""Prefect's temporary API server for `imgclf run` when no PREFECT_API_URL is configured, started as Prefect
3.9 starts it, without importing the server into this process.

Prefect's client starts `python -m uvicorn --factory prefect.server.api.server:create_app` (ephemeral, UI off)
itself when it finds no API URL, and to do that imports prefect.server.api.server into the process that runs
the flow: FastAPI, the server's database layer and every API router, ~1.5 s of CPU (2.5 s against 0.9 s for
what the flow's client needs) that this process never uses. This module starts the same command, waits for its
health check and then points this process's Prefect settings at it (PREFECT_API_URL, then Prefect's own
`refresh_global_settings_context`, the way Prefect applies environment variables that its plugins set), so the
flow's client talks to it as to any server. One per process, stopped at exit, like Prefect's own."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Iterator

PORTS = range(8000, 9000)  # where Prefect looks for a free port
PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind its port
_lock = threading.Lock()
_server: "TemporaryServer | None" = None
_stop_at_exit = False


# The server runs under this small wrapper: `python -c WATCHED -m MODULE ARGS...` (or `-c CODE ARGS...`) runs as
# `python -m MODULE ARGS...` would, and also sends itself SIGTERM (what stop() sends) once its stdin reaches EOF.
# Its stdin is a pipe that only the process that started it holds, so the server goes when that process goes,
# however it goes (SIGKILL, the OOM killer), instead of outliving it with its port and memory.
WATCHED = """
import os, runpy, signal, sys, threading
def watch():
    while os.read(0, 4096):  # the raw descriptor: a buffered sys.stdin's lock would block the exit
        pass
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, name="parent-watch", daemon=True).start()
kind, target = sys.argv[1:3]
sys.argv = [target, *sys.argv[3:]]
if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv[0] = "-c"
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
"""


def spawn_watched(args: list[str], env: dict[str, str]) -> "subprocess.Popen[bytes]":
    """`python ARGS` (`-m module ...` or `-c code ...`) that ends when this process does (see WATCHED)."""
    return subprocess.Popen([sys.executable, "-c", WATCHED, *args], env=env, stdin=subprocess.PIPE)


def port_available(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(ports: range = PORTS, attempts: int = 50) -> int:
    for _ in range(attempts):
        port = random.choice(ports)
        if port_available(port):
            return port
    raise RuntimeError(f"no free port for Prefect's temporary API server in {ports.start}-{ports.stop - 1}")


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:  # refused while it starts (URLError and timeouts are OSErrors)
        return False


class TemporaryServer:
    """The server process; `start()` returns once its health check answers, `stop()` ends it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self, env: dict[str, str]) -> "subprocess.Popen[bytes]":
        import prefect

        self.port = free_port()
        return spawn_watched(["-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                              "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                              "--log-level", "error", "--lifespan", "on"], env)

    def start(self, timeout_s: float | None = None) -> str:
        from prefect.logging import get_logger
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

        # what Prefect gives its own: this process's environment, its resolved settings (a profile's too), UI off
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        timeout_s = timeout_s or float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        self.process = self._spawn(env)
        get_logger().info("Starting temporary server on http://127.0.0.1:%s (set PREFECT_API_URL to use a "
                          "dedicated Prefect server instead)", self.port)
        deadline = time.monotonic() + timeout_s
        while not healthy(self.api_url):
            code = self.process.poll()
            if code is not None and self.process.stdin:
                self.process.stdin.close()
            if code == PORT_IN_USE:  # taken since we looked: another port
                self.process = self._spawn(env)
                continue
            if code is not None:
                self.process = None
                raise RuntimeError(f"Prefect's temporary API server exited with status {code} before answering "
                                   f"(see its output above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Prefect's temporary API server did not answer within {timeout_s:.0f} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.05)
        return self.api_url

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        from prefect.logging import get_logger

        get_logger().info("Stopping temporary server on http://127.0.0.1:%s", self.port)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdin:
            process.stdin.close()


def _use(api_url: str | None) -> None:
    """Point this process's Prefect settings (and its children's environment) at api_url (None: unset)."""
    from prefect.context import refresh_global_settings_context

    if api_url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = api_url
    refresh_global_settings_context()


def ensure_started() -> str:
    """This process's temporary server, started on first use; Prefect's settings point at it from then on."""
    global _server, _stop_at_exit
    with _lock:
        if _server is None or _server.process is None:
            server = TemporaryServer()
            server.start()
            _server = server
            if not _stop_at_exit:
                atexit.register(stop)  # after the flow's log and event workers have drained (atexit is LIFO)
                _stop_at_exit = True
            _use(server.api_url)
        return _server.api_url


def started_here() -> bool:
    """True when PREFECT_API_URL is this process's temporary server (not a server the user configured)."""
    return _server is not None and _server.process is not None and os.environ.get("PREFECT_API_URL") == _server.api_url


@contextlib.contextmanager
def flow_settings() -> Iterator[None]:
    """Prefect settings for a flow run on this process's temporary server (none elsewhere): no flow-run
    heartbeats. Heartbeats let a lasting server mark a run whose process died as crashed; this server dies with
    the process, so they only cost: Prefect 3.9's heartbeat thread sleeps in 1 s steps, and a flow run waits
    for it to notice its end (~0.5-1 s per run)."""
    if not started_here():
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def stop() -> None:
    """Stop this process's temporary server (if any) and unset the API URL it set."""
    global _server
    with _lock:
        server, _server = _server, None
        if server is None:
            return
        was_ours = os.environ.get("PREFECT_API_URL") == server.api_url
        server.stop()
        if was_ours:
            _use(None)
