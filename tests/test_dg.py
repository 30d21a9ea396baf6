"""The project as a dg project: `dg scaffold defs` writes a new fine-tune that loads, `dg check defs`
and `dg list defs` see every asset, check, sensor and automation condition, and a typo fails the
check naming the file, the key and its line. Run on a copy of the project, so the checkout is never
written to; the copy's folders come first on the path, so dg loads the copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from loraflow.spec import PipelineAttributes, load_spec, spec_json_schema

REPO = Path(__file__).resolve().parent.parent
DG = Path(sys.executable).with_name("dg")
COMPONENT = "pipelines.component.FineTune"


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The project's code and its demo fine-tune, copied (not its data, artifacts or venv)."""
    root = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "dagster.yaml"):
        shutil.copy(REPO / name, root / name)
    for name in ("pipelines", "assets", "resources"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".dagster").mkdir()
    shutil.copy(REPO / "dagster.yaml", root / ".dagster" / "dagster.yaml")
    return root


def dg(copy: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(copy),
        "DAGSTER_HOME": str(copy / ".dagster"),
        "LORAFLOW_HOME": str(copy / ".loraflow"),
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    env.pop("LORAFLOW_PIPELINES", None)
    return subprocess.run([str(DG), *args], cwd=copy, env=env, capture_output=True, text=True, timeout=300)


def test_dg_scaffolds_a_fine_tune_with_every_key_documented_that_check_and_list_then_see(copy):
    scaffold = dg(copy, "scaffold", "defs", COMPONENT, "support")
    assert scaffold.returncode == 0, scaffold.stderr[-3000:]
    path = copy / "pipelines" / "defs" / "support" / "defs.yaml"
    text = path.read_text()

    # it loads as written: one source to fill in, everything else at the spec's defaults
    spec = load_spec(path)
    assert spec.name == "support" and spec.root == copy
    assert [s.path for s in spec.data.sources] == ["data/support/*.jsonl"]
    defaults = PipelineAttributes.model_validate({"data": {"sources": [{"path": "data/support/*.jsonl"}]}})
    assert spec.model_dump(exclude={"name", "root"}) == defaults.model_dump()
    # every key of every section is there, commented out at its default
    for section, field in PipelineAttributes.model_fields.items():
        if section in ("description", "data"):
            continue
        assert f"  # {section}:" in text
        model = field.annotation
        for key in getattr(model, "model_fields", {}):
            assert f"# {key}:" in text, f"{section}.{key} missing from the scaffold"
    # uncommenting a key at its default changes nothing: the commented value is the default
    uncommented = text.replace("  # training:\n", "  training:\n").replace(
        "    # max_steps: ", "    max_steps: "
    )
    path.write_text(uncommented)
    assert load_spec(path).training.max_steps == defaults.training.max_steps

    check = dg(copy, "check", "defs")
    assert check.returncode == 0, check.stderr[-3000:]
    assert "All definitions loaded successfully" in check.stdout

    listed = dg(copy, "list", "defs", "--json")
    assert listed.returncode == 0, listed.stderr[-3000:]
    defs = json.loads(listed.stdout)
    for name in ("demo", "support"):
        assets = {a["asset_key"]: a for a in defs["assets"] if a["group_name"] == name}
        assert set(assets) == {
            f"{name}/{s}"
            for s in (
                "base_model",
                "raw_examples",
                "validated_examples",
                "training_dataset",
                "adapter",
                "evaluation",
                "published_model",
            )
        }
        # each asset says when it materializes on its own
        automation = {
            k.split("/")[1]: a["description"].rsplit("Automation: ", 1)[1] for k, a in assets.items()
        }
        assert automation["raw_examples"].startswith("the source-file sensor")
        assert automation["training_dataset"] == "eager, checks passed."
        assert automation["evaluation"] == f"after {name}/adapter."
        assert automation["published_model"] == f"after {name}/evaluation."
        assert {
            c["key"].split(":")[1] for c in defs["asset_checks"] if c["asset_key"].startswith(f"{name}/")
        } == {
            "counts_add_up",
            "quality_suite",
            "schema_drift",
            "every_example_trains",
            "end_of_turn_trained",
            "template_round_trip",
            "token_lengths",
            "gate",
            "merge_fidelity",
            *(
                ["export_fidelity"] if name == "demo" else []
            ),  # the demo exports GGUF, the scaffold's default does not
        }
        assert {s["name"] for s in defs["sensors"]} >= {
            f"{name}__source_files",
            f"{name}__automation",
            f"{name}__retrain",
        }
    demo_adapter = next(a for a in defs["assets"] if a["asset_key"] == "demo/adapter")
    assert demo_adapter["description"].endswith(
        "Automation: retrain on 0 3 * * 1 (UTC) when an input changed."
    )
    # support has no cron: it trains when someone asks
    support_adapter = next(a for a in defs["assets"] if a["asset_key"] == "support/adapter")
    assert support_adapter["description"].endswith("Automation: none; materialized by hand.")

    # a typo: the check fails naming the file, the key path and its line
    path.write_text(uncommented.replace("    max_steps: ", "    max_stpes: "))
    typo = dg(copy, "check", "defs")
    assert typo.returncode != 0
    output = typo.stdout + typo.stderr
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "max_stpes" in text)
    assert str(path) in output
    assert f"attributes.training.max_stpes (line {line}): unknown key" in output
    path.unlink()


def test_the_committed_json_schema_is_the_specs_and_checks_the_demo(tmp_path):
    committed = json.loads((REPO / "pipelines" / "finetune.schema.json").read_text())
    assert committed == spec_json_schema(), (
        "regenerate it: python -m loraflow.scaffold schema > pipelines/finetune.schema.json"
    )
    demo = yaml.safe_load((REPO / "pipelines" / "defs" / "demo" / "defs.yaml").read_text())
    jsonschema.validate(demo, committed)
    demo["attributes"]["training"]["max_stpes"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_stpes"):
        jsonschema.validate(demo, committed)
    # the demo's schema line points at the committed file
    first = (REPO / "pipelines" / "defs" / "demo" / "defs.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../../finetune.schema.json"
