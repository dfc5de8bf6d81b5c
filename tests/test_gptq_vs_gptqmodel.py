"""Independent cross-check of our GPTQ solver against GPTQModel's own GPTQ (CPU, no model needed).

GPTQModel (7.6.0 here) is installed with
    pip install --no-build-isolation gptqmodel "torch==2.13.0"
Its per-module solver ``gptqmodel.quantization.gptq.GPTQ`` wraps one ``nn.Linear``: ``add_batch(inp, out)``
accumulates ``H = 2/n * sum x x^T`` over tokens, ``quantize(blocksize)`` returns the dequantized weight
``Q`` plus per-group ``scale``/``zero`` ``[out, n_groups]`` and ``g_idx``. We feed the same weight and the same
calibration inputs to both solvers and compare the layer-output proxy error ``tr((W-Q) H (W-Q)^T)``.
"""

import importlib.util

import pytest
import torch
from gptqmodel_env import gptqmodel_import_guard, leaked_hf_cache_vars

from eacmoe.quant import GPTQ, QuantSpec, proxy_loss

# Cheap check at collection time; the (slow, ~9 s) import itself happens once, in the `gm` fixture.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")


@pytest.fixture(scope="module")
def gm():
    """GPTQModel's ``(QuantizeConfig, GPTQ)``, imported without leaking its side effects into the session
    (see ``gptqmodel_env.gptqmodel_import_guard``)."""
    with gptqmodel_import_guard():
        pytest.importorskip("gptqmodel")
        from gptqmodel.quantization.config import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ as GPTQModelGPTQ
    return QuantizeConfig, GPTQModelGPTQ


ROWS, COLS, NSAMPLES = 32, 256, 1024

# Tolerances (justification).
# Same Hessian: GPTQModel's H is handed to our solver (GPTQ.from_hessian). Both then run the same GPTQ (damped H,
# lazy blocks, min/max grid fitted at each group start on the weights as of the block start), GPTQModel with the
# explicit inverse factor U of H^-1, ours with the Cholesky factor of H itself (one factorisation instead of
# three, see GPTQ._feedback_factor): the same updates in other fp32 roundings. Measured over 5 seeds x 64
# configurations: identical codes in 305, else 99.2-99.99% of the codes equal, loss at most 0.29% apart, mean
# signed difference -0.002% (no bias); the same chaos as the same-inputs case below, where one flipped code
# changes the rest of its row. (The previous explicit-inverse solver matched bit for bit.) The bounds still fail
# on any algorithmic difference: fitting mid-block group grids on the fully updated weights (our
# ``exact_group_grids=True``) changes ~25% of the codes and the loss by 1-5%.
SAME_H_LOSS_RTOL = 1e-2
SAME_H_MIN_CODE_AGREEMENT = 0.98
# Same inputs: each side sums its own H (GPTQModel X^T X * 2/n, ours a running mean), ~1e-7 relative apart.
# GPTQ's error feedback is chaotic: one flipped code changes every later column's update. Symmetric grids are
# the most exposed because a group's most negative value sits exactly on a rounding tie (-maxq/2), and 8-bit
# grids have many values near a rounding boundary. Measured worst case over 5 seeds x 64 configurations: loss
# 0.70% apart, 98.5% of codes equal (typical: identical). Bounds set at ~2-3x those.
SAME_INPUTS_LOSS_RTOL = 2e-2
SAME_INPUTS_MIN_CODE_AGREEMENT = 0.97


@pytest.fixture(scope="module")
def data(gm):
    QuantizeConfig, GPTQModelGPTQ = gm
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(COLS) + 0.2 * torch.randn(COLS, COLS, generator=g)
    x = torch.randn(NSAMPLES, COLS, generator=g) @ mix
    with torch.random.fork_rng():
        torch.manual_seed(0)
        w = torch.distributions.StudentT(5.0).sample((ROWS, COLS)) * 0.02  # heavy-ish tails like LLM weights
    ours = GPTQ(COLS)
    ours.add_batch(x)
    # GPTQModel's own Hessian of the same inputs, accumulated exactly as in _gptqmodel_quantize (one batch):
    # fp32 sums depend on the batching, and bit-identical H is what the same-Hessian test needs.
    ref = GPTQModelGPTQ(torch.nn.Linear(COLS, ROWS, bias=False), qcfg=QuantizeConfig(bits=4, offload_to_disk=False))
    ref.add_batch(x, None)
    h_ref = ref.finalize_hessian().clone()
    assert ref.nsamples == NSAMPLES
    return x, w, ours, h_ref


