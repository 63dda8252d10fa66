"""Kept for models registered before `tasks/` was split into subpackages (2026-12): their logged
models-from-code file runs `from tasks.pyfunc_model import DPAPyfuncModel`, and a process that has
already imported this checkout's `tasks` resolves that name here. Removing it orphans those
versions (tests/pipeline/test_registered_before_layout.py).
"""

from tasks.registry.pyfunc_model import DPAPyfuncModel

__all__ = ["DPAPyfuncModel"]
