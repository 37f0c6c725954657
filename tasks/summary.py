"""What a run reports: a markdown summary and a per-class table (pure), and webhook notifications."""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

log = logging.getLogger("imgclf.notify")


def _registration(summary: dict[str, Any]) -> str:
    if summary.get("registered"):
        return "new"
    return "gate decided now" if summary.get("resumed") else "already registered"


def run_markdown(summary: dict[str, Any], *, validation: dict[str, Any] | None, tracking_uri: str,
                 experiment_id: str | None) -> str:
    """The run's summary for the Prefect UI: data, validation, metrics, gate, links."""
    gate = summary.get("gate")
    lines = [
        f"# imgclf run: {summary.get('reason', '')}", "",
        "| item | value |", "|---|---|",
        f"| stages run | {', '.join(summary.get('stages_run') or []) or 'none (up to date)'} |",
        f"| data version | `{summary.get('data_hash', '')[:12]}` ({summary.get('n_images')} images from "
        f"`{summary.get('data_source')}`) |",
    ]
    if validation is not None:
        lines.append(f"| validation | {'passed' if validation.get('success') else 'FAILED'}: "
                     f"{validation.get('accepted')} accepted, {validation.get('quarantined')} quarantined "
                     "(reports/validation/summary.md, quarantine.csv"
                     + (f", Data Docs {validation['data_docs']}" if validation.get("data_docs") else "") + ") |")
    lines += [
        f"| test accuracy | {summary.get('accuracy', float('nan')):.4f} |",
        f"| test macro F1 | {summary.get('macro_f1', float('nan')):.4f} |",
        f"| model version | {summary.get('model_name')} v{summary.get('version')} "
        f"({_registration(summary)}) |",
        f"| champion | {('v' + str(summary['champion'])) if summary.get('champion') else 'none'}"
        f"{' (promoted)' if summary.get('promoted') else ''} |",
        f"| gate | {('passed' if gate['passed'] else 'FAILED') if gate else 'not run'} |",
    ]
    if summary.get("run_id"):
        where = tracking_uri if tracking_uri.startswith("http") else "imgclf ui -> http://127.0.0.1:5000"
        lines.append(f"| MLflow run | `{summary['run_id']}` (experiment {experiment_id}; {where}) |")
    if gate and gate.get("reasons"):
        lines += ["", "## Gate refusals", *[f"- {r}" for r in gate["reasons"]]]
    return "\n".join(lines) + "\n"


def per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class for a Prefect table artifact."""
    return [{"class": c, **{k: round(float(v), 4) if isinstance(v, float) else v for k, v in m.items()}}
            for c, m in (metrics.get("per_class") or {}).items()]


def notify(event: str, payload: dict[str, Any], *, url: str | None, timeout_s: float = 10.0) -> bool:
    """POST {"event": ..., **payload} as JSON to url; without a url, log it. Never raises."""
    body = {"event": event, **payload}
    if not url:  # failures are warnings; good news is information
        level = logging.WARNING if event == "failed" else logging.INFO
        log.log(level, "imgclf %s: %s", event, json.dumps(body, default=str)[:2000])
        return False
    try:
        req = urllib.request.Request(url, data=json.dumps(body, default=str).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return 200 <= resp.status < 300
    except Exception as exc:  # a broken webhook must not break the run
        log.warning("imgclf %s: webhook %s failed (%s); payload %s", event, url, exc,
                    json.dumps(body, default=str)[:2000])
        return False
