"""`published_model`: the adapter merged into a full-precision base, with a model card and lineage,
and the GGUF exports (llama.cpp, Ollama) the pipeline asks for, each checked against the merge."""

import json
import subprocess
from dataclasses import asdict
from functools import partial
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
    asset,
)

from assets.automation import conditions
from assets.keys import asset_key
from assets.training import GPU_POOL
from loraflow.adapters import adapter_method
from loraflow.base_model import BUILTIN_HUB_IDS, BUILTIN_LICENSES, load_tokenizer
from loraflow.dataset import load_split
from loraflow.export import ExportError, check_mergeable, export_gguf, require_fidelity
from loraflow.formatting import render
from loraflow.manifests import (
    AdapterManifest,
    BaseModelManifest,
    DatasetManifest,
    EvaluationManifest,
    HubManifest,
    PublishedManifest,
)
from loraflow.merge import (
    MergeError,
    merge_in_memory,
    merge_verdict,
    publish_dtype,
    publish_version,
    write_published,
)
from loraflow.model_card import human_size, render_model_card, training_history
from loraflow.spec import PipelineSpec
from loraflow.train import TRAINING_RECORD
from loraflow.validate import source_lineage
from resources import ArtifactStore, HubPublisher, Warehouse


def code_version_of(root: Path) -> str:
    """The git commit of the project, marked dirty when it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def heldout_conversations(dataset_dir: Path, n: int = 3) -> list[list[dict]]:
    """The first few held-out conversations (system prompt included), as training rendered them."""
    return [r["messages"] for r in load_split(dataset_dir, "eval") if r["messages"] is not None][:n]


def build_published_model(spec: PipelineSpec):
    key = asset_key(spec, "published_model")
    exporting_gguf = "gguf" in spec.publish.exports

    @asset(
        key=key,
        group_name=spec.name,
        # scores (or merges) a full-precision model on the training device: one at a time with training
        pool=GPU_POOL,
        kinds={"safetensors", "gguf"} if exporting_gguf else {"safetensors"},
        ins={
            "adapter": AssetIn(asset_key(spec, "adapter")),
            "evaluation": AssetIn(asset_key(spec, "evaluation")),
            "training_dataset": AssetIn(asset_key(spec, "training_dataset")),
            "base_model": AssetIn(asset_key(spec, "base_model")),
        },
        code_version=spec.section_version("publish"),
        automation_condition=conditions(spec)["published_model"],
        description=f"The adapter merged into the base in {spec.publish.dtype} (auto: the base checkpoint's dtype), saved as safetensors with the "
        f"tokenizer, chat template, the adapter on its own and a model card, under `models/{spec.name}/<version>` "
        "(a prefix-tuning adapter, which cannot be merged, is published alone with a record naming its base)"
        + (
            f", with GGUF files ({', '.join(spec.publish.gguf_types)}) and an Ollama Modelfile."
            if exporting_gguf
            else "."
        ),
        check_specs=[
            AssetCheckSpec(
                "merge_fidelity",
                asset=key,
                blocking=True,
                description="The merged weights give base-plus-adapter logits (computed in float32) on held-out "
                "prompts: within 1e-3 in float32, within half the adapter's own effect in 16 bits, or within "
                "publish.merge_tolerance; they differ from the base's, and reload from disk unchanged.",
            ),
            *(
                [
                    AssetCheckSpec(
                        "export_fidelity",
                        asset=key,
                        blocking=True,
                        description=f"Each GGUF ({', '.join(spec.publish.gguf_types)}) read back gives the merged "
                        "model's logits on held-out prompts within its type's tolerance, its greedy answers, and "
                        "its chat template renders and tokenizes held-out conversations as the tokenizer does. "
                        "A file that fails publishes nothing: latest stays where it was.",
                    )
                ]
                if exporting_gguf
                else []
            ),
        ],
    )
    def published_model(
        context: AssetExecutionContext,
        adapter: AdapterManifest,
        evaluation: EvaluationManifest,
        training_dataset: DatasetManifest,
        base_model: BaseModelManifest,
        store: ArtifactStore,
        warehouse: Warehouse,
    ):
        method = adapter_method(Path(adapter.path))
        try:
            if exporting_gguf:  # before any model loads: a GGUF holds merged weights
                check_mergeable(method)
        except ExportError as err:
            yield AssetCheckResult(
                check_name="export_fidelity", passed=False, description=f"publish.exports: {err}"
            )
            raise Failure(
                description=f"pipeline {spec.name!r}: publish.exports: {err}; nothing was published"
            ) from None
        with warehouse.connect() as con:
            sources = source_lineage(con, spec.name)
        license_name = spec.publish.license or BUILTIN_LICENSES.get(base_model.source, "other")
        card = partial(
            render_model_card,
            pipeline=spec.name,
            description=spec.description,
            base_model=BUILTIN_HUB_IDS.get(base_model.source, base_model.source),
            base_model_hash=base_model.content_hash,
            license=license_name,
            sources=sources,
            dataset_version=training_dataset.version,
            chat_template=training_dataset.chat_template_source,
            training_config=spec.training.model_dump(mode="json"),
            adapter_version=adapter.version,
            adapter_sha256=adapter.weights_sha256,
            code_version=code_version_of(spec.root),
            eval_table=evaluation.table,
            project_root=spec.root,
            adapter_method=method,
            base_model_revision=spec.base_model.revision,
            history=training_history(
                {
                    **json.loads((Path(adapter.path) / TRAINING_RECORD).read_text(encoding="utf-8")),
                    "adapter_version": adapter.version,
                }
            ),
        )
        dtype = publish_dtype(spec.publish.dtype, Path(base_model.path))
        version = publish_version(
            Path(adapter.path),
            base_model.content_hash,
            dtype,
            spec.publish.gguf_types if exporting_gguf else None,
        )
        tokenizer = load_tokenizer(Path(adapter.path), base_model.trust_remote_code)
        conversations = heldout_conversations(Path(training_dataset.path))
        probes = [render(tokenizer, messages) for messages in conversations]
        merged = merge_in_memory(
            Path(base_model.path),
            Path(adapter.path),
            dtype,
            base_model.trust_remote_code,
            probes=probes or None,
        )
        verdict = merge_verdict(merged.fidelity, spec.publish.merge_tolerance)
        figures = {**asdict(merged.fidelity), "tolerance": verdict.tolerance}
        if not verdict.passed:
            # the check reports the verdict with its numbers; publishing stops before anything is written
            yield AssetCheckResult(
                check_name="merge_fidelity", passed=False, metadata=figures, description=verdict.describe()
            )
            raise Failure(description=f"pipeline {spec.name!r}: {verdict.describe()}; nothing was published")

        def exports(folder: Path):
            """GGUF files and Modelfiles into the unfinished folder; a failed comparison stops the publish."""
            if not exporting_gguf:
                return None
            report = export_gguf(
                folder,
                spec.name,
                spec.publish.gguf_types,
                merged,
                conversations,
                spec.evaluation.max_new_tokens,
                spec.format.system_prompt,
            )
            return require_fidelity(report)

        try:
            result = write_published(
                merged,
                Path(adapter.path),
                store.folder("models", spec.name),
                version,
                lambda report: card(exports=report),
                base_model.trust_remote_code,
                record={
                    "pipeline": spec.name,
                    "adapter_version": adapter.version,
                    "base_model": base_model.source,
                    "base_model_hub_id": BUILTIN_HUB_IDS.get(base_model.source),
                    "base_model_revision": spec.base_model.revision,
                    "base_model_hash": base_model.content_hash,
                    "dataset_version": training_dataset.version,
                    "metrics": evaluation.tuned,
                },
                verdict=verdict,
                exports=exports,
            )
        except MergeError as err:
            yield AssetCheckResult(
                check_name="merge_fidelity", passed=False, metadata=figures, description=str(err)
            )
            if exporting_gguf:
                yield AssetCheckResult(
                    check_name="export_fidelity", passed=False, description="not exported: the merge failed"
                )
            raise Failure(description=f"pipeline {spec.name!r}: {err}") from None
        except ExportError as err:
            # the merge itself reloaded fine; the export is what stops this version
            yield AssetCheckResult(check_name="merge_fidelity", passed=True, metadata=figures)
            report = getattr(err, "report", None)
            yield AssetCheckResult(
                check_name="export_fidelity",
                passed=False,
                metadata=report.metadata() if report else {},
                description=str(err),
            )
            raise Failure(
                description=f"pipeline {spec.name!r}: {err}; nothing was published, latest is unchanged"
            ) from None
        context.log.info("published %s at %s", version, result.path)
        yield Output(
            PublishedManifest(version=version, path=result.path, adapter_version=adapter.version),
            data_version=DataVersion(version),
            metadata={
                "path": MetadataValue.path(result.path),
                "version": version,
                "dtype": dtype,
                "adapter_method": method,
                "merged": merged.merged,
                "merge_max_abs_diff": result.merge_max_abs_diff,
                "reload_max_abs_diff": result.reload_max_abs_diff,
                "model_card": MetadataValue.md((Path(result.path) / "README.md").read_text(encoding="utf-8")),
            },
        )
        yield AssetCheckResult(
            check_name="merge_fidelity",
            passed=True,
            metadata={
                **figures,
                "reload_max_abs_diff": result.reload_max_abs_diff,
                "probe_prompts": merged.fidelity.probes,
            },
        )
        if exporting_gguf:
            report = result.exports
            yield AssetCheckResult(
                check_name="export_fidelity",
                passed=True,
                metadata={
                    **report.metadata(),
                    "files": MetadataValue.md(
                        "\n".join(
                            f"- {f.name}: {human_size(f.bytes)}, sha256 {f.sha256}" for f in report.files
                        )
                    ),
                },
            )

    return published_model


def build_hub_model(spec: PipelineSpec):
    """`hub_model`: the published folder uploaded to `publish.hub_repo`; built only when that is set.

    An asset of its own, so that only runs that upload need HF_TOKEN, and a failed upload is retried
    by materializing it alone, without merging again.
    """

    @asset(
        key=asset_key(spec, "hub_model"),
        group_name=spec.name,
        kinds={"huggingface"},
        ins={"published_model": AssetIn(asset_key(spec, "published_model"))},
        code_version=spec.section_version("publish"),
        automation_condition=conditions(spec)["hub_model"],
        description=f"The published model uploaded to {spec.publish.hub_repo} on the Hugging Face Hub "
        f"({'private' if spec.publish.hub_private else 'public'} when created), one commit per version.",
    )
    def hub_model(
        context: AssetExecutionContext, published_model: PublishedManifest, hub: HubPublisher
    ) -> Output[HubManifest]:
        version = published_model.version
        commit = hub.upload(
            Path(published_model.path),
            spec.publish.hub_repo,
            private=spec.publish.hub_private,
            commit_message=f"loraflow: {spec.name} {version}",
        )
        context.log.info("uploaded %s to %s: %s", version, commit.repo_url, commit.commit_url)
        return Output(
            HubManifest(
                version=version,
                repo_id=spec.publish.hub_repo,
                repo_url=commit.repo_url,
                commit=commit.commit_oid,
            ),
            data_version=DataVersion(version),
            metadata={
                "repo_url": MetadataValue.url(commit.repo_url),
                "commit_url": MetadataValue.url(commit.commit_url),
                "commit": commit.commit_oid,
                "version": version,
                "private": spec.publish.hub_private,
            },
        )

    return hub_model
