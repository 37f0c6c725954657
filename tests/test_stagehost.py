"""tasks/stagehost.py: stage commands handed to a warm host process under `imgclf run` behave exactly like the
command run on its own (working folder, arguments, environment, output, exit status), end with it, and fall
back to running in place when there is no host. The real stages run through it in tests/test_flow.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import stagehost
from tests.project_helpers import process_ends

PROBE = '''
import os, sys, time
from pathlib import Path

def main():
    print("out", os.getcwd(), sys.argv[1:], os.environ.get("PROBE"), os.environ.get("IMGCLF_STAGE_HOST"), flush=True)
    print("err", file=sys.stderr)
    print("preloaded" if "probe_slow" in sys.modules else "cold")
    Path("pids").write_text(f"{os.getpid()} {os.getppid()}")
    if sys.argv[1] == "sleep":
        time.sleep(60)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), 9)
    if sys.argv[1] == "raise":
        raise ValueError("bad image")
    sys.exit(int(sys.argv[1]))

if __name__ == "__main__":
    from tasks.stagehost import run_main

    run_main("probe", main)
'''

pytestmark = pytest.mark.skipif(not stagehost.enabled(), reason="warm stages need fork (Linux)")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "probe.py").write_text(PROBE)
    monkeypatch.delenv(stagehost.ENV, raising=False)
    monkeypatch.delenv(stagehost.SWITCH, raising=False)
    return tmp_path


def command(workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run `python -m probe ARGS` as DVC would; (its result, the command's own pid)."""
    env = {**os.environ, "PROBE": "seen"}
    proc = subprocess.Popen([sys.executable, "-m", "probe", *args], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def pids(workdir: Path) -> tuple[int, int]:
    pid, parent = (workdir / "pids").read_text().split()
    return int(pid), int(parent)


def test_a_command_runs_in_a_child_of_the_host_as_if_run_itself(workdir):
    with stagehost.serving(workdir, preload=()) as host:
        path = host.path
        assert os.environ[stagehost.ENV] == path
        (ok, client), (failed, _), (raised, _) = (command(workdir, "0", "--flag"), command(workdir, "3"),
                                                  command(workdir, "raise"))
    assert ok.returncode == 0 and failed.returncode == 3 and raised.returncode == 1
    assert ok.stdout.split("\n")[0] == f"out {workdir} ['0', '--flag'] seen None"  # the stage's own env, no host
    assert ok.stderr == "err\n" and "ValueError: bad image" in raised.stderr
    stage, parent = pids(workdir)
    assert client not in (stage, parent)  # forked by the host, not run by the command's own interpreter
    assert stagehost.ENV not in os.environ and not Path(path).exists()


def test_a_killed_stage_is_reported_like_a_killed_process(workdir):
    with stagehost.serving(workdir, preload=()):
        res, _ = command(workdir, "kill")
    assert res.returncode == 128 + signal.SIGKILL


def sleeping_stage(workdir: Path) -> tuple[subprocess.Popen, int]:
    """A command whose stage sleeps; (the command, the stage's pid) once the stage runs."""
    proc = subprocess.Popen([sys.executable, "-m", "probe", "sleep"], cwd=workdir, env=os.environ.copy())
    deadline = time.time() + 30
    while not (workdir / "pids").exists() and time.time() < deadline:
        time.sleep(0.05)
    return proc, pids(workdir)[0]


def test_when_the_command_goes_its_stage_goes_too(workdir):
    with stagehost.serving(workdir, preload=()):
        proc, stage_pid = sleeping_stage(workdir)
        proc.kill()
        proc.wait()
        assert process_ends(stage_pid)


def test_the_run_ending_ends_a_stage_still_running(workdir):
    with stagehost.serving(workdir, preload=()):
        proc, stage_pid = sleeping_stage(workdir)
    assert process_ends(stage_pid)
    assert proc.wait(timeout=30) != 0


def test_without_a_reachable_host_the_command_runs_the_stage_itself(workdir, monkeypatch):
    monkeypatch.setenv(stagehost.ENV, str(workdir / "gone.sock"))
    res, client = command(workdir, "4")
    assert res.returncode == 4 and res.stdout.startswith(f"out {workdir} ['4'] seen {workdir / 'gone.sock'}")
    assert pids(workdir)[0] == client


def test_a_command_without_stdin_runs_the_stage_itself(workdir):
    with stagehost.serving(workdir, preload=()):
        env = {**os.environ, "PROBE": "seen"}
        proc = subprocess.Popen([sys.executable, "-c", "import os, runpy, sys; os.close(0); sys.argv = ['probe', '5'];"
                                 " runpy.run_module('probe', run_name='__main__')"], cwd=workdir, env=env,
                                stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 5 and out.startswith("out") and pids(workdir)[0] == proc.pid


def test_a_host_started_on_demand_serves_only_once_started(workdir):
    with stagehost.serving(workdir, preload=(), start=False) as host:
        _, client = command(workdir, "0")
        assert pids(workdir)[0] == client and not Path(host.path).exists()  # not started: ran in place
        stagehost.start_current()
        stagehost.start_current()  # once
        _, client = command(workdir, "0")
        assert pids(workdir)[0] != client and pids(workdir)[1] == host.process.pid
    stagehost.start_current()  # no run in progress: nothing
    assert host.process.poll() is not None and not Path(host.folder).exists()


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_warm_stages_can_be_switched_off(workdir, monkeypatch, value):
    monkeypatch.setenv(stagehost.SWITCH, value)
    with stagehost.serving(workdir, preload=()) as host:
        assert host is None and stagehost.ENV not in os.environ


def test_an_outer_run_host_is_reused(workdir, monkeypatch):
    monkeypatch.setenv(stagehost.ENV, "/tmp/outer.sock")
    with stagehost.serving(workdir, preload=()) as host:
        assert host is None and os.environ[stagehost.ENV] == "/tmp/outer.sock"


def test_stages_wait_for_the_preload_they_need(workdir):
    (workdir / "probe_slow.py").write_text("import time\ntime.sleep(1)\n")
    with stagehost.serving(workdir, preload=("json", "probe_slow")):
        res, _ = command(workdir, "0")  # sent while the host is still importing; forked once it is done
    assert res.returncode == 0 and res.stdout.split("\n")[1] == "preloaded"
    res, _ = command(workdir, "0")  # (no host: nothing preloaded)
    assert res.stdout.split("\n")[1] == "cold"


def test_a_host_stopped_mid_import_exits_at_once(workdir):
    (workdir / "probe_endless.py").write_text("import time\ntime.sleep(120)\n")
    with stagehost.serving(workdir, preload=("probe_endless",)) as host:
        time.sleep(1)  # the preload thread is inside the 120 s import now
        started = time.monotonic()
    assert host.process.poll() is not None and time.monotonic() - started < 10


def test_a_fork_waits_for_one_import_not_for_the_whole_preload(tmp_path, monkeypatch):
    import socket
    import threading

    for i in range(4):
        (tmp_path / f"probe_import{i}.py").write_text("import time\ntime.sleep(0.3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with socket.socket(socket.AF_UNIX) as listener:
        host = stagehost.Host(listener, preload=tuple(f"probe_import{i}" for i in range(4)))
        host.wake_r, host.wake_w = os.pipe()
        importer = threading.Thread(target=host._preload)
        importer.start()
        while not host.importing:
            time.sleep(0.01)
        with host.no_import_running():  # what a fork does
            during = (host.importing, host.loaded)
            time.sleep(0.4)  # no import starts meanwhile
            assert host.loaded == during[1]
        importer.join()
        os.close(host.wake_r), os.close(host.wake_w)
    assert during[0] is False and 1 <= during[1] <= 2  # in after the first import or so, not after all four
    assert host.loaded == 4 and all(f"probe_import{i}" in sys.modules for i in range(4))


def test_each_stage_waits_only_for_the_libraries_it_uses():
    import socket

    with socket.socket(socket.AF_UNIX) as listener:
        host = stagehost.Host(listener, preload=("numpy", "great_expectations", "torch", "matplotlib.figure", "onnx"))
        assert host.needs("tasks.validate") == host.needs("tasks.split") == 2
        assert host.needs("tasks.train") == 4  # not ONNX: the host imports it while train runs
        assert host.needs("tasks.evaluate") == host.needs("anything.else") == 5
        assert stagehost.Host(listener, preload=()).needs("tasks.train") == 0




@pytest.mark.parametrize("module", ["tasks.train", "tasks.split", "tasks.ingest", "tasks.evaluate", "tasks.validate"])
def test_a_stage_command_describes_itself_and_refuses_arguments_instead_of_running(module, tmp_path):
    """In a folder with no params.yaml: had the stage run, it would fail reading params (or train)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("IMGCLF_STAGE_HOST", None)
    helped = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=env)
    assert helped.returncode == 0 and f"python -m {module}" in helped.stdout and "takes no arguments" in helped.stdout
    assert f"Stage `{module.split('.')[1]}`" in helped.stdout  # the module's own description
    refused = subprocess.run([sys.executable, "-m", module, "--epochs", "3"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "unrecognized arguments: --epochs 3" in refused.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written
