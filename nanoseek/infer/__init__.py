"""Inference: latent-cache engine, sampling, MTP speculative decoding, scheduler, OpenAI server."""

from nanoseek.infer.engine import Completion, Engine, GenerationStats, cache_bytes_per_token
from nanoseek.infer.sampling import SamplingParams

__all__ = ["Completion", "Engine", "GenerationStats", "SamplingParams", "cache_bytes_per_token"]
