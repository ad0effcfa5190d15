"""dflash-compiler: a compiler-driven, kernel-autotuned runtime for DFlash speculative decoding."""

__version__ = "0.1.0"
