"""Prefill / decode throughput and memory of a causal LM: what the deployment demo and the runtime benchmark
measure.

Prefill = one forward over a batch of prompts (the paper's 4 x 512 tokens), filling the KV cache; decode = greedy
next tokens one at a time from that cache. Times are medians over repeats (the first run warms up), with CUDA
synchronised around each; tokens per second count every sequence of the batch.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class SpeedResult:
    batch: int
    prompt_tokens: int
    decode_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    prompt_perplexity: float            # of the prompts under the model (a sanity check that PESF etc. keep quality)
    peak_gpu_bytes: int | None          # torch.cuda.max_memory_allocated, None on CPU

    def to_dict(self) -> dict:
        return asdict(self)


def model_tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (what its weights take in memory; shared tensors once)."""
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _prefill_and_decode(model: nn.Module, input_ids: torch.Tensor, decode_tokens: int) -> tuple[float, float, float]:
    device = input_ids.device
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - start
    logits = out.logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    cache, next_ids = out.past_key_values, logits[:, -1].argmax(-1, keepdim=True)
    del out, logits
    _sync(device)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        step = model(next_ids, past_key_values=cache, use_cache=True)
        cache, next_ids = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return prefill, time.perf_counter() - start, float(nll.exp())


def measure_speed(model: nn.Module, input_ids: torch.Tensor, decode_tokens: int = 32, repeats: int = 3) -> SpeedResult:
    """Median prefill and decode time of ``model`` on ``input_ids`` [batch, prompt] (already on its device)."""
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _prefill_and_decode(model, input_ids[:, : min(16, input_ids.shape[1])], min(2, decode_tokens))  # warm-up
    runs = [_prefill_and_decode(model, input_ids, decode_tokens) for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    batch, prompt = input_ids.shape
    return SpeedResult(
        batch=batch, prompt_tokens=prompt, decode_tokens=decode_tokens, prefill_seconds=prefill, decode_seconds=decode,
        prefill_tokens_per_second=batch * prompt / prefill,
        decode_tokens_per_second=batch * decode_tokens / decode if decode_tokens else float("nan"),
        prompt_perplexity=runs[0][2],
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )
