"""The training worker: one training in its own process, started by Dagster or by hand.

    python -m loraflow.worker request.json                    # by hand: a TrainRequest as JSON
    torchrun --standalone --nproc_per_node 2 -m loraflow.worker request.json

The trainer resource starts it through Dagster Pipes (a subprocess, torchrun, or a Kubernetes
pod) with no argument: the request then comes in the Pipes extras under "request".

    Pipes extras["request"] -> train_adapter -> adapter folder (training_summary.json, rank 0)
    "loraflow" log (progress: step, loss, lr, grad norm, tokens/s) -> Pipes log -> the run's log
    TrainResult -> Pipes custom message {"training_summary": ...}

The asset's own output is made on the Dagster side from the adapter folder, so the worker reports
no materialization. Under torchrun every rank inherits the Pipes environment, but only rank 0
opens Pipes: each opened context writes its own messages, and two ranks reporting would give Dagster
two of everything. The other ranks read the request from the same Pipes context without opening a
message channel, and log warnings to stderr.

When training fails, the error goes back through Pipes with its traceback (rank 0), and every rank
writes its message to the file named by LORAFLOW_FAILURE_FILE unless another rank already did:
the first failure is the cause, later ones are its echo (a rank whose peer died). The trainer
raises that message as the step's failure; on Kubernetes the file is the container's termination
log, which Kubernetes reports with the failed pod.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from loraflow.plan import PlanError
from loraflow.request import TrainRequest, run_training
from loraflow.train import TrainingError

FAILURE_FILE_ENV = "LORAFLOW_FAILURE_FILE"
LOGGER = "loraflow"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loraflow.worker", description=__doc__.split("\n")[0])
    parser.add_argument(
        "request", nargs="?", type=Path, help="a TrainRequest as JSON (default: the Pipes extras)"
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if under_pipes() and rank == 0:
            train_reporting_to_dagster(args.request)
        else:
            logging.basicConfig(
                level=logging.INFO if rank == 0 else logging.WARNING,
                format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s",
            )
            result = run_training(load_request(args.request))
            if rank == 0:
                print(json.dumps(asdict(result), indent=2))
    except Exception as err:
        record_failure(err)
        raise


def under_pipes() -> bool:
    from dagster_pipes import PipesEnvVarParamsLoader

    return PipesEnvVarParamsLoader().is_dagster_pipes_process()


def train_reporting_to_dagster(request_file: Path | None) -> None:
    """Rank 0 under Pipes: the "loraflow" log and the result go to the Dagster run."""
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        logger = logging.getLogger(LOGGER)
        logger.setLevel(logging.INFO)
        logger.addHandler(PipesLogHandler(pipes.log))
        logger.propagate = False  # stderr is forwarded too; each line once is enough
        request = load_request(request_file, pipes.extras)
        result = run_training(request)
        logger.info(
            "trained %d steps on %d rank(s): final loss %.4f, %.0f tokens/s, %.0f MB peak memory",
            result.steps,
            result.world_size,
            result.final_loss,
            result.tokens_per_second,
            result.peak_memory_mb,
        )
        pipes.report_custom_message({"training_summary": asdict(result)})


def load_request(request_file: Path | None, extras: dict | None = None) -> TrainRequest:
    """The request from a JSON file if one is named, else from the Pipes extras."""
    if request_file is not None:
        return TrainRequest.model_validate_json(request_file.read_text(encoding="utf-8"))
    if extras is None and under_pipes():
        extras = pipes_extras()
    if not extras or "request" not in extras:
        raise TrainingError(
            "no training request: name a TrainRequest JSON file (python -m loraflow.worker request.json), "
            "or start the worker through the trainer resource, which passes it in the Pipes extras"
        )
    return TrainRequest.model_validate(extras["request"])


def pipes_extras() -> dict:
    """The Pipes extras read without opening Pipes (for the ranks that must not report)."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as context:
        return dict(context.get("extras") or {})


class PipesLogHandler(logging.Handler):
    """Forwards log records to the Pipes log, which Dagster shows in the run's log."""

    def __init__(self, pipes_log: logging.Logger):
        super().__init__()
        self.pipes_log = pipes_log

    def emit(self, record: logging.LogRecord) -> None:
        self.pipes_log.log(record.levelno, record.getMessage())


def record_failure(err: Exception) -> None:
    """Write why training failed to LORAFLOW_FAILURE_FILE, unless another rank got there first."""
    path = os.environ.get(FAILURE_FILE_ENV)
    if not path:
        return
    message = str(err) if isinstance(err, (TrainingError, PlanError)) else f"{type(err).__name__}: {err}"
    try:
        with open(path, "a", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            file.seek(0, os.SEEK_END)
            if file.tell() == 0:
                file.write(message)
    except OSError as write_error:  # the failure itself matters more than its note
        print(f"could not write the failure to {path}: {write_error}", file=sys.stderr)


if __name__ == "__main__":
    main()
