"""tasks/config.py: params.yaml -> frozen Params; overrides; write/restore of params.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tasks.config import (
    Params,
    ParamsError,
    apply_overrides,
    load_params,
    parse_overrides,
    parse_params,
    read_raw,
    restore_file,
    write_overrides,
)

REPO_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    """A copy of the repo's params.yaml that tests may modify."""
    dest = tmp_path / "params.yaml"
    shutil.copyfile(REPO_PARAMS, dest)
    return dest


# --- loading -----------------------------------------------------------------------------------

def test_repo_params_load_with_every_section():
    params = load_params(REPO_PARAMS)
    assert isinstance(params, Params)
    raw = read_raw(REPO_PARAMS)
    # every section the model knows is spelled out in params.yaml, and nothing else is there
    assert set(raw) == set(Params().to_dict())
    for section, values in Params().to_dict().items():
        assert set(raw[section]) == set(values), section


def test_repo_params_values_are_the_documented_defaults():
    params = load_params(REPO_PARAMS)
    assert params.ingest.source == "sample:digits"
    assert params.ingest.sha256 is None
    assert params.validate_.labels is None
    assert isinstance(params.base.seed, int)
    assert 0 < params.split.val_fraction < 1 and 0 < params.split.test_fraction < 1
    assert params.train.optimizer in ("adamw", "sgd")
    # the resolved dict has params.yaml's shape (aliases, not the Python attribute names)
    resolved = params.to_dict()
    assert "validate" in resolved and "register" in resolved
    assert "validate_" not in resolved and "register_" not in resolved


def test_params_are_frozen():
    params = load_params(REPO_PARAMS)
    with pytest.raises(ValidationError):
        params.train.epochs = 99  # type: ignore[misc]


def test_digest_is_stable_and_changes_with_values():
    a = load_params(REPO_PARAMS)
    b = load_params(REPO_PARAMS)
    c = load_params(REPO_PARAMS, {"train.epochs": a.train.epochs + 1})
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()


def test_missing_params_file_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_params_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


# --- overrides -----------------------------------------------------------------------------------

def test_parse_overrides_types_values_as_yaml():
    parsed = parse_overrides([
        "train.epochs=5",
        "train.lr=0.001",
        "train.hflip=true",
        "train.model=resnet18",
        "validate.labels=[cat, dog]",
        "ingest.sha256=null",
        "ingest.watch=",
    ])
    assert parsed == {
        "train.epochs": 5,
        "train.lr": 0.001,
        "train.hflip": True,
        "train.model": "resnet18",
        "validate.labels": ["cat", "dog"],
        "ingest.sha256": None,
        "ingest.watch": None,
    }
    assert type(parsed["train.epochs"]) is int
    assert type(parsed["train.lr"]) is float


def test_parse_overrides_keeps_equals_signs_in_the_value():
    assert parse_overrides(["register.tracking_uri=sqlite:///a=b.db"]) == {
        "register.tracking_uri": "sqlite:///a=b.db"}


@pytest.mark.parametrize("item", ["train.epochs", "epochs=5", "=5"])
def test_parse_overrides_rejects_malformed_items(item):
    with pytest.raises(ParamsError, match="section.key=value"):
        parse_overrides([item])


def test_override_in_exponent_notation_still_loads_as_float():
    params = load_params(REPO_PARAMS, parse_overrides(["train.lr=1e-3"]))
    assert params.train.lr == pytest.approx(0.001)


def test_overrides_apply_to_loaded_params():
    params = load_params(REPO_PARAMS, parse_overrides(
        ["train.epochs=2", "validate.min_images_per_class=3", "base.seed=7"]))
    assert params.train.epochs == 2
    assert params.validate_.min_images_per_class == 3
    assert params.base.seed == 7


def test_apply_overrides_does_not_mutate_its_input():
    raw = read_raw(REPO_PARAMS)
    before = yaml.safe_dump(raw)
    merged = apply_overrides(raw, {"train.epochs": 1})
    assert merged["train"]["epochs"] == 1
    assert yaml.safe_dump(raw) == before


@pytest.mark.parametrize("key", ["train.epoch", "trian.epochs", "train.epochs.value", "validate_.labels"])
def test_unknown_override_key_is_a_params_error_naming_it(key):
    with pytest.raises(ParamsError) as info:
        load_params(REPO_PARAMS, {key: 1})
    assert key in str(info.value)


def test_unknown_key_in_file_is_a_params_error_naming_it(params_copy):
    params_copy.write_text(params_copy.read_text() + "\nextra_section:\n  x: 1\n")
    with pytest.raises(ParamsError) as info:
        load_params(params_copy)
    assert "extra_section" in str(info.value)

    raw = read_raw(REPO_PARAMS)
    raw["train"]["epoch"] = 3
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert "train.epoch" in str(info.value)


@pytest.mark.parametrize("value", [0, -1, "many"])
def test_invalid_value_names_the_dotted_key(value):
    with pytest.raises(ParamsError) as info:
        load_params(REPO_PARAMS, {"train.epochs": value})
    assert "train.epochs" in str(info.value)


