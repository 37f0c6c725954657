"""Run reports (pure), webhook notifications against a local HTTP server, and the one-run-at-a-time lock."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from flows.early import RunBusy, run_lock
from tasks.summary import notify, per_class_rows, run_markdown

SUMMARY = {"stages_run": ["train", "evaluate"], "data_hash": "f" * 64, "n_images": 45, "data_source": "/imgs",
           "accuracy": 0.9, "macro_f1": 0.88, "model_name": "imgclf", "version": "3", "registered": True,
           "champion": "2", "promoted": False, "run_id": "abc",
           "gate": {"passed": False, "reasons": ["non_inferiority: too low"]}, "reason": "gate FAILED"}


def test_run_markdown_has_data_validation_metrics_gate_and_links():
    md = run_markdown(SUMMARY, validation={"success": True, "accepted": 44, "quarantined": 1},
                      tracking_uri="sqlite:////p/mlflow.db", experiment_id="1")
    for needle in ("ffffffffffff", "44 accepted, 1 quarantined", "0.9000", "imgclf v3 (new)", "| gate | FAILED |",
                   "non_inferiority: too low", "`abc`", "imgclf ui"):
        assert needle in md, needle


def test_per_class_rows():
    rows = per_class_rows({"per_class": {"a": {"recall": 0.123456, "support": 3}}})
    assert rows == [{"class": "a", "recall": 0.1235, "support": 3}]


@pytest.fixture()
def webhook():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def test_notify_posts_json_to_the_webhook(webhook):
    url, received = webhook
    assert notify("promoted", {"version": "3"}, url=url) is True
    assert received == [{"event": "promoted", "version": "3"}]


def test_notify_without_url_or_with_a_dead_url_logs_and_never_raises(caplog):
    assert notify("failed", {"message": "boom"}, url=None) is False
    assert notify("failed", {"message": "boom"}, url="http://127.0.0.1:9/nothing", timeout_s=2) is False
    assert sum("boom" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records) == 2
    caplog.set_level("INFO", logger="imgclf.notify")
    notify("promoted", {"version": "9"}, url=None)
    assert caplog.records[-1].levelname == "INFO" and '"version": "9"' in caplog.records[-1].getMessage()


def test_a_second_run_does_not_start_while_one_holds_the_lock(tmp_path: Path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"l = FileLock({str(tmp_path / '.imgclf' / 'run.lock')!r}); "
                               "(tmp := __import__('pathlib').Path(l.lock_file).parent).mkdir(exist_ok=True); "
                               "l.acquire(); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another process's run
        with pytest.raises(RunBusy, match="another imgclf run is in progress"):
            with run_lock(tmp_path, 0.2):
                pass
    finally:
        holder.communicate("", timeout=30)
    with run_lock(tmp_path, 0):  # released afterwards
        with run_lock(tmp_path, 0):  # and re-entrant within one thread (imgclf run: early stages, then the flow)
            pass
        import threading

        refused: list[BaseException] = []

        def another_run_in_this_process() -> None:
            try:
                with run_lock(tmp_path, 0):
                    pass
            except RunBusy as exc:
                refused.append(exc)

        other = threading.Thread(target=another_run_in_this_process)
        other.start()
        other.join()
        assert len(refused) == 1  # another thread is another run
