"""Where and how training runs. The adapter asset asks the trainer; it never decides this itself.

    in_process   train_adapter in the step's own process
    subprocess   python -m loraflow.worker, through Dagster Pipes: GPU memory is freed when it ends
    torchrun     python -m torch.distributed.run --nproc_per_node N -m loraflow.worker (DDP), same Pipes path
    kubernetes   a pod running the worker (torchrun when it has several GPUs), through PipesK8sClient

Every mode but in_process hands the TrainRequest to the worker in the Pipes extras, gets the
worker's "loraflow" log (progress with loss, learning rate, grad norm and tokens/s) in the run's
log, and reads the TrainResult from the adapter folder the worker wrote. A failed worker fails the
step with the worker's own message.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Literal

import psutil
from dagster import Config, ConfigurableResource
from pydantic import Field

from loraflow.request import TrainRequest, read_result, run_training
from loraflow.train import TrainingError, TrainResult
from loraflow.worker import FAILURE_FILE_ENV

WORKER = ["-m", "loraflow.worker"]
CONTAINER = "loraflow-worker"
STORE_VOLUME = "artifact-store"
TERMINATION_LOG = "/dev/termination-log"
RUN_WATCH_SECONDS = 2.0
"""How often a training step looks whether its run is still going (see ends_with_its_run)."""


class KubernetesSettings(Config):
    """The cluster side of the `kubernetes` mode. A pipeline YAML's `kubernetes` section overrides
    gpus, node_selector and tolerations for its own training."""

    image: str | None = Field(
        default=None,
        description="Container image with this project installed, at the same code and package "
        "versions as the Dagster deployment.",
    )
    namespace: str | None = Field(
        default=None, description="Namespace of the pod; unset: the current one in a cluster, else default."
    )
    python: str = Field(default="python", description="The Python interpreter inside the image.")
    gpus: int = Field(
        default=1, ge=0, description="GPUs per pod (limits nvidia.com/gpu); more than one runs torchrun."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pod must run on, e.g. a GPU node pool."
    )
    tolerations: list[dict[str, str]] = Field(
        default_factory=list,
        description="Kubernetes tolerations as written in a pod spec "
        "(key, operator, value, effect), e.g. for tainted GPU nodes.",
    )
    store_claim: str | None = Field(
        default=None,
        description="PersistentVolumeClaim holding the artifact store (base models, datasets, adapters).",
    )
    store_mount_path: str | None = Field(
        default=None,
        description="Where the claim is mounted in the pod: the artifact store's root as Dagster sees "
        "it, so the paths in a training request mean the same files in the pod.",
    )
    service_account: str | None = Field(default=None, description="Service account the pod runs as.")


class Trainer(ConfigurableResource):
    """Runs the training loop: in the step's process, in a subprocess, under torchrun, or in a pod."""

    mode: Literal["in_process", "subprocess", "torchrun", "kubernetes"] = Field(
        default="in_process",
        description="Where training runs: in_process; subprocess or torchrun (DDP), both through "
        "Dagster Pipes; or kubernetes, a pod through Pipes.",
    )
    python: str | None = Field(
        default=None,
        description="Python interpreter for subprocess and torchrun; unset: the one running Dagster.",
    )
    nproc_per_node: int | None = Field(
        default=None,
        ge=1,
        description="torchrun processes (ranks); unset: one per visible GPU, or 1 without a GPU.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables added for the worker (e.g. OMP_NUM_THREADS, HF_HOME).",
    )
    kubernetes: KubernetesSettings = Field(
        default_factory=KubernetesSettings, description="Image, namespace, GPUs and storage of the pod."
    )

    def train(self, context, request: TrainRequest) -> TrainResult:
        """Run the training the request describes, where `mode` says; returns the adapter's summary.

        Under Pipes the calling asset must return an Output or MaterializeResult (Dagster asks for
        typed events once a Pipes session opened); the adapter asset does."""
        if self.mode == "in_process":
            # the adapter asset checked the memory plan on this machine before asking
            with ends_with_its_run(context):
                return run_training(request, preflight=False)
        if self.mode == "kubernetes":
            self._run_in_pod(context, request)
        else:
            with ends_with_its_run(context):
                self._run_subprocess(context, request)
        return read_result(request.adapter_dir)

    @property
    def trains_on_this_machine(self) -> bool:
        """Whether training uses this machine's devices (every mode but kubernetes)."""
        return self.mode != "kubernetes"

    @property
    def device_kind(self) -> str:
        """`cuda` or `cpu`: what the training's device is, for the memory plan."""
        if self.mode == "kubernetes":
            return "cuda" if self.kubernetes.gpus else "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def worker_command(self) -> list[str]:
        """The command line that starts the worker for `subprocess` or `torchrun`."""
        python = self.python or sys.executable
        if self.mode == "torchrun":
            return [python, *torchrun_args(self.nproc_per_node or visible_gpus()), *WORKER]
        return [python, *WORKER]

    def _run_subprocess(self, context, request: TrainRequest) -> None:
        from dagster import PipesSubprocessClient

        with tempfile.TemporaryDirectory(prefix="loraflow-worker-") as scratch:
            failure_file = Path(scratch) / "failure.txt"
            client = PipesSubprocessClient(env={**self.env, FAILURE_FILE_ENV: str(failure_file)})
            try:
                client.run(context=context, command=self.worker_command(), extras=worker_extras(request))
            except Exception as err:  # the worker's own message, when it left one, says more
                failure = failure_file.read_text(encoding="utf-8") if failure_file.is_file() else ""
                if not failure:
                    raise
                raise TrainingError(f"{failure}\n(in the {self.mode} training worker: {err})") from None

    def _run_in_pod(self, context, request: TrainRequest) -> None:
        from dagster_k8s import PipesK8sClient

        PipesK8sClient().run(
            context=context,
            namespace=self.kubernetes.namespace,
            base_pod_spec=worker_pod_spec(self.kubernetes, request, self.env),
            extras=worker_extras(request),
        )


