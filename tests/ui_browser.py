"""Drive the Dagster UI of a loraflow project: `dagster dev`, its GraphQL API, and headless Chromium.

Shared by the browser test (tests/test_ui.py) and the README screenshot script
(docs/ui_screenshots.py). The browser is Debian's `chromium` with its `chromium-driver`; selenium is
given the driver's path, so it never looks for (or downloads) a driver of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM = os.environ.get("LORAFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LORAFLOW_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")
# `dagster dev -m pipelines.definitions` serves one code location named after the module.
LOCATION = "loraflow"  # [tool.dg.project] code_location_name
REPOSITORY = "__repository__"
ASSET_JOB = "__ASSET_JOB"
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def browser_missing() -> str | None:
    """Why the UI cannot be driven on this machine, or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return (
                f"{path} not found: install Debian's {package} package "
                "(apt-get install chromium chromium-driver; .ci/run does so when run as root)"
            )
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def poll(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Call `check` until it returns something truthy, and return that; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(interval)


class DagsterApi:
    """The webserver's GraphQL API, the one the UI itself calls."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def query(self, text: str, **variables: Any) -> dict:
        """The `data` of one GraphQL request; raises RuntimeError with the server's errors."""
        body = json.dumps({"query": text, "variables": variables}).encode()
        request = urllib.request.Request(
            f"{self.base_url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        if answer.get("errors"):
            raise RuntimeError(f"GraphQL errors: {json.dumps(answer['errors'], indent=1)}")
        return answer["data"]

    def responding(self) -> bool:
        """Whether the webserver answers /server_info."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/server_info", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def location_status(self) -> tuple[str, str | None]:
        """(load status, load error message or None) of the project's code location."""
        data = self.query(
            """query {
              workspaceOrError {
                __typename
                ... on Workspace { locationEntries { name loadStatus locationOrLoadError {
                  __typename ... on PythonError { message } } } }
                ... on PythonError { message }
              }
            }"""
        )["workspaceOrError"]
        if data["__typename"] != "Workspace":
            return "ERROR", data.get("message")
        for entry in data["locationEntries"]:
            if entry["name"] == LOCATION:
                error = entry["locationOrLoadError"] or {}
                return entry["loadStatus"], error.get("message")
        return "MISSING", None

    def should_show_nux(self) -> bool:
        """Whether the UI will open its "Join the Dagster community" dialog on this instance."""
        return self.query("query { shouldShowNux }")["shouldShowNux"]

    def daemons(self) -> dict[str, bool]:
        """Each required daemon's type and whether its heartbeats are healthy."""
        statuses = self.query(
            "query { instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }"
        )["instance"]["daemonHealth"]["allDaemonStatuses"]
        return {s["daemonType"]: bool(s["healthy"]) for s in statuses if s["required"]}

    def partition_keys(self, asset: Sequence[str]) -> list[str]:
        """The partition keys of a partitioned asset."""
        node = self.query(
            """query ($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) {
                 __typename ... on AssetNode { partitionKeys } } }""",
            key={"path": list(asset)},
        )["assetNodeOrError"]
        return node.get("partitionKeys") or []

    def add_partition(self, partitions_def: str, key: str) -> None:
        """Add a key to a dynamic partitions definition (as the UI's "Add partition" does)."""
        result = self.query(
            """mutation ($repo: RepositorySelector!, $name: String!, $key: String!) {
                 addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
                   __typename ... on Error { message } } }""",
            repo={"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY},
            name=partitions_def,
            key=key,
        )["addDynamicPartition"]
        if result["__typename"] != "AddDynamicPartitionSuccess":
            raise RuntimeError(f"addDynamicPartition {partitions_def}/{key}: {json.dumps(result)}")

    def launch_assets(
        self, assets: Sequence[Sequence[str]], partition: str | None = None, in_process: bool = False
    ) -> str:
        """Launch one run of the asset job materializing `assets` (of `partition`); its run id.

        `in_process` runs every step in the run's own process instead of one process per step.
        """
        params = {
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": REPOSITORY,
                "jobName": ASSET_JOB,
                "assetSelection": [{"path": list(key)} for key in assets],
            },
            "runConfigData": {"execution": {"config": {"in_process": {}}}} if in_process else {},
            "executionMetadata": {
                "tags": [{"key": "dagster/partition", "value": partition}] if partition else []
            },
        }
        result = self.query(
            """mutation ($params: ExecutionParams!) { launchRun(executionParams: $params) {
                 __typename
                 ... on LaunchRunSuccess { run { runId } }
                 ... on Error { message }
                 ... on RunConfigValidationInvalid { errors { message } }
               } }""",
            params=params,
        )["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"launchRun answered {result['__typename']}: {json.dumps(result, indent=1)}")
        return result["run"]["runId"]

    def run_status(self, run_id: str) -> str:
        """QUEUED, STARTING, STARTED, SUCCESS, FAILURE, CANCELED, ..."""
        run = self.query("query ($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", id=run_id)
        return run["runOrError"]["status"]

    def wait_for_run(self, run_id: str, timeout: float) -> str:
        """The status a run ended with."""
        return poll(
            f"run {run_id} to end",
            lambda: (status := self.run_status(run_id)) in FINISHED and status,
            timeout,
        )

    def run_errors(self, run_id: str) -> list[str]:
        """What went wrong in a run: its error events' messages and Python errors, for a readable failure."""
        events = self.query(
            """query ($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
                 ... on MessageEvent { level stepKey message }
                 ... on ErrorEvent { error { message causes { message } } } } } } }""",
            id=run_id,
        )["logsForRun"]["events"]
        errors = []
        for event in events:
            if event.get("level") not in ("ERROR", "CRITICAL"):
                continue
            error = event.get("error") or {}
            causes = [error.get("message")] + [c["message"] for c in error.get("causes") or []]
            details = "".join(f"\n    {c.strip()}" for c in causes if c)
            errors.append(f"{event.get('stepKey') or 'run'}: {event['message']}{details}")
        return errors

    def latest_run_of(self, asset: Sequence[str]) -> str | None:
        """The id of the run that last materialized `asset`, or None if none has."""
        found = self.query(
            """query ($key: AssetKeyInput!) { assetOrError(assetKey: $key) {
                 ... on Asset { assetMaterializations(limit: 1) { runId } } } }""",
            key={"path": list(asset)},
        )["assetOrError"]
        events = found.get("assetMaterializations") or []
        return events[0]["runId"] if events else None


class DagsterDev:
    """`dagster dev` (webserver and daemon) in its own process group, logging to a file.

    `dagster dev` ignores SIGTERM, and the code server and runs it starts are its children:
    stopping means interrupting and then killing the whole group.
    """

    def __init__(self, dagster_home: Path, log_path: Path, env: dict[str, str] | None = None, port: int = 0):
        self.dagster_home = dagster_home
        self.log_path = log_path
        self.env = env or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = DagsterApi(self.url)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                # what `make ui` runs: dg dev in the project, the instance at DAGSTER_HOME
                [
                    str(Path(sys.executable).with_name("dg")),
                    "dev",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=REPO,
                env={**os.environ, **self.env, "DAGSTER_HOME": str(self.dagster_home)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # a shell without job control starts background jobs with Ctrl-C ignored; undo that,
                # or dagster dev could not be interrupted into shutting down cleanly
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )

    def wait_until_loaded(self, timeout: float = 120) -> None:
        """Wait until the webserver answers and the code location has loaded; raise with the log if not."""

        def loaded() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.process.returncode}\n{self.log_tail()}")
            if not self.api.responding():
                return False
            status, error = self.api.location_status()
            if error:
                raise RuntimeError(f"code location {LOCATION} failed to load:\n{error}")
            return status == "LOADED"

        poll("the webserver and code location", loaded, timeout)

    def stop(self, grace: float = 15) -> None:
        """Interrupt the process group (what Ctrl-C does), then kill whatever is left of it."""
        if self.process is None:
            return
        group = self.process.pid  # the session leader's pid is the group id
        try:
            os.killpg(group, signal.SIGINT)
            self.process.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of dagster dev's output."""
        if not self.log_path.exists():
            return "(no dagster dev log)"
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def __enter__(self) -> DagsterDev:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def asset_path(asset: Sequence[str]) -> str:
    """The UI path of an asset's page."""
    return "/assets/" + "/".join(asset)


def group_path(group: str) -> str:
    """The UI path of an asset group's lineage graph."""
    return f"/locations/{REPOSITORY}@{LOCATION}/asset-groups/{group}"


class Browser:
    """Headless Chromium pointed at one Dagster webserver."""

    def __init__(self, base_url: str, artifacts: Path = ARTIFACTS, size: tuple[int, int] = (1280, 800)):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base_url = base_url.rstrip("/")
        self.artifacts = artifacts
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--window-size={size[0]},{size[1]}", "--hide-scrollbars"):
            options.add_argument(flag)
        # an explicit driver path: selenium-manager is never asked to find or fetch one
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        # headless Chromium takes part of --window-size for window decorations: fix the viewport itself
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False},
        )

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def wait(self, what: str, condition: Callable[[Any], Any], timeout: float = 30) -> Any:
        """Wait until `condition(driver)` is truthy; an AssertionError that says what was awaited if not."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.25).until(condition)
        except TimeoutException:
            raise AssertionError(f"{self.driver.current_url}: waited {timeout:.0f}s for {what}") from None

    def text(self) -> str:
        """The page's visible text."""
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait_for_text(self, *texts: str, timeout: float = 30) -> None:
        """Wait until every one of `texts` is visible on the page."""

        def all_shown(_driver) -> bool:
            shown = self.text()
            return all(t in shown for t in texts)

        try:
            self.wait(f"the texts {list(texts)}", all_shown, timeout)
        except AssertionError as err:
            shown = self.text()
            missing = [t for t in texts if t not in shown]
            raise AssertionError(f"{err}; not shown: {missing}") from None

    def button(self, label: str, timeout: float = 30):
        """A visible, enabled button whose text is `label`, once there is one."""
        from selenium.webdriver.common.by import By

        def find(driver):
            for element in driver.find_elements(By.XPATH, f"//button[normalize-space()='{label}']"):
                if element.is_displayed() and element.is_enabled():
                    return element
            return None

        return self.wait(f"a {label!r} button", find, timeout)

    def skip_community_dialog(self, api: DagsterApi) -> None:
        """Close the "Join the Dagster community" dialog a fresh instance shows on first load.

        The server says whether it will show; the UI opens it a second after the page loads.
        """
        if not api.should_show_nux():
            return
        self.button("Skip").click()
        self.wait(
            "the community dialog to close",
            lambda _driver: "Join the Dagster community" not in self.text(),
        )

    def screenshot(self, name: str) -> Path:
        """Save the viewport as `<artifacts>/<name>.png`."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def save_failure(self, name: str) -> list[Path]:
        """A screenshot and the page source, to see what the browser saw when a check failed."""
        saved = [self.screenshot(f"{name}-failure")]
        source = self.artifacts / f"{name}-failure.html"
        source.write_text(self.driver.page_source, encoding="utf-8")
        return [*saved, source]

    def close(self) -> None:
        self.driver.quit()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
