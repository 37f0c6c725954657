"""The promotion gate as a pure function: every refusal reason, paired statistics, per-class regression."""

import math

import pytest

from tasks.gate import (
    ChampionScore,
    GateInput,
    Policy,
    check_gate_record,
    decide,
    mcnemar_p,
    paired_bootstrap_diff,
    per_class_recall,
)

N = 200
POLICY = Policy(min_accuracy=0.8, min_macro_f1=0.8, margin=0.02, max_class_recall_drop=0.1, bootstrap_samples=1000)
HASH = "ab" * 32


def metrics(acc=0.95, f1=0.95, recall=None, **extra):
    recall = recall or {"a": 0.95, "b": 0.95}
    return {"accuracy": acc, "macro_f1": f1, "test_hash": HASH, "status": "ok",
            "per_class": {c: {"recall": r} for c, r in recall.items()}, **extra}


def correct(n_wrong: int, n: int = N) -> list[bool]:
    return [i >= n_wrong for i in range(n)]


def champ(n_wrong=10, recall=None, data_time="2026-01-01T00:00:00+00:00"):
    return ChampionScore("3", correct(n_wrong), recall or {"a": 0.95, "b": 0.95}, data_time)


def inp(**kw):
    base = dict(metrics=metrics(), candidate_correct=correct(10), test_hash_now=HASH, validation_passed=True,
                leakage=0, data_time="2026-02-01T00:00:00+00:00", champion=None)
    return GateInput(**{**base, **kw})


def failed(decision):
    return {c.name for c in decision.checks if not c.passed}


def test_first_run_without_champion_is_judged_on_floors_only():
    d = decide(inp(), POLICY)
    assert d.passed and d.compared_with is None
    assert "non_inferiority" not in {c.name for c in d.checks}
    low = decide(inp(metrics=metrics(acc=0.7)), POLICY)
    assert not low.passed and failed(low) == {"min_accuracy"}


def test_better_and_equal_candidates_pass_against_the_champion():
    better = decide(inp(candidate_correct=correct(4), champion=champ(10)), POLICY)
    equal = decide(inp(champion=champ(10)), POLICY)
    assert better.passed and equal.passed and better.compared_with == "3"


def test_worse_candidate_fails_non_inferiority_on_the_same_test_set():
    d = decide(inp(candidate_correct=correct(30), champion=champ(10)), POLICY)
    assert not d.passed and "non_inferiority" in failed(d)
    assert any("paired bootstrap" in r for r in d.reasons)


def test_a_regression_in_one_class_only_fails_even_when_accuracy_holds():
    cand = metrics(recall={"a": 0.99, "b": 0.80})
    d = decide(inp(metrics=cand, champion=champ(10, recall={"a": 0.95, "b": 0.95})), POLICY)
    assert failed(d) == {"class_recall_drop"}
    assert "'b'" in next(c.detail for c in d.checks if c.name == "class_recall_drop")


@pytest.mark.parametrize("bad", [float("nan"), None])
def test_nan_or_missing_metrics_are_refused(bad):
    d = decide(inp(metrics=metrics(acc=bad)), POLICY)
    assert not d.passed and "evaluation" in failed(d)
    assert not decide(inp(metrics=None), POLICY).passed


def test_failed_evaluation_status_is_refused():
    assert "evaluation" in failed(decide(inp(metrics=metrics(status="failed")), POLICY))


def test_a_different_test_set_is_refused():
    d = decide(inp(test_hash_now="cd" * 32), POLICY)
    assert failed(d) == {"test_set"}


def test_stale_data_is_refused():
    d = decide(inp(data_time="2025-06-01T00:00:00+00:00", champion=champ(10)), POLICY)
    assert failed(d) == {"data_freshness"}


def test_failed_validation_and_leakage_are_refused():
    assert failed(decide(inp(validation_passed=False), POLICY)) == {"data_validation"}
    assert failed(decide(inp(validation_passed=None), POLICY)) == {"data_validation"}
    assert failed(decide(inp(leakage=2), POLICY)) == {"leakage"}
    assert failed(decide(inp(leakage=None), POLICY)) == {"leakage"}


def test_optional_budgets_calibration_latency_and_onnx_parity():
    policy = Policy(max_ece=0.05, max_latency_ms_b1=10.0, min_onnx_agreement=0.99)
    good = metrics(ece=0.02, latency_ms_b1=3.0, onnx={"top1_agreement": 1.0})
    assert decide(inp(metrics=good), policy).passed
    bad = metrics(ece=0.2, latency_ms_b1=30.0, onnx={"top1_agreement": 0.9})
    assert failed(decide(inp(metrics=bad), policy)) == {"max_ece", "max_latency_ms_b1", "onnx_parity"}
    assert failed(decide(inp(metrics=metrics()), policy)) == {"max_ece", "max_latency_ms_b1", "onnx_parity"}


def test_champion_that_could_not_be_rescored_is_a_refusal_not_a_crash():
    broken = ChampionScore("3", [], {}, None)
    assert "non_inferiority" in failed(decide(inp(champion=broken), POLICY))


