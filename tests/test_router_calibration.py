"""Router calibration (TopK-MSE): both ways of evaluating the objective agree with its definition and with
autograd, give the same optimisation, and the optimiser approaches the least-squares optimum."""
import pytest
import torch

from eacmoe.router_calibration import (RouterCalibrationConfig, StatisticsObjective, TokenObjective,
                                       calibrate_router, topk_mse)


def _problem(tokens=600, hidden=12, experts=6, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_fp = torch.randn(experts, hidden, generator=g)
    x_fp = torch.randn(tokens, hidden, generator=g)
    x_q = x_fp + noise * torch.randn(tokens, hidden, generator=g)  # the quantized stream drifts from the FP one
    return w_fp, x_fp, x_q


@pytest.mark.parametrize("objective_class", [TokenObjective, StatisticsObjective])
@pytest.mark.parametrize("topk", [1, 3, 6])
def test_objective_matches_definition_and_autograd(objective_class, topk) -> None:
    w_fp, x_fp, x_q = (t.double() for t in _problem())
    target = x_fp @ w_fp.T
    index = target.topk(topk, -1).indices
    w = (w_fp + 0.1 * torch.randn_like(w_fp)).requires_grad_(True)
    reference = topk_mse(target, x_q @ w.T, index)
    reference.backward()
    loss, grad = objective_class(x_q, target, index).loss_and_grad(w.detach())
    assert loss == pytest.approx(reference.item(), rel=1e-10)
    torch.testing.assert_close(grad, w.grad, rtol=1e-9, atol=1e-12)


def test_statistics_and_token_objectives_give_the_same_calibration() -> None:
    w_fp, x_fp, x_q = _problem(tokens=2000, hidden=16, experts=8)
    results = {kind: calibrate_router(w_fp, x_fp, x_q, RouterCalibrationConfig(topk=4, steps=300, lr=1e-2, objective=kind))
               for kind in ("tokens", "statistics")}
    tokens, statistics = results["tokens"], results["statistics"]
    assert tokens.best_step == statistics.best_step > 0
    assert statistics.loss_after == pytest.approx(tokens.loss_after, rel=1e-4)
    torch.testing.assert_close(statistics.weight, tokens.weight, rtol=1e-4, atol=1e-5)


def test_no_drift_keeps_the_fp_router() -> None:
    w_fp, x_fp, _ = _problem()
    result = calibrate_router(w_fp, x_fp, x_fp.clone(), RouterCalibrationConfig(topk=3, steps=50))
    assert result.loss_before == pytest.approx(0.0, abs=1e-9) and result.best_step == 0
    assert torch.equal(result.weight, w_fp)


def test_plain_mse_approaches_the_least_squares_optimum() -> None:
    """K = all experts is ordinary least squares per router row: W'^T = argmin ||X' W'^T - X W^T||."""
    w_fp, x_fp, x_q = _problem(tokens=3000, hidden=10, experts=4, noise=0.5)
    config = RouterCalibrationConfig(topk=4, steps=3000, lr=3e-2, patience=3000, holdout_fraction=0.0)
    result = calibrate_router(w_fp, x_fp, x_q, config)
    optimum_weight = torch.linalg.lstsq(x_q.double(), (x_fp @ w_fp.T).double()).solution.T
    optimum = topk_mse(x_fp.double() @ w_fp.T.double(), x_q.double() @ optimum_weight.T,
                       torch.arange(4).expand(3000, 4)).item()
    assert result.loss_after < 0.9 * result.loss_before
    assert optimum * (1 - 1e-6) <= result.loss_after <= optimum * 1.01


def test_bad_k_is_rejected() -> None:
    w_fp, x_fp, x_q = _problem()
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        calibrate_router(w_fp, x_fp, x_q, RouterCalibrationConfig(topk=7))
    with pytest.raises(ValueError, match="unknown router calibration objective"):
        calibrate_router(w_fp, x_fp, x_q, RouterCalibrationConfig(topk=2, objective="closed-form"))


def test_auto_objective_takes_statistics_only_when_they_are_small(monkeypatch) -> None:
    import eacmoe.router_calibration as rc

    chosen = []
    real = rc.make_objective
    monkeypatch.setattr(rc, "make_objective", lambda kind, *a: chosen.append(kind) or real(kind, *a))
    w_fp, x_fp, x_q = _problem()
    rc.calibrate_router(w_fp, x_fp, x_q, RouterCalibrationConfig(topk=3, steps=2))
    monkeypatch.setattr(rc, "STATISTICS_BUDGET_BYTES", 0)
    w_fp, x_fp, x_q = _problem(tokens=100, hidden=64)  # 6 experts x 64^2 float64 x 2 > 100 tokens x 64 float32
    rc.calibrate_router(w_fp, x_fp, x_q, RouterCalibrationConfig(topk=3, steps=2))
    assert chosen == ["statistics", "statistics", "tokens", "tokens"]


def test_ridge_solver_reaches_the_least_squares_optimum() -> None:
    """With a negligible damping the exact solver is ordinary least squares per router row (K = all experts)."""
    w_fp, x_fp, x_q = _problem(tokens=3000, hidden=10, experts=4, noise=0.5)
    config = RouterCalibrationConfig(topk=4, solver="ridge", ridge_dampings=(1e-9,), holdout_fraction=0.0)
    result = calibrate_router(w_fp, x_fp, x_q, config)
    optimum = torch.linalg.lstsq(x_q.double(), (x_fp @ w_fp.T).double()).solution.T
    torch.testing.assert_close(result.weight.double(), optimum, rtol=1e-4, atol=1e-5)


def test_ridge_solver_never_worse_than_the_fp_router_on_held_out() -> None:
    w_fp, x_fp, x_q = _problem(tokens=400, hidden=12, experts=6)
    result = calibrate_router(w_fp, x_fp, x_q, RouterCalibrationConfig(topk=3, solver="ridge"))
    assert result.loss_after <= result.loss_before
    _, _, x_same = _problem(tokens=400, hidden=12, experts=6, noise=0.0)
    unchanged = calibrate_router(w_fp, x_fp, x_same, RouterCalibrationConfig(topk=3, solver="ridge"))
    torch.testing.assert_close(unchanged.weight, w_fp)  # nothing to fix: the solution is the FP router itself
