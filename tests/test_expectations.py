"""The Great Expectations quality suite: what it holds, and what it reports on a partition's rows."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from loraflow.expectations import SuiteResult, build_suite, mostly_for, run_suite
from loraflow.spec import PiiSpec, QualitySpec
from loraflow.validate import PII_PATTERNS

TOPICS = ["photosynthesis", "recursion", "the water cycle", "compound interest", "plate tectonics"]


def make_frame(n: int = 10, first_line: int = 1) -> pd.DataFrame:
    """n valid rows as the validation step would hand them over, record_index = line numbers."""
    prompts = [f"Explain {TOPICS[i % len(TOPICS)]} to a student, part {i}." for i in range(n)]
    responses = [f"Here is a short explanation of {TOPICS[i % len(TOPICS)]}." for i in range(n)]
    hashes = [
        hashlib.sha256(f"{p}\x00{r}".encode()).hexdigest() for p, r in zip(prompts, responses, strict=True)
    ]
    frame = pd.DataFrame(
        {
            "record_index": pd.Series(range(first_line, first_line + n), dtype="int64"),
            "prompt": pd.Series(prompts, dtype=object),
            "response": pd.Series(responses, dtype=object),
            "example_hash": pd.Series(hashes, dtype=object),
            "reason": pd.Series([None] * n, dtype=object),
        }
    )
    # a shuffled, non-default pandas index: samples must come from the record_index column
    return frame.set_axis([1000 + 7 * i for i in reversed(range(n))])


def quarantine(frame: pd.DataFrame, row: int, reason: str, **values: object) -> None:
    """Mark one positional row as quarantined, optionally overriding its text."""
    frame.iloc[row, frame.columns.get_loc("reason")] = reason
    for column, value in values.items():
        frame.iloc[row, frame.columns.get_loc(column)] = value


def expectation_types(suite) -> list[str]:
    return [expectation.expectation_type for expectation in suite.expectations]


def test_clean_frame_passes_every_expectation_with_100_percent():
    result = run_suite(make_frame(), QualitySpec(max_prompt_chars=80, max_invalid_fraction=0.1), PII_PATTERNS)

    assert isinstance(result, SuiteResult)
    assert result.success is True
    assert result.success_percent == 100.0
    # 6 base expectations + 3 PII kinds x (prompt, response)
    assert result.evaluated == 12
    assert result.failing == []
    assert result.sample_failures == []
    metadata = result.to_metadata()
    assert metadata == {
        "gx_success": True,
        "gx_success_percent": 100.0,
        "gx_evaluated": 12,
        "gx_failing": [],
        "gx_sample_failures": [],
    }
    json.dumps(metadata)


def test_too_many_quarantined_rows_fail_the_reason_rule_with_their_record_indices():
    frame = make_frame(10, first_line=41)
    quarantine(frame, 2, "malformed_json", prompt=None, response=None, example_hash=None)
    quarantine(frame, 5, "empty_response", response="   ")
    quarantine(frame, 8, "duplicate")
    quality = QualitySpec(max_prompt_chars=80, max_invalid_fraction=0.1, pii=PiiSpec(action="off"))

    result = run_suite(frame, quality, PII_PATTERNS)

    assert result.success is False
    assert "expect_column_values_to_be_null(reason)" in result.failing
    reason_samples = [s for s in result.sample_failures if s["column"] == "reason"]
    assert {s["record_index"] for s in reason_samples} == {43, 46, 49}
    assert {(s["record_index"], s["value"]) for s in reason_samples} == {
        (43, "malformed_json"),
        (46, "empty_response"),
        (49, "duplicate"),
    }
    assert all(s["expectation"] == "expect_column_values_to_be_null" for s in reason_samples)
    # the other rules see nothing wrong: null texts are not measured, whitespace has a length
    assert result.failing == ["expect_column_values_to_be_null(reason)"]
    assert result.evaluated == 6
    assert result.success_percent == pytest.approx(100 * 5 / 6)
    json.dumps(result.to_metadata())


def test_quarantined_share_at_the_tolerance_still_passes():
    frame = make_frame(10)
    quarantine(frame, 0, "prompt_too_long")

    result = run_suite(frame, QualitySpec(max_prompt_chars=80, max_invalid_fraction=0.1), PII_PATTERNS)

    assert result.success is True
    assert result.sample_failures == []


def test_over_long_prompts_beyond_the_mostly_threshold_are_reported():
    frame = make_frame(10, first_line=0)
    frame.iloc[3, frame.columns.get_loc("prompt")] = "Summarize this report: " + "lorem ipsum " * 40
    frame.iloc[7, frame.columns.get_loc("prompt")] = "Translate: " + "bonjour " * 20
    quality = QualitySpec(max_prompt_chars=50, max_invalid_fraction=0.1, pii=PiiSpec(action="off"))

    result = run_suite(frame, quality, PII_PATTERNS)

    assert result.failing == ["expect_column_value_lengths_to_be_between(prompt)"]
    samples = result.sample_failures
    assert [s["record_index"] for s in samples] == [3, 7]
    assert {s["column"] for s in samples} == {"prompt"}
    assert samples[0]["value"].startswith("Summarize this report: lorem ipsum")
    assert len(samples[0]["value"]) == 120


def test_pii_expectations_are_present_only_when_action_is_reject():
    kinds = ["email", "api_key"]
    suites = {
        action: build_suite(QualitySpec(pii=PiiSpec(action=action, kinds=kinds)), PII_PATTERNS)
        for action in ("reject", "redact", "off")
    }

    regex_rules = [
        (e.column, e.regex) for e in suites["reject"].expectations if e.expectation_type.endswith("_regex")
    ]
    assert sorted(regex_rules) == sorted(
        (column, PII_PATTERNS[kind]) for kind in kinds for column in ("prompt", "response")
    )
    for action in ("redact", "off"):
        assert not any(t.endswith("_regex") for t in expectation_types(suites[action]))
        assert len(suites[action].expectations) == 6
    # redact/off never look at the patterns, so none are needed
    assert len(build_suite(QualitySpec(pii=PiiSpec(action="off")), {}).expectations) == 6


def test_pii_in_a_response_is_reported_under_reject_but_not_under_redact():
    frame = make_frame(10, first_line=1)
    frame.iloc[4, frame.columns.get_loc("response")] = "Write to jane.doe@example.org for the slides."
    frame.iloc[6, frame.columns.get_loc("response")] = "Use the key sk-abcdefghijklmnopqrstuvwx1234 here."

    rejected = run_suite(
        frame, QualitySpec(max_prompt_chars=80, max_invalid_fraction=0.1), PII_PATTERNS, name="reject"
    )
    redacted = run_suite(
        frame,
        QualitySpec(max_prompt_chars=80, max_invalid_fraction=0.1, pii=PiiSpec(action="redact")),
        PII_PATTERNS,
    )

    # one match per kind is 10%, within tolerance: raise the bar to exact to see them reported
    assert rejected.success is True
    strict = run_suite(frame, QualitySpec(max_prompt_chars=80, max_invalid_fraction=0.0), PII_PATTERNS)
    assert strict.failing == [
        "expect_column_values_to_not_match_regex(response)",
        "expect_column_values_to_not_match_regex(response)",
    ]
    assert {(s["record_index"], s["value"][:8]) for s in strict.sample_failures} == {
        (5, "Write to"),
        (7, "Use the "),
    }
    assert redacted.success is True
    assert redacted.evaluated == 6


def test_duplicate_record_index_fails_provenance_even_with_a_lenient_tolerance():
    frame = make_frame(6, first_line=10)
    frame.iloc[4, frame.columns.get_loc("record_index")] = 11
    quality = QualitySpec(max_prompt_chars=80, max_invalid_fraction=0.5, pii=PiiSpec(action="off"))

    result = run_suite(frame, quality, PII_PATTERNS)

    assert result.success is False
    assert result.failing == ["expect_compound_columns_to_be_unique(record_index,sub_index)"]
    assert [s["record_index"] for s in result.sample_failures] == [11, 11]
    assert all("11" in s["value"] for s in result.sample_failures)


def test_empty_frame_passes_vacuously_with_every_expectation_evaluated():
    quality = QualitySpec(max_prompt_chars=50, max_invalid_fraction=0.1)
    typed_empty = make_frame(0)
    untyped_empty = pd.DataFrame()

    for frame in (typed_empty, untyped_empty):
        result = run_suite(frame, quality, PII_PATTERNS)
        assert result == SuiteResult(
            success=True, success_percent=100.0, evaluated=12, failing=[], sample_failures=[]
        )


def test_non_empty_frame_missing_a_contract_column_is_an_error():
    frame = make_frame(3).drop(columns=["example_hash"])

    with pytest.raises(ValueError, match="example_hash"):
        run_suite(frame, QualitySpec(), PII_PATTERNS)


def test_missing_or_broken_pii_pattern_is_an_error_under_reject():
    with pytest.raises(ValueError, match="phone"):
        build_suite(QualitySpec(pii=PiiSpec(kinds=["email", "phone"])), {"email": PII_PATTERNS["email"]})
    with pytest.raises(ValueError, match="does not compile"):
        build_suite(QualitySpec(pii=PiiSpec(kinds=["email"])), {"email": "[unclosed"})


@pytest.mark.parametrize(
    ("max_invalid_fraction", "mostly"), [(0.0, 1.0), (0.05, 0.95), (0.07, 0.93), (1.0, 0.0)]
)
def test_mostly_is_one_minus_max_invalid_fraction(max_invalid_fraction, mostly):
    quality = QualitySpec(max_invalid_fraction=max_invalid_fraction, pii=PiiSpec(action="off"))

    assert mostly_for(quality) == mostly
    suite = build_suite(quality, {})
    by_rule = {(e.expectation_type, getattr(e, "column", None)): e for e in suite.expectations}
    assert by_rule[("expect_column_values_to_be_null", "reason")].mostly == mostly
    assert by_rule[("expect_column_value_lengths_to_be_between", "prompt")].mostly == mostly
    assert by_rule[("expect_column_values_to_be_unique", "example_hash")].mostly == mostly
    # provenance is exact whatever the tolerance
    assert by_rule[("expect_compound_columns_to_be_unique", None)].column_list == [
        "record_index",
        "sub_index",
    ]
    assert by_rule[("expect_column_values_to_not_be_null", "record_index")].mostly == 1


def test_every_expectation_names_the_yaml_rule_it_comes_from():
    quality = QualitySpec(max_prompt_chars=50, max_response_chars=70)
    suite = build_suite(quality, PII_PATTERNS, name="demo_quality")

    assert suite.name == "demo_quality"
    assert all(e.description and e.meta.get("loraflow_rule") for e in suite.expectations)
    lengths = {
        e.column: e
        for e in suite.expectations
        if e.expectation_type == "expect_column_value_lengths_to_be_between"
    }
    assert lengths["prompt"].meta["loraflow_rule"] == "quality.max_prompt_chars"
    assert lengths["prompt"].max_value == 50
    assert lengths["response"].meta["loraflow_rule"] == "quality.max_response_chars"
    assert lengths["response"].max_value == 70
    assert {e.meta["loraflow_rule"] for e in suite.expectations} == {
        "provenance",
        "quality.max_invalid_fraction",
        "quality.max_prompt_chars",
        "quality.max_response_chars",
        "quality.pii",
    }


def test_sample_failures_are_capped_at_ten_and_cover_each_failed_rule():
    frame = make_frame(30, first_line=0)
    for row in range(0, 30, 2):
        quarantine(frame, row, "prompt_too_long", prompt="Describe: " + "very long text " * 10)
    quality = QualitySpec(max_prompt_chars=60, max_invalid_fraction=0.05, pii=PiiSpec(action="off"))

    result = run_suite(frame, quality, PII_PATTERNS)

    assert result.failing == [
        "expect_column_values_to_be_null(reason)",
        "expect_column_value_lengths_to_be_between(prompt)",
    ]
    assert len(result.sample_failures) == 10
    assert {s["column"] for s in result.sample_failures} == {"reason", "prompt"}
    assert all(s["record_index"] % 2 == 0 for s in result.sample_failures)


def test_exploded_records_share_a_record_index_but_not_a_sub_index():
    frame = pd.DataFrame(
        {
            "record_index": [1, 1, 2],
            "sub_index": [0, 1, 0],
            "prompt": ["Antonym of hot?", "Antonym of up?", "Say hi."],
            "response": ["cold", "down", "hi"],
            "example_hash": ["a", "b", "c"],
            "reason": [None, None, None],
        }
    )
    result = run_suite(frame, QualitySpec(pii=PiiSpec(action="off")), {})
    assert result.success, result.failing