def test_paired_bootstrap_is_deterministic_and_brackets_the_difference():
    a, b = correct(5), correct(15)
    diff, low, high = paired_bootstrap_diff(a, b, samples=2000, confidence=0.95, seed=1)
    assert diff == pytest.approx(10 / N) and low <= diff <= high
    assert (diff, low, high) == paired_bootstrap_diff(a, b, samples=2000, confidence=0.95, seed=1)
    with pytest.raises(ValueError):
        paired_bootstrap_diff([True], [True, False], samples=10, confidence=0.95, seed=0)


def test_mcnemar_is_one_for_identical_models_and_small_for_a_clear_win():
    assert mcnemar_p(correct(10), correct(10)) == 1.0
    assert mcnemar_p(correct(0), correct(40)) < 1e-6


def test_decision_record_has_json_and_a_markdown_table():
    d = decide(inp(candidate_correct=correct(30), champion=champ(10)), POLICY)
    record = d.to_dict()
    assert record["passed"] is False and record["compared_with"] == "3" and record["reasons"]
    assert {"name", "passed", "value", "threshold", "detail"} <= set(record["checks"][0])
    md = d.markdown()
    assert "| check | value | threshold | result | detail |" in md and "| non_inferiority |" in md and "FAIL" in md


def test_per_class_recall():
    assert per_class_recall(["a", "a", "b"], ["a", "b", "b"]) == {"a": 0.5, "b": 1.0}
    assert math.isclose(sum(per_class_recall(["x"] * 4, ["x", "x", "y", "x"]).values()), 0.75)


def test_manual_promotion_rechecks_the_gate_record():
    ok = {"gate": "passed", "gate.compared_with": "3"}
    assert check_gate_record(ok, champion_now="3") is None
    assert "now v4" in check_gate_record(ok, champion_now="4")
    assert "'failed'" in check_gate_record({"gate": "failed", "gate.reasons": "x"}, champion_now="3")
    assert check_gate_record({"gate": "passed", "gate.compared_with": ""}, champion_now=None) is None


def test_calibration_ceiling_applies_to_the_served_uncalibrated_probabilities():
    policy = Policy(max_ece=0.05)
    scaled_only = metrics(ece=0.01, ece_before=0.2)  # temperature scaling is reported, not served
    assert failed(decide(inp(metrics=scaled_only), policy)) == {"max_ece"}
    assert decide(inp(metrics=metrics(ece=0.01, ece_before=0.03)), policy).passed


def test_the_champion_is_compared_only_on_the_test_images_it_never_trained_on():
    """After a data change, images the champion trained on can be test images (a moved group, re-added bytes).
    Its score on those would flatter it, so the comparison is paired on the rest (ChampionScore.compared)."""
    # 300 test images; the first 100 are ones the champion trained on: it is right on all of them, the
    # candidate is wrong on 20 of them. On the other 200 both are wrong on the same 10.
    cand = [i >= 20 for i in range(100)] + correct(10)
    fair = ChampionScore("3", correct(10), {"a": 0.95, "b": 0.95}, None, compared=list(range(100, 300)),
                         candidate_per_class_recall={"a": 0.95, "b": 0.95}, excluded=100)
    d = decide(inp(candidate_correct=cand, champion=fair), POLICY)
    assert d.passed, d.reasons
    (check,) = [c for c in d.checks if c.name == "non_inferiority"]
    assert "on the 200 test images v3 never trained on (100 it trained or chose its epoch on left out)" in check.detail
    flattered = ChampionScore("3", [True] * 100 + correct(10), {"a": 0.95, "b": 0.95}, None)  # the same, on all
    assert "non_inferiority" in failed(decide(inp(candidate_correct=cand, champion=flattered), POLICY))


def test_the_recall_drop_compares_both_models_on_the_same_images():
    """The candidate's recall on the compared images, not on its whole test split (metrics.json)."""
    on_same = ChampionScore("3", correct(10), {"a": 0.95, "b": 0.95}, None, compared=list(range(N)),
                            candidate_per_class_recall={"a": 0.95, "b": 0.70})
    d = decide(inp(metrics=metrics(recall={"a": 0.95, "b": 0.95}), champion=on_same), POLICY)
    assert failed(d) == {"class_recall_drop"}
    assert any("class 'b' lost 0.2500 (recall 0.9500 -> 0.7000)" in r for r in d.reasons)  # a drop, not "+0.2500"


def test_a_champion_with_no_record_of_its_training_images_is_compared_on_all_and_says_so():
    old = ChampionScore("3", correct(10), {"a": 0.95, "b": 0.95}, None, seen_known=False)
    d = decide(inp(champion=old), POLICY)
    (check,) = [c for c in d.checks if c.name == "non_inferiority"]
    assert d.passed and "has no record of the images it trained on" in check.detail


def test_no_test_image_left_that_the_champion_never_saw_refuses_with_the_reason():
    saw_all = ChampionScore("3", [], {}, None, compared=[], excluded=N)
    d = decide(inp(champion=saw_all), POLICY)
    assert "non_inferiority" in failed(d)
    assert any("no paired per-image results" in r and f"{N} it trained or chose its epoch on left out" in r
               for r in d.reasons)
