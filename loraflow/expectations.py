"""Great Expectations suite for one partition's rows, built from the pipeline's `quality` rules.

The suite restates the YAML's quality rules as Great Expectations (GX 1.x) expectations and runs
them on a pandas DataFrame holding every raw example candidate of one partition, valid or
quarantined. It is a second, independent look at the data: the validation query decides each row's
fate, the suite reports how the partition as a whole measures up, with the offending rows'
`record_index` as evidence. Dagster asset checks call `run_suite` and attach
`SuiteResult.to_metadata()`; this module itself knows nothing of Dagster.

The DataFrame contract, one row per raw example candidate:

- `record_index` (int64, never null): the record's line or position in its file.
- `sub_index` (int, optional, 0 when absent): the element of a record split by `explode`.
- `prompt` (str or None): the text before the answer.
- `response` (str or None): the answer text.
- `example_hash` (str or None): the example's content hash, None when it could not be parsed.
- `reason` (str or None): the quarantine reason code, None for a valid row.

Rules marked "mostly" below tolerate `quality.max_invalid_fraction` of the rows breaking them, as
the blocking invalid-fraction check does; provenance rules are exact:

- `record_index` is not null, and (`record_index`, `sub_index`) is unique (provenance, exact).
- `reason` is null (`quality.max_invalid_fraction`, mostly).
- `prompt` / `response` lengths are within 1..`quality.max_prompt_chars` /
  1..`quality.max_response_chars` (mostly).
- `example_hash` is unique (mostly).
- with `quality.pii.action: reject`, `prompt` and `response` match none of the `quality.pii.kinds`
  patterns (mostly).

GX counts a "mostly" share over the column's non-null values, so a null `prompt` (a record that
could not be parsed) is not measured by the length rule; such a row carries a `reason` and is
counted by the reason rule instead.

GX is imported lazily, inside the functions, so importing loraflow stays cheap. Each `run_suite`
call uses its own ephemeral (in-memory) Data Context; nothing is written to disk.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraflow.spec import QualitySpec

if TYPE_CHECKING:
    import great_expectations
    import pandas

COLUMNS: tuple[str, ...] = ("record_index", "prompt", "response", "example_hash", "reason")
"""The columns `run_suite` needs, in the order of the contract."""

INDEX_COLUMN = "record_index"
SUB_INDEX_COLUMN = "sub_index"
"""Optional: the element of an exploded record (0 when absent); provenance is (record_index, sub_index)."""
MAX_SAMPLES = 10
"""Most failure samples a SuiteResult keeps (over all failed expectations together)."""

MAX_VALUE_CHARS = 120
"""A sampled value is cut to this many characters."""

_DATASOURCE = "loraflow_partition"
_ASSET = "rows"
_BATCH_DEFINITION = "whole_partition"


def _import_gx() -> Any:
    """Import great_expectations with analytics off (the env var must be set before the import)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


@dataclass(frozen=True)
class SuiteResult:
    """What one run of the quality suite found on one partition.

    `failing` names each failed expectation as `expect_xxx(column)`; two PII kinds failing on the same
    column give two equal entries (one per expectation). `sample_failures` holds up to ten offending
    rows taken in turn from each failed expectation, so every failed rule is represented before any
    rule gets a second sample. Each sample is
    `{"expectation": "expect_xxx", "column": ..., "record_index": int | None, "value": str}`, the value
    cut to 120 characters (`"null"` for a null value).
    """

    success: bool
    """True when every expectation passed."""

    success_percent: float
    """Share of the expectations that passed, 0-100."""

    evaluated: int
    """Number of expectations run."""

    failing: list[str] = field(default_factory=list)
    """`expect_xxx(column)` for each failed expectation, in suite order."""

    sample_failures: list[dict[str, Any]] = field(default_factory=list)
    """Up to ten offending rows of the failed expectations, with their `record_index`."""

    def to_metadata(self) -> dict[str, Any]:
        """A JSON-able dict for Dagster metadata: gx_success, gx_success_percent, gx_evaluated,
        gx_failing and gx_sample_failures."""
        return {
            "gx_success": bool(self.success),
            "gx_success_percent": float(self.success_percent),
            "gx_evaluated": int(self.evaluated),
            "gx_failing": list(self.failing),
            "gx_sample_failures": [dict(sample) for sample in self.sample_failures],
        }


