"""Promotion decision (pure) and the registry side effects against a real sqlite MLflow store."""

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from tasks import registry, tracking
from tasks.models import build_model, save_model
from tasks.preprocess import Preprocess
from tasks.gate import Decision, GateInput, Policy, check_gate_passed, check_gate_record, decide
from tasks.registry import PromotionConflict, cross_split_duplicates, duplicate_groups, rollback_target


def _moves(*moves: str) -> list[dict[str, str]]:
    """History entries from "1>2" (a promotion) and "rb 2>1" (a rollback)."""
    out = []
    for move in moves:
        kind, _, path = move.rpartition(" ")
        frm, to = path.split(">")
        out.append({"from": frm, "to": to, "reason": "test", "kind": "rollback" if kind == "rb" else "promote"})
    return out


def test_rollback_goes_back_one_move():
    assert rollback_target(_moves(">1", "1>2"), "2") == "1"
    assert rollback_target(_moves(">1", "1>2", "2>3"), "3") == "2"
    assert rollback_target(_moves(">1"), "1") is None  # the first champion: nothing before it


def test_a_second_rollback_never_returns_to_what_the_first_undid():
    """The user's report: v2 forced in over its failed gate, rolled back to v1; a second rollback put v2 back."""
    assert rollback_target(_moves(">1", "1>2", "rb 2>1"), "1") is None
    history = _moves(">1", "1>2", "2>3", "rb 3>2")
    assert rollback_target(history, "2") == "1"
    assert rollback_target(history + _moves("rb 2>1"), "1") is None


def test_rollback_after_promote_rollback_promote_sequences():
    assert rollback_target(_moves(">1", "1>2", "rb 2>1", "1>3"), "3") == "1"
    assert rollback_target(_moves(">1", "1>2", "rb 2>1", "1>3", "rb 3>1"), "1") is None
    history = _moves(">1", "1>2", "2>3", "rb 3>2", "2>4")
    assert rollback_target(history, "4") == "2"
    assert rollback_target(history + _moves("rb 4>2"), "2") == "1"
    # promoting the old champion again by hand is a move like any other: rolling back undoes it
    assert rollback_target(_moves(">1", "1>2", "rb 2>1", "1>2"), "2") == "1"
    assert rollback_target(_moves(">1", "1>2", "2>1"), "1") == "2"


def test_rollback_with_no_history_or_a_history_that_does_not_end_at_the_champion():
    assert rollback_target([], None) is None
    assert rollback_target([], "3") is None
    assert rollback_target(_moves(">1", "1>2"), None) is None
    assert rollback_target(_moves(">1", "1>2"), "5") is None  # the alias was moved outside the history
    # a move from a champion the history never set (moved by hand in MLflow) still says where it came from
    assert rollback_target(_moves(">1", "7>3"), "3") == "7"


def test_rollback_reads_histories_written_before_moves_had_a_kind():
    old = [{"from": "", "to": "1", "reason": "gate passed (first champion: floors only)"},
           {"from": "1", "to": "2", "reason": "manual promotion (imgclf promote) FORCED over: ..."},
           {"from": "2", "to": "1", "reason": "rollback from v2"}]
    assert rollback_target(old, "1") is None
    # ... including one where the old rollback had already put v2 back: undoing that is still possible
    assert rollback_target(old + [{"from": "1", "to": "2", "reason": "rollback from v1"}], "2") == "1"


def test_a_rollback_target_must_have_passed_its_gate_and_a_promotion_a_current_one():
    assert check_gate_passed({"gate": "passed", "gate.compared_with": "1"}) is None
    assert "'failed': x" in check_gate_passed({"gate": "failed", "gate.reasons": "x"})
    assert "'missing'" in check_gate_passed({})
    stale = check_gate_record({"gate": "passed", "gate.compared_with": ""}, champion_now="4")
    assert "no champion (floors only)" in stale and "now v4" in stale
    assert "re-run `imgclf run`" not in stale and "never gates an already registered version again" in stale


