"""The promotion gate: a pure decision over evaluation facts, the champion's re-score and the policy.

Nothing here touches MLflow, files or Prefect; tasks/registry.py and flows/ gather the inputs and
act on the decision."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

HEADLINE = ("accuracy", "macro_f1")


@dataclass(frozen=True)
class Policy:
    """The `promote` section of params.yaml, as the gate sees it."""

    min_accuracy: float = 0.0
    min_macro_f1: float = 0.0
    margin: float = 0.01
    confidence: float = 0.95
    bootstrap_samples: int = 2000
    max_class_recall_drop: float = 0.05
    max_ece: float | None = None
    max_latency_ms_b1: float | None = None
    min_onnx_agreement: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class ChampionScore:
    """The champion re-scored on the candidate's (current) test split: on every test image, or (`compared`) on
    those it never saw in training, when the data changed since it was trained and it knows what it saw."""

    version: str
    correct: Sequence[bool]
    per_class_recall: dict[str, float]
    data_time: str | None = None
    compared: Sequence[int] | None = None     # indices of the test images compared on; None: all of them
    candidate_per_class_recall: dict[str, float] | None = None  # the candidate's, on those same images
    excluded: int = 0                          # test images left out: the champion trained (or chose) on them
    seen_known: bool = True                    # False: the champion has no record of its training images


@dataclass(frozen=True)
class GateInput:
    metrics: dict[str, Any] | None           # reports/metrics.json of the candidate, None if missing
    candidate_correct: Sequence[bool] | None  # per test image, same order as the champion's
    test_hash_now: str                        # sha256 of data/splits/test.csv now
    validation_passed: bool | None            # None: no validation record found
    leakage: int | None                       # duplicate groups straddling splits; None: not checked
    data_time: str | None = None              # when the candidate's data was ingested (ISO 8601)
    champion: ChampionScore | None = None


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: Any
    threshold: Any
    detail: str = ""


@dataclass(frozen=True)
class Decision:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    compared_with: str | None = None

    @property
    def reasons(self) -> list[str]:
        """One line per failed check."""
        return [f"{c.name}: {c.detail or f'{_fmt(c.value)} vs {_fmt(c.threshold)}'}" for c in self.checks
                if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "compared_with": self.compared_with, "reasons": self.reasons,
                "checks": [asdict(c) for c in self.checks]}

    def markdown(self) -> str:
        """The decision as a table: each check, value, threshold, pass or fail."""
        head = "PASSED" if self.passed else "FAILED"
        against = f" against champion v{self.compared_with}" if self.compared_with else " (no champion: floors only)"
        lines = [f"## Promotion gate: {head}{against}", "", "| check | value | threshold | result | detail |",
                 "|---|---|---|---|---|"]
        for c in self.checks:
            lines.append(f"| {c.name} | {_fmt(c.value)} | {_fmt(c.threshold)} | {'pass' if c.passed else 'FAIL'} "
                         f"| {c.detail} |")
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "" if value is None else str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bound(what: str, value: Any, limit: Any, *, floor: bool) -> str:
    """A floor or ceiling check in words, 4 decimals: "accuracy 0.7778, below the floor 0.8000"."""
    if not _finite(value):
        return f"no {what} in the evaluation"
    ok = value >= limit if floor else value <= limit
    side = ("at or above" if ok else "below") if floor else ("at or under" if ok else "above")
    return f"{what} {_fmt(value)}, {side} the {'floor' if floor else 'ceiling'} {_fmt(limit)}"


def _recall_drop(worst: str, champion: float, candidate: float) -> str:
    """The largest per-class recall drop in words, 4 decimals; a drop reads as an amount lost, not a signed
    change ("class 'b' lost 0.2222", never "+0.2222")."""
    change = f"recall {champion:.4f} -> {candidate:.4f}"
    drop = round(champion - candidate, 4) + 0.0  # (+ 0.0: no "-0.0000")
    if drop > 0:
        return f"largest recall drop: class {worst!r} lost {drop:.4f} ({change})"
    return f"no class lost recall (smallest change: class {worst!r} {0.0 - drop:+.4f}, {change})"


def paired_bootstrap_diff(candidate: Sequence[bool], champion: Sequence[bool], *, samples: int,
                          confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean difference, lower, upper) of candidate - champion accuracy, resampling test images in pairs."""
    import numpy as np

    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired comparison needs two equally long, non-empty correctness vectors")
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(samples, diff.size))
    boot = diff[idx].mean(axis=1)
    alpha = 1.0 - confidence
    return float(diff.mean()), float(np.quantile(boot, alpha / 2)), float(np.quantile(boot, 1 - alpha / 2))