def mostly_for(quality: QualitySpec) -> float:
    """The GX `mostly` for a rule that tolerates `quality.max_invalid_fraction` of bad rows.

    1 - max_invalid_fraction, rounded so that e.g. 0.07 gives 0.93 rather than 0.9299999999999999
    (GX compares the passing share with `>=`), and clamped to GX's 0..1.
    """
    return min(1.0, max(0.0, round(1.0 - quality.max_invalid_fraction, 9)))


def build_suite(
    quality: QualitySpec, pii_patterns: dict[str, str], name: str = "loraflow_quality"
) -> great_expectations.ExpectationSuite:
    """Build the expectation suite for a pipeline's quality rules.

    `pii_patterns` maps each PII kind to its regex (Python `re` syntax, searched anywhere in the text
    the way pandas `str.contains` does). It is only read when `quality.pii.action` is `reject`; every
    kind in `quality.pii.kinds` must then have a pattern that compiles, or ValueError is raised.

    The suite belongs to no Data Context (it is built with its expectations rather than through
    `add_expectation`, which in GX 1.x needs an active context), so it can be built anywhere and
    validated in any context.
    """
    gx = _import_gx()
    import great_expectations.expectations as gxe

    mostly = mostly_for(quality)
    tolerance = f"at most {quality.max_invalid_fraction:g} of rows may break it"

    def rule(rule_name: str, text: str) -> dict[str, Any]:
        return {"description": f"{rule_name}: {text}", "meta": {"loraflow_rule": rule_name}}

    expectations: list[Any] = [
        gxe.ExpectColumnValuesToNotBeNull(
            column=INDEX_COLUMN,
            **rule("provenance", "every row keeps its record_index (line/position in its file)"),
        ),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=[INDEX_COLUMN, SUB_INDEX_COLUMN],
            **rule("provenance", "no two rows share a record_index (and sub_index, for exploded records)"),
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="reason",
            mostly=mostly,
            **rule("quality.max_invalid_fraction", f"rows are not quarantined; {tolerance}"),
        ),
        *(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=column,
                min_value=1,
                max_value=limit,
                mostly=mostly,
                **rule(f"quality.max_{column}_chars", f"{column} is 1-{limit} characters; {tolerance}"),
            )
            for column, limit in (
                ("prompt", quality.max_prompt_chars),
                ("response", quality.max_response_chars),
            )
        ),
        gxe.ExpectColumnValuesToBeUnique(
            column="example_hash",
            mostly=mostly,
            **rule("quality.max_invalid_fraction", f"examples are not duplicated; {tolerance}"),
        ),
    ]

    if quality.pii.action == "reject":
        for kind in quality.pii.kinds:
            pattern = pii_patterns.get(kind)
            if not pattern:
                raise ValueError(f"quality.pii.kinds names {kind!r} but pii_patterns has no regex for it")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"the PII regex for {kind!r} does not compile: {exc}") from exc
            for column in ("prompt", "response"):
                expectations.append(
                    gxe.ExpectColumnValuesToNotMatchRegex(
                        column=column,
                        regex=pattern,
                        mostly=mostly,
                        **rule(
                            "quality.pii",
                            f"{column} holds no {kind} (action: reject, kind: {kind}); {tolerance}",
                        ),
                    )
                )

    return gx.ExpectationSuite(name=name, expectations=expectations)