def test_invalid_value_in_aliased_section_names_the_yaml_key():
    with pytest.raises(ParamsError) as info:
        load_params(REPO_PARAMS, {"validate.min_images_per_class": 0})
    assert "validate.min_images_per_class" in str(info.value)


def test_split_fractions_must_leave_training_data():
    with pytest.raises(ParamsError, match="split"):
        load_params(REPO_PARAMS, {"split.val_fraction": 0.5, "split.test_fraction": 0.45})


def test_literal_fields_reject_unknown_choices():
    with pytest.raises(ParamsError) as info:
        load_params(REPO_PARAMS, {"train.optimizer": "adam"})
    assert "train.optimizer" in str(info.value)


# --- ingest source / watch ------------------------------------------------------------------------

def test_local_source_requires_matching_watch():
    with pytest.raises(ParamsError) as info:
        load_params(REPO_PARAMS, {"ingest.source": "data/images"})  # watch is still tasks/sample.py
    message = str(info.value)
    assert "ingest.watch" in message
    assert "data/images" in message


@pytest.mark.parametrize("source, watch", [
    ("data/images", "data/images"),
    ("data/images", "data"),
    ("./data/images/", "data/images"),
    ("archives/photos.tar.gz", "archives/photos.tar.gz"),
])
def test_local_source_accepts_watch_equal_to_or_above_it(source, watch):
    params = load_params(REPO_PARAMS, {"ingest.source": source, "ingest.watch": watch})
    assert params.ingest.source == source
    assert params.ingest.watch == watch


def test_watch_that_is_a_sibling_prefix_is_rejected():
    # "data/img" is a string prefix of "data/images" but not a folder above it
    with pytest.raises(ParamsError, match="ingest.watch"):
        load_params(REPO_PARAMS, {"ingest.source": "data/images", "ingest.watch": "data/img"})


def test_url_source_requires_sha256():
    with pytest.raises(ParamsError) as info:
        load_params(REPO_PARAMS, {"ingest.source": "https://example.com/images.zip"})
    assert "sha256" in str(info.value)

    params = load_params(REPO_PARAMS, {"ingest.source": "https://example.com/images.zip",
                                       "ingest.sha256": "ab" * 32})
    assert params.ingest.sha256 == "ab" * 32


def test_sample_source_needs_no_watch_or_checksum():
    params = load_params(REPO_PARAMS, {"ingest.source": "sample:digits", "ingest.watch": "anything"})
    assert params.ingest.source == "sample:digits"


# --- write_overrides / restore_file --------------------------------------------------------------

def test_write_overrides_keeps_comments_and_restore_puts_exact_bytes_back(params_copy):
    original = params_copy.read_bytes()
    comment_lines = [line.strip() for line in original.decode().splitlines() if line.strip().startswith("#")]
    assert comment_lines, "params.yaml is expected to carry comments"

    returned = write_overrides(params_copy, {"train.epochs": 3, "validate.labels": ["a", "b"]})
    assert returned == original

    changed = params_copy.read_text()
    assert params_copy.read_bytes() != original
    for line in comment_lines:
        assert line in changed, f"comment lost: {line}"
    params = load_params(params_copy)
    assert params.train.epochs == 3
    assert params.validate_.labels == ["a", "b"]
    # untouched values stay as they were
    assert params.train.lr == load_params(REPO_PARAMS).train.lr
    # no temp files left beside it
    assert sorted(p.name for p in params_copy.parent.iterdir()) == ["params.yaml"]

    restore_file(params_copy, returned)
    assert params_copy.read_bytes() == original
    assert sorted(p.name for p in params_copy.parent.iterdir()) == ["params.yaml"]


def test_write_overrides_rejects_invalid_values_without_touching_the_file(params_copy):
    original = params_copy.read_bytes()
    with pytest.raises(ParamsError, match="train.epochs"):
        write_overrides(params_copy, {"train.epochs": 0})
    with pytest.raises(ParamsError, match="train.nope"):
        write_overrides(params_copy, {"train.nope": 1})
    assert params_copy.read_bytes() == original


# --- data params ---------------------------------------------------------------------------------------

def test_csv_source_needs_a_watch_folder_holding_it():
    with pytest.raises(ParamsError, match="set ingest.watch: data/flat"):
        load_params(REPO_PARAMS, {"ingest.source": "data/flat/labels.csv", "ingest.watch": "data/flat/labels.csv"})
    params = load_params(REPO_PARAMS, {"ingest.source": "data/flat/labels.csv", "ingest.watch": "data/flat"})
    assert params.ingest.watch == "data/flat"