@contextlib.contextmanager
def ends_with_its_run(context, every: float = RUN_WATCH_SECONDS) -> Iterator[None]:
    """While the block trains, end this process and the training processes it started as soon as
    the run is over without them.

    A run worker killed outright (kill -9, the OOM killer, a lost machine) leaves the step processes
    of Dagster's multiprocess executor running: the code server marks the run failed, the daemon
    retries it, and run monitoring gives the "gpu" slot to the retry, while the orphan still trains
    on the same device into the same checkpoint folder (seen here: an orphaned training went on to
    its last step and wrote the adapter 25 s after its run worker was killed). So a thread reads
    the run's status every `every` seconds and, once the run has finished (failed or canceled),
    kills the worker processes and this one, well before run monitoring frees the slot
    (`free_slots_after_run_end_seconds` in dagster.yaml). A pod in `kubernetes` mode is not this
    process's child; a failed run's pod is Kubernetes' to stop."""
    instance, run_id = context.instance, context.run_id
    training = threading.Event()
    training.set()

    def watch() -> None:
        while training.is_set():
            time.sleep(every)
            try:
                run = instance.get_run_by_id(run_id)
            except Exception:  # the storage is unreachable for now: look again next time
                continue
            if training.is_set() and run is not None and run.is_finished:
                me = psutil.Process()
                for child in me.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                me.kill()

    watcher = threading.Thread(target=watch, name=f"loraflow-watch-{run_id[:8]}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        training.clear()


def worker_extras(request: TrainRequest) -> dict:
    return {"request": request.model_dump(mode="json")}


def torchrun_args(processes: int) -> list[str]:
    """torchrun on one machine: a free rendezvous port, one process per rank."""
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def visible_gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def worker_pod_spec(settings: KubernetesSettings, request: TrainRequest, env: dict[str, str]) -> dict:
    """The pod spec (Kubernetes field names) that runs the worker for `request`: image, command,
    GPU limit, node selector, tolerations, and the artifact store mounted where the request's paths
    point. The pipeline's `kubernetes` section overrides the settings' gpus, selector and tolerations.
    PipesK8sClient adds the Pipes environment, the pod's name and labels."""
    placement = request.kubernetes
    gpus = settings.gpus if placement.gpus is None else placement.gpus
    node_selector = settings.node_selector if placement.node_selector is None else placement.node_selector
    tolerations = (
        settings.tolerations
        if placement.tolerations is None
        else [t.model_dump(exclude_none=True) for t in placement.tolerations]
    )
    if not settings.image:
        raise TrainingError(
            "trainer mode kubernetes needs kubernetes.image: an image with this project installed"
        )
    if not settings.store_claim or not settings.store_mount_path:
        raise TrainingError(
            "trainer mode kubernetes needs kubernetes.store_claim and kubernetes.store_mount_path: the "
            "pod reads the base model and dataset from the artifact store and writes the adapter there"
        )
    mount = PurePosixPath(settings.store_mount_path)
    for name in ("base_model_dir", "dataset_dir", "adapter_dir"):
        path = PurePosixPath(getattr(request, name))
        if not path.is_relative_to(mount):
            raise TrainingError(
                f"the training's {name} {path} is outside kubernetes.store_mount_path {mount}: the pod "
                "sees only the artifact store's volume, mounted where Dagster sees the store; a base model "
                "from a local folder must lie on that volume too"
            )

    command = [settings.python, *WORKER]
    if gpus > 1:
        command = [settings.python, *torchrun_args(gpus), *WORKER]
    mounts = [{"name": STORE_VOLUME, "mountPath": str(mount)}]
    volumes = [{"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": settings.store_claim}}]
    if gpus > 1:  # NCCL between ranks uses shared memory; a container's default /dev/shm is 64 MB
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "command": command,
        "env": [{"name": k, "value": v} for k, v in {**env, FAILURE_FILE_ENV: TERMINATION_LOG}.items()],
        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {},
        "volumeMounts": mounts,
        # the worker writes its error to the termination log; a crash without one shows the log's tail
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    spec: dict = {"containers": [container], "volumes": volumes, "restartPolicy": "Never"}
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    return spec
