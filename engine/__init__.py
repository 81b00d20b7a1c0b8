"""gpt2-engine's runtime: load a model directory made by `gpt2-engine export` and generate.

    from engine import Generator, SamplingParams
    gen = Generator.from_pretrained("artifacts/gpt2")

This package imports nothing from `export`, `benchmarks`, `cli` or `server` (tests/test_layering.py).
"""

from engine.core import Delta, EngineStats, TokenLogprob
from engine.errors import (
                           ArtifactError,
                           BackendUnavailable,
                           CheckpointError,
                           EngineClosed,
                           EngineError,
                           EngineOverloaded,
                           InputError,
                           RandomWeightsWarning,
)
from engine.generator import GenerationOutput, Generator, Timings
from engine.sampling import SamplingParams

__all__ = ["Generator", "SamplingParams", "GenerationOutput", "Timings", "Delta", "TokenLogprob", "EngineStats",
           "EngineError", "ArtifactError", "CheckpointError", "InputError", "BackendUnavailable", "EngineOverloaded",
           "EngineClosed", "RandomWeightsWarning"]
