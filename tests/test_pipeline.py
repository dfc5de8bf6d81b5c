"""The layer-by-layer QESC pipeline on tiny random models of every supported family.

Each check compares what the pipeline did with something computed independently of it: the quantized model's own
forward (transformers' router and experts, observed through hooks), the FP model built again from the same seed,
or a closed form (GPTQ's Hessian 2 X^T X / n)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from eacmoe.pipeline import LayerwiseQuantizer, QuantizeConfig
from eacmoe.quant import QuantSpec, rtn_quantize
from eacmoe.router_calibration import topk_mse
from tiny_models import FAMILY_NAMES, VOCAB, build

torch.set_num_threads(1)


def calib_ids(n: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def quantize(name: str, method: str = "qesc", bits: int | list[int] = 2, progress_dir=None, stop_after_layer=None, resume=False,
             model=None, group_size: int = 8, router_solver: str = "adam", ids: torch.Tensor | None = None,
             quantizer_class: type[LayerwiseQuantizer] = LayerwiseQuantizer, **config):
    if model is None:
        model, _ = build(name)
    n_layers = len(model.model.layers)
    expert_bits = list(bits) if isinstance(bits, (list, tuple)) else [bits] * n_layers
    cfg = QuantizeConfig(expert_bits=expert_bits, method=method, group_size=group_size, router_steps=20,
                         batch_size=2, router_solver=router_solver, **config)
    q = quantizer_class(model, cfg, progress_dir=progress_dir)
    q.run(calib_ids() if ids is None else ids, resume=resume, stop_after_layer=stop_after_layer)
    return model, q


class RecordingQuantizer(LayerwiseQuantizer):
    """Keeps the Hessian and sample count of the GPTQ solver behind every quantized matrix (None: RTN)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hessians: dict[str, tuple[torch.Tensor, int] | None] = {}

    def _quantize_matrices(self, items, bits, report):
        for name, _weight, solver in items:
            self.hessians[name] = None if solver is None else (solver.H.clone(), solver.nsamples)
        return super()._quantize_matrices(items, bits, report)


def moe_layers(model: nn.Module, adapter) -> list[tuple[int, nn.Module]]:
    blocks = [(i, adapter.moe_block(layer)) for i, layer in enumerate(adapter.decoder_layers(model))]
    return [(i, b) for i, b in blocks if b is not None]


@torch.no_grad()
def observe_moe(model: nn.Module, adapter, ids: torch.Tensor, batch_size: int) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer, what the model's own forward does (in the pipeline's batches): the block input as [T, H] and
    the experts the block's real router picked (the `top_k_index` its fused experts module is called with)."""
    seen: dict[int, dict[str, list]] = {}
    handles = []
    for i, block in moe_layers(model, adapter):
        rec = seen.setdefault(i, {"x": [], "indices": []})
        handles.append(block.register_forward_pre_hook(
            lambda m, args, rec=rec: rec["x"].append(args[0].reshape(-1, args[0].shape[-1]).clone())))
        handles.append(adapter.experts(block).register_forward_pre_hook(
            lambda m, args, rec=rec: rec["indices"].append(args[1].clone())))
    run_with_hooks(model, ids, batch_size, handles)
    return {i: {k: torch.cat(v) for k, v in rec.items()} for i, rec in seen.items()}


