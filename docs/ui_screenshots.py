"""The README's screenshots of the Dagster UI, taken from a running `make ui` on the project's instance.

    make ui                                     # in another terminal, after `make demo`
    .venv/bin/python docs/ui_screenshots.py     # writes docs/images/ui-*.png

Uses the browser code of the UI test (tests/ui_browser.py), so it needs what that test needs:
Debian's chromium and chromium-driver packages. It only looks: nothing is launched.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ui_browser import Browser, DagsterApi, asset_path, browser_missing, group_path  # noqa: E402

from assets import STAGES  # noqa: E402  (every stage of a pipeline's graph)

IMAGES = Path(__file__).resolve().parent / "images"
# node colours that show an asset's status; a node stays gray until the graph's live data has loaded
STATUS_COLOURS = ("green", "red", "yellow", "blue")


def statuses_shown(browser: Browser) -> bool:
    """Whether every node of the zoomed-out lineage graph is coloured by its status (live data loaded)."""
    from selenium.webdriver.common.by import By

    boxes = browser.driver.find_elements(By.CSS_SELECTOR, "[class*=minimalAssetNodeBox]")
    return all(any(c in (box.get_attribute("style") or "") for c in STATUS_COLOURS) for box in boxes)


def take_screenshots(url: str, pipeline: str, out: Path) -> list[Path]:
    api = DagsterApi(url)
    saved = []
    with Browser(url, artifacts=out) as browser:
        browser.open(group_path(pipeline))
        browser.skip_community_dialog(api)
        browser.wait_for_text(*STAGES)
        browser.wait("asset statuses on the graph", lambda _driver: statuses_shown(browser))
        saved.append(browser.screenshot("ui-asset-graph"))

        # "Materialize all" over partitioned assets is a backfill: pick all partitions, look, close
        browser.button("Materialize all…").click()
        browser.wait_for_text("Launch runs to materialize", "Partition selection")
        browser.button("All").click()
        browser.wait(
            "partitions selected", lambda _driver: re.search(r"\b[1-9]\d* partitions?\b", browser.text())
        )
        saved.append(browser.screenshot("ui-backfill-dialog"))
        browser.button("Cancel").click()
        browser.wait(
            "the dialog to close", lambda _driver: "Launch runs to materialize" not in browser.text()
        )

        browser.open(asset_path((pipeline, "validated_examples")) + "?view=checks")
        browser.wait_for_text("counts_add_up", "quality_suite", "schema_drift", "Evaluation result")
        saved.append(browser.screenshot("ui-asset-checks"))

        browser.open(asset_path((pipeline, "evaluation")))
        browser.wait_for_text("Metadata", "format_match")
        saved.append(browser.screenshot("ui-evaluation"))

        run_id = api.latest_run_of((pipeline, "evaluation"))
        if run_id is None:
            print(f"{pipeline}/evaluation was never materialized: no run page screenshot", file=sys.stderr)
        else:
            browser.open(f"/runs/{run_id}")
            browser.wait_for_text(run_id[:8], f"{pipeline}__evaluation")
            saved.append(browser.screenshot("ui-run"))
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the running webserver (make ui)")
    parser.add_argument("--pipeline", default="demo", help="the pipeline (asset group) to show")
    parser.add_argument("--out", type=Path, default=IMAGES, help="folder for the PNG files")
    args = parser.parse_args(argv)
    missing = browser_missing()
    if missing:
        parser.error(missing)
    if not DagsterApi(args.url).responding():
        parser.error(f"nothing answers at {args.url}: start `make ui` first")
    for path in take_screenshots(args.url, args.pipeline, args.out):
        print(f"{path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
