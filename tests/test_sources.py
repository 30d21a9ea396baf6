"""The source-file sensor and concurrent writers: partitions follow the files, nothing trips on the lock."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import write_yaml
from dagster import AssetKey, build_sensor_context, instance_for_test, materialize

from assets import pipeline_assets
from loraflow.spec import load_spec
from pipelines.definitions import build_definitions, pipeline_resources

SOURCES = "data:\n  sources:\n    - path: data/*.jsonl\n"


def example(i: int) -> str:
    return json.dumps({"instruction": "Classify.", "input": f"message {i}", "output": f"label {i % 3}"})


def tick(defs, instance, cursor: str | None):
    context = build_sensor_context(
        instance=instance,
        cursor=cursor,
        definitions=defs,
        resources={"warehouse": defs.resources["warehouse"]},
    )
    # the sensor's own result, before the daemon applies its partition requests and launches its runs
    return defs.resolve_sensor_def("triage__source_files")(context)


def apply_partition_requests(instance, result) -> None:
    for request in result.dynamic_partitions_requests:
        if type(request).__name__.startswith("Add"):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)


def test_sensor_adds_reingests_only_changed_files_and_removes_deleted_ones(project):
    data = project / "data"
    (data / "a.jsonl").write_text("\n".join(example(i) for i in range(5)))
    (data / "b.jsonl").write_text("\n".join(example(i) for i in range(5, 8)))
    spec = load_spec(write_yaml(project / "pipelines", "triage", SOURCES))
    home = project / ".loraflow"
    defs = build_definitions(project / "pipelines", home)
    assets, resources = pipeline_assets(spec), pipeline_resources(home)
    stages = [AssetKey(["triage", "raw_examples"]), AssetKey(["triage", "validated_examples"])]

    with instance_for_test() as instance:
        first = tick(defs, instance, None)
        assert sorted(r.partition_key for r in first.run_requests) == ["data/a.jsonl", "data/b.jsonl"]
        assert all(r.run_key.startswith(f"{r.partition_key}@") for r in first.run_requests)
        apply_partition_requests(instance, first)
        for request in first.run_requests:  # what the daemon would launch
            materialize(
                assets,
                selection=stages,
                partition_key=request.partition_key,
                instance=instance,
                resources=resources,
            )

        quiet = tick(defs, instance, first.cursor)
        assert quiet.run_requests == [] and quiet.dynamic_partitions_requests == []

        (data / "a.jsonl").write_text("\n".join(example(i) for i in range(6)))  # a grows by one line
        changed = tick(defs, instance, quiet.cursor)
        assert [r.partition_key for r in changed.run_requests] == ["data/a.jsonl"]
        assert changed.run_requests[0].run_key != next(
            r.run_key for r in first.run_requests if r.partition_key == "data/a.jsonl"
        )

        (data / "b.jsonl").unlink()
        deleted = tick(defs, instance, changed.cursor)
        requests = deleted.dynamic_partitions_requests
        assert [list(r.partition_keys) for r in requests] == [["data/b.jsonl"]]
        assert type(requests[0]).__name__.startswith("Delete")
        with resources["warehouse"].connect() as con:
            left = con.execute("SELECT DISTINCT partition FROM triage.raw_examples").fetchall()
        assert left == [("data/a.jsonl",)]  # the deleted file's rows are gone


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from loraflow.ingest import ingest_file
    from loraflow.spec import QualitySpec, SourceSpec
    from loraflow.validate import validate_partition
    from resources import Warehouse

    warehouse, path, key = Warehouse(path=sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    for _ in range(3):
        with warehouse.connect() as con:
            ingest_file(con, "p", key, path, SourceSpec(path="*"))
        with warehouse.connect() as con:
            result = validate_partition(con, "p", key, SourceSpec(path="*"), QualitySpec())
    print(result.raw, result.valid)
    """
)


def test_parallel_partitions_wait_for_the_warehouse_lock_instead_of_failing(tmp_path):
    database = tmp_path / "warehouse.duckdb"
    processes = []
    for key in ("a", "b"):
        path = tmp_path / f"{key}.jsonl"
        path.write_text("\n".join(example(i) for i in range(20000)))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(database), str(path), key],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        )
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-800:] for _, err in outputs]
    assert [out.split() for out, _ in outputs] == [["20000", "20000"], ["20000", "20000"]]
