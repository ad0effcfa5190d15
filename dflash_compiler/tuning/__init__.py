"""Autotuning: search spaces per kernel family (spaces.py), checked measurement (measure.py), resumable Optuna
studies (study.py, runtime.py), the `dflash-tune` CLI, and what the compiler reads back:

    from dflash_compiler.tuning import choose
    lowering, config, tuned = choose("linear", shape_key, "fp8_channel", "sm90")

The names below are imported on first use: importing the kernel modules fixes whether Triton runs them through
its interpreter, which a CPU process decides before that (the CLI sets TRITON_INTERPRET first).
"""

_EXPORTS = {"choose": "choice", "Chooser": "choice", "Choice": "choice", "untuned_fallbacks": "choice"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