def test_gate_details_are_rounded_and_a_recall_drop_reads_as_an_amount_lost():
    from tasks.gate import ChampionScore

    def fails(acc: float, recall: dict[str, float]) -> list[str]:
        inp = GateInput(metrics={"accuracy": acc, "macro_f1": 0.9, "test_hash": "h",
                                 "per_class": {c: {"recall": r} for c, r in recall.items()}},
                        candidate_correct=[True] * 9, test_hash_now="h", validation_passed=True, leakage=0,
                        champion=ChampionScore("3", [True] * 9, {"a": 1.0, "b": 1.0}))
        return decide(inp, Policy(min_accuracy=0.8, max_class_recall_drop=0.1, bootstrap_samples=100)).reasons

    reasons = fails(7 / 9, {"a": 1.0, "b": 7 / 9})
    assert "min_accuracy: accuracy 0.7778, below the floor 0.8000" in reasons
    assert "class_recall_drop: largest recall drop: class 'b' lost 0.2222 (recall 1.0000 -> 0.7778)" in reasons
    assert not any("0.777777" in r or "+0.2222" in r for r in reasons)


def test_tracking_uri_is_made_absolute_against_the_project(tmp_path: Path):
    assert tracking.resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


def test_background_returns_the_value_or_raises_in_the_caller():
    assert tracking.Background(lambda a, b: a + b, 2, 3).result() == 5
    with pytest.raises(ValueError, match="boom"):
        tracking.Background(lambda: (_ for _ in ()).throw(ValueError("boom"))).result()


