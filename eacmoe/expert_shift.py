"""Measure expert shift: how a quantized model's expert choices and predictions drift from the FP model's.

Four streams of held-out text run layer by layer in lockstep:

  fp/fp   FP weights, own routing            (the FP model)
  q/q     quantized weights, own routing     (the quantized model)
  fp/q    FP weights, routing of q/q forced  (what the quantized routing alone costs)
  q/fp    quantized weights, routing of fp/fp forced  (the oracle: the most that fixing routing can recover)

"Routing forced" replaces both the selected experts and their combine weights of every MoE layer. Per MoE
layer and token we compare the FP stream's top-k experts with the quantized stream's: rate "all" (every
one of the top-k changed), "any" (at least one changed) and "half" (half or more changed), as EAC-MoE
defines them. At the end we report perplexity of all four streams and the KL divergence of each stream's
next-token distribution from the FP model's (more sensitive than perplexity).

Only one FP and one quantized layer are in memory at a time when both come from lazy `LayerSource`s (e.g. the
checkpoint and the quantizer's progress files); by default they are the two models' own layers.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import MoEAdapter, Routing, get_adapter
from .pipeline import LayerSource, ModelLayers, _first, _kwargs_for, capture_layer_inputs

STREAMS = ("fp/fp", "q/q", "fp/q", "q/fp")


@dataclass
class ShiftReport:
    perplexity: dict[str, float]          # per stream
    kl_from_fp: dict[str, float]          # mean per-token KL(FP || stream), nats
    shift: list[dict]                     # per MoE layer: {"layer", "all", "any", "half"}
    tokens: int

    def mean_shift(self) -> dict[str, float]:
        keys = ("all", "any", "half")
        return {k: sum(s[k] for s in self.shift) / max(1, len(self.shift)) for k in keys}

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "kl_from_fp": self.kl_from_fp, "shift_per_layer": self.shift,
                "shift_mean": self.mean_shift(), "tokens": self.tokens}


@contextlib.contextmanager
def routed_block(adapter: MoEAdapter, block: nn.Module, forced: Routing | None, record: list[Routing]) -> Iterator[None]:
    """Within the context the MoE block routes with `forced` (if given) instead of its own router, and
    appends the routing it used to `record`."""
    def forward(hidden, *args, **kwargs):
        routing = forced if forced is not None else adapter.route(block, hidden)
        record.append(routing)
        return adapter.moe_forward(block, hidden, routing)

    block.forward = forward  # instance attribute shadows the class method for this block only
    try:
        yield
    finally:
        del block.forward


def change_counts(fp_indices: torch.Tensor, q_indices: torch.Tensor) -> torch.Tensor:
    """Per token, how many of the FP top-k experts are missing from the quantized top-k."""
    kept = (fp_indices.unsqueeze(-1) == q_indices.unsqueeze(-2)).any(-1).sum(-1)
    return fp_indices.shape[-1] - kept


@dataclass
class FPReference:
    """The FP model's own stream (fp/fp) on a set of held-out inputs: each MoE layer's routing per batch and the
    hidden states after the last layer. It is the same for every quantized model, so a study comparing many
    computes it once (`measure_fp_reference`) and passes it to every `measure_expert_shift`."""
    input_ids: torch.Tensor
    batch_size: int
    routing: list[list[Routing] | None]   # per decoder layer, one Routing per batch (None: dense layer)
    final_hidden: torch.Tensor            # [n, seqlen, hidden], before the final norm


@torch.no_grad()
def measure_fp_reference(fp_model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8,
                         device: torch.device | str = "cpu", fp_layers: LayerSource | None = None) -> FPReference:
    device = torch.device(device)
    adapter = get_adapter(fp_model)
    source = fp_layers if fp_layers is not None else ModelLayers(adapter.decoder_layers(fp_model))
    hidden, layer_kwargs = capture_layer_inputs(fp_model, adapter, input_ids, batch_size, device)
    routing = []
    for index in range(len(source)):
        layer = source.load(index).to(device)
        block = adapter.moe_block(layer)
        parts, recorded = [], []
        for start in range(0, hidden.shape[0], batch_size):
            x = hidden[start:start + batch_size].to(device)
            with routed_block(adapter, block, None, recorded) if block is not None else contextlib.nullcontext():
                parts.append(_first(layer(x, **_kwargs_for(layer_kwargs, x.shape[0], device))).cpu())
        hidden = torch.cat(parts)
        routing.append(recorded if block is not None else None)
        source.release(index, layer.to("cpu"))
    return FPReference(input_ids, batch_size, routing, hidden)


@torch.no_grad()
def measure_expert_shift(fp_model: nn.Module, q_model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8,
                         device: torch.device | str = "cpu", fp_layers: LayerSource | None = None,
                         q_layers: LayerSource | None = None, reference: FPReference | None = None) -> ShiftReport:
    """Run the four streams (module docstring) over `input_ids` [n, seqlen] and compare them with fp/fp.

    `fp_layers` / `q_layers` replace the models' own decoder layers (the models then only provide embedding, final
    norm and head, and may be the same skeleton). `reference`: fp/fp computed before on the same inputs."""
    device = torch.device(device)
    adapter = get_adapter(fp_model)
    if reference is None:
        reference = measure_fp_reference(fp_model, input_ids, batch_size, device, fp_layers)
    elif reference.batch_size != batch_size or not torch.equal(reference.input_ids, input_ids):
        raise ValueError("the FP reference was measured on other inputs or another batch size")
    fp_source = fp_layers if fp_layers is not None else ModelLayers(adapter.decoder_layers(fp_model))
    q_source = q_layers if q_layers is not None else ModelLayers(adapter.decoder_layers(q_model))
    inputs, layer_kwargs = capture_layer_inputs(fp_model, adapter, input_ids, batch_size, device)
    others = STREAMS[1:]
    streams = {name: inputs.clone() for name in others}
    shift = []
    for index in range(len(fp_source)):
        fp_layer, q_layer = fp_source.load(index).to(device), q_source.load(index).to(device)
        fp_block, q_block = adapter.moe_block(fp_layer), adapter.moe_block(q_layer)
        changed = []
        new = {name: [] for name in others}
        for batch_number, start in enumerate(range(0, inputs.shape[0], batch_size)):
            def run(layer, stream):
                x = streams[stream][start:start + batch_size].to(device)
                new[stream].append(_first(layer(x, **_kwargs_for(layer_kwargs, x.shape[0], device))).cpu())
            if fp_block is None:
                for stream in others:
                    run(fp_layer if stream.startswith("fp") else q_layer, stream)
                continue
            fp_routing, q_routing = reference.routing[index][batch_number], []
            with routed_block(adapter, q_block, None, q_routing):
                run(q_layer, "q/q")
            with routed_block(adapter, fp_block, q_routing[0], []):
                run(fp_layer, "fp/q")
            with routed_block(adapter, q_block, fp_routing, []):
                run(q_layer, "q/fp")
            changed.append(change_counts(fp_routing.indices, q_routing[0].indices))
        streams = {name: torch.cat(parts) for name, parts in new.items()}
        fp_source.release(index, fp_layer.to("cpu")); q_source.release(index, q_layer.to("cpu"))
        if changed:
            c = torch.cat(changed).float()
            k = fp_routing.indices.shape[-1]
            shift.append({"layer": index, "all": (c == k).float().mean().item(), "any": (c >= 1).float().mean().item(),
                          "half": (2 * c >= k).float().mean().item()})
    streams["fp/fp"] = reference.final_hidden

    nll = {name: 0.0 for name in STREAMS}
    kl = {name: 0.0 for name in STREAMS if name != "fp/fp"}
    count = 0
    for model in (fp_model, q_model):  # the head of each model, for its two streams
        adapter.final_norm(model).to(device)
        model.get_output_embeddings().to(device)
    for start in range(0, input_ids.shape[0], batch_size):
        targets = input_ids[start:start + batch_size, 1:].to(device).flatten()
        logprobs = {}
        for name in STREAMS:
            model = fp_model if name.startswith("fp") else q_model
            h = adapter.final_norm(model)(streams[name][start:start + batch_size].to(device))
            logits = model.get_output_embeddings()(h)[:, :-1].float().flatten(0, 1)
            logprobs[name] = logits.log_softmax(-1)
            nll[name] += F.nll_loss(logprobs[name], targets, reduction="sum").item()
        p_fp = logprobs["fp/fp"].exp()
        for name in kl:
            kl[name] += (p_fp * (logprobs["fp/fp"] - logprobs[name])).sum().item()
        count += targets.numel()
    return ShiftReport(perplexity={k: math.exp(v / count) for k, v in nll.items()},
                       kl_from_fp={k: v / count for k, v in kl.items()}, shift=shift, tokens=count)
