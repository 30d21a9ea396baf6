"""The project's fine-tunes: one folder per fine-tune, each with its `defs.yaml` (a `FineTune` component)."""
