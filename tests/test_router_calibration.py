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


def _linear_drift_problem(tokens=300, hidden=12, experts=6, drift=0.3, noise=0.2, seed=3):
    """A quantized stream that is a linear distortion of the FP one plus noise: a recalibrated router can undo
    most of the distortion, so the calibration has a clear optimum away from the FP router."""
    g = torch.Generator().manual_seed(seed)
    w_fp = torch.randn(experts, hidden, generator=g)
    x_fp = torch.randn(tokens, hidden, generator=g)
    mix = torch.eye(hidden) + drift * torch.randn(hidden, hidden, generator=g) / hidden**0.5
    return w_fp, x_fp, x_fp @ mix + noise * torch.randn(tokens, hidden, generator=g)


def _held_out_split(n_tokens: int, config: RouterCalibrationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented split: a seeded permutation of the tokens, its first `holdout_fraction` held out."""
    order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(config.seed))[: config.max_tokens]
    n_holdout = int(order.numel() * config.holdout_fraction)
    return order[:n_holdout], order[n_holdout:]


def _reference_adam(w_fp, x_fp, x_q, config: RouterCalibrationConfig) -> tuple[torch.Tensor, int, float, float]:
    """Adam by autograd on the definition of TopK-MSE, keeping the held-out best with the documented patience."""
    target = x_fp @ w_fp.T
    index = target.topk(config.topk, -1).indices
    hold, train = _held_out_split(x_q.shape[0], config)

    def held_out(w):
        return topk_mse(target[hold], x_q[hold] @ w.T, index[hold]).item()

    weight = w_fp.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=config.lr)
    before = best = held_out(w_fp)
    best_weight, best_step = w_fp.clone(), 0
    for step in range(1, config.steps + 1):
        optimizer.zero_grad()
        topk_mse(target[train], x_q[train] @ weight.T, index[train]).backward()
        optimizer.step()
        with torch.no_grad():
            current = held_out(weight)
        if current < best:
            best, best_weight, best_step = current, weight.detach().clone(), step
        elif step - best_step >= config.patience:
            break
    return best_weight, best_step, before, best


@pytest.mark.parametrize("objective", ["tokens", "statistics"])
def test_adam_follows_autograd_on_the_definition_and_keeps_the_held_out_best(objective, monkeypatch) -> None:
    """The whole calibration (split, targets, gradient, Adam steps, early stopping on held-out) against an
    autograd reference; the run is built to stop early (few tokens, high lr) and to improve (drift)."""
    import eacmoe.router_calibration as rc

    steps = []
    real = rc.make_objective

    def counting(*args):  # counts the gradient evaluations, one per Adam step
        made = real(*args)
        loss_and_grad = made.loss_and_grad
        made.loss_and_grad = lambda w: steps.append(1) or loss_and_grad(w)
        return made
    monkeypatch.setattr(rc, "make_objective", counting)
    w_fp, x_fp, x_q = _linear_drift_problem()
    config = RouterCalibrationConfig(topk=3, steps=400, lr=3e-2, patience=20, seed=5, objective=objective,
                                     max_tokens=250)  # a seeded subset of the 300 tokens
    result = calibrate_router(w_fp, x_fp, x_q, config)
    weight, best_step, before, after = _reference_adam(w_fp, x_fp, x_q, config)
    assert 0 < result.best_step == best_step < config.steps - config.patience  # stopped early, after improving
    assert len(steps) == best_step + config.patience  # `patience` steps without an improvement, then it stops
    assert result.loss_before == pytest.approx(before, rel=1e-5)
    assert result.loss_after == pytest.approx(after, rel=1e-5)
    assert result.loss_after < 0.8 * result.loss_before
    torch.testing.assert_close(result.weight, weight, rtol=1e-4, atol=1e-5)


def _reference_ridge(w_fp, x_fp, x_q, config: RouterCalibrationConfig, damping: float) -> torch.Tensor:
    """Per router row: least squares over the training tokens that have the expert in their target top-K, plus
    sqrt(d) (w - w_fp) rows, d = damping x the mean diagonal of that row's X^T X (an augmented lstsq)."""
    target = x_fp @ w_fp.T
    index = target.topk(config.topk, -1).indices
    _, train = _held_out_split(x_q.shape[0], config)
    rows = []
    for e in range(w_fp.shape[0]):
        picked = train[(index[train] == e).any(-1)]
        x, a = x_q[picked].double(), target[picked, e].double()
        d = damping * (x.T @ x).diagonal().mean()
        eye = torch.eye(x.shape[1], dtype=torch.float64)
        aug_x = torch.cat([x, d.sqrt() * eye])
        aug_a = torch.cat([a, d.sqrt() * w_fp[e].double()])
        rows.append(torch.linalg.lstsq(aug_x, aug_a.unsqueeze(-1)).solution.squeeze(-1))
    return torch.stack(rows)


def test_ridge_solver_is_the_damped_least_squares_chosen_on_held_out() -> None:
    w_fp, x_fp, x_q = _linear_drift_problem(tokens=500, seed=2)
    dampings = (1e-3, 3e-1, 30.0)
    config = RouterCalibrationConfig(topk=3, solver="ridge", ridge_dampings=dampings, seed=1)
    result = calibrate_router(w_fp, x_fp, x_q, config)
    target = x_fp @ w_fp.T
    index = target.topk(config.topk, -1).indices
    hold, _ = _held_out_split(x_q.shape[0], config)
    candidates = [_reference_ridge(w_fp, x_fp, x_q, config, d) for d in dampings]
    losses = [topk_mse(target[hold], x_q[hold] @ c.T.float(), index[hold]).item() for c in candidates]
    assert len(set(round(v, 6) for v in losses)) == len(losses)  # the choice matters
    best = min(range(len(losses)), key=losses.__getitem__)
    assert result.loss_before == pytest.approx(topk_mse(target[hold], x_q[hold] @ w_fp.T, index[hold]).item(), rel=1e-5)
    assert result.loss_after == pytest.approx(losses[best], rel=1e-5) and result.loss_after < 0.8 * result.loss_before
    torch.testing.assert_close(result.weight.double(), candidates[best], rtol=1e-4, atol=1e-5)


def test_selection_scores_choose_the_target_experts() -> None:
    """The K targets are the top-K of `selection_scores(W x)` (e.g. DeepSeek-V3's biased sigmoid), not of W x."""
    w_fp, x_fp, x_q = _problem(tokens=400, hidden=10, experts=6, noise=0.4)
    bias = torch.tensor([5.0, 5.0, 5.0, 0.0, 0.0, 0.0])  # experts 0-2 always win the selection
    config = RouterCalibrationConfig(topk=3, steps=30, lr=1e-2)
    result = calibrate_router(w_fp, x_fp, x_q, config, selection_scores=lambda logits: logits.sigmoid() + bias)
    hold, _ = _held_out_split(400, config)
    target = x_fp @ w_fp.T
    index = torch.arange(3).expand(400, 3)
    assert result.loss_before == pytest.approx(topk_mse(target[hold], x_q[hold] @ w_fp.T, index[hold]).item(), rel=1e-5)
    # rows 3-5 are never targets: the calibration has no reason to move them
    assert torch.equal(result.weight[3:], w_fp[3:]) and not torch.equal(result.weight[:3], w_fp[:3])
