"""The serving engine: `LLM`, `SamplingParams`, `RequestOutput` (and the parts they use:
sequence, scheduler, sampler, model runner, workers)."""

from runtime.engine.llm import LLM
from runtime.engine.outputs import RequestOutput
from runtime.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
