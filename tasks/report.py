"""One self-contained HTML evaluation report: numbers, tables and pictures (PNG inlined as base64).
No scripts, fonts or stylesheets from anywhere else, so it renders offline and can be mailed around."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any, Sequence

# Section ids are a contract: the screenshot test and links from elsewhere rely on them.
SECTIONS = {
    "summary": "Summary",
    "metrics": "Metrics",
    "per-class": "Per class",
    "confusion": "Confusion matrix",
    "calibration": "Calibration",
    "slices": "Slices",
    "errors": "Worst errors",
    "gradcam": "Grad-CAM",
    "cross-validation": "Cross-validation",
    "label-quality": "Label quality",
    "speed-export": "Speed and ONNX export",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1c1e21;background:#fff}
header{background:#1f3b57;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85;font-size:13px}
nav{padding:8px 32px;background:#eef2f6;font-size:13px}nav a{margin-right:14px;color:#1f3b57}
main{padding:8px 32px 40px;max-width:1200px}
section{border-top:1px solid #dde3ea;padding-top:6px;margin-top:18px}h2{font-size:18px;color:#1f3b57}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #dde3ea;padding:3px 9px;
text-align:right}th{background:#f4f6f9}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #dde3ea;border-radius:6px;padding:10px 16px;
min-width:150px}.card b{display:block;font-size:22px}.card span{font-size:12px;color:#5b6670}
img{max-width:100%;border:1px solid #eee}.bad{color:#b3261e;font-weight:600}.good{color:#1e7b34}
.note{color:#5b6670;font-size:13px}.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.figs img{max-width:calc(50% - 8px)}
"""


