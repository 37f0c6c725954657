"""Stage `validate`: a manifest of per-image facts, checked against the Great Expectations contract."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.io import sha256_file, write_json, write_text

if TYPE_CHECKING:
    import pandas as pd

RAW_DIR = Path("data/raw")
MANIFEST = Path("data/manifest.csv")
REPORT_DIR = Path("reports/validation")
SUITE = Path("expectations/manifest.json")
MAX_PIXELS = 50_000_000
MANIFEST_COLUMNS = [
    "path", "label", "bytes", "sha256", "format", "mode", "width", "height",
    "n_frames", "decodable", "accepted", "reason",
]


@dataclass(frozen=True)
class Check:
    expectation: str
    column: str | None
    success: bool
    detail: str
    examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ContractResult:
    success: bool
    checks: list[Check]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.success]


def inspect_image(path: Path, *, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """Facts about one file; a full decode decides `decodable`. Never raises for a bad image."""
    from PIL import Image

    facts: dict[str, Any] = {"format": None, "mode": None, "width": None, "height": None,
                             "n_frames": None, "decodable": False, "reason": ""}
    try:
        with Image.open(path) as img:
            facts.update(format=img.format, mode=img.mode, width=img.width, height=img.height,
                         n_frames=getattr(img, "n_frames", 1))
            if img.width * img.height > max_pixels:
                facts["reason"] = f"{img.width}x{img.height} exceeds the {max_pixels:,}-pixel cap"
                return facts
            img.load()
        facts["decodable"] = True
    except Image.DecompressionBombError as exc:
        facts["reason"] = f"decompression bomb: {exc}"
    except Exception as exc:  # any decoder error means "not an image we can use"
        facts["reason"] = f"cannot decode: {type(exc).__name__}: {exc}"
    return facts


def build_manifest(raw_dir: Path, *, max_pixels: int = MAX_PIXELS) -> "pd.DataFrame":
    """One row per file under raw_dir/<label>/, accepted or not with the reason."""
    import pandas as pd
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels
    rows = []
    for path in sorted(p for p in raw_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(raw_dir)
        facts = inspect_image(path, max_pixels=max_pixels)
        rows.append({
            "path": rel.as_posix(), "label": rel.parts[0], "bytes": path.stat().st_size,
            "sha256": sha256_file(path), **facts, "accepted": facts["decodable"],
        })
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return frame.astype({"accepted": bool, "decodable": bool})


def dataset_mode(manifest: "pd.DataFrame") -> str:
    """'L' when every accepted image is grayscale, else 'RGB'."""
    modes = set(manifest.loc[manifest["accepted"], "mode"].dropna())
    return "L" if modes and modes <= {"1", "L", "I;16", "I;16B", "I;16L", "I", "F", "LA"} else "RGB"


def contract_frame(manifest: "pd.DataFrame") -> "pd.DataFrame":
    """The accepted rows plus derived columns the suite checks."""
    accepted = manifest[manifest["accepted"]].copy()
    accepted["class_count"] = accepted.groupby("label")["path"].transform("count")
    return accepted.reset_index(drop=True)


def load_suite(path: Path) -> dict:
    """The committed suite as plain JSON."""
    return json.loads(Path(path).read_text())


def run_contract(frame: "pd.DataFrame", suite_json: dict, parameters: dict[str, Any]) -> ContractResult:
    """Validate frame with the suite in an ephemeral GX context; one Check per expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    suite_data = {k: v for k, v in suite_json.items() if k != "id"}
    suite_data["expectations"] = [{k: v for k, v in e.items() if k != "id"} for e in suite_data["expectations"]]
    suite = context.suites.add(gx.ExpectationSuite(**suite_data))
    asset = context.data_sources.add_pandas("imgclf").add_dataframe_asset("manifest")
    batch = asset.add_batch_definition_whole_dataframe("accepted")
    definition = gx.ValidationDefinition(name="manifest", data=batch, suite=suite)
    result = definition.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters,
                            result_format="COMPLETE")
    checks = []
    for res in result.results:
        config = res.expectation_config
        column = config.kwargs.get("column")
        details = res.result or {}
        examples: list[str] = []
        if not res.success and "unexpected_index_list" in details and column is not None:
            idx = [i for i in (details.get("unexpected_index_list") or [])[:5] if isinstance(i, int)]
            examples = [f"{frame.loc[i, 'path']} ({column}={frame.loc[i, column]})" for i in idx]
        detail = _describe(config.type, config.kwargs, details)
        checks.append(Check(config.type, column, bool(res.success), detail, examples))
    return ContractResult(success=bool(result.success), checks=checks)


