"""The training engine on this CPU: settings resolved for the device, refusals of what cannot run,
eager attention with packing, LoRA+, the tracked run, and the distributed modes as far as a CPU goes."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from conftest import tiny_llama_config
from test_training import dataset, lora_spec

from loraflow.packing import collate_packed, pack_examples
from loraflow.runtime import TrainingError, auto_dtype, cpu_has_bf16_units, resolve_runtime
from loraflow.spec import LoraSpec, TrainingSpec
from loraflow.tracking import Tracking
from loraflow.train import train_adapter

NO_BF16 = not cpu_has_bf16_units()


# ---------------------------------------------------------------------------------------------
# settings for the device


@pytest.mark.skipif(not NO_BF16, reason="this CPU has bf16 units: auto picks bfloat16 there")
def test_auto_trains_in_float32_on_a_cpu_without_bf16_units():
    for method in ("lora", "qlora"):
        runtime = resolve_runtime(TrainingSpec(method=method), device="cpu")
        assert runtime.dtype == "float32" and not runtime.bf16 and not runtime.fp16
        assert runtime.compute_dtype == ("float32" if method == "qlora" else None)
        assert runtime.attention == "sdpa" and runtime.optimizer == "adamw_torch"
        assert not runtime.liger_kernel and not runtime.torch_compile


def test_auto_picks_bfloat16_where_the_hardware_multiplies_it(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16\n")
    assert cpu_has_bf16_units.__wrapped__(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert not cpu_has_bf16_units.__wrapped__(str(cpuinfo))
    assert auto_dtype("cpu", cpu_bf16=True) == "bfloat16" and auto_dtype("cpu", cpu_bf16=False) == "float32"
    assert (
        auto_dtype("cuda", cuda_bf16=True) == "bfloat16" and auto_dtype("cuda", cuda_bf16=False) == "float16"
    )
    gpu = resolve_runtime(TrainingSpec(method="qlora"), device="cuda")
    assert gpu.dtype == gpu.compute_dtype == "bfloat16" and gpu.optimizer == "adamw_torch_fused"


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"attn_implementation": "flash_attention_2"},
            "flash_attention_2 needs a CUDA GPU and the flash-attn",
        ),
        ({"dtype": "float16"}, "float16 needs a CUDA GPU"),
        ({"optimizer": "paged_adamw_8bit"}, "paged_adamw_8bit runs on a CUDA GPU only"),
        ({"liger_kernel": True}, "liger_kernel: true needs a CUDA GPU and the liger-kernel package"),
        (
            {"distributed": "deepspeed", "deepspeed_config": "ds.json"},
            "deepspeed needs CUDA GPUs and the deepspeed package",
        ),
    ],
)
def test_a_setting_that_cannot_run_on_a_cpu_is_refused_before_any_weight_loads(
    settings, message, tokenizer, tiny_model_dir, tmp_path
):
    with pytest.raises(TrainingError, match=message):
        resolve_runtime(TrainingSpec(method="lora", **settings), device="cpu")
    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    with pytest.raises(TrainingError, match=message):
        train_adapter(lora_spec(**settings), tiny_model_dir, data.path, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_flash_attention_in_float32_is_refused_even_on_a_gpu(monkeypatch):
    import loraflow.runtime

    monkeypatch.setattr(
        loraflow.runtime, "installed", lambda package: True
    )  # as on a GPU box with flash-attn
    with pytest.raises(TrainingError, match="flash_attention_2 runs in bfloat16 or float16 only"):
        resolve_runtime(
            TrainingSpec(method="lora", dtype="float32", attn_implementation="flash_attention_2"),
            device="cuda",
        )


# ---------------------------------------------------------------------------------------------
# eager attention with packing


def test_packed_rows_under_eager_attention_give_each_examples_own_logits():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=200)).eval()
    model.config._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(3)
    examples = [
        {"input_ids": (ids := torch.randint(3, 200, (n,), generator=generator).tolist()), "labels": ids}
        for n in (7, 12, 5, 9)
    ]
    rows = pack_examples(examples, max_seq_len=24)
    assert len(rows) < len(examples)
    batch = collate_packed(rows, pad_id=0, additive=torch.float32)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for r, row in enumerate(rows):
            start = 0
            for segment in sorted(set(row.segment_ids)):
                n = row.segment_ids.count(segment)
                alone = model(input_ids=torch.tensor([row.input_ids[start : start + n]])).logits[0]
                torch.testing.assert_close(packed[r, start : start + n], alone, atol=1e-5, rtol=1e-5)
                start += n
        # the boolean mask, which sdpa takes, would be added to eager's scores as 0/1: no isolation
        leaky = model(**{k: v for k, v in collate_packed(rows, pad_id=0).items() if k != "labels"}).logits
    assert (leaky - packed).abs().max() > 1e-3


def test_a_packed_step_under_eager_attention_trains_on_the_sdpa_loss(tokenizer, tiny_model_dir, tmp_path):
    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    step = dict(max_steps=1, batch_size=4, checkpoint_every=None)
    sdpa = train_adapter(
        lora_spec(attn_implementation="sdpa", **step), tiny_model_dir, data.path, tmp_path / "s", pack_to=128
    )
    eager = train_adapter(
        lora_spec(attn_implementation="eager", **step), tiny_model_dir, data.path, tmp_path / "e", pack_to=128
    )
    assert eager.loss_curve[0][1] == pytest.approx(sdpa.loss_curve[0][1], abs=1e-5)
    assert "attention eager" in eager.runtime and "attention sdpa" in sdpa.runtime


# ---------------------------------------------------------------------------------------------
# LoRA+ and the schedule


def test_lora_plus_moves_the_b_matrices_ratio_times_faster(tokenizer, tiny_model_dir, tmp_path):
    """At the first step A's gradient is zero (B starts at zero) and Adam moves each B weight by
    about its learning rate: lr without LoRA+, ratio x lr with it."""
    from safetensors.torch import load_file

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    one_step = dict(max_steps=1, learning_rate=1e-3, lr_scheduler="constant", checkpoint_every=None)
    largest = {}
    for name, ratio in (("plain", None), ("plus", 16.0)):
        spec = lora_spec(
            lora=LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], loraplus_lr_ratio=ratio),
            **one_step,
        )
        train_adapter(spec, tiny_model_dir, data.path, tmp_path / name)
        weights = load_file(tmp_path / name / "adapter_model.safetensors")
        largest[name] = max(float(t.abs().max()) for k, t in weights.items() if "lora_B" in k)
    assert largest["plain"] == pytest.approx(1e-3, rel=0.02)
    assert largest["plus"] == pytest.approx(16e-3, rel=0.02)


def test_the_learning_rate_follows_loraflows_schedule(tokenizer, tiny_model_dir, tmp_path):
    from loraflow.train import lr_at

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    spec = lora_spec(max_steps=6, warmup_steps=2, learning_rate=1e-3, checkpoint_every=None)
    rates = []
    train_adapter(
        spec, tiny_model_dir, data.path, tmp_path / "a", progress=lambda f: rates.append(f["learning_rate"])
    )
    assert rates == pytest.approx([lr_at(step, 6, 2, 1e-3) for step in range(6)])


# ---------------------------------------------------------------------------------------------
# tracking


def test_each_training_is_one_mlflow_run_with_its_settings_and_step_figures(
    tokenizer, tiny_model_dir, tmp_path
):
    import mlflow
    from mlflow.tracking import MlflowClient

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template, eval_size=4)
    tracking = Tracking(
        backend="mlflow",
        folder=str(tmp_path / "mlflow"),
        experiment="triage",
        run_name="v1",
        tags={"pipeline": "triage"},
    )
    result = train_adapter(
        lora_spec(max_steps=4, eval_every=2, checkpoint_every=None),
        tiny_model_dir,
        data.path,
        tmp_path / "a",
        tracking=tracking,
    )
    run_id = result.tracking["run_id"]
    assert result.tracking["url"].endswith(f"/runs/{run_id}") and result.tracking["backend"] == "mlflow"

    client = MlflowClient(tracking_uri=tracking.mlflow_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "triage"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id and run.info.run_name == "v1" and run.info.status == "FINISHED"
    assert run.data.tags["pipeline"] == "triage"
    assert run.data.params["loraflow.training.lora.r"] == "4"
    assert run.data.params["loraflow.training.max_steps"] == "4"
    losses = client.get_metric_history(run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in losses] == result.loss_curve
    assert [m.step for m in client.get_metric_history(run_id, "training_eval_loss")] == [2, 4]
    assert [round(m.value, 6) for m in client.get_metric_history(run_id, "training_eval_loss")] == [
        v for _, v in result.eval_curve
    ]
    for metric in ("learning_rate", "grad_norm", "tokens_per_second", "tokens_seen"):
        assert len(client.get_metric_history(run_id, metric)) == 4, metric
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    assert "loss_curve.png" in artifacts
    assert (tmp_path / "a" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mlflow.set_tracking_uri(None)


def test_a_resumed_training_continues_its_tracked_run(tokenizer, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    tracking = Tracking(backend="mlflow", folder=str(tmp_path / "mlflow"), experiment="triage", run_name="v1")
    spec = lora_spec(max_steps=4, checkpoint_every=2)

    def stop_at_step_3(figures: dict) -> None:
        if figures["step"] == 3:
            raise KeyboardInterrupt("the machine went away")

    with pytest.raises(KeyboardInterrupt):
        train_adapter(
            spec, tiny_model_dir, data.path, tmp_path / "a", progress=stop_at_step_3, tracking=tracking
        )
    resumed = train_adapter(spec, tiny_model_dir, data.path, tmp_path / "a", tracking=tracking)
    assert resumed.resumed_from_step == 2
    client = MlflowClient(tracking_uri=tracking.mlflow_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("triage").experiment_id])
    assert run.info.run_id == resumed.tracking["run_id"] and run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")}) == [1, 2, 3, 4]


def test_a_tracker_that_is_not_installed_is_refused_before_training(
    tokenizer, tiny_model_dir, tmp_path, monkeypatch
):
    import loraflow.tracking

    monkeypatch.setattr(loraflow.tracking, "installed", lambda package: package != "wandb")
    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    with pytest.raises(
        TrainingError, match=r"tracking: wandb needs the wandb package \(pip install 'loraflow\[wandb\]'\)"
    ):
        train_adapter(
            lora_spec(), tiny_model_dir, data.path, tmp_path / "a", tracking=Tracking(backend="wandb")
        )


# ---------------------------------------------------------------------------------------------
# several processes


def _rank(rank: int, port: int, args: tuple, kwargs: dict) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    train_adapter(*args, **kwargs)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fsdp_on_two_cpu_ranks_follows_the_loss_curve_of_one_process(tokenizer, tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template, n=40)
    one = train_adapter(
        lora_spec(batch_size=4, checkpoint_every=None), tiny_model_dir, data.path, tmp_path / "one"
    )
    sharded = lora_spec(batch_size=2, distributed="fsdp", checkpoint_every=None)
    mp.spawn(_rank, args=(free_port(), (sharded, tiny_model_dir, data.path, tmp_path / "two"), {}), nprocs=2)
    two = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert two["world_size"] == 2
    assert [loss for _, loss in two["loss_curve"]] == pytest.approx(
        [loss for _, loss in one.loss_curve], abs=1e-5
    )


# ---------------------------------------------------------------------------------------------
# QLoRA's dtypes


class LayerDtypes:
    """Records the dtype of every decoder layer's output while in the block (a global forward hook)."""

    def __enter__(self):
        self.seen: set = set()

        def record(module, args, output):
            if type(module).__name__.endswith("DecoderLayer"):
                self.seen.add((output[0] if isinstance(output, tuple) else output).dtype)

        self._handle = torch.nn.modules.module.register_module_forward_hook(record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_keeps_the_stream_in_its_compute_dtype_with_gradient_checkpointing(
    dtype, tokenizer, tiny_model_dir, tmp_path
):
    """No k-bit upcast: a 4-bit base in bfloat16 runs its layers in bfloat16 (on a GPU, the fast
    path), in float32 on a CPU. Checkpointing is non-reentrant, so the adapters still get gradients."""
    from safetensors.torch import load_file

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    spec = TrainingSpec(
        method="qlora",
        dtype=dtype,
        lora=LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        max_steps=1,
        batch_size=2,
        learning_rate=1e-3,
        gradient_checkpointing=True,
        checkpoint_every=None,
    )
    with LayerDtypes() as layers:
        result = train_adapter(spec, tiny_model_dir, data.path, tmp_path / "adapter")
    assert layers.seen == {getattr(torch, dtype)}
    assert f"cpu, {dtype}, 4-bit compute in {dtype}" in result.runtime
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)  # it trained
