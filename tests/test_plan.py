"""The planner: parameter counts, activation terms, the guide's tables, preflight, and estimates
against peaks measured on this CPU."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import autograd_saved_bytes, write_yaml

from loraflow.plan import (
    NAMED_SHAPES,
    FreeMemory,
    ModelShape,
    PlanError,
    Setup,
    check_fits,
    estimate_for_spec,
    estimate_memory,
    fitting_alternatives,
    flops_per_token,
    layer_activation_terms,
    preflight,
    time_for_spec,
)
from loraflow.plan.__main__ import main
from loraflow.plan.measure import measure_peaks, sample_chats
from loraflow.plan.memory import GIB, MIB
from loraflow.plan.preflight import available_system_memory
from loraflow.spec import SpecError, load_spec

# ---------------------------------------------------------------------------------------------
# shapes and formulas


def test_parameter_counts_equal_the_models_own(tiny_model_dir, builtin_model):
    from transformers import AutoModelForCausalLM

    for folder in (tiny_model_dir, builtin_model.path):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert ModelShape.from_folder(folder).params == sum(p.numel() for p in model.parameters())
    assert NAMED_SHAPES["7B"].params == 6_738_415_616  # Llama 2 7B's published count
    assert NAMED_SHAPES["70B"].params == 68_976_648_192


def test_a_folder_without_a_usable_config_is_a_clear_error(tmp_path):
    with pytest.raises(PlanError, match="no config.json"):
        ModelShape.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(PlanError, match="lacks hidden_size"):
        ModelShape.from_folder(tmp_path)


def _saved_bytes(
    layers: int, dtype, targets, dropout: float, padded: bool, checkpointing: bool = False
) -> int:
    """Bytes autograd keeps for the backward pass in a LoRA Llama's decoder (parameters excluded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets)
    model = get_peft_model(model, config).get_base_model()
    model.train()
    ids = torch.randint(0, 256, (2, 48))
    mask = torch.ones_like(ids)
    mask[0, 40:] = 0
    return autograd_saved_bytes(
        model, lambda: model.model(input_ids=ids, attention_mask=mask if padded else None)
    )


@pytest.mark.parametrize(
    "dtype, targets, dropout, padded",
    [
        ("float32", ["q_proj", "k_proj", "v_proj", "o_proj"], 0.0, False),
        ("float32", "all-linear", 0.05, False),
        ("bfloat16", ["q_proj", "v_proj"], 0.0, False),
        ("float32", ["q_proj", "k_proj", "v_proj", "o_proj"], 0.0, True),
    ],
)
def test_a_layers_activation_terms_equal_what_autograd_saves(dtype, targets, dropout, padded):
    """One layer's terms against the bytes a real layer keeps: a three-layer model minus a
    two-layer one is exactly one (steady-state) layer."""
    import torch

    torch_dtype = getattr(torch, dtype)
    one_layer = _saved_bytes(3, torch_dtype, targets, dropout, padded) - _saved_bytes(
        2, torch_dtype, targets, dropout, padded
    )
    shape = ModelShape("small", 128, 320, 3, 4, 2, 32, 256, False)
    setup = Setup(
        method="lora",
        dtype=dtype,
        lora_r=8,
        target_modules=("all-linear",) if targets == "all-linear" else tuple(targets),
        lora_dropout=dropout,
        batch_size=2,
        seq_len=48,
        padded=padded,
        device="cpu",
    )
    predicted = sum(layer_activation_terms(shape, setup).values()) * setup.tokens
    assert predicted == pytest.approx(one_layer, rel=0.01)


