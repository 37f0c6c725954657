"""Great Expectations, kept in one place: run a committed JSON suite on a DataFrame, optionally build Data Docs.

Suites live as reviewable JSON under expectations/; thresholds are `$PARAMETER`s supplied at run time from
params.yaml. An ephemeral context is used (no gx/ project folder to keep in sync)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Check:
    expectation: str
    column: str | None
    success: bool
    detail: str
    examples: list[str] = field(default_factory=list)
    why: str = ""


@dataclass(frozen=True)
class ContractResult:
    success: bool
    checks: list[Check]
    data_docs: str | None = None

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.success]


def load_suite(path: Path) -> dict:
    """The committed suite as plain JSON."""
    return json.loads(Path(path).read_text())


def _describe(kind: str, kwargs: dict, details: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("batch_id", "column")}
    if "unexpected_count" in details:
        return f"{kind} {shown}: {details['unexpected_count']} unexpected"
    if "observed_value" in details:
        return f"{kind} {shown}: observed {details['observed_value']}"
    return f"{kind} {shown}"


def _site_config(docs_dir: Path) -> dict:
    return {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
    }


def run_suite(frame: "pd.DataFrame", suite_json: dict, parameters: dict[str, Any], *, name: str = "manifest",
              example_column: str = "path", docs_dir: Path | None = None) -> ContractResult:
    """Validate frame with the suite; one Check per expectation, examples named by example_column."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    suite_data = {k: v for k, v in suite_json.items() if k != "id"}
    suite_data["expectations"] = [{k: v for k, v in e.items() if k != "id"} for e in suite_data["expectations"]]
    suite = context.suites.add(gx.ExpectationSuite(**suite_data))
    asset = context.data_sources.add_pandas("imgclf").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("accepted")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(site_name="local", site_config=_site_config(docs_dir))
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["local"]))
    checkpoint = context.checkpoints.add(gx.Checkpoint(name=name, validation_definitions=[definition],
                                                       actions=actions, result_format="COMPLETE"))
    run = checkpoint.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters)
    (result,) = run.run_results.values()
    checks = []
    for res in result.results:
        config = res.expectation_config
        column = config.kwargs.get("column")
        details = res.result or {}
        examples: list[str] = []
        if not res.success and column is not None and example_column in frame.columns:
            idx = [i for i in (details.get("unexpected_index_list") or []) if isinstance(i, int)][:MAX_EXAMPLES]
            examples = [f"{frame.loc[i, example_column]} ({column}={frame.loc[i, column]})" for i in idx]
        checks.append(Check(config.type, column, bool(res.success), _describe(config.type, config.kwargs, details),
                            examples, str((config.meta or {}).get("why", ""))))
    index = docs_dir / "index.html" if docs_dir is not None else None
    return ContractResult(success=bool(result.success), checks=checks,
                          data_docs=str(index) if index is not None and index.is_file() else None)
