"""The Dagster UI in a real browser: `dagster dev` (webserver and daemon) on a small project, headless
Chromium looking at it, and a run launched through the webserver's GraphQL API, the one the UI uses.

Screenshots, the dagster dev log and, on failure, the page source go to test-artifacts/ui/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import write_yaml
from ui_browser import (
    ARTIFACTS,
    REPO,
    Browser,
    DagsterDev,
    asset_path,
    browser_missing,
    group_path,
    poll,
)

from loraflow.demo_data import write_demo_data

MISSING = browser_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"browser test skipped: {MISSING}")

PIPELINE = """
data:
  sources:
    - path: data/*.jsonl
quality:
  max_invalid_fraction: 0.5
base_model:
  source: {model}
schedule:
  watch_files: false   # the test adds the partition and launches the run itself
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""
NAME = "triage"
MODEL = "models/tiny-llama"  # in the project; relative paths resolve against its root
STAGES = (
    "base_model",
    "raw_examples",
    "validated_examples",
    "training_dataset",
    "adapter",
    "evaluation",
    "published_model",
)
CHECKS = ("counts_add_up", "quality_suite", "schema_drift")
PARTITION = "data/feedback-part-01.jsonl"  # the one file write_demo_data(files=1) writes


@pytest.fixture
def dagster_dev(tmp_path, request) -> Iterator[DagsterDev]:
    """`dagster dev` serving one pipeline from a project in tmp_path, on a fresh instance."""
    project = tmp_path / "project"
    (project / "pipelines").mkdir(parents=True)
    write_demo_data(project / "data", n=40, files=1)
    write_yaml(project / "pipelines", NAME, PIPELINE.format(model=MODEL))
    home = tmp_path / "dagster-home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    env = {"LORAFLOW_PIPELINES": str(project / "pipelines"), "LORAFLOW_HOME": str(project / ".loraflow")}
    with DagsterDev(home, ARTIFACTS / "dagster-dev.log", env) as dev:
        # the model is only read by a run: build it while dagster dev starts
        shutil.copytree(request.getfixturevalue("tiny_model_dir"), project / MODEL)
        dev.wait_until_loaded(timeout=180)
        yield dev


@pytest.fixture
def browser(dagster_dev) -> Iterator[Browser]:
    with Browser(dagster_dev.url) as chromium:
        yield chromium


@contextmanager
def step(name: str, dev: DagsterDev, browser: Browser) -> Iterator[None]:
    """Turn a failure into one readable message: what failed, what the browser saw, dagster dev's log."""
    try:
        yield
    except Exception as err:
        saved = browser.save_failure(name)
        raise AssertionError(
            f"{name}: {err}\nsaved: {', '.join(str(p) for p in saved)}\n{dev.log_tail()}"
        ) from err


def test_ui_shows_the_pipeline_a_run_and_its_checks(dagster_dev, browser):
    dev, api = dagster_dev, dagster_dev.api
    keys = {stage: (NAME, stage) for stage in STAGES}

    with step("asset-graph", dev, browser):
        browser.open(group_path(NAME))
        browser.skip_community_dialog(api)
        browser.wait_for_text(NAME, *STAGES, timeout=60)
        browser.screenshot("asset-graph")

    with step("launch", dev, browser):
        api.add_partition(f"{NAME}__source_files", PARTITION)
        assert PARTITION in api.partition_keys(keys["raw_examples"])
        cheap = [keys["base_model"], keys["raw_examples"], keys["validated_examples"]]
        # the queued run is started by the daemon: a success also says the daemon is up
        run_id = api.launch_assets(cheap, partition=PARTITION, in_process=True)
        status = api.wait_for_run(run_id, timeout=240)
        assert status == "SUCCESS", f"run {run_id} ended {status}:\n" + "\n".join(api.run_errors(run_id))
        # schedules and sensors need the daemon: every one of its parts reports healthy
        poll(
            "healthy daemon heartbeats", lambda: (beats := api.daemons()) and all(beats.values()), timeout=60
        )

    with step("asset-metadata", dev, browser):
        browser.open(asset_path(keys["validated_examples"]))
        browser.wait_for_text(PARTITION, "valid_rows", "quarantined_rows", "invalid_fraction", timeout=60)

    with step("asset-checks", dev, browser):
        browser.open(asset_path(keys["validated_examples"]) + "?view=checks")
        browser.wait_for_text(*(f"{check}\nSucceeded" for check in CHECKS), "Passed", timeout=60)
        browser.screenshot("asset-checks")

    with step("run", dev, browser):
        browser.open(f"/runs/{run_id}")
        browser.wait_for_text(
            run_id[:8],
            "Success",
            f"partition: {PARTITION}",
            *(f"{NAME}__{s}" for s in STAGES[:3]),
            timeout=60,
        )
        browser.screenshot("run")
