"""duoserve: serve Mixture-of-Experts LLMs on one GPU smaller than the model."""

from duoserve.layers.sampler import SamplingParams
from duoserve.llm import LLM

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
