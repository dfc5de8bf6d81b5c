"""Transient memory of Hessian accumulation stays bounded by a chunk, whatever an expert's token count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from eacmoe.pipeline import LayerwiseQuantizer, QuantizeConfig, _expert_token_chunks
from eacmoe.quant import GPTQ
from tiny_models import VOCAB, build


def test_chunked_hessian_equals_one_shot_closed_form() -> None:
    """2/n X^T X accumulated over chunks of 7 rows (and over several add_batch calls) equals the fp64 closed form
    within fp32 round-off (rtol 1e-5 of the largest entry)."""
    x = torch.randn(1003, 40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    solver = GPTQ(40)
    solver.max_chunk_bytes = 7 * 4 * 40
    assert solver.chunk_rows() == 7
    solver.add_batch(x[:500])
    solver.add_batch(x[500:])
    x64 = x.double()
    expected = 2.0 / x.shape[0] * x64.T @ x64
    assert solver.nsamples == 1003
    torch.testing.assert_close(solver.H.double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_expert_token_chunks_cover_exactly_the_selected_rows() -> None:
    expert_input = torch.arange(50 * 4, dtype=torch.float32).reshape(50, 4)
    token_index = torch.tensor([3, 7, 8, 20, 21, 22, 49])
    original = GPTQ.max_chunk_bytes
    try:
        GPTQ.max_chunk_bytes = 2 * 4 * 4  # two rows of width 4 per chunk
        chunks = list(_expert_token_chunks(expert_input, token_index, 4))
        pooled = list(_expert_token_chunks(expert_input, None, 4))
    finally:
        GPTQ.max_chunk_bytes = original
    assert [c.shape[0] for c in chunks] == [2, 2, 2, 1]
    torch.testing.assert_close(torch.cat(chunks), expert_input[token_index], rtol=0, atol=0)
    assert len(pooled) == 25
    torch.testing.assert_close(torch.cat(pooled), expert_input, rtol=0, atol=0)


def test_pipeline_with_tiny_chunks_matches_default() -> None:
    """Quantizing with 3-row chunks gives the same experts as with one chunk (Hessians equal up to summation
    order: at most a handful of codes may flip at a rounding tie)."""
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))

    def run():
        model, _ = build("mixtral")
        cfg = QuantizeConfig(expert_bits=[2] * len(model.model.layers), method="gptq", group_size=8,
                             min_expert_tokens=1, batch_size=2)
        q = LayerwiseQuantizer(model, cfg)
        q.run(ids)
        return q

    reference = run()
    original = GPTQ.max_chunk_bytes
    try:
        GPTQ.max_chunk_bytes = 3 * 4 * 64  # tiny models are at most 64 wide: 3 rows or more per chunk
        chunked = run()
    finally:
        GPTQ.max_chunk_bytes = original
    experts = [n for n in reference.quantized if ".experts." in n]
    assert experts
    differing = sum(int((reference.quantized[n].codes != chunked.quantized[n].codes).sum()) for n in experts)
    total = sum(reference.quantized[n].codes.numel() for n in experts)
    assert differing <= 1e-3 * total
    for r_ref, r_chunk in zip(reference.reports, chunked.reports):
        for name, loss in r_ref.gptq_loss.items():
            assert abs(r_chunk.gptq_loss[name] - loss) <= 1e-3 * abs(loss) + 1e-6, name


_PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from eacmoe.quant import GPTQ
    torch.set_num_threads(1)
    rows, columns = int(sys.argv[1]), int(sys.argv[2])
    x = torch.empty(rows, columns, dtype=torch.bfloat16).normal_()  # no fp32 original to inflate the peak
    solver = GPTQ(columns)
    solver.add_batch(x[:16])  # warm up: allocator, BLAS workspace
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    solver.add_batch(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"input_bytes": x.numel() * 2, "peak_increase_bytes": (after - before) * 1024,
                      "chunk_bytes": GPTQ.max_chunk_bytes}))
""")


def test_add_batch_peak_memory_does_not_grow_with_tokens() -> None:
    """A 256 MiB bf16 input: the old path (fp32 cast, then the scaled copy) raised the peak by ~4x the input
    (1 GiB); chunked, the increase stays near two fp32 chunks (128 MiB), far under the input's own size."""
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(65536), str(2048)], capture_output=True,
                            text=True, check=True)
    measured = json.loads(result.stdout)
    assert measured["input_bytes"] == 256 * 1024**2
    assert measured["peak_increase_bytes"] < 3 * measured["chunk_bytes"], measured


_PACKED_PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from eacmoe.runtime import packed_modules
    from eacmoe.runtime.packed_modules import PackedLinear
    torch.set_num_threads(1)
    size = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    def module(n):
        m = PackedLinear(n, n, bits=2, group_size=128)
        m.qweight.copy_(torch.randint(-2**31, 2**31 - 1, m.qweight.shape, generator=g, dtype=torch.int32))
        m.qzeros.copy_(torch.randint(-2**31, 2**31 - 1, m.qzeros.shape, generator=g, dtype=torch.int32))
        m.scales.copy_(torch.full(m.scales.shape, 0.01, dtype=torch.float16).view(torch.int16))
        return m
    small, big = module(256), module(size)
    small(torch.randn(4, 256).bfloat16())  # warm up: allocator, kernels
    x = torch.randn(4, size).bfloat16()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    y = big(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"weight_bytes": size * size * 2, "increase": (after - before) * 1024,
                      "tile_bytes": packed_modules.TILE_BYTES, "finite": bool(torch.isfinite(y).all())}))