def _gptqmodel_quantize(gm, w, x, bits, group_size, sym, act_order, block_size):
    QuantizeConfig, GPTQModelGPTQ = gm
    linear = torch.nn.Linear(COLS, ROWS, bias=False)
    linear.weight.data = w.clone()
    cfg = QuantizeConfig(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=act_order,
        act_group_aware=False,  # GPTQModel's default "GAR" reordering is not plain GPTQ
        damp_percent=0.01,
        mse=0.0,  # plain min/max grid, no clipping search
        offload_to_disk=False,
    )
    solver = GPTQModelGPTQ(linear, qcfg=cfg)
    solver.quantizer.configure(perchannel=True)  # the module looper normally does this
    solver.add_batch(x, None)
    q, scale, zero, g_idx, _duration, _avg_loss, damp, nsamples = solver.quantize(blocksize=block_size)
    assert nsamples == NSAMPLES and damp == pytest.approx(0.01)
    assert torch.equal(linear.weight.data, w)  # GPTQModel returns Q, the module is left alone
    codes = torch.round(q / scale[:, g_idx.long()]) + zero[:, g_idx.long()]
    return q, codes, scale, zero, g_idx


# (group_size, block_size): aligned groups, groups starting mid-block (reference grid timing), per channel
GROUPINGS = [(32, 32), (64, 128), (32, 128), (-1, 128)]
CONFIGS = [
    pytest.param(
        bits, sym, act_order, gs, bs,
        id=f"b{bits}-{'sym' if sym else 'asym'}-{'act' if act_order else 'seq'}-g{gs}-bs{bs}",
    )
    for bits in (2, 3, 4, 8)
    for sym in (False, True)
    for act_order in (False, True)
    for gs, bs in GROUPINGS
]


def _compare(w, h_eval, q_ref, codes_ref, scale_ref, zero_ref, g_idx_ref, res, loss_rtol, min_agreement):
    qw = res.qweight
    loss_ours = proxy_loss(w, qw.dequantize(), h_eval)
    loss_ref = proxy_loss(w, q_ref, h_eval)
    assert loss_ours == pytest.approx(loss_ref, rel=loss_rtol)
    agreement = float((qw.codes.float() == codes_ref).float().mean())
    assert agreement >= min_agreement, agreement
    assert torch.equal(qw.g_idx, g_idx_ref)
    assert float((qw.zeros.float() == zero_ref).float().mean()) >= min_agreement
    assert float(torch.isclose(qw.scales, scale_ref, rtol=1e-4, atol=0).float().mean()) >= min_agreement


@pytest.mark.parametrize("bits,sym,act_order,group_size,block_size", CONFIGS)
def test_same_hessian_matches_gptqmodel(gm, data, bits, sym, act_order, group_size, block_size):
    x, w, _ours, h_ref = data
    ref = _gptqmodel_quantize(gm, w, x, bits, group_size, sym, act_order, block_size)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order, block_size=block_size,
                     scale_dtype="float32")  # GPTQModel's solver keeps fp32 scales
    res = GPTQ.from_hessian(h_ref, nsamples=NSAMPLES).quantize(w, spec)
    _compare(w, h_ref, *ref, res, SAME_H_LOSS_RTOL, SAME_H_MIN_CODE_AGREEMENT)


@pytest.mark.parametrize("bits,sym,act_order,group_size,block_size", CONFIGS)
def test_same_inputs_match_gptqmodel(gm, data, bits, sym, act_order, group_size, block_size):
    x, w, ours, _h_ref = data
    ref = _gptqmodel_quantize(gm, w, x, bits, group_size, sym, act_order, block_size)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order, block_size=block_size,
                     scale_dtype="float32")  # GPTQModel's solver keeps fp32 scales
    res = ours.quantize(w, spec)
    _compare(w, ours.H, *ref, res, SAME_INPUTS_LOSS_RTOL, SAME_INPUTS_MIN_CODE_AGREEMENT)


def test_hessians_agree(data):
    _x, _w, ours, h_ref = data
    assert torch.allclose(ours.H, h_ref, rtol=1e-5, atol=1e-5 * float(h_ref.abs().max()))


def test_gptqmodel_import_does_not_leak_into_the_session(gm):
    # tokenicer would point the HF caches at /tmp for everything that runs after this module
    assert leaked_hf_cache_vars() == []
