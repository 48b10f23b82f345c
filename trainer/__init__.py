"""The trusted trainer: data preparation, packed loader, BPB evaluation and the run harness.

train.py uses only the names below (see trainer/api.py) and trainer.ops (the trusted kernels its
model may call). They load lazily, so importing `trainer.config` on the host pulls in neither torch
nor numpy.
"""

_API = ("program", "train_loader", "step", "progress", "submit")

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from trainer import api

        return getattr(api, name)
    if name == "ops":
        import importlib

        return importlib.import_module("trainer.ops")
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
