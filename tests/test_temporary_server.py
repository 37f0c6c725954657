"""flows/temporary_server.py: Prefect's temporary API server started without importing it into this process.

The server command is replaced by small stand-ins (one that answers the health check, one that exits, one
that never answers); the real server starts in every `imgclf run` of tests/test_flow.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

import flows.early as early
import flows.temporary_server as ts
from tests.project_helpers import process_ends

HEALTH = r"""
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def spawner(*commands: str):
    """A TemporaryServer._spawn that runs the given Python snippets in turn (argv[1] is the chosen port)."""
    queue = list(commands)

    def spawn(self, env):
        self.port = ts.free_port()
        return ts.spawn_watched(["-c", queue.pop(0), str(self.port)], env)

    return spawn


@pytest.fixture
def no_api_url(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    yield
    ts.stop()


def test_free_port_skips_a_port_in_use():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert not ts.port_available(port)
        assert ts.free_port(range(port, port + 2)) == port + 1


def test_start_picks_another_port_when_its_port_was_taken_and_waits_for_health(monkeypatch, no_api_url):
    monkeypatch.setattr(ts.TemporaryServer, "_spawn", spawner(f"raise SystemExit({ts.PORT_IN_USE})", HEALTH))
    server = ts.TemporaryServer()
    url = server.start(timeout_s=30)
    assert url == server.api_url and ts.healthy(url)
    process = server.process
    server.stop()
    assert process.poll() is not None and server.process is None and not ts.healthy(url)


def test_a_server_that_exits_is_reported_with_its_status(monkeypatch, no_api_url):
    monkeypatch.setattr(ts.TemporaryServer, "_spawn", spawner("raise SystemExit(1)"))
    with pytest.raises(RuntimeError, match="exited with status 1"):
        ts.TemporaryServer().start(timeout_s=30)


def test_a_server_that_never_answers_times_out_and_is_stopped(monkeypatch, no_api_url):
    monkeypatch.setattr(ts.TemporaryServer, "_spawn", spawner("import time; time.sleep(60)"))
    server = ts.TemporaryServer()
    with pytest.raises(RuntimeError, match="did not answer within 1 s"):
        server.start(timeout_s=1)
    assert server.process is None


def test_prefect_settings_point_at_the_server_while_it_runs(monkeypatch, no_api_url):
    from prefect.settings import get_current_settings

    monkeypatch.setattr(ts.TemporaryServer, "_spawn", spawner(HEALTH))
    url = ts.ensure_started()
    assert ts.ensure_started() == url  # one per process
    assert get_current_settings().api.url == url and ts.started_here()
    import os

    assert os.environ["PREFECT_API_URL"] == url  # the flow's task runners' processes inherit it
    with ts.flow_settings():  # no heartbeats for runs on a server that ends with this process
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency is not None
    ts.stop()
    with ts.flow_settings():  # a configured (or no) server: Prefect's settings as they are
        assert get_current_settings().flows.heartbeat_frequency is not None
    assert get_current_settings().api.url is None and "PREFECT_API_URL" not in os.environ
    assert not ts.started_here() and not ts.healthy(url)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_server_ends_when_the_process_that_started_it_is_killed(tmp_path):
    import os

    # a process that starts a (stand-in) server the way TemporaryServer does, then dies without any cleanup
    script = tmp_path / "starter.py"
    script.write_text(
        "import os, signal, sys\n"
        "import flows.temporary_server as ts\n"
        f"server = ts.spawn_watched(['-c', {HEALTH!r}, str(ts.free_port())], dict(os.environ))\n"
        "print(server.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    starter = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert starter.returncode == -9
    assert process_ends(int(starter.stdout.split()[0]), within_s=20)


def test_a_watched_command_runs_a_module_as_python_m_would(tmp_path):
    import os

    (tmp_path / "probe_mod.py").write_text(
        "import sys, pathlib\n"
        "pathlib.Path(sys.argv[1]).write_text(repr((__name__, sys.argv[0].endswith('probe_mod.py'), sys.argv[2:])))\n"
        "sys.exit(7)\n")
    out = tmp_path / "seen"
    proc = ts.spawn_watched(["-m", "probe_mod", str(out), "a", "b"], {**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.wait(timeout=30) == 7  # its exit status is the module's (uvicorn's 3, "port taken", counts)
    proc.stdin.close()
    assert out.read_text() == repr(("__main__", True, ["a", "b"]))