def _describe(kind: str, kwargs: dict, details: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("batch_id", "column")}
    if "unexpected_count" in details:
        return f"{kind} {shown}: {details['unexpected_count']} unexpected"
    if "observed_value" in details:
        return f"{kind} {shown}: observed {details['observed_value']}"
    return f"{kind} {shown}"


def summary_markdown(*, discovered: int, accepted: int, contract: ContractResult) -> str:
    """A human-readable validation report."""
    lines = [
        f"# Data validation: {'PASSED' if contract.success else 'FAILED'}", "",
        f"- discovered: {discovered}", f"- accepted: {accepted}",
        f"- quarantined: {discovered - accepted} (see quarantine.csv)", "",
        "| expectation | column | result | detail |", "|---|---|---|---|",
    ]
    for c in contract.checks:
        lines.append(f"| {c.expectation} | {c.column or ''} | {'pass' if c.success else 'FAIL'} | {c.detail} |")
    for c in contract.failures:
        if c.examples:
            lines += ["", f"Examples failing {c.expectation} ({c.column}):"] + [f"- {e}" for e in c.examples]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ValidationOutcome:
    discovered: int
    accepted: int
    quarantined: int
    mode: str
    contract: ContractResult


def validate(raw_dir: Path, *, suite_path: Path, labels: list[str] | None, min_images_per_class: int,
             manifest_path: Path = MANIFEST, report_dir: Path = REPORT_DIR) -> ValidationOutcome:
    """Build the manifest, write it and the quarantine list, run the contract, write the reports."""
    manifest = build_manifest(raw_dir)
    frame = contract_frame(manifest)
    quarantined = manifest[~manifest["accepted"]]
    if len(frame) + len(quarantined) != len(manifest):  # nothing may go missing between the two lists
        raise AssertionError("discovered != accepted + quarantined")
    found = sorted(frame["label"].unique().tolist())
    parameters = {"labels": list(labels) if labels else found, "min_images_per_class": min_images_per_class}
    contract = run_contract(frame, load_suite(suite_path), parameters)
    mode = dataset_mode(manifest)

    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(manifest_path, manifest.to_csv(index=False))
    write_text(report_dir / "quarantine.csv", quarantined[["path", "label", "reason"]].to_csv(index=False))
    outcome = ValidationOutcome(len(manifest), len(frame), len(quarantined), mode, contract)
    write_json(report_dir / "summary.json", {
        "success": contract.success, "discovered": outcome.discovered, "accepted": outcome.accepted,
        "quarantined": outcome.quarantined, "mode": mode, "labels": found, "parameters": parameters,
        "checks": [asdict(c) for c in contract.checks],
    })
    write_text(report_dir / "summary.md",
               summary_markdown(discovered=outcome.discovered, accepted=outcome.accepted, contract=contract))
    return outcome


def main() -> None:
    """DVC stage entry point."""
    from rich.console import Console

    from tasks.config import load_params

    params = load_params()
    console = Console(stderr=True)
    outcome = validate(RAW_DIR, suite_path=SUITE, labels=params.validate_.labels,
                       min_images_per_class=params.validate_.min_images_per_class)
    console.print(f"validate: {outcome.accepted}/{outcome.discovered} accepted, "
                  f"{outcome.quarantined} quarantined ({REPORT_DIR / 'quarantine.csv'})")
    if not outcome.contract.success:
        console.print("[red]Data contract FAILED[/] — training will not start. Failing expectations:")
        for check in outcome.contract.failures:
            console.print(f"  - {check.detail}")
            for example in check.examples:
                console.print(f"      e.g. {example}")
        console.print(f"Full report: {REPORT_DIR / 'summary.md'}")
        raise SystemExit(1)
    console.print("validate: data contract passed")


if __name__ == "__main__":
    main()
