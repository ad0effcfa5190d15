"""The runtime: the speculative decoding loop, sampling, and the embeddable Engine."""

from .engine import Engine, GenerationResult
from .sampling import SamplingParams
from .speculative import GenerationStats, SpeculativeDecoder

__all__ = ["Engine", "GenerationResult", "GenerationStats", "SamplingParams", "SpeculativeDecoder"]
