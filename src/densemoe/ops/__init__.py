"""Public ops: validation, default configs, torch custom ops (``densemoe.ops.fc2`` is the module)."""
