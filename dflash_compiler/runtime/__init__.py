"""The runtime: the speculative decoding loop, sampling, and the embeddable Engine."""

import importlib

_EXPORTS = {
    "Engine": ".engine",
    "GenerationResult": ".engine",
    "SamplingParams": ".sampling",
    "GenerationStats": ".speculative",
    "SpeculativeDecoder": ".speculative",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that the models and the compiler can import runtime.sampling without loading the Engine.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
