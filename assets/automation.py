"""When each stage materializes on its own: Dagster's declarative automation, one condition per stage.

    source files --sensor (pipelines/sensors.py)--> raw_examples + validated_examples, one run per file
    validated_examples -> training_dataset      eager, once no file is still being ingested
    base_model                                   when missing or its `base_model` section changed
    schedule.cron tick -> adapter                only if something it depends on changed
    adapter -> evaluation -> published_model [-> hub_model]   right after, unless a blocking check failed

A retrain happens at a tick of `schedule.cron` and only when, since the adapter was last trained, a
dependency's data version changed (new validated data gives training_dataset a new content version;
a new base model gives base_model one) or the adapter's own code version changed (its `training`
section, packing or sequence length), or there is no adapter yet. A tick with nothing changed is
used up: data arriving after it waits for the next tick, so a week of file drops trains once.
Nothing trains while a dependency is still being materialized, or while a blocking check of a
dependency failed (a failing check on a file keeps training_dataset from being rebuilt, so the
failure also holds the adapter back).
"""

from __future__ import annotations

from dagster import AssetKey, AssetSelection, AutomationCondition

from assets.keys import asset_key
from loraflow.spec import PipelineSpec

AC = AutomationCondition


def handled() -> AutomationCondition:
    """This asset was requested or materialized (by automation, a launch from the UI, or `dg launch`)."""
    return AC.newly_requested() | AC.newly_updated()


def ready() -> AutomationCondition:
    """Nothing it depends on is missing, running or failing a blocking check, and it is not running."""
    return (
        ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
        & AC.all_deps_blocking_checks_passed()
    )


def ingested_data() -> AutomationCondition:
    """training_dataset: after new validated data, once no file is still being ingested (a burst of files
    formats once), and never from a file whose blocking checks failed."""
    return (AC.eager() & AC.all_deps_blocking_checks_passed()).with_label("eager, checks passed")


def base_model_condition() -> AutomationCondition:
    """base_model: prepared when missing and again when its `base_model` section (its code version) changes."""
    return ((AC.newly_missing() | AC.code_version_changed()).since(handled()) & ~AC.in_progress()).with_label(
        "missing or base_model section changed"
    )


def retrain_condition(spec: PipelineSpec) -> AutomationCondition | None:
    """adapter: at a tick of `schedule.cron`, only when an input changed since its last training (see the
    module docstring). None without a cron: trainings are started by hand."""
    cron = spec.schedule.cron
    if cron is None:
        return None
    changed = (
        (AC.any_deps_match(AC.data_version_changed()) | AC.code_version_changed()).since(handled())
        | AC.missing()
    ).with_label("an input changed since the last training, or no adapter yet")
    # a tick with nothing changed is reset at once; one with a change waits until it is handled
    due = AC.cron_tick_passed(cron, spec.schedule.timezone).since(handled() | ~changed)
    return (due.with_label(f"tick of {cron} ({spec.schedule.timezone})") & changed & ready()).with_label(
        f"retrain on {cron} ({spec.schedule.timezone}) when an input changed"
    )


def after(upstream: AssetKey) -> AutomationCondition:
    """evaluation, published_model, hub_model: right after `upstream` is (or is about to be) materialized,
    in the same run when both are requested together, and not when a blocking check upstream failed
    (the gate on evaluation holds publishing back)."""
    updated = AC.any_deps_match(AC.newly_updated() | AC.will_be_requested()).allow(
        AssetSelection.assets(upstream)
    )
    return ((updated | AC.newly_missing()).since(handled()) & ready()).with_label(
        f"after {'/'.join(upstream.path)}"
    )


def conditions(spec: PipelineSpec) -> dict[str, AutomationCondition | None]:
    """Stage -> its automation condition (None: materialized by the sensor or by hand)."""
    return {
        "base_model": base_model_condition(),
        "raw_examples": None,
        # a file's raw rows re-ingested on their own (from the UI) are re-validated
        "validated_examples": AC.eager(),
        "training_dataset": ingested_data(),
        "adapter": retrain_condition(spec),
        "evaluation": after(asset_key(spec, "adapter")),
        "published_model": after(asset_key(spec, "evaluation")),
        "hub_model": after(asset_key(spec, "published_model")),
    }
