"""Where training runs is the trainer's configuration: the real adapter asset trained in a subprocess
and under torchrun through Dagster Pipes, a failing worker, and the pod Kubernetes would be sent."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import materialize_upstream_of_adapter, write_yaml
from dagster import AssetKey, instance_for_test, materialize

from assets import pipeline_assets
from loraflow.demo_data import write_demo_data
from loraflow.plan import PlanError, estimate_training
from loraflow.plan.memory import GIB
from loraflow.plan.preflight import leanest
from loraflow.request import check_request_fits, run_training
from loraflow.spec import LoraSpec, PipelineSpec, PlanSpec, load_spec
from loraflow.train import TRAINING_SUMMARY, TrainingError
from pipelines.definitions import pipeline_resources
from resources import KubernetesSettings, Trainer, TrainRequest
from resources.trainer import worker_pod_spec

PIPELINE = """
data:
  sources:
    - path: data/*.jsonl
quality:
  max_invalid_fraction: 0.5
format:
  chat_template: chatml
  eval_size: 0.2
base_model:
  source: {model}
training:
  method: lora
  lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}}
  max_steps: 4
  batch_size: 4
  learning_rate: 5.0e-3
  log_every: 1
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two ranks on a 2-core machine: more threads oversubscribe it
STEP_LINE = re.compile(r"step (\d+)/4 \| loss [\d.]+ \| lr \S+ \| grad norm [\d.]+ \| \d+ tokens/s")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_model_dir) -> tuple[PipelineSpec, Path]:
    """A pipeline with everything upstream of `adapter` materialized once; (spec, store root)."""
    project = tmp_path_factory.mktemp("trainer-modes")
    (project / "pipelines").mkdir()
    write_demo_data(project / "data", n=60, files=1)
    home = project / ".loraflow"
    # in the artifact store, as a pod would need it: the store is the volume the pod mounts
    model = shutil.copytree(tiny_model_dir, home / "base_models" / "tiny-llama")
    spec = load_spec(write_yaml(project / "pipelines", "triage", PIPELINE.format(model=model)))
    materialize_upstream_of_adapter(spec, home)
    return spec, home


def train(spec: PipelineSpec, home: Path, trainer: Trainer, instance):
    """One run of the real adapter asset; its inputs load from the upstream manifests."""
    return materialize(
        pipeline_assets(spec),
        selection=[AssetKey([spec.name, "adapter"])],
        instance=instance,
        resources={**pipeline_resources(home), "trainer": trainer},
        raise_on_error=False,
    )


def with_training(spec: PipelineSpec, **settings) -> PipelineSpec:
    return spec.model_copy(update={"training": spec.training.model_copy(update=settings)})


def summary_of(result) -> dict:
    """The training summary in the adapter folder the run materialized."""
    (event,) = result.get_asset_materialization_events()
    folder = Path(event.materialization.metadata["path"].value)
    return json.loads((folder / TRAINING_SUMMARY).read_text())


def failure_messages(result) -> list[str]:
    """The messages of the step failure's error and of each error that caused it."""
    (failure,) = result.get_step_failure_events()
    error, messages = failure.step_failure_data.error, []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return messages


def logging_instance():
    """A test instance that, like the repository's dagster.yaml, puts the "loraflow" logger in run logs."""
    return instance_for_test(overrides={"python_logs": {"managed_python_loggers": ["loraflow"]}})


def run_log(instance, result) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id)]


def test_a_subprocess_training_streams_the_workers_progress_into_the_run_log(upstream):
    spec, home = upstream
    with instance_for_test() as instance:
        result = train(spec, home, Trainer(mode="subprocess"), instance)
        assert result.success
        log = run_log(instance, result)
    assert [int(STEP_LINE.search(line).group(1)) for line in log if STEP_LINE.search(line)] == [1, 2, 3, 4]
    assert any(line.startswith("trained 4 steps on 1 rank(s): final loss") for line in log)
    summary = summary_of(result)
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["steps"].value == summary["steps"] == 4
    assert metadata["final_train_loss"].value == summary["final_loss"]
    assert metadata["plan_peak_gib"].value > 0 and "| **peak**" in metadata["memory_plan"].value


def test_torchrun_with_two_ranks_follows_the_loss_curve_of_one_process_with_the_same_global_batch(upstream):
    spec, home = upstream
    with instance_for_test() as instance:
        one = train(spec, home, Trainer(mode="in_process"), instance)
        two = train(
            with_training(spec, batch_size=2),
            home,
            Trainer(mode="torchrun", nproc_per_node=2, env=ONE_THREAD),
            instance,
        )
        assert one.success and two.success
        log = run_log(instance, two)
    reference, ddp = summary_of(one), summary_of(two)
    assert (reference["world_size"], ddp["world_size"]) == (1, 2)
    assert [loss for _, loss in ddp["loss_curve"]] == pytest.approx(
        [loss for _, loss in reference["loss_curve"]], abs=1e-5
    )
    # only rank 0 talks to Dagster: each step is logged once, not once per rank
    assert [int(STEP_LINE.search(line).group(1)) for line in log if STEP_LINE.search(line)] == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["subprocess", "torchrun"])
def test_a_failing_worker_fails_the_step_with_the_workers_own_message(upstream, mode):
    spec, home = upstream
    broken = with_training(spec, lora=LoraSpec(r=4, alpha=8, target_modules=["query_key_value"]))
    with instance_for_test() as instance:
        result = train(broken, home, Trainer(mode=mode, nproc_per_node=2, env=ONE_THREAD), instance)
    assert not result.success
    messages = failure_messages(result)
    assert any(
        "TrainingError" in m and "target_modules ['query_key_value']" in m and "q_proj" in m for m in messages
    ), messages


def kubernetes_trainer(home: Path) -> Trainer:
    return Trainer(
        mode="kubernetes",
        env={"HF_HUB_OFFLINE": "1"},
        kubernetes=KubernetesSettings(
            image="registry.example.com/loraflow:1.0",
            namespace="training",
            gpus=1,
            node_selector={"pool": "gpu"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            store_claim="loraflow-store",
            store_mount_path=str(home),
        ),
    )


class PodSubmitted(Exception):
    """Stands in for the cluster: the pod is recorded, never run."""


def test_kubernetes_mode_submits_a_pod_running_the_worker_with_the_configured_gpus_placement_and_store(
    upstream, monkeypatch
):
    from dagster_k8s import PipesK8sClient
    from dagster_k8s.client import DagsterKubernetesClient

    spec, home = upstream
    submitted = []

    class CoreApi:
        def create_namespaced_pod(self, namespace, body):
            submitted.append((namespace, body))
            raise PodSubmitted

    class Cluster:
        core_api = CoreApi()

    monkeypatch.setattr(PipesK8sClient, "_load_k8s_config", lambda self: None)
    monkeypatch.setattr(DagsterKubernetesClient, "production_client", staticmethod(lambda: Cluster()))
    with instance_for_test() as instance:
        result = train(spec, home, kubernetes_trainer(home), instance)
    assert any("PodSubmitted" in message for message in failure_messages(result))

    ((namespace, pod),) = submitted
    (container,) = pod.spec.containers
    assert namespace == "training"
    assert container.image == "registry.example.com/loraflow:1.0"
    assert container.command == ["python", "-m", "loraflow.worker"]
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    assert pod.spec.node_selector == {"pool": "gpu"}
    assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [
        ("nvidia.com/gpu", "Exists", "NoSchedule")
    ]
    assert [(m.name, m.mount_path) for m in container.volume_mounts] == [("artifact-store", str(home))]
    assert [(v.name, v.persistent_volume_claim.claim_name) for v in pod.spec.volumes] == [
        ("artifact-store", "loraflow-store")
    ]
    assert pod.spec.restart_policy == "Never"
    env = {e.name: e.value for e in container.env}
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["LORAFLOW_FAILURE_FILE"] == container.termination_message_path == "/dev/termination-log"
    assert "DAGSTER_PIPES_CONTEXT" in env  # the request travels in the Pipes extras


def test_a_pipelines_kubernetes_section_overrides_gpus_selector_and_tolerations(upstream, project):
    spec, home = upstream
    yaml_path = write_yaml(
        project / "pipelines",
        "big",
        PIPELINE.format(model="/models/llama")
        + """
kubernetes:
  gpus: 4
  node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
  tolerations:
    - {key: dedicated, operator: Equal, value: training, effect: NoExecute}
""",
    )
    placement = load_spec(yaml_path).kubernetes
    request = TrainRequest(
        training=spec.training,
        base_model_dir=f"{home}/base_models/llama",
        dataset_dir=f"{home}/datasets/big/v1",
        adapter_dir=f"{home}/adapters/big/v1",
        kubernetes=placement,
    )
    pod = worker_pod_spec(kubernetes_trainer(home).kubernetes, request, {})
    (container,) = pod["containers"]
    assert container["command"] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "loraflow.worker",
    ]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoExecute"}
    ]
    assert "/dev/shm" in [mount["mountPath"] for mount in container["volumeMounts"]]

    outside = request.model_copy(update={"dataset_dir": "/elsewhere/datasets/big/v1"})
    with pytest.raises(
        TrainingError, match=r"dataset_dir /elsewhere/datasets/big/v1 is outside .*store_mount"
    ):
        worker_pod_spec(kubernetes_trainer(home).kubernetes, outside, {})


def test_a_training_that_cannot_fit_fails_before_the_model_loads_with_the_settings_that_would(upstream):
    spec, home = upstream
    (dataset,) = (home / "datasets" / spec.name).iterdir()
    estimate = estimate_training(spec.training, home / "base_models" / "tiny-llama", dataset, device="cpu")
    limit = (leanest(estimate).peak + estimate.peak) / 2 / GIB  # the leanest setting fits, these do not
    tight = spec.model_copy(update={"plan": PlanSpec(memory_limit_gib=limit)})
    adapters = home / "adapters" / spec.name
    before = set(adapters.glob("*")) if adapters.exists() else set()
    with logging_instance() as instance:
        result = train(tight, home, Trainer(mode="in_process"), instance)
        log = run_log(instance, result)
    assert not result.success
    message = "\n".join(failure_messages(result))
    assert "training will not fit" in message
    assert f"plan.memory_limit_gib ({limit:g} GiB) has {limit:,.1f} GiB free" in message
    assert "Settings that fit (each re-estimated):" in message and "training." in message
    assert not any("trainable params" in line for line in log)  # no weights were loaded
    assert set(adapters.glob("*")) == before  # no adapter folder, no checkpoint


def test_a_worker_refuses_a_request_that_cannot_fit_before_loading_weights(upstream, tmp_path):
    spec, home = upstream
    (dataset,) = (home / "datasets" / spec.name).iterdir()
    request = TrainRequest(
        training=spec.training,
        base_model_dir=str(home / "base_models" / "tiny-llama"),
        dataset_dir=str(dataset),
        adapter_dir=str(tmp_path / "adapter"),
        plan=PlanSpec(memory_limit_gib=0.001),
    )
    with pytest.raises(PlanError, match="training will not fit"):
        run_training(request)
    assert not (tmp_path / "adapter").exists()
    unchecked = request.model_copy(update={"plan": PlanSpec(memory_limit_gib=0.001, preflight=False)})
    assert check_request_fits(unchecked).peak > 0.001 * GIB  # estimated, not checked


def test_a_model_the_planner_cannot_read_trains_without_a_plan_and_says_so(tokenizer, project):
    """GPT-2's config names its sizes n_embd and n_layer, not the Llama keys the planner reads."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model_dir = project / "tiny-gpt2"
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_demo_data(project / "data", n=40, files=1)
    text = PIPELINE.format(model=model_dir).replace(
        "target_modules: [q_proj, v_proj]", "target_modules: [c_attn]"
    )
    spec = load_spec(write_yaml(project / "pipelines", "triage", text))
    home = project / ".loraflow"
    materialize_upstream_of_adapter(spec, home)
    with logging_instance() as instance:
        result = train(spec, home, Trainer(mode="in_process"), instance)
        log = run_log(instance, result)
    assert result.success
    (warning,) = [line for line in log if "no memory plan for this training" in line]
    assert "config.json lacks hidden_size" in warning
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["steps"].value == 4
    assert not [key for key in metadata if key.startswith("plan_")]
