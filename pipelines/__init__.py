"""The declarations: one YAML per fine-tune, turned into Dagster definitions."""
