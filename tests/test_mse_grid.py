"""The "mse" grid search (`--grid mse`): the range of each group shrunk to minimise its (weighted) rounding error.

Checked against a brute-force reference written here with numpy in fp64 (every shrink factor, the grid rebuilt from
its definition), on its behaviour where the answer is known (an outlier clipped or kept by its column weight), and
end to end: the GPTQ loop hands it the columns' loss factors, and `--grid mse` reaches the solver.
"""

import numpy as np
import pytest
import torch

from eacmoe.pipeline import QuantizeConfig
from eacmoe.quant import GPTQ, QuantSpec, proxy_loss, rtn_quantize
from eacmoe.quant.grid import MSE_GRID_NORM, MSE_GRID_SHRINKS, fit_grid, fit_mse_grid


def _reference(w: np.ndarray, bits: int, sym: bool, column_weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `w`: the (scale, zero) of the shrunk min/max grid with the least weighted error sum c |q - w|^p (fp64,
    fp32 scales; the first shrink wins ties)."""
    maxq = 2**bits - 1
    c = np.ones(w.shape[1]) if column_weight is None else column_weight
    scales, zeros = [], []
    for row in w.astype(np.float64):
        best = None
        for shrink in MSE_GRID_SHRINKS:
            lo, hi = min(row.min() * shrink, 0.0), max(row.max() * shrink, 0.0)
            if sym:
                hi = max(abs(lo), hi)
                lo = -hi
            scale = (hi - lo) / maxq
            zero = 2 ** (bits - 1) if sym else np.clip(np.round(-lo / scale), 0, maxq)
            q = (np.clip(np.round(row / scale) + zero, 0, maxq) - zero) * scale
            err = float((c * np.abs(q - row) ** MSE_GRID_NORM).sum())
            if best is None or err < best[0] * (1 - 1e-9):
                best = (err, scale, zero)
        scales.append(best[1])
        zeros.append(best[2])
    return np.array(scales), np.array(zeros)


@pytest.mark.parametrize("bits,sym", [(2, False), (3, False), (2, True), (4, False)])
def test_mse_grid_matches_a_brute_force_search(bits, sym):
    g = torch.Generator().manual_seed(bits + 10 * sym)
    w = torch.randn(64, 64, generator=g)
    w[::7, 3] *= 6.0  # some rows with an outlier, where clipping matters most
    weight = torch.rand(64, generator=g) + 0.1
    for column_weight in (None, weight):
        scale, zero = fit_mse_grid(w, bits, sym, "float32", column_weight)
        ref_scale, ref_zero = _reference(w.numpy(), bits, sym, None if column_weight is None else weight.numpy())
        # fp32 vs fp64 can pick a neighbouring shrink where two are within rounding of each other
        assert (np.isclose(scale.numpy(), ref_scale, rtol=1e-5)).mean() > 0.95
        assert (zero.numpy() == ref_zero).mean() > 0.95


def test_mse_grid_shrinks_at_two_bits_and_never_loses_to_min_max():
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    minmax_scale, minmax_zero = fit_grid(w, 2)
    scale, zero = fit_mse_grid(w, 2)
    assert float(scale.mean()) < 0.9 * float(minmax_scale.mean())  # Gaussian groups: the tails are clipped

    def err(s, z):
        q = (torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 3) - z[:, None]) * s[:, None]
        return (q - w).square().sum(-1)

    assert bool((err(scale, zero) <= err(minmax_scale, minmax_zero)).all())
    assert float(err(scale, zero).sum()) < 0.75 * float(err(minmax_scale, minmax_zero).sum())


def test_column_weight_decides_whether_an_outlier_is_clipped():
    w = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    w[0, 5] = 1.0  # one outlier, 10 sd out
    ignore_it = torch.ones(64)
    ignore_it[5] = 0.0
    keep_it = torch.ones(64)
    keep_it[5] = 1e4
    clipped, _ = fit_mse_grid(w, 3, column_weight=ignore_it)
    kept, _ = fit_mse_grid(w, 3, column_weight=keep_it)
    minmax, _ = fit_grid(w, 3)
    assert float(clipped) <= 0.5 * float(minmax) + 1e-3  # the smallest range searched
    assert float(kept) == pytest.approx(float(minmax), rel=1e-3)


def test_spec_grid_reaches_rtn_and_gptq_and_lowers_their_error():
    g = torch.Generator().manual_seed(2)
    mix = torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ mix
    w = torch.randn(32, 64, generator=g) * 0.05
    solver = GPTQ(64)
    solver.add_batch(x)
    losses = {}
    for grid in ("minmax", "mse"):
        spec = QuantSpec(bits=2, group_size=32, grid=grid)
        rtn = rtn_quantize(w, spec)
        gptq = solver.quantize(w, spec)
        losses[grid] = (proxy_loss(w, rtn.dequantize(), solver.H), proxy_loss(w, gptq.dequantize(), solver.H))
        if grid == "minmax":
            scale, _ = fit_grid(w.reshape(32, 2, 32), 2)
            assert torch.equal(rtn.scales, scale)
    assert losses["mse"][0] < 0.9 * losses["minmax"][0]
    assert losses["mse"][1] < 0.95 * losses["minmax"][1]


def test_gptq_weighs_the_grid_search_by_each_columns_loss_factor(monkeypatch):
    # The loop passes r_j^2 (GPTQ's per-column loss factor) of the group's columns, in processing order.
    seen = []
    original = QuantSpec.fit
    monkeypatch.setattr(QuantSpec, "fit", lambda self, part, weight=None: seen.append(weight) or original(self, part, weight))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 32, generator=g) * torch.linspace(0.5, 2.0, 32)
    solver = GPTQ(32)
    solver.add_batch(x)
    solver.quantize(torch.randn(4, 32, generator=g), QuantSpec(bits=2, group_size=16, grid="mse"))
    factor = solver._factorisation(False, 0.01)
    assert len(seen) == 2
    for k, weight in enumerate(seen):
        assert torch.equal(weight.reshape(-1), factor.col_scale[16 * k:16 * (k + 1)].square())
    # independently: r_j^2 is the Schur complement of H_d on column j given the later columns
    Hd = solver.H.double() + 0.01 * float(torch.diagonal(solver.H).mean()) * torch.eye(32, dtype=torch.float64)
    j = 3
    later = slice(j + 1, 32)
    schur = Hd[j, j] - Hd[j, later] @ torch.linalg.solve(Hd[later, later], Hd[later, j])
    assert float(factor.col_scale[j] ** 2) == pytest.approx(float(schur), rel=1e-4)


def test_unknown_grid_is_refused_with_one_line():
    with pytest.raises(ValueError, match="grid must be one of"):
        QuantSpec(bits=2, grid="percentile")
    with pytest.raises(ValueError, match="grid must be one of"):
        QuantizeConfig(expert_bits=[2], grid="percentile")
    assert QuantizeConfig(expert_bits=[2], grid="mse").spec(3).grid == "mse"