def run_with_hooks(model: nn.Module, ids: torch.Tensor, batch_size: int, handles: list) -> None:
    """The model's own forward over `ids` in batches, with the observing hooks removed afterwards."""
    try:
        for start in range(0, ids.shape[0], batch_size):
            model(ids[start:start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def observe_linear_inputs(model: nn.Module, adapter, ids: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """What every Linear GPTQ quantizes outside the routed experts (attention, dense MLPs, shared experts) receives
    in the model's own forward, as [T, in_features], under the pipeline's names ("layers.{i}.{name}")."""
    seen: dict[str, list] = {}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        block = adapter.moe_block(layer)
        groups = adapter.attention_linears(layer) + adapter.dense_mlp_linears(layer)
        if block is not None:
            groups += adapter.shared_experts(block)
        for name, linear in (pair for group in groups for pair in group):
            rec = seen.setdefault(f"layers.{i}.{name}", [])
            handles.append(linear.register_forward_hook(
                lambda m, args, out, rec=rec: rec.append(args[0].reshape(-1, args[0].shape[-1]).clone())))
    run_with_hooks(model, ids, batch_size, handles)
    return {k: torch.cat(v) for k, v in seen.items()}


def hessian(x: torch.Tensor) -> torch.Tensor:
    """GPTQ's Hessian of a Linear that saw the rows of x, by its definition."""
    x = x.double()
    return 2.0 * x.T @ x / x.shape[0]


def assert_hessian(recorded: tuple[torch.Tensor, int] | None, x: torch.Tensor, what: str) -> None:
    assert recorded is not None, f"{what}: quantized without a Hessian"
    h, n = recorded
    assert n == x.shape[0], f"{what}: Hessian of {n} tokens, expected {x.shape[0]}"
    expected = hessian(x)
    torch.testing.assert_close(h.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=what)


def quantized_parameters(model: nn.Module, adapter) -> dict[int, str]:
    """id -> name of every parameter GPTQ replaces: attention, dense MLPs, shared experts, the fused routed experts."""
    names = {id(p): n for n, p in model.named_parameters()}
    ids = set()
    for layer in adapter.decoder_layers(model):
        block = adapter.moe_block(layer)
        groups = adapter.attention_linears(layer) + adapter.dense_mlp_linears(layer)
        if block is not None:
            groups += adapter.shared_experts(block)
            ids |= {id(p) for p in adapter.experts(block).parameters()}
        ids |= {id(linear.weight) for group in groups for _, linear in group}
    return {i: names[i] for i in ids}


def router_names(model: nn.Module, adapter) -> dict[int, str]:
    """Per MoE layer, the router module's name relative to the layer, found from the adapter's accessor."""
    names = {}
    for i, block in moe_layers(model, adapter):
        layer = adapter.decoder_layers(model)[i]
        router = adapter.router(block)
        names[i] = next(n for n, m in layer.named_modules() if m is router)
        assert adapter.router_weight(block) is router.weight
    return names


def expected_quantized_keys(model: nn.Module, adapter) -> set[str]:
    keys = set()
    for i, layer in enumerate(adapter.decoder_layers(model)):
        block = adapter.moe_block(layer)
        groups = adapter.attention_linears(layer) + adapter.dense_mlp_linears(layer)
        if block is not None:
            groups += adapter.shared_experts(block)
            keys |= {f"layers.{i}.mlp.experts.{e}.{p}" for e in range(adapter.num_experts(block))
                     for p in ("gate_proj", "up_proj", "down_proj")}
        keys |= {f"layers.{i}.{name}" for group in groups for name, _ in group}
    return keys


def assert_only_routers_and_quantized_changed(name: str, model: nn.Module, q: LayerwiseQuantizer,
                                              routers_changed: bool) -> None:
    """Against the FP model built again from the same seed: the quantized set is exactly the attention / MLP /
    expert matrices, no router is in it, every router is byte-identical (gptq) or changed in every MoE layer
    (qesc), and every other tensor (norms, embeddings, head, biases, shared-expert gates, buffers) is untouched."""
    fp, adapter = build(name)
    routers = router_names(model, adapter)
    assert routers, "no MoE layer"
    assert set(q.quantized) == expected_quantized_keys(model, adapter)
    for i, router in routers.items():
        assert not any(k == f"layers.{i}.{router}" or k.startswith(f"layers.{i}.{router}.") for k in q.quantized)
    if name.startswith("phimoe"):
        assert set(routers.values()) == {"mlp.router"}
    quantized = set(quantized_parameters(model, adapter).values())
    fp_state = fp.state_dict()
    router_keys = {f"model.layers.{i}.{r}.weight" for i, r in routers.items()}
    for key, value in model.state_dict().items():
        if key in quantized:
            continue
        same = value.dtype == fp_state[key].dtype and torch.equal(value.view(torch.uint8), fp_state[key].view(torch.uint8))
        if key in router_keys and routers_changed:
            assert not same, f"{key}: the calibrated router was not kept"
        else:
            assert same, f"{key} changed"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_full_qesc_run_every_family(name: str) -> None:
    model, q = quantize(name)
    adapter = q.adapter
    n_experts_quantized = 0
    for i, layer in enumerate(adapter.decoder_layers(model)):
        # every attention Linear holds exactly its dequantized grid values
        for group in adapter.attention_linears(layer):
            for lname, linear in group:
                torch.testing.assert_close(linear.weight.data, q.quantized[f"layers.{i}.{lname}"].dequantize(),
                                           rtol=0, atol=0)
        block = adapter.moe_block(layer)
        if block is None:
            continue
        for e in range(adapter.num_experts(block)):
            for proj, w in adapter.expert_weights(block, e).items():
                qw = q.quantized[f"layers.{i}.mlp.experts.{e}.{proj}"]
                assert qw.codes.max() <= 3
                torch.testing.assert_close(w, qw.dequantize(), rtol=0, atol=0)
                n_experts_quantized += 1
        for group in adapter.shared_experts(block):
            for lname, linear in group:
                torch.testing.assert_close(linear.weight.data, q.quantized[f"layers.{i}.{lname}"].dequantize(),
                                           rtol=0, atol=0)
    assert n_experts_quantized > 0
    logits = model(calib_ids(1)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_gptq_keeps_every_router_byte_for_byte(name: str) -> None:
    schedule = [3, 2, 4]  # one expert width per layer; attention at 4 bits
    model, q = quantize(name, method="gptq", bits=schedule)
    assert all(r.router is None for r in q.reports)
    assert_only_routers_and_quantized_changed(name, model, q, routers_changed=False)
    for key, qw in q.quantized.items():  # attention at attn_bits, everything else (dense MLP too) at its layer's
        layer = int(key.split(".")[1])
        assert qw.bits == (4 if ".self_attn." in key else schedule[layer]), key


@pytest.mark.parametrize("name", FAMILY_NAMES)
@torch.no_grad()
def test_hessians_come_from_the_quantized_stream_and_the_calibrated_routing(name: str) -> None:
    """Enough tokens that no expert falls under min_expert_tokens: each expert's gate/up Hessian is 2 X^T X / n over
    exactly the tokens the *calibrated* router of the quantized model sends to it (observed in the model's own
    forward on the quantized stream), and its down_proj Hessian is that of act(X G'^T) * (X U'^T) with its already
    quantized gate and up projections. Every other quantized Linear (attention, dense MLP, shared experts) has the
    Hessian of what it receives in the quantized model's forward (true-sequential: after the groups before it)."""
    ids = calib_ids(32, 32)
    model, q = quantize(name, ids=ids, quantizer_class=RecordingQuantizer)
    adapter, fp = q.adapter, build(name)[0]
    linear_inputs = observe_linear_inputs(model, adapter, ids, q.config.batch_size)
    assert set(linear_inputs) == {k for k in q.quantized if ".mlp.experts." not in k}
    for key, x in linear_inputs.items():
        assert_hessian(q.hessians[key], x, key)
    seen = observe_moe(model, adapter, ids, q.config.batch_size)
    rerouted = 0
    for (i, block), (_, fp_block) in zip(moe_layers(model, adapter), moe_layers(fp, adapter)):
        report = q.reports[i]
        x, indices = seen[i]["x"], seen[i]["indices"]
        assert report.sparse_experts == [], "an expert took the pooled fallback: this test needs more tokens"
        for e in range(adapter.num_experts(block)):
            xe = x[(indices == e).any(-1)]
            assert report.expert_tokens[e] == xe.shape[0]
            prefix = f"layers.{i}.mlp.experts.{e}"
            assert_hessian(q.hessians[f"{prefix}.gate_proj"], xe, f"{prefix}.gate_proj")
            assert_hessian(q.hessians[f"{prefix}.up_proj"], xe, f"{prefix}.up_proj")
            assert_hessian(q.hessians[f"{prefix}.down_proj"], adapter.expert_intermediate(block, e, xe),
                           f"{prefix}.down_proj")
        # the FP router would have sent some tokens elsewhere: the check above can tell the two routings apart
        fp_indices = adapter.route(block, x, router_weight=adapter.router_weight(fp_block)).indices
        rerouted += int((fp_indices.sort(-1).values != indices.sort(-1).values).any(-1).sum())
    assert rerouted > 0
    # QESC re-calibrated every router and changed nothing else outside the quantized matrices
    assert_only_routers_and_quantized_changed(name, model, q, routers_changed=True)


@pytest.mark.parametrize("policy", ["pool", "rtn"])
@torch.no_grad()
def test_sparse_experts_pool_the_layer_or_fall_back_to_rtn(policy: str) -> None:
    """Under min_expert_tokens an expert is quantized on every token of the layer (pool) or with RTN."""
    model, q = quantize("mixtral", quantizer_class=RecordingQuantizer, min_expert_tokens=10**9,
                        sparse_expert_policy=policy)
    fp, adapter = build("mixtral")
    seen = observe_moe(model, adapter, calib_ids(), q.config.batch_size)
    spec = QuantSpec(bits=2, group_size=8)
    for (i, block), (_, fp_block) in zip(moe_layers(model, adapter), moe_layers(fp, adapter)):
        assert q.reports[i].sparse_experts == list(range(adapter.num_experts(block)))
        x = seen[i]["x"]
        for e in range(adapter.num_experts(block)):
            prefix = f"layers.{i}.mlp.experts.{e}"
            if policy == "pool":
                assert_hessian(q.hessians[f"{prefix}.gate_proj"], x, prefix)
                assert_hessian(q.hessians[f"{prefix}.down_proj"], adapter.expert_intermediate(block, e, x), prefix)
            else:
                for proj, w in adapter.expert_weights(fp_block, e).items():
                    assert q.hessians[f"{prefix}.{proj}"] is None
                    assert torch.equal(q.quantized[f"{prefix}.{proj}"].codes, rtn_quantize(w, spec).codes)


def test_min_expert_tokens_is_the_fewest_tokens_an_expert_may_have() -> None:
    """An expert with exactly min_expert_tokens tokens is calibrated on its own; only those with fewer pool. Layer 0's
    token counts do not depend on the threshold (its routing comes before any expert), so they set the boundary."""
    _, first = quantize("mixtral", min_expert_tokens=1)
    counts = first.reports[0].expert_tokens
    threshold = sorted(counts)[len(counts) // 2]
    _, q = quantize("mixtral", min_expert_tokens=threshold)
    assert q.reports[0].expert_tokens == counts
    assert q.reports[0].sparse_experts == [e for e, c in enumerate(counts) if c < threshold]
    assert 0 < len(q.reports[0].sparse_experts) < len(counts)


@pytest.mark.parametrize(("name", "method", "router_solver"), [
    ("mixtral", "qesc", "adam"), ("mixtral", "qesc", "ridge"), ("mixtral", "qesc-mse", "adam"),
    ("deepseek_v3", "qesc", "adam"),  # experts ranked by sigmoid + correction bias, not by the raw logits
])
def test_reported_router_loss_is_the_held_out_topk_mse(name: str, method: str, router_solver: str) -> None:
    """The report's TopK-MSE before/after equals the loss recomputed from the two models' own forwards (FP model:
    targets; quantized model: router inputs) on the held-out tenth of the calibration tokens, and the calibrated
    router is strictly better than the FP one there and on all calibration tokens."""
    ids = calib_ids(16, 32)  # with fewer the ridge solution overfits some layer and the FP router is kept
    model, q = quantize(name, method=method, router_solver=router_solver, ids=ids)
    fp, adapter = build(name)
    seen_q = observe_moe(model, adapter, ids, q.config.batch_size)
    seen_fp = observe_moe(fp, adapter, ids, q.config.batch_size)
    for (i, block), (_, fp_block) in zip(moe_layers(model, adapter), moe_layers(fp, adapter)):
        report = q.reports[i].router
        w_fp, w_cal = adapter.router_weight(fp_block).double(), adapter.router_weight(block).double()
        x_fp, x_q = seen_fp[i]["x"].double(), seen_q[i]["x"].double()
        target = x_fp @ w_fp.T
        top = adapter.selection_scores(fp_block, target).topk(report["topk"], dim=-1).indices
        k = adapter.num_experts(block) if method == "qesc-mse" else adapter.default_calibration_topk(block)
        assert report["topk"] == k
        # the held-out tokens: the first tenth of the calibration's seeded permutation (seed + layer index)
        order = torch.randperm(x_q.shape[0], generator=torch.Generator().manual_seed(q.config.seed + i))
        hold = order[: x_q.shape[0] // 10]
        before = topk_mse(target[hold], x_q[hold] @ w_fp.T, top[hold]).item()
        after = topk_mse(target[hold], x_q[hold] @ w_cal.T, top[hold]).item()
        assert report["loss_before"] == pytest.approx(before, rel=1e-4)
        assert report["loss_after"] == pytest.approx(after, rel=1e-4)
        assert after < 0.99 * before
        assert topk_mse(target, x_q @ w_cal.T, top) < topk_mse(target, x_q @ w_fp.T, top)


def test_same_seed_gives_bit_identical_weights() -> None:
    a, _ = quantize("qwen2_moe")
    b, _ = quantize("qwen2_moe")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_kill_after_layer_then_resume_is_identical(tmp_path) -> None:
    full, _ = quantize("deepseek_v3")
    progress = tmp_path / "progress"
    quantize("deepseek_v3", progress_dir=progress, stop_after_layer=0)   # "crash" after layer 0
    assert (progress / "state.json").exists()
    resumed, q = quantize("deepseek_v3", progress_dir=progress, resume=True)
    assert [r.layer for r in q.reports] == list(range(len(resumed.model.layers)))
    for (na, pa), (_, pb) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(pa, pb), na


def test_rtn_needs_no_data_and_is_on_grid() -> None:
    model, q = quantize("olmoe", method="rtn", bits=3)
    experts = [qw for n, qw in q.quantized.items() if ".experts." in n]
    attention = [qw for n, qw in q.quantized.items() if ".self_attn." in n]
    assert experts and attention
    assert all(qw.bits == 3 and qw.codes.max() <= 7 for qw in experts)
    assert all(qw.bits == 4 and qw.codes.max() <= 15 for qw in attention)
    assert max(qw.codes.max() for qw in experts) == 7  # the grid is used to its full range


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_advance_from_the_captured_block_input_equals_the_layers_own_forward(name: str) -> None:
    # The stream advances as residual + block(norm output) captured before the experts were quantized, instead
    # of running attention again: it must be what the decoder layer's own forward returns, bit for bit.
    from eacmoe.adapters import get_adapter
    from eacmoe.pipeline import advance_from_block, capture_block_input, capture_layer_inputs, run_layer

    model, _ = build(name)
    adapter, cpu = get_adapter(model), torch.device("cpu")
    stream, layer_kwargs = capture_layer_inputs(model, adapter, calib_ids(n=3), 2, cpu)
    checked = 0
    for layer in adapter.decoder_layers(model):
        expected = run_layer(layer, stream, layer_kwargs, 2, cpu)
        if adapter.moe_block(layer) is not None:
            residual, block_input = capture_block_input(layer, adapter, stream, layer_kwargs, 2, cpu)
            assert torch.equal(advance_from_block(layer, adapter, residual, block_input, 2, cpu), expected)
            checked += 1
        stream = expected
    assert checked >= 1


class OneMatrixAtATime(LayerwiseQuantizer):
    loop_rows = 1


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_shared_column_loops_give_what_one_matrix_at_a_time_gives(name: str, monkeypatch) -> None:
    from eacmoe import pipeline

    loops: list[int] = []
    original = pipeline.quantize_together
    monkeypatch.setattr(pipeline, "quantize_together", lambda s, w, spec: loops.append(len(w)) or original(s, w, spec))
    _, batched = quantize(name, method="gptq")
    batched_loops, loops[:] = list(loops), []
    _, alone = quantize(name, method="gptq", quantizer_class=OneMatrixAtATime)
    assert set(loops) == {1} and max(batched_loops) > 2  # experts and q/k/v did share loops
    assert batched.quantized.keys() == alone.quantized.keys()
    for key, qw in batched.quantized.items():
        other = alone.quantized[key]
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(qw, field), getattr(other, field)), (key, field)
    assert batched.reports[0].gptq_loss == alone.reports[0].gptq_loss


def test_a_group_of_linears_must_share_its_input() -> None:
    # One Hessian serves a group (q, k, v): an adapter grouping Linears with different inputs is an error, not a
    # silently wrong Hessian.
    from eacmoe.pipeline import _StopForward, collect_hessians

    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    x = torch.randn(5, 8)

    def same_input():
        try:
            a(x), b(x.clone())  # equal values, another tensor
        except _StopForward:
            pass

    def different_inputs():
        a(x), b(x + 1)

    solvers = collect_hessians([("a", a), ("b", b)], same_input)
    assert solvers["a"] is solvers["b"] and solvers["a"].nsamples == 5
    torch.testing.assert_close(solvers["a"].H, 2 * x.T @ x / 5)
    with pytest.raises(RuntimeError, match="does not see the same input"):
        collect_hessians([("a", a), ("b", b)], different_inputs)