""")


def test_packed_linear_dequantizes_in_the_compute_dtype_in_tiles() -> None:
    """A bf16 forward of an 8192 x 8192 2-bit PackedLinear: the old path built the whole weight in fp32 several
    times (codes, zeros, scales, product, transpose: > 1.3 GB); tiled, the peak grows by the bf16 weight
    (128 MiB) plus a few 16 MiB tile-sized temporaries (bound: 5)."""
    # a fixed mmap threshold: freed tiles go back to the kernel at once instead of piling up in malloc's heap
    # (glibc's adaptive threshold otherwise makes the reading vary between runs by a few tiles)
    result = subprocess.run([sys.executable, "-c", _PACKED_PEAK_SCRIPT, "8192"], capture_output=True, text=True,
                            check=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20)))
    m = json.loads(result.stdout)
    assert m["finite"]
    assert m["increase"] < m["weight_bytes"] + 5 * m["tile_bytes"], m


_ROUTER_PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from eacmoe.router_calibration import RouterCalibrationConfig, calibrate_router
    torch.set_num_threads(1)
    tokens, hidden = int(sys.argv[1]), int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    x_fp = torch.empty(tokens, hidden, dtype=torch.bfloat16).normal_(generator=g)
    x_q = torch.empty(tokens, hidden, dtype=torch.bfloat16).normal_(generator=g)
    w = torch.randn(8, hidden, generator=g) * 0.05
    config = RouterCalibrationConfig(topk=4, steps=2, max_tokens=32768)
    calibrate_router(w, x_fp[:20000], x_q[:20000], config)  # warm up: allocator, kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    calibrate_router(w, x_fp, x_q, config)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"input_bytes": 2 * x_fp.numel() * 2, "subset_fp32_bytes": 2 * 32768 * hidden * 4,
                      "increase": (after - before) * 1024}))
""")


def test_router_calibration_subsamples_before_casting() -> None:
    """Two bf16 router inputs of 262144 tokens x 512 (512 MiB together): the old order cast both whole to fp32
    (1 GiB more) before keeping 32768 tokens; now only the kept rows are copied and cast (2 x 64 MiB fp32), and
    the peak grows by well under the inputs' own size."""
    result = subprocess.run([sys.executable, "-c", _ROUTER_PEAK_SCRIPT, "262144", "512"], capture_output=True,
                            text=True, check=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20)))
    m = json.loads(result.stdout)
    assert m["increase"] < 0.5 * m["input_bytes"], m


def test_router_calibration_never_reads_tokens_outside_its_subset() -> None:
    """Rows outside the seeded subset of max_tokens may hold anything (here NaN): the result is bit-identical."""
    from eacmoe.router_calibration import RouterCalibrationConfig, calibrate_router

    g = torch.Generator().manual_seed(1)
    x_fp = torch.randn(3000, 32, generator=g).bfloat16()
    x_q = (x_fp.float() @ (torch.eye(32) + 0.05 * torch.randn(32, 32, generator=g))).bfloat16()
    w = torch.randn(8, 32, generator=g) * 0.2
    config = RouterCalibrationConfig(topk=4, steps=50, max_tokens=500, seed=3)
    reference = calibrate_router(w, x_fp, x_q, config)
    kept = torch.randperm(3000, generator=torch.Generator().manual_seed(3))[:500]
    outside = torch.ones(3000, dtype=torch.bool)
    outside[kept] = False
    x_fp[outside], x_q[outside] = float("nan"), float("nan")
    result = calibrate_router(w, x_fp, x_q, config)
    assert reference.best_step > 0 and torch.equal(result.weight, reference.weight)
    assert result.loss_before == reference.loss_before and result.loss_after == reference.loss_after


def test_fp_layer_copy_is_freed_before_the_experts_are_quantized(monkeypatch) -> None:
    """QESC keeps an FP copy of the current layer for the FP stream; it is gone (garbage-collected, no reference
    left) by the time the routed experts, the layer's memory peak, are quantized."""
    import copy as copy_module
    import gc
    import types
    import weakref

    from eacmoe import pipeline

    copies: list[weakref.ref] = []

    def recording_deepcopy(obj, *args, **kwargs):
        out = copy_module.deepcopy(obj, *args, **kwargs)
        copies.append(weakref.ref(out))
        return out

    alive_at_experts: list[int] = []
    original = pipeline.LayerwiseQuantizer._quantize_routed_experts

    def checking(self, *args, **kwargs):
        gc.collect()
        alive_at_experts.append(sum(ref() is not None for ref in copies))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline, "copy", types.SimpleNamespace(deepcopy=recording_deepcopy))
    monkeypatch.setattr(pipeline.LayerwiseQuantizer, "_quantize_routed_experts", checking)
    model, _ = build("mixtral")
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = QuantizeConfig(expert_bits=[2] * len(model.model.layers), method="qesc", group_size=8, router_steps=3,
                         batch_size=2)
    LayerwiseQuantizer(model, cfg).run(ids)
    assert len(copies) == len(model.model.layers)  # one FP copy per layer ...
    assert alive_at_experts == [0] * len(model.model.layers)  # ... none of them alive at the experts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantized_codes_leave_the_gpu_as_they_are_produced() -> None:
    """In memory (--no-lazy) on CUDA every quantized matrix is kept until the export: on the CPU, not the GPU."""
    model, _ = build("mixtral")
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = QuantizeConfig(expert_bits=[2] * len(model.model.layers), method="qesc", group_size=8, router_steps=3,
                         batch_size=2)
    q = LayerwiseQuantizer(model, cfg, device="cuda")
    q.run(ids)
    assert q.quantized
    for name, qw in q.quantized.items():
        assert {t.device.type for t in (qw.codes, qw.scales, qw.zeros, qw.g_idx)} == {"cpu"}, name
    assert all(p.device.type == "cpu" for p in model.model.layers.parameters())
