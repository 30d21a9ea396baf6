"""Backfill a pipeline's data stages over all its source files, from the command line.

    python -m pipelines.backfill demo                        # re-validate every file, then re-format
    python -m pipelines.backfill demo --from raw_examples    # re-ingest too (after a `data` change)
    python -m pipelines.backfill demo --partitions data/demo/part-000.jsonl --wait

It asks the Dagster webserver (`make ui`) for the same backfill the UI's "Materialize all partitions"
launches, through the same GraphQL API, so it shows under Overview > Backfills and the daemon runs
it: one run per source file, at most two at a time (dagster.yaml), then training_dataset once.
Training is never part of a backfill: the retrain schedule picks the new data up. A change to
the `format` section alone needs no backfill: training_dataset is one asset, not partitioned, and
the retrain schedule rebuilds it because its code version changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

STAGES = ("raw_examples", "validated_examples", "training_dataset")
FIRST_STAGES = STAGES[:2]
DEFAULT_URL = "http://127.0.0.1:3000"
RUNNING = {"REQUESTED", "CANCELING", "FAILING"}

LAUNCH = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on Error { message }
  }
}
"""
STATUS = """
query BackfillStatus($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { id status numPartitions }
    ... on Error { message }
  }
}
"""


class BackfillError(RuntimeError):
    pass


def graphql(url: str, query: str, variables: dict, timeout: float = 120.0) -> dict:
    """POST one GraphQL request to the webserver at `url`; its `data`, or BackfillError."""
    request = urllib.request.Request(
        url.rstrip("/") + "/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.URLError as err:
        raise BackfillError(
            f"no Dagster webserver at {url} ({err.reason}): start it with `make ui` (its daemon runs the "
            "backfill), or pass --url"
        ) from None
    if body.get("errors"):
        raise BackfillError("; ".join(e.get("message", str(e)) for e in body["errors"]))
    return body["data"]


def backfill_params(pipeline: str, first: str, partitions: list[str] | None) -> dict:
    """The LaunchBackfillParams of a backfill from stage `first` through training_dataset."""
    stages = STAGES[STAGES.index(first) :]
    params: dict = {
        "assetSelection": [{"path": [pipeline, stage]} for stage in stages],
        "title": f"{pipeline}: {' -> '.join(stages)}",
        "description": f"python -m pipelines.backfill {pipeline} --from {first}",
        "tags": [{"key": "loraflow/pipeline", "value": pipeline}],
    }
    if partitions:
        params["partitionNames"] = partitions
    else:
        params["allPartitions"] = True
    return params


def launch(url: str, params: dict) -> str:
    """Launch the backfill; its id."""
    result = graphql(url, LAUNCH, {"params": params})["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise BackfillError(
            f"the webserver refused the backfill ({result['__typename']}): {result.get('message')}"
        )
    return result["backfillId"]


def wait(url: str, backfill_id: str, timeout: float, poll: float = 2.0) -> str:
    """Poll until the backfill is no longer running; its final status."""
    deadline = time.monotonic() + timeout
    while True:
        result = graphql(url, STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        if result["__typename"] != "PartitionBackfill":
            raise BackfillError(f"backfill {backfill_id}: {result.get('message')}")
        if result["status"] not in RUNNING:
            return result["status"]
        if time.monotonic() > deadline:
            raise BackfillError(f"backfill {backfill_id} still {result['status']} after {timeout:.0f} s")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.backfill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pipeline", help="the pipeline's name: pipelines/defs/<name>/defs.yaml")
    parser.add_argument(
        "--from",
        dest="first",
        choices=FIRST_STAGES,
        default="validated_examples",
        help="the first stage to redo; every data stage after it follows (default: validated_examples)",
    )
    parser.add_argument("--partitions", nargs="+", help="only these source files (partition keys)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the Dagster webserver (default: {DEFAULT_URL})")
    parser.add_argument("--wait", action="store_true", help="wait until the backfill has finished")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits at most")
    args = parser.parse_args(argv)
    try:
        backfill_id = launch(args.url, backfill_params(args.pipeline, args.first, args.partitions))
        print(f"backfill {backfill_id} launched: {args.url}/runs/b/{backfill_id}")
        if args.wait:
            status = wait(args.url, backfill_id, args.timeout)
            print(f"backfill {backfill_id}: {status}")
            return 0 if status in ("COMPLETED", "COMPLETED_SUCCESS") else 1
    except BackfillError as err:
        print(f"backfill: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