def _conform(frame: pandas.DataFrame) -> pandas.DataFrame:
    """Check the frame against the contract; an empty frame gets any missing columns added."""
    import pandas as pd

    if SUB_INDEX_COLUMN not in frame.columns:  # a source without `explode`: one row per record
        frame = frame.assign(**{SUB_INDEX_COLUMN: 0})
    missing = [column for column in COLUMNS if column not in frame.columns]
    if not missing:
        return frame
    if len(frame):
        raise ValueError(f"the partition frame lacks column(s) {missing}; expected {list(COLUMNS)}")
    conformed = frame.copy()
    for column in missing:
        dtype = "int64" if column == INDEX_COLUMN else object
        conformed[column] = pd.Series([], dtype=dtype, index=frame.index)
    return conformed


def _plain_index(entry: Any) -> int | None:
    """The record_index of one unexpected-row entry as a plain int (None when null or absent)."""
    value = entry.get(INDEX_COLUMN) if isinstance(entry, dict) else None
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):  # NaN from a record_index column holding nulls
        return None


def _plain_value(value: Any) -> str:
    """A sampled value as text cut to MAX_VALUE_CHARS; "null" for a missing value."""
    if value is None or (isinstance(value, float) and value != value):
        return "null"
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_VALUE_CHARS]


def _samples_of(expectation_type: str, column: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The offending rows GX reported for one expectation, oldest first."""
    entries = result.get("partial_unexpected_index_list") or []
    values = result.get("partial_unexpected_list") or []
    samples = []
    for position, entry in enumerate(entries):
        if isinstance(entry, dict) and column in entry:
            value = entry[column]
        else:
            value = values[position] if position < len(values) else None
        samples.append(
            {
                "expectation": expectation_type,
                "column": column,
                "record_index": _plain_index(entry),
                "value": _plain_value(value),
            }
        )
    return samples


def _interleave(groups: list[list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Take one item from each group in turn until `limit` items are taken or all groups are empty."""
    taken: list[dict[str, Any]] = []
    depth = 0
    while len(taken) < limit and any(depth < len(group) for group in groups):
        for group in groups:
            if depth < len(group) and len(taken) < limit:
                taken.append(group[depth])
        depth += 1
    return taken


def run_suite(
    frame: pandas.DataFrame,
    quality: QualitySpec,
    pii_patterns: dict[str, str],
    name: str = "loraflow_quality",
) -> SuiteResult:
    """Run the quality suite on one partition's rows and summarize the outcome.

    The frame must follow the module's contract (extra columns are ignored). A non-empty frame
    lacking a contract column is a programming error and raises ValueError.

    An empty frame is validated like any other: every expectation is run and passes vacuously
    (there is no row to break a rule), so the result is success with 100% and `evaluated` equal
    to the suite's size. Whether an empty partition is acceptable at all is a row-count question
    for the caller, not a quality rule.

    Each call makes its own ephemeral Data Context with a pandas data source, a dataframe asset
    and a whole-dataframe batch definition; nothing is written to disk and progress bars are off.
    """
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite = build_suite(quality, pii_patterns, name=name)
    data = _conform(frame)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(_DATASOURCE)
        .add_dataframe_asset(_ASSET)
        .add_batch_definition_whole_dataframe(_BATCH_DEFINITION)
    )
    batch = batch_definition.get_batch(batch_parameters={"dataframe": data})
    outcome = batch.validate(
        suite,
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": [INDEX_COLUMN],
            "partial_unexpected_count": MAX_SAMPLES,
            "return_unexpected_index_query": False,
        },
    )

    evaluated = len(outcome.results)
    passed = 0
    failing: list[str] = []
    sample_groups: list[list[dict[str, Any]]] = []
    for expectation_result in outcome.results:
        if expectation_result.success:
            passed += 1
            continue
        config = expectation_result.expectation_config
        column = str(config.kwargs.get("column") or ",".join(config.kwargs.get("column_list") or []))
        failing.append(f"{config.type}({column})")
        sample_groups.append(_samples_of(config.type, column, dict(expectation_result.result or {})))

    return SuiteResult(
        success=bool(outcome.success) and not failing,
        success_percent=100.0 * passed / evaluated if evaluated else 100.0,
        evaluated=evaluated,
        failing=failing,
        sample_failures=_interleave(sample_groups, MAX_SAMPLES),
    )