def test_data_thresholds_are_validated():
    with pytest.raises(ParamsError, match="min_side"):
        load_params(REPO_PARAMS, {"validate.min_side": 100, "validate.max_side": 50})
    with pytest.raises(ParamsError, match="allowed_modes"):
        load_params(REPO_PARAMS, {"validate.allowed_modes": ["RGB", "LAB"]})
    with pytest.raises(ParamsError, match="validate.max_rejected_share"):
        load_params(REPO_PARAMS, {"validate.max_rejected_share": 1.5})
    with pytest.raises(ParamsError, match="split.near_duplicate_distance"):
        load_params(REPO_PARAMS, {"split.near_duplicate_distance": -1})
    with pytest.raises(ParamsError, match="ingest.sha256"):
        load_params(REPO_PARAMS, {"ingest.source": "https://example.com/a.zip", "ingest.sha256": "abc"})


def test_dvc_stages_declare_the_params_they_read():
    dvc = yaml.safe_load((REPO_PARAMS.parent / "dvc.yaml").read_text())["stages"]
    assert dvc["ingest"]["params"] == ["ingest"]
    assert dvc["validate"]["params"] == ["validate"]
    assert dvc["split"]["params"] == ["base.seed", "split"]
    assert "data/ingest.json" in dvc["validate"]["deps"] and "expectations/splits.json" in dvc["split"]["deps"]


def test_source_overrides_watch_local_paths_only():
    from tasks.config import source_overrides

    assert source_overrides("/data/pets") == {"ingest.source": "/data/pets", "ingest.watch": "/data/pets"}
    assert source_overrides("sample:digits") == {"ingest.source": "sample:digits"}
    assert source_overrides("https://h/x.tgz") == {"ingest.source": "https://h/x.tgz"}


def test_source_override_of_a_csv_manifest_watches_its_folder_and_passes_validation(tmp_path):
    """`imgclf run --source /data/flat/labels.csv` once failed: it set ingest.watch to the CSV itself, which
    the params check rightly refuses (images next to the CSV would go unwatched)."""
    from tasks.config import load_params, source_overrides

    overrides = source_overrides("/data/flat/labels.CSV")
    assert overrides == {"ingest.source": "/data/flat/labels.CSV", "ingest.watch": "/data/flat"}
    assert source_overrides("/data/pets.zip")["ingest.watch"] == "/data/pets.zip"
    params = load_params(Path(__file__).resolve().parent.parent / "params.yaml", overrides)
    assert params.ingest.watch == "/data/flat"


# --- where the project is ----------------------------------------------------------------------


def test_project_root_is_found_from_a_subfolder_and_refused_outside_any_project(tmp_path):
    from tasks.config import NotInProject, project_root

    project = tmp_path / "proj"
    (project / "sub" / "deeper").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    shutil.copyfile(REPO_PARAMS, project / "params.yaml")
    assert project_root(project / "sub" / "deeper") == project.resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(NotInProject, match="elsewhere is not inside an imgclf project"):
        project_root(elsewhere)  # never the checkout the package is installed from


def test_missing_source_names_the_path_and_ignores_sample_and_url_sources(tmp_path):
    from tasks.config import missing_source

    (tmp_path / "images").mkdir()
    assert missing_source("images", tmp_path) is None  # relative paths are the project's
    assert missing_source(str(tmp_path / "images"), Path("/")) is None
    problem = missing_source("nope/labels.csv", tmp_path)
    assert problem is not None and str(tmp_path / "nope" / "labels.csv") in problem and "ingest.source" in problem
    assert missing_source("sample:digits", tmp_path) is None
    assert missing_source("https://example.org/data.zip", tmp_path) is None


def test_pretrained_sha256_needs_a_weights_file_to_pin(params_copy):
    with pytest.raises(ParamsError, match="train.pretrained_sha256 pins a local weights file"):
        load_params(params_copy, {"train.pretrained_sha256": "a" * 64})
    assert load_params(params_copy, {"train.pretrained": "w.pth", "train.pretrained_sha256": "a" * 64})


def test_a_source_typed_on_the_command_line_is_the_users_path_from_where_they_typed_it(tmp_path):
    from tasks.config import source_from

    root = tmp_path / "proj"
    (root / "reports").mkdir(parents=True)
    assert source_from("../../data/shapes", cwd=root / "reports", root=root) == str(tmp_path / "data" / "shapes")
    assert source_from("../images", cwd=root / "reports", root=root) == "images"  # inside: the project's
    assert source_from("images/labels.csv", cwd=root, root=root) == "images/labels.csv"
    assert source_from("~/pics", cwd=root, root=root) == str(Path.home() / "pics")
    assert source_from("sample:digits", cwd=root / "reports", root=root) == "sample:digits"
    assert source_from("https://x.org/a.zip", cwd=root, root=root) == "https://x.org/a.zip"


def test_a_watch_dvc_cannot_follow_is_refused_with_the_fix(params_copy):
    with pytest.raises(ParamsError, match="DVC does not expand ~"):
        load_params(params_copy, {"ingest.source": "~/pics", "ingest.watch": "~/pics"})
    with pytest.raises(ParamsError, match="in a folder of their own"):  # a CSV manifest at the project root
        load_params(params_copy, {"ingest.source": "labels.csv", "ingest.watch": "."})