def data_uri(png: Path) -> str:
    """A PNG file as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if value is None:
        return "–"
    return escape(str(value))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, left: Sequence[str] = (),
          css: dict[int, str] | None = None) -> str:
    """A plain HTML table; `left` columns are left-aligned text, css maps a row index to a class."""
    head = "".join(f'<th class="{"l" if c in left else ""}">{escape(c)}</th>' for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="{"l" if c in left else ""}">{_fmt(row.get(c))}</td>' for c in columns)
        body.append(f'<tr class="{(css or {}).get(i, "")}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(png: Path | None, alt: str) -> str:
    """An inlined image, or a note when it was not produced."""
    if png is None or not Path(png).is_file():
        return f'<p class="note">({escape(alt)}: not produced)</p>'
    return f'<img alt="{escape(alt)}" src="{data_uri(png)}">'


def _card(label: str, value: str) -> str:
    return f'<div class="card"><b>{value}</b><span>{escape(label)}</span></div>'


def _ci(m: dict[str, Any], key: str) -> str:
    lo, hi = m[f"{key}_ci95"]
    return f"{m[key]:.4f} <span class='note'>[{lo:.4f}, {hi:.4f}]</span>"


def _summary(m: dict[str, Any], title: str) -> str:
    onnx = m["onnx"]
    cards = [
        _card("accuracy (95% CI)", _ci(m, "accuracy")),
        _card("macro F1 (95% CI)", _ci(m, "macro_f1")),
        _card("top-5 accuracy", f"{m['top5_accuracy']:.4f}"),
        _card("ROC-AUC (one-vs-rest)", f"{m['roc_auc_ovr']:.4f}"),
        _card("ECE", f"{m['ece']:.4f}"),
        _card("test images", str(m["n_test"])),
        _card("ONNX top-1 agreement", f"{onnx['top1_agreement']:.4f}"),
        _card("CPU latency, batch 1", f"{m['latency_ms_b1']:.2f} ms"),
    ]
    return (f"<p>{escape(title)}. Every number is on the held-out test split (test-set sha256 "
            f"<code>{escape(m['test_hash'][:12])}</code>) unless it says otherwise.</p>"
            f"<div class='cards'>{''.join(cards)}</div>")


def _metrics(m: dict[str, Any]) -> str:
    rows = [{"metric": k, "value": m[k]} for k in
            ("accuracy", "top5_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision",
             "weighted_recall", "weighted_f1", "roc_auc_ovr", "ece_before", "ece", "temperature") if k in m]
    rows += [{"metric": f"{k} (95% bootstrap CI)", "value": f"[{m[k][0]:.4f}, {m[k][1]:.4f}]"}
             for k in ("accuracy_ci95", "macro_f1_ci95")]
    return table(rows, ["metric", "value"], left=["metric"])


def _per_class(m: dict[str, Any]) -> str:
    rows = [{"class": c, **v} for c, v in m["per_class"].items()]
    worst = sorted(range(len(rows)), key=lambda i: rows[i]["f1"])[:1]
    return ("<p class='note'>The weakest class by F1 is highlighted.</p>"
            + table(rows, ["class", "precision", "recall", "f1", "support"], left=["class"],
                    css={i: "bad" for i in worst}))


def _slices(slices: list[dict[str, Any]], m: dict[str, Any]) -> str:
    if not slices:
        return "<p class='note'>No slice attributes configured (<code>evaluate.slices</code>).</p>"
    rows = sorted(slices, key=lambda r: (r["attribute"], r["accuracy"]))
    css = {i: "bad" for i, r in enumerate(rows) if r["accuracy_delta"] < -0.05}
    worst = m.get("worst_slice")
    lead = (f"<p>Lowest-accuracy slice with enough images: <b>{escape(worst['attribute'])} = "
            f"{escape(str(worst['value']))}</b> ({worst['accuracy']:.4f} on {worst['n']} images, overall "
            f"{m['accuracy']:.4f}).</p>") if worst else ""
    return (lead + "<p class='note'>Accuracy per value of each manifest attribute; rows more than 5 points "
            "below the overall accuracy are red.</p>"
            + table(rows, ["attribute", "value", "n", "accuracy", "accuracy_delta", "macro_f1"],
                    left=["attribute", "value"], css=css))


def _cv(cv: dict[str, Any] | None, folds: list[dict[str, Any]], plot: Path | None) -> str:
    if not cv:
        return ("<p class='note'>Off (<code>evaluate.cv_folds: 0</code>). Set it to k ≥ 2 (e.g. 5) to train k "
                "models on stratified folds of all images and report each metric as mean ± standard deviation.</p>")
    keys = [k for k, v in cv.items() if isinstance(v, dict)]
    rows = [{"metric": k, "mean": cv[k]["mean"], "std": cv[k]["std"]} for k in keys]
    grouped = (f"groups kept together: {cv.get('group_source') or 'duplicate groups'}" if cv.get("grouped")
               else cv.get("group_warning") or "no groups: every image on its own")
    return (f"<p>{cv['folds']} folds over {cv['n']} images ({grouped}).</p>"
            + table(rows, ["metric", "mean", "std"], left=["metric"])
            + table(folds, ["fold", "n_train", "n_val", "n_test", "best_epoch", "accuracy", "macro_f1"])
            + figure(plot, "metrics per fold"))


def _labels(issues: list[dict[str, Any]] | None, gallery: Path | None) -> str:
    if issues is None:
        return ("<p class='note'>Needs out-of-fold predictions: turn on cross-validation "
                "(<code>evaluate.cv_folds</code>).</p>")
    n_flagged = sum(bool(r["flagged"]) for r in issues)
    verdict = (f"<p class='bad'>{n_flagged} image(s) flagged as probably mislabelled.</p>" if n_flagged else
               "<p class='good'>Confident learning flagged no image; below are the lowest label-quality scores, "
               "worth a glance.</p>")
    return (verdict + "<p>Confident learning (cleanlab) on out-of-fold predictions: flagged images first, then the "
            "lowest label-quality scores. Reported for a person to check — nothing is changed.</p>"
            + figure(gallery, "most likely mislabelled images")
            + table(issues, ["path", "given_label", "suspected_label", "flagged", "label_quality",
                             "suspected_probability"], left=["path", "given_label", "suspected_label", "flagged"],
                    css={i: "bad" for i, r in enumerate(issues) if r["flagged"]}))


def _speed(m: dict[str, Any]) -> str:
    onnx = m["onnx"]
    rows = [
        {"runtime": "torch eager (CPU)", "batch 1 (ms)": m["latency_ms_b1"], "batch 64 (ms)": m["latency_ms_b64"]},
        {"runtime": "onnxruntime (CPU)", "batch 1 (ms)": onnx["latency_ms_b1"], "batch 64 (ms)": None},
    ]
    ok = onnx["top1_agreement"] == 1.0
    return (table(rows, ["runtime", "batch 1 (ms)", "batch 64 (ms)"], left=["runtime"])
            + f"<p>ONNX (opset {onnx.get('opset', '?')}) on the test split: top-1 agreement "
            f"<b class='{'good' if ok else 'bad'}'>{onnx['top1_agreement']:.4f}</b>, largest absolute logit "
            f"difference <b>{onnx['max_abs_logit_diff']:.2e}</b>.</p>"
            f"<p class='note'>Median of repeated runs on {m.get('latency_threads', '?')} CPU threads; "
            "per batch, not per image.</p>")


def render_report(*, title: str, metrics: dict[str, Any], slices: list[dict[str, Any]], plots_dir: Path,
                  gradcam_note: str | None = None, cv_folds: list[dict[str, Any]] | None = None,
                  label_issues: list[dict[str, Any]] | None = None) -> str:
    """The whole report as one HTML string; PNGs are read from plots_dir and inlined."""
    p = Path(plots_dir)
    png = lambda name: p / name if (p / name).is_file() else None  # noqa: E731
    body = {
        "summary": _summary(metrics, title),
        "metrics": _metrics(metrics),
        "per-class": _per_class(metrics),
        "confusion": ("<div class='figs'>" + figure(png("confusion_matrix.png"), "confusion matrix (counts)")
                      + figure(png("confusion_matrix_normalized.png"), "confusion matrix (normalised)")
                      + "</div>"),
        "calibration": (f"<p>Expected calibration error {metrics['ece_before']:.4f} as trained"
                        + (f", {metrics['ece']:.4f} after temperature scaling (T = {metrics['temperature']:.3f}, "
                           "fitted on the validation split)" if metrics.get("temperature")
                           and metrics.get("temperature_status") != "fallback" else "")
                        + (f" (temperature scaling: {metrics['temperature_note']})" if metrics.get("temperature_note")
                           else "")
                        + ".</p>" + figure(png("reliability.png"), "reliability diagram")),
        "slices": _slices(slices, metrics),
        "errors": ("<p>The test images with the highest loss: true label, prediction and its probability.</p>"
                   + figure(png("worst_loss.png"), "worst images by loss")),
        "gradcam": (f"<p class='note'>{escape(gradcam_note)}</p>" if gradcam_note else
                    "<p>Where the model looked for its prediction on the same images (red = most influence).</p>"
                    + figure(png("gradcam.png"), "Grad-CAM")),
        "cross-validation": _cv(metrics.get("cv"), cv_folds or [], png("cv_folds.png")),
        "label-quality": _labels(label_issues, png("label_issues.png")),
        "speed-export": _speed(metrics),
    }
    nav = "".join(f'<a href="#{sid}">{escape(name)}</a>' for sid, name in SECTIONS.items())
    sections = "".join(f'<section id="{sid}"><h2>{escape(SECTIONS[sid])}</h2>{html}</section>'
                       for sid, html in body.items())
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body><header><h1>Evaluation report</h1><p>{escape(title)}</p></header>"
            f"<nav>{nav}</nav><main>{sections}</main></body></html>\n")