def test_checkpointing_keeps_only_each_layers_input():
    import torch

    targets = ["q_proj", "v_proj"]
    one_layer = _saved_bytes(3, torch.float32, targets, 0.0, False, True) - _saved_bytes(
        2, torch.float32, targets, 0.0, False, True
    )
    assert one_layer == 4 * 128 * 2 * 48  # fp32 hidden state x tokens


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_weights_take_the_bytes_bitsandbytes_stores(tmp_path, double_quant):
    """NF4 in blocks of 64: 4.127 bits per weight with double quantization, 4.5 without. Counted on
    a real 4-bit load: packed weights, absmax per block and (double quantization) the second level."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraflow.base_model import load_causal_lm
    from loraflow.spec import QuantizationSpec

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    model = load_causal_lm(tmp_path, quantization=QuantizationSpec(double_quant=double_quant))
    stored = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is None:
            continue
        stored += param.numel() * param.element_size() + state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    estimate = estimate_memory(
        ModelShape.from_folder(tmp_path), Setup(method="qlora", double_quant=double_quant)
    )
    linear = next(i for i in estimate.items if i.label == "4-bit linear weights")
    assert linear.bytes == pytest.approx(stored, rel=1e-3)


def test_full_fine_tuning_peaks_at_the_optimizer_step_with_20_bytes_per_parameter():
    shape = NAMED_SHAPES["7B"]
    estimate = estimate_memory(shape, Setup(method="full", batch_size=1, seq_len=512))
    assert estimate.peak_phase == "optimizer step"
    assert estimate.step == 20 * shape.params
    lora = estimate_memory(shape, Setup(method="lora", batch_size=1, seq_len=512))
    assert lora.peak_phase == "backward start"
    assert lora.total("weights") == 2 * shape.params


def test_more_tokens_and_no_checkpointing_need_more_activation_memory():
    shape = NAMED_SHAPES["7B"]
    base = Setup(method="qlora", batch_size=2, seq_len=1024)
    activations = [
        estimate_memory(shape, s).total("activations")
        for s in (replace(base, gradient_checkpointing=True), base, replace(base, batch_size=4))
    ]
    assert activations[0] < activations[1] < activations[2]


def test_lora_flops_skip_the_frozen_weights_gradients():
    shape = NAMED_SHAPES["7B"]
    setup = Setup(method="lora", seq_len=2, trained_fraction=0.0)  # leave out attention and head
    n = shape.quantizable_params
    lora = flops_per_token(shape, setup)
    full = flops_per_token(shape, replace(setup, method="full"))
    assert full.model == pytest.approx(6 * n, rel=1e-3)
    assert lora.model == pytest.approx(4 * n + 6 * 16 * 32 * 4 * (4096 + 4096), rel=1e-3)
    recomputed = flops_per_token(shape, replace(setup, gradient_checkpointing=True))
    assert recomputed.hardware - recomputed.model == pytest.approx(2 * n, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# the command


def test_the_guide_table_shows_the_planners_figures_beside_the_guides_and_explains_them(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for size, guide_full, guide_lora in (
        ("7B", "~140", "~8"),
        ("13B", "~260", "~16"),
        ("70B", "~1,400", "~48"),
    ):
        row = next(line for line in out.splitlines() if line.startswith(f"| {size} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == guide_full and cells[4] == guide_lora
        full, lora16, lora8, qlora = (
            float(c.replace(",", "")) for c in (cells[3], cells[5], cells[6], cells[7])
        )
        assert qlora < lora8 < lora16 < full
    assert "7B LoRA: ~8 GB implies a base held in 8 bits, not 16" in out
    assert "70B LoRA: ~48 GB implies a base held in 4 bits" in out
    assert "| total GPU | ~48 |" in out  # the QLoRA 65B breakdown
    assert "| Llama 7B + LoRA (r=16) | ~4 (A100) | ~$12 |" in out


@pytest.fixture
def pipeline(project, tiny_model_dir):
    return write_yaml(
        project / "pipelines",
        "triage",
        f"""
        data:
          sources:
            - path: data/*.jsonl
        base_model:
          source: {tiny_model_dir}
        training:
          method: lora
          batch_size: 4
        plan:
          gpu: H100
          price_per_hour: 2.5
        """,
    )


def test_the_plan_section_is_checked_and_sets_gpu_and_price(pipeline, project, tiny_model_dir):
    spec = load_spec(pipeline)
    assert (spec.plan.gpu, spec.plan.price_per_hour, spec.plan.gpu_memory_gib) == ("H100", 2.5, None)
    time = time_for_spec(spec, tiny_model_dir, tokens=1e6)
    assert time.accelerator.name == "H100" and time.cost == pytest.approx(2.5 * time.hours)
    bad = write_yaml(project / "pipelines", "bad", "data: {sources: [{path: x}]}\nplan: {gpu: A1000}\n")
    with pytest.raises(SpecError, match="plan.gpu"):
        load_spec(bad)


def test_the_plan_sections_gpus_are_the_ones_the_planner_times():
    from typing import get_args

    from loraflow.plan import ACCELERATORS
    from loraflow.spec import PlanSpec

    assert set(get_args(PlanSpec.model_fields["gpu"].annotation)) == set(ACCELERATORS)


def test_the_command_prints_a_pipelines_estimate(pipeline, capsys):
    assert main([str(pipeline), "--tokens", "2000000"]) == 0
    out = capsys.readouterr().out
    assert "### Plan for pipeline triage" in out
    assert "| **peak**" in out and "Fits:" in out
    assert "on H100" in out and "2.00M tokens" in out


# ---------------------------------------------------------------------------------------------
# preflight


def _seven_b_folder(tmp_path: Path) -> Path:
    """A model folder with a 7B config and no weights: anything that tried to load it would fail."""
    shape = NAMED_SHAPES["7B"]
    config = {
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": False,
    }
    folder = tmp_path / "llama-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_impossible_config_fails_before_loading_with_the_settings_that_fit(project, tmp_path):
    yaml_path = write_yaml(
        project / "pipelines",
        "big",
        """
        data:
          sources:
            - path: data/*.jsonl
        format:
          max_seq_len: 2048
          packing: true
        training:
          method: lora
          dtype: bfloat16
          batch_size: 8
        """,
    )
    spec, folder = load_spec(yaml_path), _seven_b_folder(tmp_path)
    free = FreeMemory(24 * GIB, "a 24 GiB GPU")
    with pytest.raises(PlanError) as caught:
        check_fits(spec, folder, free=free, device="cuda")
    message = str(caught.value)
    assert "needs about" in message and "a 24 GiB GPU has 24.0 GiB free" in message
    assert "training.gradient_checkpointing: true" in message
    assert "training.batch_size:" in message and "training.method: qlora" in message

    estimate = estimate_for_spec(spec, folder, device="cuda")
    alternatives = fitting_alternatives(estimate, free.bytes)
    assert alternatives and all(a.estimate.peak <= free.bytes < estimate.peak for a in alternatives)
    sizes = [len(a.changes) for a in alternatives]
    assert sizes == sorted(sizes)  # the fewest changes first


def test_a_config_that_fits_passes_and_gives_metadata(pipeline, tiny_model_dir):
    estimate = check_fits(load_spec(pipeline), tiny_model_dir, free=FreeMemory(64 * GIB, "x"), device="cpu")
    metadata = estimate.metadata()
    assert metadata["plan_peak_gib"] == pytest.approx(estimate.peak / GIB, abs=1e-3)
    assert {"plan_weights_gib", "plan_activations_gib", "plan_overhead_gib"} <= metadata.keys()


def test_a_worker_checks_its_training_request_against_free_memory(tokenizer, tiny_model_dir, tmp_path):
    from loraflow.dataset import build_dataset
    from loraflow.plan import check_training_fits
    from loraflow.spec import FormatSpec, TrainingSpec

    data = build_dataset(
        sample_chats(12),
        tokenizer,
        FormatSpec(eval_size=2, max_seq_len=128),
        tokenizer.chat_template,
        "t",
        tmp_path,
    )
    training = TrainingSpec(method="lora", batch_size=4)
    estimate = check_training_fits(
        training, tiny_model_dir, data.path, free=FreeMemory(64 * GIB, "x"), device="cpu"
    )
    assert estimate.setup.seq_len == data.token_percentiles["p100"]  # padded to the longest example
    packed = check_training_fits(
        training, tiny_model_dir, data.path, pack_to=128, free=FreeMemory(64 * GIB, "x"), device="cpu"
    )
    assert packed.setup.seq_len == 128 and packed.setup.packing
    with pytest.raises(PlanError, match="100 MiB machine has 0.1 GiB free"):
        check_training_fits(
            training, tiny_model_dir, data.path, free=FreeMemory(100 * MIB, "a 100 MiB machine")
        )


def test_nothing_fits_says_what_the_leanest_setting_needs():
    estimate = estimate_memory(NAMED_SHAPES["70B"], Setup(method="lora", batch_size=2))
    with pytest.raises(PlanError, match="No setting the planner tries fits: even QLoRA"):
        preflight(estimate, 8 * GIB, "an 8 GiB GPU")


def test_available_memory_comes_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    4000000 kB\n")
    assert available_system_memory(meminfo) == 4_000_000 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    with pytest.raises(PlanError, match="no MemAvailable"):
        available_system_memory(meminfo)


# ---------------------------------------------------------------------------------------------
# estimates against measured peaks


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
@pytest.mark.alone  # a neighbour test running beside it changes how glibc grows the heap
def test_estimates_are_within_15_percent_of_peaks_measured_on_this_cpu(
    tokenizer, tiny_model_dir, builtin_model, project, tmp_path, monkeypatch
):
    """Each case trains 2 steps in a fresh process and reads its peak resident set size (VmHWM):
    the Python and torch runtime is in it, and the planner counts it as overhead.

    The processes run with MALLOC_MMAP_THRESHOLD_ fixed, so that glibc maps and unmaps every
    activation tensor and resident memory follows the live bytes. With glibc's default, the
    heap keeps growing from step to step past the live peak (by a half or more of the activations
    over 3 steps on SmolLM2): the planner's fragmentation term covers that, but a peak that depends
    on the step count is no yardstick for a test. Gradient checkpointing is left to
    bench/plan_cpu.py (a minute more here); its kept tensors are checked above."""
    from loraflow.dataset import build_dataset
    from loraflow.spec import FormatSpec

    data = build_dataset(
        sample_chats(40),
        tokenizer,
        FormatSpec(eval_size=2, max_seq_len=128),
        tokenizer.chat_template,
        "t",
        tmp_path,
    )
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the estimate sees what the processes see
    cases = [
        (tiny_model_dir, "lora", 8, False),
        (builtin_model.path, "lora", 4, False),
        (builtin_model.path, "qlora", 4, False),
    ]

    def measure(case) -> tuple[float, float]:
        model, method, batch, checkpointing = case
        name = f"{Path(model).name}_{method}_{int(checkpointing)}".replace("-", "_")
        yaml_path = write_yaml(
            project / "pipelines",
            name,
            f"""
            data:
              sources:
                - path: data/*.jsonl
            training:
              method: {method}
              batch_size: {batch}
              max_steps: 2
              checkpoint_every: null
              gradient_checkpointing: {str(checkpointing).lower()}
            """,
        )
        estimate = estimate_for_spec(load_spec(yaml_path), model, data.path, device="cpu")
        measured = max(measure_peaks(yaml_path, model, data.path, tmp_path / name, env=env, timeout=300))
        return estimate.peak / MIB, measured / MIB

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(measure, cases))
    report = [
        f"{Path(m).name} {method} batch {batch} checkpointing {ckpt}: estimated {e:.0f} MiB, measured {r:.0f} MiB"
        for (m, method, batch, ckpt), (e, r) in zip(cases, results, strict=True)
    ]
    for estimated, measured in results:
        assert estimated == pytest.approx(measured, rel=0.15), "\n".join(report)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
@pytest.mark.alone  # a neighbour test running beside it changes how glibc grows the heap
def test_under_glibcs_default_heap_the_demos_own_training_is_within_15_percent_of_the_estimate(
    tokenizer, builtin_model, project, tmp_path, monkeypatch
):
    """The demo's training section (SmolLM2 QLoRA, batches of 8 padded to their own longest
    example) on 400 demo examples, 4 steps in a fresh process under glibc's default allocator, the
    one a user's process has. Batches of varying length are what made the heap grow past the plan
    with the hand-written loop (README, "Estimated against measured")."""
    import duckdb

    from loraflow.dataset import build_dataset, select_examples
    from loraflow.demo_data import write_demo_data
    from loraflow.ingest import ingest_file
    from loraflow.templates import resolve_template
    from loraflow.validate import validate_partition

    demo = load_spec(Path(__file__).resolve().parents[1] / "pipelines" / "defs" / "demo" / "defs.yaml")
    con = duckdb.connect()
    for path in write_demo_data(project / "data", n=400):
        ingest_file(con, "demo", path.name, path, demo.data.sources[0])
        validate_partition(con, "demo", path.name, demo.data.sources[0], demo.quality)
    rows, _ = select_examples(con, "demo")
    template, _ = resolve_template(demo.format.chat_template, tokenizer)
    data = build_dataset(rows, tokenizer, demo.format, template, "t", tmp_path / "datasets")
    # the demo's own training section, 4 steps
    training = demo.training.model_dump(mode="json", exclude_none=True) | {
        "max_steps": 4,
        "checkpoint_every": None,
    }
    yaml_path = project / "pipelines" / "demo_training.yaml"
    yaml_path.write_text(json.dumps({"data": {"sources": [{"path": "data/*.jsonl"}]}, "training": training}))

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)  # the estimate sees the default heap too
    estimate = estimate_for_spec(load_spec(yaml_path), builtin_model.path, data.path, device="cpu").peak
    peaks = measure_peaks(
        yaml_path, builtin_model.path, data.path, tmp_path / "a", {"MALLOC_MMAP_THRESHOLD_": None}
    )
    report = (
        f"estimated {estimate / MIB:.0f} MiB, measured {[round(p / MIB) for p in peaks]} MiB after each step"
    )
    assert estimate == pytest.approx(max(peaks), rel=0.15), report