def mcnemar_p(candidate: Sequence[bool], champion: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value on the discordant pairs (reported beside the bootstrap)."""
    from scipy.stats import binomtest

    only_cand = sum(1 for a, b in zip(candidate, champion) if a and not b)
    only_champ = sum(1 for a, b in zip(candidate, champion) if b and not a)
    n = only_cand + only_champ
    return 1.0 if n == 0 else float(binomtest(only_cand, n, 0.5).pvalue)


def decide(inp: GateInput, policy: Policy) -> Decision:
    """All checks, each with value and threshold; the candidate passes only if every check passes."""
    checks: list[Check] = []
    m = inp.metrics
    ok_eval = m is not None and m.get("status", "ok") == "ok" and all(_finite(m.get(k)) for k in HEADLINE)
    checks.append(Check("evaluation", ok_eval, "present" if m is not None else "missing", "present, finite",
                        "" if ok_eval else ("evaluation missing" if m is None else
                                            "evaluation failed or has NaN/missing headline metrics")))
    checks.append(Check("data_validation", inp.validation_passed is True, inp.validation_passed, True,
                        "" if inp.validation_passed else "data validation did not pass (or no record)"))
    checks.append(Check("leakage", inp.leakage == 0, inp.leakage, 0,
                        "" if inp.leakage == 0 else ("leakage not checked" if inp.leakage is None
                                                     else f"{inp.leakage} duplicate groups straddle splits")))
    test_hash = m.get("test_hash") if m else None
    checks.append(Check("test_set", test_hash == inp.test_hash_now, (test_hash or "")[:12], inp.test_hash_now[:12],
                        "" if test_hash == inp.test_hash_now else "metrics were computed on a different test set"))
    if not ok_eval:  # nothing below can be trusted
        return Decision(False, checks, inp.champion.version if inp.champion else None)

    checks.append(Check("min_accuracy", m["accuracy"] >= policy.min_accuracy, m["accuracy"], policy.min_accuracy,
                        _bound("accuracy", m["accuracy"], policy.min_accuracy, floor=True)))
    checks.append(Check("min_macro_f1", m["macro_f1"] >= policy.min_macro_f1, m["macro_f1"], policy.min_macro_f1,
                        _bound("macro F1", m["macro_f1"], policy.min_macro_f1, floor=True)))
    if policy.max_ece is not None:  # the served model's calibration: before temperature scaling
        ece = m.get("ece_before", m.get("ece"))
        checks.append(Check("max_ece", _finite(ece) and ece <= policy.max_ece, ece, policy.max_ece,
                            _bound("calibration error", ece, policy.max_ece, floor=False)))
    if policy.max_latency_ms_b1 is not None:
        lat = m.get("latency_ms_b1")
        checks.append(Check("max_latency_ms_b1", _finite(lat) and lat <= policy.max_latency_ms_b1, lat,
                            policy.max_latency_ms_b1, _bound("latency", lat, policy.max_latency_ms_b1, floor=False)))
    if policy.min_onnx_agreement is not None:
        agree = (m.get("onnx") or {}).get("top1_agreement")
        checks.append(Check("onnx_parity", _finite(agree) and agree >= policy.min_onnx_agreement, agree,
                            policy.min_onnx_agreement,
                            _bound("ONNX parity", agree, policy.min_onnx_agreement, floor=True)))

    champ = inp.champion
    if champ is not None:
        checks += _against_champion(inp, champ, policy)
    return Decision(all(c.passed for c in checks), checks, champ.version if champ else None)


def _against_champion(inp: GateInput, champ: ChampionScore, policy: Policy) -> list[Check]:
    checks: list[Check] = []
    if inp.data_time and champ.data_time:
        fresh = inp.data_time >= champ.data_time
        checks.append(Check("data_freshness", fresh, inp.data_time, champ.data_time,
                            "" if fresh else "the candidate was trained on data older than the champion's"))
    cand = inp.candidate_correct
    if cand is not None and champ.compared is not None:
        cand = [cand[i] for i in champ.compared] if all(0 <= i < len(cand) for i in champ.compared) else None
    on = _compared_on(champ, len(cand) if cand is not None else 0)
    if cand is None or len(cand) != len(champ.correct) or not len(cand):
        checks.append(Check("non_inferiority", False, None, -policy.margin,
                            "no paired per-image results for the candidate and the champion"
                            + (f" ({on})" if champ.excluded else "")))
        return checks
    diff, low, high = paired_bootstrap_diff(cand, champ.correct, samples=policy.bootstrap_samples,
                                            confidence=policy.confidence, seed=policy.seed)
    p = mcnemar_p(cand, champ.correct)
    checks.append(Check("non_inferiority", low > -policy.margin, [low, high], -policy.margin,
                        f"accuracy difference {diff:+.4f}, {policy.confidence:.0%} paired bootstrap interval "
                        f"[{low:+.4f}, {high:+.4f}] must stay above -{policy.margin}; McNemar p={p:.3f}; {on}"))
    if champ.candidate_per_class_recall is not None:
        per_class = {c: {"recall": r} for c, r in champ.candidate_per_class_recall.items()}
    else:
        per_class = (inp.metrics or {}).get("per_class", {})
    drops = {c: champ.per_class_recall[c] - v["recall"] for c, v in per_class.items()
             if c in champ.per_class_recall and _finite(v.get("recall"))}
    worst = max(drops, key=drops.get) if drops else None
    worst_drop = drops[worst] if worst else 0.0
    checks.append(Check("class_recall_drop", worst_drop <= policy.max_class_recall_drop, worst_drop,
                        policy.max_class_recall_drop,
                        _recall_drop(worst, champ.per_class_recall[worst], per_class[worst]["recall"])
                        if worst else "no shared classes"))
    return checks


def _compared_on(champ: ChampionScore, n: int) -> str:
    """Which test images the comparison used, in words."""
    if not champ.seen_known:
        return (f"on all {n} test images (v{champ.version} has no record of the images it trained on: any it "
                "saw count for it)")
    if champ.excluded:
        return (f"on the {n} test images v{champ.version} never trained on ({champ.excluded} it trained or chose "
                "its epoch on left out)")
    return f"on all {n} test images"


def per_class_recall(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Recall per true class from label/prediction pairs."""
    totals: dict[str, int] = {}
    hits: dict[str, int] = {}
    for y, p in zip(labels, predictions):
        totals[y] = totals.get(y, 0) + 1
        hits[y] = hits.get(y, 0) + (y == p)
    return {c: hits[c] / totals[c] for c in sorted(totals)}


def check_gate_passed(tags: dict[str, str]) -> str | None:
    """Pure: why a version's own gate record does not let it serve (None when its gate passed). What a rollback
    checks: its target was champion before, so the gate compared it with an older champion by necessity."""
    if tags.get("gate") != "passed":
        return f"its gate record is {tags.get('gate', 'missing')!r}: {tags.get('gate.reasons', 'never gated')}"
    return None


def check_gate_record(tags: dict[str, str], *, champion_now: str | None) -> str | None:
    """Pure: why a version may not be promoted by hand (None when its gate record allows it).

    A passed gate that compared the version with another champion than today's is stale, and nothing gates it
    again: `imgclf run` gates only a version it has just registered (or one whose gate never decided)."""
    if problem := check_gate_passed(tags):
        return problem
    compared = tags.get("gate.compared_with") or None
    if compared != champion_now:
        then = f"v{compared} (then champion)" if compared else "no champion (floors only)"
        if champion_now is None:
            return f"its gate compared it against {then} but there is no champion now"
        return (f"its gate compared it against {then} but champion is now v{champion_now}, and no gate has compared "
                f"the two (`imgclf run` never gates an already registered version again): compare them yourself "
                f"(each version's test.* tags and gate/decision.md, `imgclf ui`), then --force it if it should serve")
    return None