@pytest.fixture()
def store(tmp_path: Path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    tracking.configure("sqlite:///mlflow.db", "test", tmp_path)
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def _logged_model(tmp_path: Path, seed: int) -> tuple[str, str]:
    import mlflow

    torch.manual_seed(seed)
    model_dir = tmp_path / f"model{seed}"
    save_model(model_dir, build_model("smallcnn", num_classes=2, in_channels=1), name="smallcnn",
               classes=["dark", "light"], preprocess=Preprocess.for_mode("L", 16))
    with mlflow.start_run() as run:
        uri = tracking.log_serving_model(model_dir)
    return run.info.run_id, uri


def test_model_logging_and_loading_check_requirements_without_scanning_every_distribution(tmp_path: Path, store,
                                                                                         monkeypatch, caplog):
    import importlib_metadata
    from mlflow.utils import requirements_utils as ru

    scans = []
    monkeypatch.setattr(importlib_metadata, "packages_distributions", lambda: scans.append(1) or {})
    monkeypatch.setattr(ru, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(ru, "_PACKAGES_TO_MODULES", None)
    _, uri = _logged_model(tmp_path, 1)
    assert tracking.load_pyfunc(uri).metadata.flavors["python_function"]
    assert scans == []  # (MLflow swallows errors inside its check, so count the scans)
    # the empty map was only for those calls: anything else in the process still gets MLflow's own
    assert ru._MODULES_TO_PACKAGES is None and ru._PACKAGES_TO_MODULES is None
    # and the check still works: a requirement this environment does not satisfy is reported
    caplog.set_level("WARNING")
    with tracking.requirements_checked_by_version():
        ru.warn_dependency_requirement_mismatches(["torch==0.0.1", "no-such-package-imgclf==1.0", "numpy"])
    assert "torch (current: " in caplog.text and "required: torch==0.0.1" in caplog.text
    assert "no-such-package-imgclf (current: uninstalled" in caplog.text and "numpy (current" not in caplog.text


def test_registration_is_idempotent_and_champion_moves_are_recorded(tmp_path: Path, store):
    run1, uri1 = _logged_model(tmp_path, 1)
    first = registry.register(store, "m", model_uri=uri1, run_id=run1, tags={"test.accuracy": "0.9"})
    again = registry.register(store, "m", model_uri=uri1, run_id=run1, tags={"test.accuracy": "0.9"})
    assert first.created and not again.created and first.version == again.version == "1"
    assert len(store.search_model_versions("name='m'")) == 1
    assert str(registry.alias_version(store, "m", "challenger").version) == "1"

    assert registry.champion_version(store, "m") is None
    registry.promote_if_unchanged(store, "m", "1", expected=None, reason="first", lock_path=tmp_path / "lock")
    assert str(registry.champion_version(store, "m").version) == "1"

    run2, uri2 = _logged_model(tmp_path, 2)
    second = registry.register(store, "m", model_uri=uri2, run_id=run2, tags={"test.accuracy": "0.95"})
    assert str(registry.alias_version(store, "m", "challenger").version) == second.version == "2"
    registry.promote_if_unchanged(store, "m", "2", expected="1", reason="better", lock_path=tmp_path / "lock")
    history = registry.alias_history(store, "m")
    assert [(h["from"], h["to"], h["reason"]) for h in history] == [("", "1", "first"), ("1", "2", "better")]
    assert all(h["by"] and h["time"] for h in history)
    assert rollback_target(history, "2") == "1"


def test_two_racing_promotions_end_with_exactly_one_winner(tmp_path: Path, store):
    from concurrent.futures import ThreadPoolExecutor

    versions = []
    for seed in (1, 2, 3):
        run, uri = _logged_model(tmp_path, seed)
        versions.append(registry.register(store, "race", model_uri=uri, run_id=run, tags={}).version)
    registry.promote_if_unchanged(store, "race", versions[0], expected=None, reason="first", lock_path=tmp_path / "l")

    def attempt(version: str) -> str:
        try:
            registry.promote_if_unchanged(store, "race", version, expected=versions[0], reason="gate passed",
                                          lock_path=tmp_path / "l")
            return "promoted"
        except PromotionConflict as exc:
            return str(exc)

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(attempt, versions[1:]))
    assert outcomes.count("promoted") == 1
    loser = next(o for o in outcomes if o != "promoted")
    assert "not promoted" in loser and f"v{versions[0]}" in loser
    winner = versions[1 + outcomes.index("promoted")]
    assert str(registry.champion_version(store, "race").version) == winner
    assert len(registry.alias_history(store, "race")) == 2


def test_a_rollback_moves_by_compare_and_set_and_is_recorded_as_one(tmp_path: Path, store):
    assert registry.alias_history(store, "undo") == []  # no registered model yet: no moves, no error
    store.create_registered_model("undo")
    for _ in range(3):
        store.create_model_version("undo", source=str(tmp_path / "model"))
    registry.promote_if_unchanged(store, "undo", "1", expected=None, reason="first", lock_path=tmp_path / "l")
    registry.promote_if_unchanged(store, "undo", "2", expected="1", reason="better", lock_path=tmp_path / "l")
    with pytest.raises(PromotionConflict, match="nothing moved") as info:  # chose its target when v3 was champion
        registry.promote_if_unchanged(store, "undo", "1", expected="3", reason="rollback from v3",
                                      lock_path=tmp_path / "l", kind="rollback")
    assert (info.value.now, info.value.expected) == ("2", "3")
    assert str(registry.champion_version(store, "undo").version) == "2"
    registry.promote_if_unchanged(store, "undo", "1", expected="2", reason="rollback from v2",
                                  lock_path=tmp_path / "l", kind="rollback")
    history = registry.alias_history(store, "undo")
    assert [(h["from"], h["to"], h["kind"]) for h in history] == [("", "1", "promote"), ("1", "2", "promote"),
                                                                  ("2", "1", "rollback")]
    assert rollback_target(history, "1") is None


def test_decision_is_recorded_on_the_run_and_as_version_tags(tmp_path: Path, store):
    import mlflow

    run, uri = _logged_model(tmp_path, 4)
    version = registry.register(store, "rec", model_uri=uri, run_id=run, tags={}).version
    decision = Decision(False, [], "7")
    registry.record_decision(store, "rec", version, run, decision)
    tags = store.get_model_version("rec", version).tags
    assert tags["gate"] == "failed" and tags["gate.compared_with"] == "7"
    local = mlflow.artifacts.download_artifacts(run_id=run, artifact_path="gate", dst_path=str(tmp_path / "dl"))
    assert sorted(p.name for p in Path(local).iterdir()) == ["decision.json", "decision.md"]


def test_cross_split_duplicates_counts_groups_in_more_than_one_split():
    manifest = pd.DataFrame({"path": ["a", "b", "c", "d"], "sha256": ["1", "1", "2", "3"]})
    splits = {"train": pd.DataFrame({"path": ["a", "c"]}), "test": pd.DataFrame({"path": ["b", "d"]})}
    assert cross_split_duplicates(manifest, splits) == 1
    splits = {"train": pd.DataFrame({"path": ["a", "b"]}), "test": pd.DataFrame({"path": ["c", "d"]})}
    assert cross_split_duplicates(manifest, splits) == 0
    grouped = manifest.assign(group=["g1", "g2", "g1", "g3"])  # near-duplicate groups win over sha256
    assert cross_split_duplicates(grouped, splits) == 1
    assert cross_split_duplicates(manifest.assign(group=[1, 2, 1, 3]), splits) == 1  # numeric keys count too


def test_duplicate_groups_from_the_split_stage_with_rows_that_were_never_read():
    """A manifest as validate writes it when ingest refused files: their rows have no sha256 (NaN once read
    back). They used to crash the gate ("s" + NaN) whenever the split stage had found near-duplicates."""
    import io

    manifest = pd.read_csv(io.StringIO("path,label,sha256\na.png,x,11\nb.png,x,22\nc.png,y,33\n"
                                       "stray.jpg,,\nd.png,y,11\n"), dtype={"label": str, "sha256": str})
    grouped = pd.DataFrame({"path": ["a.png", "c.png"], "group": ["0", "0"]})  # a and c: near-duplicates
    groups = duplicate_groups(manifest, grouped)
    assert groups == ["g0", "s22", "g0", None, "s11"]
    splits = {"train": pd.DataFrame({"path": ["a.png", "b.png"]}), "test": pd.DataFrame({"path": ["c.png", "d.png"]})}
    assert cross_split_duplicates(manifest.assign(group=groups), splits) == 1  # group 0 (a, c) straddles the two
    assert cross_split_duplicates(manifest, splits) == 1  # by sha256 alone: a and d do; the row without one is in no group


def test_served_model_loads_without_pickle_and_predicts_paths_bytes_and_base64(tmp_path: Path, store):
    import base64

    import mlflow

    run_id, uri = _logged_model(tmp_path, 3)
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    model = mlflow.pyfunc.load_model(uri, model_config={"allow_paths": True})  # paths: in-process only
    img = tmp_path / "x.png"
    Image.new("L", (20, 20), 200).save(img)
    raw = img.read_bytes()
    out = model.predict(pd.DataFrame({"image": [str(img), raw, base64.b64encode(raw).decode()]}))
    assert list(out.columns) == ["label", "probability", "p_dark", "p_light", "error"]
    assert len(out) == 3 and out["label"].nunique() == 1 and out["error"].isna().all()
    assert out["probability"].between(0.5, 1.0).all()
    missing = model.predict(pd.DataFrame({"image": ["/no/such/file.png"]}))
    assert missing.loc[0, "label"] is None
    assert missing.loc[0, "error"] == "neither a readable file nor base64 image data"


def _gate_project(root: Path, test_rows: list[tuple[str, str, str]]) -> None:
    """The outputs gate_input reads: manifest (path, label, sha256), splits, candidate predictions, reports."""
    (root / "data/splits").mkdir(parents=True)
    (root / "reports/validation").mkdir(parents=True)
    train = [("old/a.png", "dark", "aa"), ("old/b.png", "light", "bb")]
    rows = train + test_rows
    pd.DataFrame(rows, columns=["path", "label", "sha256"]).to_csv(root / "data/manifest.csv", index=False)
    pd.DataFrame(train[:1], columns=["path", "label", "sha256"]).to_csv(root / "data/splits/train.csv", index=False)
    pd.DataFrame(train[1:], columns=["path", "label", "sha256"]).to_csv(root / "data/splits/val.csv", index=False)
    pd.DataFrame(test_rows, columns=["path", "label", "sha256"]).to_csv(root / "data/splits/test.csv", index=False)
    pd.DataFrame({"path": [r[0] for r in test_rows], "label": [r[1] for r in test_rows],
                  "prediction": [r[1] for r in test_rows]}).to_csv(root / "reports/predictions.csv", index=False)
    (root / "reports/metrics.json").write_text("{}")
    (root / "reports/validation/summary.json").write_text('{"success": true}')


def test_the_gate_rescores_the_champion_only_on_test_images_it_never_saw(tmp_path: Path, store, monkeypatch):
    """The champion's run records the sha256 of its train and val images (log_seen); when a new split puts some
    of them in the test set, gate_input leaves them out of the champion's re-score and the paired comparison."""
    from tasks import registry

    _gate_project(tmp_path, [("old/a.png", "dark", "aa")])  # the champion's split: a in train, b in val
    run_id, uri = _logged_model(tmp_path, 1)
    registry.log_seen(store, run_id, tmp_path)
    assert registry._seen_by(run_id) == {"aa", "bb"}
    version = registry.register(store, "fair", model_uri=uri, run_id=run_id, tags={}).version
    registry.set_champion(store, "fair", version, "test")
    # the data changed: a (trained on) and b (validated on) are test images now, beside two new ones
    new = tmp_path / "new"
    _gate_project(new, [("old/a.png", "dark", "aa"), ("old/b.png", "light", "bb"), ("new/c.png", "dark", "cc"),
                        ("new/d.png", "light", float("nan"))])
    scored: list[list[str]] = []
    monkeypatch.setattr(registry, "rescore", lambda model, paths: scored.append([p.name for p in paths])
                        or ["light"] * len(paths))
    facts = registry.gate_input(new, store, "fair", candidate_version="99")
    assert scored == [["c.png", "d.png"]]  # (d has no sha256: never read, so never seen either)
    champ = facts.champion
    assert champ.compared == [2, 3] and champ.excluded == 2 and champ.seen_known
    assert champ.correct == [False, True] and champ.candidate_per_class_recall == {"dark": 1.0, "light": 1.0}
    # a champion registered before runs recorded what they saw: compared on every test image, and marked so
    other_run, other_uri = _logged_model(tmp_path, 2)
    assert registry._seen_by(other_run) is None
    registry.set_champion(store, "fair", registry.register(store, "fair", model_uri=other_uri, run_id=other_run,
                                                          tags={}).version, "test")
    facts = registry.gate_input(new, store, "fair", candidate_version="99")
    assert facts.champion.compared == [0, 1, 2, 3] and not facts.champion.seen_known


def test_seen_images_are_the_train_and_val_images_by_content():
    manifest = pd.DataFrame({"path": ["a", "b", "c", "d", "e"], "sha256": ["1", "2", "3", "1", None]})
    splits = {"train": pd.DataFrame({"path": ["a", "e"]}), "val": pd.DataFrame({"path": ["b", "d"]}),
              "test": pd.DataFrame({"path": ["c"]})}
    from tasks.registry import seen_images, unseen

    assert seen_images(manifest, splits) == ["1", "2"]  # unique; e never read; test images not seen
    assert unseen(["3", "1", None, "2", "9"], {"1", "2"}) == [0, 2, 4]
