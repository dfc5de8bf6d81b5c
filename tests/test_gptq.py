"""Our GPTQ solver: closed forms, an independent naive reference, and edge cases (tiny tensors, fast)."""

import logging

import numpy as np
import pytest
import torch

from eacmoe.quant import GPTQ, MAX_DAMP_PERCENT, QuantSpec, proxy_loss, rtn_quantize

BITS = (2, 3, 4, 8)


def _correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    # Mixing i.i.d. features through a random matrix gives a dense, well-conditioned-but-correlated Hessian,
    # which is where GPTQ's error feedback pays off over RTN.
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    return torch.randn(n, cols, generator=g) @ mix


def _weight(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05


def _solver(x: torch.Tensor) -> GPTQ:
    solver = GPTQ(x.shape[-1])
    solver.add_batch(x)
    return solver


def _assert_on_grid(qw) -> None:
    maxq = 2**qw.bits - 1
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= maxq and int(qw.zeros.max()) <= maxq
    g = qw.g_idx.long()
    manual = (qw.codes.float() - qw.zeros[:, g].float()) * qw.scales[:, g]
    assert torch.equal(qw.dequantize(), manual)


# ---------------------------------------------------------------- Hessian accumulation


def test_hessian_running_mean_matches_closed_form():
    x = _correlated_inputs(300, 24)
    solver = GPTQ(24)
    solver.add_batch(x[:7].reshape(7, 24))
    solver.add_batch(x[7:107].reshape(4, 25, 24))  # leading dims are flattened into samples
    solver.add_batch(x[107:])
    solver.add_batch(x[:0])  # empty batch is a no-op
    assert solver.nsamples == 300
    expected = 2.0 / 300 * x.double().T @ x.double()
    assert torch.allclose(solver.H.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert solver.H.dtype == torch.float32
    with pytest.raises(ValueError, match="features"):
        solver.add_batch(torch.zeros(3, 23))


def test_quantize_argument_errors():
    solver = GPTQ(32)
    with pytest.raises(ValueError, match="nsamples"):
        solver.quantize(torch.zeros(4, 32), QuantSpec(bits=4, group_size=16))
    solver.add_batch(torch.randn(10, 32))
    with pytest.raises(ValueError, match=r"in_features=32"):
        solver.quantize(torch.zeros(4, 32), QuantSpec(bits=4, group_size=24))
    with pytest.raises(ValueError, match="weight"):
        solver.quantize(torch.zeros(4, 31), QuantSpec(bits=4, group_size=-1))
    bad = GPTQ(4)
    bad.add_batch(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        bad.quantize(torch.zeros(2, 4), QuantSpec(bits=4, group_size=-1))


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [16, -1])
def test_identity_and_diagonal_hessian_equal_rtn(bits, sym, group_size):
    # With a diagonal H the inverse factor is diagonal, so no error is fed forward: GPTQ == RTN exactly.
    w = _weight(8, 64)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, block_size=32)
    rtn = rtn_quantize(w, spec)
    diag = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.1
    for hessian in (torch.eye(64), torch.diag(diag)):
        res = GPTQ.from_hessian(hessian).quantize(w, spec)
        assert torch.equal(res.qweight.codes, rtn.codes)
        assert torch.equal(res.qweight.scales, rtn.scales)
        assert torch.equal(res.qweight.zeros, rtn.zeros)
        assert torch.equal(res.qweight.g_idx, rtn.g_idx)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    x = _correlated_inputs(512, 64)
    w = _weight(16, 64)
    solver = _solver(x)
    spec = QuantSpec(bits=bits, group_size=16, act_order=act_order)
    res = solver.quantize(w, spec)
    loss_gptq = proxy_loss(w, res.dequantize(), solver.H)
    loss_rtn = proxy_loss(w, rtn_quantize(w, spec).dequantize(), solver.H)
    assert loss_gptq < 0.8 * loss_rtn, (loss_gptq, loss_rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_reported_loss_is_half_the_damped_proxy(act_order):
    # Telescoping identity of the Cholesky formulation: sum_j err_j^2 = tr((W-Q) H_d (W-Q)^T).
    x = _correlated_inputs(256, 48)
    w = _weight(12, 48)
    solver = _solver(x)
    res = solver.quantize(w, QuantSpec(bits=3, group_size=16, act_order=act_order, block_size=16))
    h_damped = solver.H + res.damp * torch.eye(48)
    assert res.damp == pytest.approx(0.01 * float(torch.diagonal(solver.H).mean()), rel=1e-6)
    assert res.damp_percent == 0.01 and res.nsamples == 256
    assert res.loss == pytest.approx(0.5 * proxy_loss(w, res.dequantize(), h_damped), rel=1e-4)


# ---------------------------------------------------------------- act-order


@pytest.mark.parametrize("bits", BITS)
def test_act_order_on_grid_and_g_idx_consistent(bits):
    x = _correlated_inputs(256, 64) * torch.linspace(0.2, 3.0, 64)  # spread the diagonal so perm is non-trivial
    w = _weight(8, 64)
    solver = _solver(x)
    gs = 16
    res = solver.quantize(w, QuantSpec(bits=bits, group_size=gs, act_order=True))
    qw = res.qweight
    _assert_on_grid(qw)
    perm = res.perm
    assert perm is not None and sorted(perm.tolist()) == list(range(64))
    assert torch.equal(perm, torch.argsort(torch.diagonal(solver.H), descending=True, stable=True))
    assert not torch.equal(perm, torch.arange(64))
    # GPTQModel's convention: column perm[p] belongs to group p // gs
    assert torch.equal(qw.g_idx[perm], torch.arange(64, dtype=torch.int32) // gs)
    assert torch.bincount(qw.g_idx.long()).tolist() == [gs] * 4
    # each group's grid was fitted on its own (permuted) columns: their codes use the full range somewhere
    for k in range(4):
        cols = (qw.g_idx == k).nonzero().flatten()
        assert set(cols.tolist()) == set(perm[k * gs : (k + 1) * gs].tolist())
    # without act-order no permutation is reported
    assert solver.quantize(w, QuantSpec(bits=bits, group_size=gs)).perm is None


# ---------------------------------------------------------------- degenerate Hessians


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_are_zeroed(act_order):
    x = _correlated_inputs(128, 32)
    x[:, [3, 17]] = 0.0  # these inputs never fire
    w = _weight(6, 32)
    w_before = w.clone()
    solver = _solver(x)
    assert float(solver.H[3, 3]) == 0.0
    res = solver.quantize(w, QuantSpec(bits=2, group_size=16, act_order=act_order))
    deq = res.dequantize()
    assert bool(torch.isfinite(deq).all()) and res.damp_percent == 0.01
    assert bool((deq[:, [3, 17]] == 0).all())
    assert torch.equal(w, w_before)
    assert float(solver.H[3, 3]) == 0.0  # the solver's Hessian is not modified either
    _assert_on_grid(res.qweight)


def test_singular_hessian_is_handled_by_default_damping():
    x = _correlated_inputs(16, 32)  # 16 samples < 32 features: H has rank 16
    x[:, 5] = x[:, 4]
    solver = _solver(x)
    res = solver.quantize(_weight(4, 32), QuantSpec(bits=4, group_size=-1))
    assert res.damp_percent == 0.01
    _assert_on_grid(res.qweight)


def test_damping_escalates_when_the_requested_damping_is_lost_in_fp32_rounding(caplog):
    # Two equal input columns make H singular; 1e-9 of the mean diagonal is below fp32's resolution of the diagonal,
    # so H + damp I rounds back to the singular H and a factorisation can "succeed" on rounding noise. The solver
    # must refuse such pivots (a pivot of H + damp I is a Schur complement, at least damp) and raise the damping
    # until it is real: the damping it reports must make the fp32 H + damp I positive definite (checked in fp64,
    # as the GPTAQ target needs it), and the result is then GPTQ's at that damping.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 32, generator=g)
    x[:, 1] = x[:, 0]
    solver = _solver(x)
    w = torch.randn(6, 32, generator=g) * 0.05
    with caplog.at_level(logging.WARNING, logger="eacmoe.quant.gptq"):
        res = solver.quantize(w, QuantSpec(bits=2, group_size=8, damp_percent=1e-9))
    assert res.damp_percent > 1e-9 and any("damp_percent" in r.getMessage() for r in caplog.records)
    damped = solver.H.clone()
    damped.diagonal().add_(res.damp)
    assert int(torch.linalg.cholesky_ex(damped.double()).info) == 0
    direct = solver.quantize(w, QuantSpec(bits=2, group_size=8, damp_percent=res.damp_percent))
    assert torch.equal(direct.qweight.codes, res.qweight.codes)
    rtn = rtn_quantize(w, QuantSpec(bits=2, group_size=8))
    assert proxy_loss(w, res.dequantize(), solver.H) < proxy_loss(w, rtn.dequantize(), solver.H)


def test_damping_escalates_on_indefinite_hessian(caplog):
    # [[1, 3], [3, 1]] has eigenvalue -2: needs damp > 2 x mean(diag); x10 steps 0.01 -> 0.1 -> 1 -> 10.
    h = torch.eye(8)
    h[0, 1] = h[1, 0] = 3.0
    with caplog.at_level(logging.WARNING, logger="eacmoe.quant.gptq"):
        res = GPTQ.from_hessian(h).quantize(_weight(4, 8), QuantSpec(bits=4, group_size=-1))
    assert res.damp_percent == pytest.approx(10.0)
    assert res.damp == pytest.approx(10.0)  # mean diagonal is 1
    assert any("damp_percent" in r.getMessage() for r in caplog.records)
    _assert_on_grid(res.qweight)
    # beyond the limit: a clear error instead of garbage
    h[0, 1] = h[1, 0] = 1000.0
    with pytest.raises(RuntimeError, match="not positive definite"):
        GPTQ.from_hessian(h).quantize(_weight(4, 8), QuantSpec(bits=4, group_size=-1))
    assert MAX_DAMP_PERCENT == 10.0


# ---------------------------------------------------------------- independent naive reference


def _naive_gptq_codes(w: torch.Tensor, h: torch.Tensor, bits: int, gs: int, sym: bool, damp_percent: float,
                      scale_dtype: str = "float32"):
    """GPTQ straight from the paper (OBS), fp64, one column at a time, no blocks, no Cholesky.

    For column q with the inverse Hessian Hinv of the not-yet-quantized columns:
        w_F <- w_F - (w_q - quant(w_q)) / Hinv_qq * Hinv_{F,q}
        Hinv <- Hinv - Hinv_{:,q} Hinv_{q,:} / Hinv_qq        (removes q)
    The grid of a group is the min/max grid of its current (updated) weights when the group starts; with
    ``scale_dtype="float16"`` its scale is rounded to fp16 first (what a GPTQ checkpoint stores).
    """
    w = w.double().clone()
    h = h.double().clone()
    rows, cols = w.shape
    maxq = 2**bits - 1
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp_percent * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(rows, cols, dtype=torch.long)
    for q in range(cols):
        if q % gs == 0:
            grp = w[:, q : q + gs]
            lo = torch.clamp(grp.min(dim=1).values, max=0.0)
            hi = torch.clamp(grp.max(dim=1).values, min=0.0)
            if sym:
                hi = torch.maximum(hi, -lo)
                lo = -hi
            scale = (hi - lo) / maxq
            if scale_dtype == "float16":  # the next fp16 value up (numpy's float16 nextafter)
                half = scale.numpy().astype(np.float16)
                below = half.astype(np.float64) < scale.numpy()
                half[below] = np.nextafter(half[below], np.float16(np.inf))
                scale = torch.from_numpy(half.astype(np.float64))
            zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-lo / scale)
        c = torch.clamp(torch.round(w[:, q] / scale) + zero, 0, maxq)
        codes[:, q] = c.long()
        err = (w[:, q] - (c - zero) * scale) / hinv[q, q]
        w -= err[:, None] * hinv[q, :][None, :]
        hinv -= torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return codes


# Asymmetric grids only: a symmetric grid puts the group's most negative value (if it is the abs max) exactly
# on a rounding tie (-maxq/2), so fp64-vs-fp32 noise legitimately picks either neighbour (same error) and the
# codes then diverge; that case is compared by loss below.
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("bits", BITS)
def test_blocked_solver_matches_naive_reference(bits, scale_dtype):
    sym = False
    x = _correlated_inputs(256, 32, seed=5)
    x[:, 9] = 0.0  # one dead column
    w = _weight(8, 32, seed=6)
    solver = _solver(x)
    gs = 8
    ref = _naive_gptq_codes(w, solver.H, bits, gs, sym, 0.01, scale_dtype)
    # exact grids: any block size (not a multiple of the group size, not dividing the width) gives the same codes
    for block_size in (3, 8, 12, 32):
        spec = QuantSpec(bits=bits, group_size=gs, sym=sym, block_size=block_size, scale_dtype=scale_dtype)
        res = solver.quantize(w, spec, exact_group_grids=True)
        assert torch.equal(res.qweight.codes.long(), ref), block_size
    # reference grids coincide with exact grids when every group starts a block
    for block_size in (4, 8):
        spec = QuantSpec(bits=bits, group_size=gs, sym=sym, block_size=block_size, scale_dtype=scale_dtype)
        res = solver.quantize(w, spec)
        assert torch.equal(res.qweight.codes.long(), ref), block_size


def test_symmetric_grid_matches_naive_reference_in_loss():
    x = _correlated_inputs(256, 32, seed=5)
    w = _weight(8, 32, seed=6)
    solver = _solver(x)
    ref = _naive_gptq_codes(w, solver.H, 3, 8, True, 0.01)
    res = solver.quantize(w, QuantSpec(bits=3, group_size=8, sym=True, block_size=8))
    ours = res.dequantize()
    # rebuild the naive dequantized weight from its codes with our (identical up to ties) grids
    g = res.qweight.g_idx.long()
    naive = (ref.float() - res.qweight.zeros[:, g].float()) * res.qweight.scales[:, g]
    assert (res.qweight.codes.long() == ref).float().mean() > 0.8
    assert proxy_loss(w, ours, solver.H) == pytest.approx(proxy_loss(w, naive, solver.H), rel=0.05)


def test_reference_grid_timing_depends_on_block_size_only_when_groups_start_mid_block():
    x = _correlated_inputs(256, 64, seed=2)
    w = _weight(8, 64, seed=3)
    solver = _solver(x)
    a = solver.quantize(w, QuantSpec(bits=2, group_size=16, block_size=16))
    b = solver.quantize(w, QuantSpec(bits=2, group_size=16, block_size=64))
    c = solver.quantize(w, QuantSpec(bits=2, group_size=16, block_size=64), exact_group_grids=True)
    assert torch.equal(a.qweight.codes, c.qweight.codes)
    assert not torch.equal(a.qweight.codes, b.qweight.codes)


# ---------------------------------------------------------------- hygiene


@pytest.mark.parametrize("act_order", [False, True])
def test_deterministic_and_inputs_untouched(act_order):
    x = _correlated_inputs(200, 48, seed=4)
    w = _weight(10, 48)
    w_before = w.clone()
    spec = QuantSpec(bits=3, group_size=16, act_order=act_order, block_size=32)
    s1 = _solver(x)
    h_before = s1.H.clone()
    r1 = s1.quantize(w, spec)
    r2 = s1.quantize(w, spec)
    r3 = _solver(x).quantize(w, spec)
    for r in (r2, r3):
        assert torch.equal(r.qweight.codes, r1.qweight.codes)
        assert torch.equal(r.qweight.scales, r1.qweight.scales)
        assert torch.equal(r.qweight.zeros, r1.qweight.zeros)
        assert torch.equal(r.qweight.g_idx, r1.qweight.g_idx)
        assert r.loss == r1.loss and r.damp == r1.damp
    assert torch.equal(w, w_before)
    assert torch.equal(s1.H, h_before)


def test_low_precision_weight_input():
    x = _correlated_inputs(64, 32)
    w = _weight(4, 32).to(torch.bfloat16)
    w_before = w.clone()
    res = _solver(x.to(torch.bfloat16)).quantize(w, QuantSpec(bits=4, group_size=16))
    assert res.dequantize().dtype == torch.float32
    assert torch.equal(w, w_before)
    _assert_on_grid(res.qweight)


def _equal_results(a, b) -> bool:
    return (all(torch.equal(getattr(a.qweight, k), getattr(b.qweight, k)) for k in ("codes", "scales", "zeros", "g_idx"))
            and a.loss == b.loss and a.damp == b.damp)


def test_factorisation_is_shared_by_matrices_of_one_input_and_dropped_when_the_hessian_changes(monkeypatch):
    # An expert's gate and up projections share one solver: the damped Cholesky is computed once per setting and
    # gives what fresh solvers give; more inputs (add_batch) or another damping / act-order refactorise.
    x, more = _correlated_inputs(300, 48, seed=5), _correlated_inputs(100, 48, seed=6)
    gate, up = _weight(12, 48, seed=2), _weight(20, 48, seed=3)
    spec = QuantSpec(bits=2, group_size=16, block_size=32)
    calls = []
    original = GPTQ._feedback_factor
    monkeypatch.setattr(GPTQ, "_feedback_factor", lambda self, H, d: calls.append(d) or original(self, H, d))
    shared = _solver(x)
    assert _equal_results(shared.quantize(gate, spec), _solver(x).quantize(gate, spec))
    assert _equal_results(shared.quantize(up, spec), _solver(x).quantize(up, spec))
    assert len(calls) == 3  # shared: once for both; the two fresh solvers: once each
    for other in (QuantSpec(bits=2, group_size=16, block_size=32, damp_percent=0.1),   # another damping
                  QuantSpec(bits=2, group_size=16, block_size=32, act_order=True)):   # act-order
        assert _equal_results(shared.quantize(up, other), _solver(x).quantize(up, other))
    assert len(calls) == 7
    shared.add_batch(more)
    grown = _solver(x)
    grown.add_batch(more)  # the same two batches: the same fp32 Hessian
    last = QuantSpec(bits=2, group_size=16, block_size=32, act_order=True)  # the setting cached before add_batch
    assert _equal_results(shared.quantize(up, last), grown.quantize(up, last))
    assert not _equal_results(grown.quantize(up, last), _solver(x).quantize(up, last))  # the new inputs matter


# ---------------------------------------------------------------- several matrices in one column loop


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_quantize_together_equals_one_matrix_at_a_time_and_the_naive_reference(act_order, exact):
    # Three experts, each a gate and an up projection on one solver (stacked rows) with its own Hessian (the
    # batch dimension), one of them with a dead column; every matrix must come out as if quantized alone.
    from eacmoe.quant.gptq import quantize_together

    spec = QuantSpec(bits=2, group_size=8, act_order=act_order, block_size=12)
    solvers, weights = [], []
    for e in range(3):
        x = _correlated_inputs(256, 32, seed=10 + e)
        if e == 1:
            x[:, 5] = 0.0
        solver = _solver(x)
        solvers += [solver, solver]
        weights += [_weight(6, 32, seed=20 + e), _weight(6, 32, seed=30 + e)]
    together = quantize_together(solvers, weights, spec, exact_group_grids=exact)
    for solver, w, res in zip(solvers, weights, together):
        alone = _solver_like(solver).quantize(w, spec, exact_group_grids=exact)
        assert _equal_results(res, alone)
        assert res.qweight.codes.shape == w.shape and res.nsamples == 256
        if exact and not act_order:  # the paper's algorithm, fp64, no blocks: an independent reference
            assert torch.equal(res.qweight.codes.long(), _naive_gptq_codes(w, solver.H, 2, 8, False, 0.01, "float16"))
    assert together[2].loss != together[3].loss  # (the members do differ)


def _solver_like(solver: GPTQ) -> GPTQ:
    return GPTQ.from_hessian(solver.H, solver.nsamples)


def test_quantize_together_refuses_unequal_members():
    from eacmoe.quant.gptq import quantize_together

    a, b = _solver(_correlated_inputs(64, 16, seed=1)), _solver(_correlated_inputs(64, 16, seed=2))
    spec = QuantSpec(bits=2, group_size=8)
    with pytest.raises(ValueError, match="equal columns, equal rows"):
        quantize_together([a, b], [_weight(4, 16), _weight(5, 16)], spec)
    with pytest.raises(ValueError, match="one solver per weight"):
        quantize_together([a], [_weight(4, 16), _weight(4, 16)], spec)


def test_column_loops_stack_one_solvers_matrices_and_batch_equal_solvers_within_the_row_budget():
    from eacmoe.quant.gptq import column_loops

    a, b, c, d = (GPTQ(16) for _ in range(4))
    # gate+up of four experts, 64 rows each: two experts (256 rows) per loop of 256 rows
    pairs = [(s, (64, 16)) for s in (a, b, c, d) for _ in range(2)]
    assert column_loops(pairs, 256) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert column_loops(pairs, 128) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # a solver whose matrices do not fit together is split, one matrix per loop (q of 200 rows, k and v of 50)
    assert column_loops([(a, (200, 16)), (a, (50, 16)), (a, (50, 16))], 128) == [[0], [1, 2]]
    # unequal shapes never share a loop, nor does one loop take more than its rows
    assert column_loops([(a, (32, 16)), (b, (48, 16)), (c, (48, 16)), (d, (48, 16))], 100) == [[0], [1, 2], [3]]
    assert column_loops(pairs, 1) == [[k] for k in range(8)]
