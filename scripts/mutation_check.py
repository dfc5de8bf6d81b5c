"""Mutation check: seed one plausible bug at a time into a private copy of the project and run the tests that
should catch it. Prints a markdown table (the last full run is in docs/MUTATIONS.md).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_check.py                  # every mutant (about 15 min on one core)
    .venv/bin/python scripts/mutation_check.py --list                             # ids, files, tests; runs nothing
    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_check.py --only P1 E1     # ids, or file name fragments
    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_check.py --out /tmp/mutations.md   # the table, also as a file

The working tree is never written to: the project (COPIED below) is copied once to a temporary directory; for each
mutant one exact snippet of one file is replaced there (it must occur exactly once, else the mutant is reported
"stale": the code moved on and the mutant needs updating), the mutant's tests run in the copy (`pytest -x -q`,
PYTHONPATH = the copy, so `import eacmoe` is the mutated one; checked before the run), and the file is restored.

Adding mutants: append `Mutant(id, file, old, new, description, tests)` to MUTANTS (or to a list you add to it);
`tests` are pytest arguments (files or node ids), the narrowest set that should catch the bug. A mutant known
to survive gets a `survivor` note saying why it is harmless (equivalent, or not observable); the run reports any
unexpected survivor or unexpected kill.
"""
from __future__ import annotations

import argparse
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("eacmoe", "tests", "eval", "calibration", "scripts", "pyproject.toml",
          # the committed sensitivity files some allocation tests read
          "docs/eval/tiny-mixtral/sensitivity/sensitivity.json", "docs/eval/tiny-qwen-moe/sensitivity/sensitivity.json")

PIPELINE_TESTS = ("tests/test_pipeline.py",)
SPARSE_TESTS = ("tests/test_sparse_experts.py",
                "tests/test_pipeline.py::test_sparse_experts_pool_the_layer_or_fall_back_to_rtn",
                "tests/test_pipeline.py::test_min_expert_tokens_is_the_fewest_tokens_an_expert_may_have")
ROUTER_TESTS = ("tests/test_router_calibration.py", "tests/test_pipeline.py")
SHIFT_TESTS = ("tests/test_expert_shift.py",)
PACKING_TESTS = ("tests/test_packing.py", "tests/test_export.py::test_generate_after_load")
GPTQ_TESTS = ("tests/test_gptq.py",)
GRID_TESTS = ("tests/test_grid.py", "tests/test_gptq.py")
MSE_GRID_TESTS = ("tests/test_mse_grid.py",)
PESF_TESTS = ("tests/test_pesf.py", "tests/test_pesf_padding.py")
RUNTIME_TESTS = ("tests/test_export.py", "tests/test_packing.py", "tests/test_pesf_padding.py::test_packed_alone_equals_padded_in_batch")


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str            # relative to the project root
    old: str             # exact snippet, must occur exactly once in the file
    new: str
    description: str
    tests: tuple[str, ...]
    survivor: str = ""   # why it is harmless, for a mutant known to survive


P, R, E, K, G, Q = "eacmoe/pipeline.py", "eacmoe/router_calibration.py", "eacmoe/expert_shift.py", \
    "eacmoe/quant/packing.py", "eacmoe/quant/gptq.py", "eacmoe/quant/grid.py"
S, T = "eacmoe/pesf.py", "eacmoe/runtime/packed_modules.py"
X, D = "eacmoe/sparse_experts.py", "eacmoe/adapters/deepseek.py"

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ pipeline (QESC order, routing, Hessians)
    Mutant("P1", P, "routing = adapter.route(block, expert_input)\n",
           "routing = adapter.route(block, expert_input)\n"
           "                    routing.indices = routing.indices[torch.randperm(routing.indices.shape[0])]\n",
           "issue #11 bug (a): experts quantized on a random token-to-expert assignment", PIPELINE_TESTS),
    Mutant("P2", P, "router_weight.data.copy_(result.weight)", "pass",
           "issue #11 bug (b): the calibrated router weight thrown away (FP router kept)", PIPELINE_TESTS),
    Mutant("P3", P, "routing = adapter.route(block, expert_input)\n",
           "routing = adapter.route(block, expert_input, router_weight=None if fp_layer is None else\n"
           "                                            adapter.router_weight(adapter.moe_block(fp_layer)))\n",
           "experts routed by the FP router while the calibrated one is kept", PIPELINE_TESTS),
    Mutant("P4", P, "adapter.router_input(block, router_input_fp), adapter.router_input(block, expert_input)",
           "adapter.router_input(block, expert_input), adapter.router_input(block, router_input_fp)",
           "FP and quantized streams swapped in the router calibration", PIPELINE_TESTS),
    Mutant("P5", P, "residual, expert_input = capture_block_input(layer, adapter, q_stream,",
           "residual, expert_input = capture_block_input(layer, adapter, q_stream if fp_stream is None else fp_stream,",
           "experts (and the router input) taken from the FP stream instead of the quantized one", PIPELINE_TESTS),
    Mutant("P6", P, "token_index = (routing.indices == e).any(dim=-1)",
           "token_index = (routing.indices[:, :1] == e).any(dim=-1)",
           "an expert gets only the tokens that chose it first (top-1), not all of its top-k tokens", PIPELINE_TESTS),
    Mutant("P7", P, "token_index = (routing.indices == e).any(dim=-1)",
           "token_index = (routing.indices == (e + 1) % num_experts).any(dim=-1)",
           "off by one expert: expert e quantized on expert e+1's tokens", PIPELINE_TESTS),
    Mutant("P8", X, "if token_index.numel() >= self.threshold(input_width, layer):",
           "if token_index.numel() > self.threshold(input_width, layer):",
           "sparse-expert threshold off by one (< becomes <=)", SPARSE_TESTS),
    Mutant("P9", P, "use_rtn, token_index, row_weights = chosen.rtn, chosen.token_index, chosen.row_weights",
           "use_rtn, row_weights = chosen.rtn, chosen.row_weights",
           "pool policy keeps the sparse expert's own few tokens (the pipeline ignores the policy's rows)",
           SPARSE_TESTS),
    Mutant("P10", X, "_RTN = ExpertTokens(sparse=True, rtn=True,", "_RTN = ExpertTokens(sparse=True, rtn=False,",
           "rtn policy ignored (sparse experts quantized by GPTQ on their few tokens)", SPARSE_TESTS),
    Mutant("P11", P, "act(x.to(gate_q.dtype) @ gate_q.T) * (x.to(up_q.dtype) @ up_q.T)",
           "act(x.to(gate_q.dtype) @ weights[\"gate_proj\"].T) * (x.to(up_q.dtype) @ weights[\"up_proj\"].T)",
           "down_proj Hessian from the FP gate/up instead of the quantized ones", PIPELINE_TESTS),
    Mutant("P12", P, "act(x.to(gate_q.dtype) @ gate_q.T) * (x.to(up_q.dtype) @ up_q.T)",
           "(x.to(gate_q.dtype) @ gate_q.T) * (x.to(up_q.dtype) @ up_q.T)",
           "activation dropped from the down_proj input", PIPELINE_TESTS),
    Mutant("P13", P, "[(names[e][k], weights[k], solver) for (e, weights, _t, _w, _b), solver in zip(batch, down_solvers)",
           "[(names[e][k], weights[k], None) for (e, weights, _t, _w, _b), solver in zip(batch, down_solvers)",
           "down_proj quantized with RTN (its Hessian dropped)", PIPELINE_TESTS),
    Mutant("P14", P, "[(names[e][k], weights[k], solver) for (e, weights, _t, _w, _b), solver in zip(batch, solvers)",
           "[(names[e][k], weights[k], solver if k == \"gate_proj\" else None)\n"
           "                 for (e, weights, _t, _w, _b), solver in zip(batch, solvers)",
           "up_proj quantized with RTN", PIPELINE_TESTS),
    Mutant("P15", P, "adapter.attention_linears(layer), cfg.attn_bits, run_stream, report)",
           "adapter.attention_linears(layer), cfg.expert_bits[index], run_stream, report)",
           "attention quantized at the expert bit width", PIPELINE_TESTS),
    Mutant("P16", P, "q_stream = run_layer(layer, q_stream,", "q_stream = run_layer(fp_layer or layer, q_stream,",
           "quantized stream advanced through the FP copy of the layer", PIPELINE_TESTS),
    Mutant("P17", P, "fp_stream = run_layer(fp_layer, fp_stream,", "fp_stream = run_layer(layer, fp_stream,",
           "FP stream advanced through the quantized layer", PIPELINE_TESTS),
    Mutant("P18", P, "fp_layer = copy.deepcopy(layer) if needs_fp else None", "fp_layer = layer if needs_fp else None",
           "FP layer not copied (it is quantized along with the layer)", PIPELINE_TESTS),
    Mutant("P19", P, "                x = x.detach()\n", "                x = x[:1].detach()\n",
           "attention Hessians from the first sequence of each batch only", PIPELINE_TESTS),
    Mutant("P20", P, "                fired.clear()\n", "",
           "group pass stops after the first Linear once every Linear fired (fired set never reset)", PIPELINE_TESTS),
    Mutant("P21", P, "hidden = expert_input[start:start + cfg.batch_size * 512]",
           "hidden = expert_input[start:start + cfg.batch_size]",
           "shared experts calibrated on a fraction of the tokens", PIPELINE_TESTS),
    Mutant("P22", P, "seed=cfg.seed + index)", "seed=cfg.seed)",
           "router held-out split not reseeded per layer", PIPELINE_TESTS),
    Mutant("P23", P, "topk = num_experts if cfg.method == \"qesc-mse\" else",
           "topk = num_experts if cfg.method != \"qesc-mse\" else",
           "qesc and qesc-mse K swapped (TopK-MSE becomes plain MSE)", PIPELINE_TESTS),
    Mutant("P24", P, "selection_scores=lambda logits: adapter.selection_scores(block, logits))",
           "selection_scores=None)",
           "router targets ranked by raw logits, not the family's selection scores (DeepSeek-V3 bias)", PIPELINE_TESTS),
    Mutant("P25", P, "needs_fp = cfg.method in (\"qesc\", \"qesc-mse\")", "needs_fp = cfg.method in (\"qesc\",)",
           "qesc-mse skips the router calibration", PIPELINE_TESTS),
    Mutant("P30", P, "q_stream = advance_from_block(layer, adapter, residual, expert_input,",
           "q_stream = advance_from_block(layer, adapter, torch.zeros_like(residual), expert_input,",
           "quantized stream advanced without the layer's residual (attention output dropped)", PIPELINE_TESTS),
    Mutant("P31", P, "fp_stream = advance_from_block(fp_layer, adapter, residual_fp,",
           "fp_stream = advance_from_block(layer, adapter, residual_fp,",
           "FP stream advanced through the (partly quantized) layer's block", PIPELINE_TESTS),
    Mutant("P32", P, "        per_batch = max(1, self.loop_rows // min(",
           "        per_batch = 2 * max(1, self.loop_rows // min(",
           "an expert batch larger than its loops (harmless: loops are still bounded; results identical)",
           PIPELINE_TESTS, survivor="equivalent: the batch size only bounds how many Hessians exist at once"),
    Mutant("P26", P, "residual_fp, router_input_fp = capture_block_input(fp_layer, adapter, fp_stream, layer_kwargs,",
           "residual_fp, router_input_fp = capture_block_input(fp_layer, adapter, q_stream, layer_kwargs,",
           "router targets computed from the quantized stream (through the FP layer)", PIPELINE_TESTS),
    Mutant("P27", P, "adapter.dense_mlp_linears(layer), cfg.expert_bits[index],",
           "adapter.dense_mlp_linears(layer), cfg.attn_bits or cfg.expert_bits[index],",
           "dense MLP layers quantized at the attention bit width", PIPELINE_TESTS),
    Mutant("P28", P, "expert_bits = cfg.expert_bits_for(report.layer, e)",
           "expert_bits = cfg.expert_bits_for(0, e)",
           "routed experts of every layer at the first layer's bit width (bit schedule ignored)", PIPELINE_TESTS),
    Mutant("P29", P, "if solver is None or self.config.method == \"rtn\":", "if solver is None:",
           "RTN chosen only by a missing solver", PIPELINE_TESTS,
           survivor="equivalent: with method rtn no solver is ever built, so the second condition is redundant"),
    # ------------------------------------------------------------------ sparse-expert policies (sparse_experts.py)
    Mutant("X1", X, "(GPTQMODEL_FALLBACK_PERCENT / 100.0) * float(layer.total_tokens)",
           "(GPTQMODEL_FALLBACK_PERCENT / 1000.0) * float(layer.total_tokens)",
           "GPTQModel's 0.5% read as 0.05%", SPARSE_TESTS),
    Mutant("X2", X, "(GPTQMODEL_FALLBACK_PERCENT / 100.0) * float(layer.total_tokens)",
           "round((GPTQMODEL_FALLBACK_PERCENT / 100.0) * float(layer.total_tokens))",
           "GPTQModel's threshold rounded to whole tokens (5.12 -> 5: an expert with 5 of 1024 keeps GPTQ)",
           SPARSE_TESTS),
    Mutant("X3", X, "    def threshold(self, input_width: int, layer: LayerRouting) -> float:\n        return (GPTQ",
           "    def _threshold(self, input_width: int, layer: LayerRouting) -> float:\n        return (GPTQ",
           "gptqmodel policy uses --min-expert-tokens instead of its 0.5% rule", SPARSE_TESTS),
    Mutant("X4", X, "row_weights=layer.expert_probabilities()[:, expert].float())", "row_weights=None)",
           "weighted-pool weights not applied (plain pool)", SPARSE_TESTS),
    Mutant("X5", X, "row_weights=layer.expert_probabilities()[:, expert].float())",
           "row_weights=layer.expert_probabilities()[:, (expert + 1) % layer.routing.logits.shape[-1]].float())",
           "weighted-pool weighted by the next expert's probabilities", SPARSE_TESTS),
    Mutant("X6", X, "row_weights=layer.hessian.routed_weights(layer.routing, expert, token_index))",
           "row_weights=None)", "kept experts lose their --expert-hessian weights",
           SPARSE_TESTS + ("tests/test_expert_hessian.py",)),
    Mutant("X7", P, "layer_routing = LayerRouting(routing, expert_input.shape[0],",
           "layer_routing = LayerRouting(routing, expert_input.shape[0] // 2,",
           "the pipeline passes half the calibration token count (GPTQModel's threshold halves)", SPARSE_TESTS),
    Mutant("X8", D, "        return logits.float().sigmoid()\n",
           "        return torch.softmax(logits, dim=-1, dtype=torch.float32)\n",
           "DeepSeek-V3 expert probabilities as a softmax instead of its sigmoid scores", SPARSE_TESTS),
    # ------------------------------------------------------------------ router calibration
    Mutant("R1", R, "target_index = ranking.topk(config.topk, dim=-1).indices",
           "target_index = ranking.topk(config.topk, dim=-1, largest=False).indices",
           "TopK targets are the K lowest-ranked experts", ROUTER_TESTS),
    Mutant("R2", R, "ranking = target if selection_scores is None else selection_scores(target)", "ranking = target",
           "selection_scores ignored", ROUTER_TESTS),
    Mutant("R3", R, "hold, train = slice(0, n_holdout), slice(n_holdout, n_tokens)",
           "train, hold = slice(0, n_holdout), slice(n_holdout, n_tokens)", "held-out and training tokens swapped",
           ROUTER_TESTS),
    Mutant("R4", R, "n_holdout = int(n_tokens * config.holdout_fraction)",
           "n_holdout = int(n_tokens * config.holdout_fraction) + 1", "held-out split off by one token", ROUTER_TESTS),
    Mutant("R5", R, "elif step - best_step >= config.patience:", "elif step - best_step > config.patience:",
           "early stopping one step later", ROUTER_TESTS),
    Mutant("R6", R, "best_loss, best_weight, best_step = current, weight.clone(), step",
           "best_loss, best_weight, best_step = current, weight, step",
           "best weight aliased to the live Adam weight (later steps overwrite it)", ROUTER_TESTS),
    Mutant("R7", R, "loss_before = best_loss = hold_objective.loss(w_fp)",
           "loss_before = best_loss = train_objective.loss(w_fp)", "loss_before measured on the training tokens",
           ROUTER_TESTS),
    Mutant("R8", R, "            current = hold_objective.loss(weight)\n",
           "            current = train_objective.loss(weight)\n", "Adam steps selected on the training loss",
           ROUTER_TESTS),
    Mutant("R9", R, "return self.scale * residual.pow(2).sum().item(), (2 * self.scale) * (residual.T @ self.x)",
           "return self.scale * residual.pow(2).sum().item(), -(2 * self.scale) * (residual.T @ self.x)",
           "token objective: gradient sign flipped", ROUTER_TESTS),
    Mutant("R10", R, "self.target = target_logits * self.mask", "self.target = target_logits",
           "token objective: targets outside the top-K not masked", ROUTER_TESTS),
    Mutant("R11", R, "            self.target_energy += a_i.pow(2).sum()\n", "",
           "statistics objective: constant term dropped (same gradient, wrong loss values)", ROUTER_TESTS),
    Mutant("R12", R, "((2 * self.scale) * (hw - self.cross))", "((2 * self.scale) * (hw + self.cross))",
           "statistics objective: wrong sign of the cross term in the gradient", ROUTER_TESTS),
    Mutant("R13", R, "d = damping * diag_mean + 1e-12", "d = damping + 1e-12",
           "ridge: absolute instead of relative damping", ROUTER_TESTS),
    Mutant("R14", R, "rhs = self.cross + d[:, None] * weight_fp.double()", "rhs = self.cross",
           "ridge: damped toward 0 instead of toward the FP router", ROUTER_TESTS),
    Mutant("R15", R, "order = torch.randperm(router_input_q.shape[0], generator=generator)[: config.max_tokens]",
           "order = torch.randperm(router_input_q.shape[0], generator=generator)",
           "max_tokens subset ignored", ROUTER_TESTS),
    Mutant("R16", R, "kind = \"statistics\" if statistics_bytes <= max(STATISTICS_BUDGET_BYTES, n_tokens * hidden * 4) "
           "else \"tokens\"", "kind = \"tokens\" if statistics_bytes <= max(STATISTICS_BUDGET_BYTES, n_tokens * hidden * 4) "
           "else \"statistics\"", "auto objective choice inverted", ROUTER_TESTS),
    # ------------------------------------------------------------------ expert shift (2x2 table)
    Mutant("E1", E, "routing = forced if forced is not None else adapter.route(block, hidden)",
           "routing = adapter.route(block, hidden)",
           "issue #11 bug (c): forced routing ignored in the 2x2 table", SHIFT_TESTS),
    Mutant("E2", E, "with routed_block(adapter, fp_block, q_routing[0], []):",
           "with routed_block(adapter, fp_block, fp_routing, []):", "fp/q stream given the FP routing", SHIFT_TESTS),
    Mutant("E3", E, "with routed_block(adapter, q_block, fp_routing, []):",
           "with routed_block(adapter, q_block, q_routing[0], []):", "oracle q/fp given the quantized routing",
           SHIFT_TESTS),
    Mutant("E4", E, "return fp_indices.shape[-1] - kept", "return kept",
           "change counts return the kept experts instead of the changed ones", SHIFT_TESTS),
    Mutant("E5", E, "\"half\": (2 * c >= k)", "\"half\": (2 * c > k)", "rate 'half' needs more than half changed",
           SHIFT_TESTS),
    Mutant("E6", E, "kl[name] += (p_fp * (logprobs[\"fp/fp\"] - logprobs[name])).sum().item()",
           "kl[name] += (logprobs[name].exp() * (logprobs[name] - logprobs[\"fp/fp\"])).sum().item()",
           "KL measured in the reverse direction", SHIFT_TESTS),
    Mutant("E7", E, "run(q_layer, \"q/q\")", "run(fp_layer, \"q/q\")", "q/q stream run through the FP layer",
           SHIFT_TESTS),
    Mutant("E8", E, "logits = model.get_output_embeddings()(h)[:, :-1]", "logits = model.get_output_embeddings()(h)[:, 1:]",
           "logits and next-token targets misaligned", SHIFT_TESTS),
    Mutant("E9", E, "reference.batch_size != batch_size or not torch.equal(reference.input_ids, input_ids)",
           "reference.batch_size != batch_size and not torch.equal(reference.input_ids, input_ids)",
           "a reference of other inputs accepted", SHIFT_TESTS),
    Mutant("E10", E, "model = fp_model if name.startswith(\"fp\") else q_model",
           "model = fp_model if name.endswith(\"fp\") else q_model", "head of the other model for the mixed streams",
           SHIFT_TESTS,
           survivor="equivalent: eacmoe quantizes decoder layers only, so the FP and quantized models share the same "
                    "final norm and head values"),
    # ------------------------------------------------------------------ packing (GPTQ checkpoint layout)
    Mutant("K1", K, "            out[:, word + 1] += value >> (bits - spill)\n",
           "            out[:, word + 1] += value >> spill\n", "3-bit straddling values: wrong high-bit shift",
           PACKING_TESTS),
    Mutant("K2", K, "return _to_int32_words(qzeros_v2.to(torch.int64) - _v1_offset_constant(bits))",
           "return _to_int32_words(qzeros_v2.to(torch.int64) + _v1_offset_constant(bits))",
           "v1 zero points stored plus one instead of minus one", PACKING_TESTS),
    Mutant("K3", K, "return sum(1 << (bits * j) for j in range(WORD_BITS // bits))",
           "return sum(1 << (bits * j) for j in range(WORD_BITS // bits - 1))",
           "v1 offset constant misses the top field (round trip still exact)", PACKING_TESTS),
    Mutant("K4", K, "return pack_cols((zeros - 1) & 0x7, bits)", "return pack_cols(zeros & 0x7, bits)",
           "3-bit v1 zero points not decremented", PACKING_TESTS),
    Mutant("K5", K, "shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=packed.device)",
           "shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=packed.device).flip(0)",
           "unpack reads the fields of a word in reverse order", PACKING_TESTS),
    Mutant("K6", K, "return -(-num_values * bits // WORD_BITS)", "return num_values * bits // WORD_BITS",
           "packed length rounded down instead of up", PACKING_TESTS),
    Mutant("K7", K, "    if bits == 3 and num_values % block != 0:\n",
           "    if False and bits == 3 and num_values % block != 0:\n",
           "3-bit packing of a partial block accepted", PACKING_TESTS),
    Mutant("K8", K, "g_idx = torch.arange(in_features, dtype=torch.int32) // width",
           "g_idx = torch.arange(in_features, dtype=torch.int32) // max(group_size, 1)",
           "rebuilt g_idx ignores per-channel groups (group_size -1)", PACKING_TESTS),
    Mutant("K9", K, "return torch.where(words >= (1 << 31), words - (1 << WORD_BITS), words).to(torch.int32)",
           "return torch.where(words > (1 << 31), words - (1 << WORD_BITS), words).to(torch.int32)",
           "int32 wrap boundary off by one", PACKING_TESTS,
           survivor="equivalent here: the only affected word, 2**31, is then wrapped by torch's int64 -> int32 cast "
                    "(-2**31, the same bit pattern); the explicit wrap only avoids relying on that cast"),
    Mutant("K10", K, "scales = qw.scales.T.contiguous().to(torch.float16)",
           "scales = qw.scales.T.contiguous().to(torch.bfloat16).to(torch.float16)",
           "scales rounded through bfloat16", PACKING_TESTS),
    # ------------------------------------------------------------------ GPTQ solver
    Mutant("G1", G, "        self._H.mul_(self._nsamples / total)\n", "",
           "running-mean Hessian: old mean not rescaled", GPTQ_TESTS),
    Mutant("G2", G, "scale = math.sqrt(2.0 / total)", "scale = math.sqrt(1.0 / total)",
           "Hessian without the factor 2", GPTQ_TESTS),
    Mutant("G3", G, "            damp_t = frac * diag_mean\n", "            damp_t = frac + 0 * diag_mean\n",
           "absolute instead of relative damping", GPTQ_TESTS),
    Mutant("G4", G, "W1T[:, i + 1 :].add_(Z1[:, i, i + 1 :].unsqueeze(2) * resid.unsqueeze(1))",
           "W1T[:, i + 1 :].sub_(Z1[:, i, i + 1 :].unsqueeze(2) * resid.unsqueeze(1))", "OBS update with the wrong sign",
           GPTQ_TESTS),
    Mutant("G5", G, "            out = out + W[:, :, :i1] @ Z[:, :i1, c0:c1]\n", "            pass\n",
           "lazy feedback of earlier blocks dropped", GPTQ_TESTS),
    Mutant("G6", G, "solver_codes[:, perm] = codes[b]", "solver_codes = codes[b].clone()",
           "act-order codes not permuted back", GPTQ_TESTS),
    Mutant("G7", G, "            W[b][:, dead] = 0.0\n", "            pass\n",
           "dead columns not zeroed", GPTQ_TESTS),
    Mutant("G8", G, "losses[:, :, i1:i2] = err.square_().div_(2).transpose(1, 2)",
           "losses[:, :, i1:i2] = err.square_().transpose(1, 2)", "reported loss twice the documented value", GPTQ_TESTS),
    Mutant("G11", G, "                part = original + torch.linalg.solve_triangular(\n",
           "                part = partial + 0 * torch.linalg.solve_triangular(\n",
           "group grids fitted on the loop's partial sums instead of GPTQ's updated weights", GPTQ_TESTS),
    Mutant("G12", G, "float(pivots.min()) >= floor", "float(pivots.min()) >= 0",
           "pivots lost in fp32 rounding accepted (no damping escalation)", GPTQ_TESTS),
    Mutant("G9", G, "perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)",
           "perm = torch.argsort(torch.diagonal(H), descending=False, stable=True)",
           "act-order processes the least important columns first", GPTQ_TESTS),
    Mutant("G10", G, "        self._factor = None  # the Hessian changes: a cached factorisation no longer applies\n",
           "", "cached Cholesky factor kept after add_batch changed the Hessian", GPTQ_TESTS),
    # ------------------------------------------------------------------ grids
    Mutant("Q1", Q, "return torch.minimum(w.amin(dim=-1), zeros_), torch.maximum(", "return w.amin(dim=-1), torch.maximum(",
           "asymmetric range need not contain 0", GRID_TESTS),
    Mutant("Q2", Q, "below = half.float() < scale", "below = half.float() <= scale",
           "fp16 scales bumped up even when exact", GRID_TESTS),
    Mutant("Q3", Q, "return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)",
           "return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq - 1)", "top code never used",
           GRID_TESTS),
    Mutant("Q4", Q, "zero = torch.round(-xmin / scale).clamp_(0, maxq)", "zero = torch.floor(-xmin / scale).clamp_(0, maxq)",
           "zero point truncated instead of rounded", GRID_TESTS),
    Mutant("Q5", Q, "            err.mul_(column_weight)\n", "            pass\n",
           "--grid mse ignores the columns' loss factors", MSE_GRID_TESTS),
    Mutant("Q6", Q, "        better = err < best_err\n", "        better = err > best_err\n",
           "--grid mse keeps the worst range", MSE_GRID_TESTS),
    Mutant("Q7", G, "scale, zero = spec.fit(part, r[:, j:g_end].unsqueeze(1).square())",
           "scale, zero = spec.fit(part)", "GPTQ's grid search without the loss factors", MSE_GRID_TESTS),
    # ------------------------------------------------------------------ PESF (prefill expert skipping)
    Mutant("S1", S, "return counts >= alpha * seq_len * top_k / counts.shape[-1]",
           "return counts > alpha * seq_len * top_k / counts.shape[-1]",
           "an expert exactly at the threshold is skipped", PESF_TESTS),
    Mutant("S2", S, "lengths = real.sum(dim=1)", "lengths = torch.full((batch,), seq_len, device=real.device)",
           "threshold from the padded length", PESF_TESTS),
    Mutant("S3", S, "index = torch.where(real[:, :, None].to(index.device), index, torch.full_like(index, num_experts))",
           "index = index", "pad tokens counted", PESF_TESTS),
    Mutant("S4", S, "top_k_weights.sum(dim=-1, keepdim=True) / kept_sum.clamp_min(1e-30)",
           "kept_sum / top_k_weights.sum(dim=-1, keepdim=True).clamp_min(1e-30)",
           "renormalisation scale inverted", PESF_TESTS),
    Mutant("S5", S, 'chunk["real"] = None if real is None else real[:, -seq_len:]',
           'chunk["real"] = None if real is None else real[:, :seq_len]',
           "with a KV cache, the oldest mask columns are used", PESF_TESTS),
    Mutant("S6", S, "padded_keep = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)",
           "padded_keep = torch.cat([keep, torch.ones_like(keep[:, :1])], dim=1)",
           "an already dropped slot counts as kept", PESF_TESTS,
           survivor="equivalent: index num_experts only ever comes with weight 0 (no router emits it), so keeping "
                    "the slot keeps index num_experts and weight 0"),
    Mutant("S7", S, "prefilled = lengths > 1", "prefilled = lengths > 0",
           "a one-token sequence (decode inside a batch) is pruned", PESF_TESTS),
    # ------------------------------------------------------------------ packed runtime
    Mutant("T1", T, "out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))",
           "out.index_add_(0, token_idx, (y * top_k_weights[token_idx, 0, None]).to(out.dtype))",
           "every slot weighted with the first slot's weight", RUNTIME_TESTS),
    Mutant("T2", T, "if e >= self.num_experts:  # dropped slot", "if e > self.num_experts:  # dropped slot",
           "a dropped slot (PESF) is run as an expert", RUNTIME_TESTS),
    Mutant("T3", T, "tile.sub_(zeros[g]).mul_(scales[g])",
           "tile.sub_(zeros[g] - 1).mul_(scales[g])",
           "zero point off by one (the v1/v2 confusion)", RUNTIME_TESTS),
    Mutant("T4", T, "gate, up = F.linear(x, gate_up).chunk(2, dim=-1)", "up, gate = F.linear(x, gate_up).chunk(2, dim=-1)",
           "gate and up projections swapped", RUNTIME_TESTS),
    Mutant("T5", T, "group = self.g_idx.long()", "group = torch.arange(self.in_features) // max(self.group_size, 1)",
           "g_idx ignored (breaks act-order checkpoints)", RUNTIME_TESTS),
]

# --------------------------------------------------------------- --per-expert-bits (tests/test_per_expert_bits.py)
BA, PER_EXPERT_TESTS = "eacmoe/bit_allocation.py", ("tests/test_per_expert_bits.py", "-k", "not committed and not gptqmodel")
PER_EXPERT_MUTANTS = [
    Mutant("PE1", P, "expert_bits = cfg.expert_bits_for(report.layer, e)",
           "expert_bits = cfg.expert_bits_for(report.layer, num_experts - 1 - e)", "wrong expert index in the pipeline",
           PER_EXPERT_TESTS),
    Mutant("PE2", BA, "routed = [chosen[(i, e)] for e in range(len(layer.routed))]",
           "routed = [chosen[(i, e)] for e in reversed(range(len(layer.routed)))]",
           "the allocation's table in the wrong expert order", PER_EXPERT_TESTS),
    Mutant("PE3", BA, "routed = tuple(by_expert[e] for e in range(n))",
           "routed = tuple(max(0.0, float(c['score'])) for c in cells)",
           "the file's per-expert cells read by position, not by expert index", PER_EXPERT_TESTS),
    Mutant("PE4", BA, "    capacity = capacity_bits // unit\n    steps", "    capacity = capacity_bits // unit - 1\n    steps",
           "budget one unit short", PER_EXPERT_TESTS),
    Mutant("PE5", BA, "    capacity = capacity_bits // unit\n    steps", "    capacity = capacity_bits // unit + 1\n    steps",
           "budget one unit over", PER_EXPERT_TESTS),
    Mutant("PE6", "eacmoe/export.py", 'rf"\\.{e}\\." + projections', 'rf"\\.{e}" + projections',
           "GPTQModel dynamic regex misses the experts", PER_EXPERT_TESTS),
    Mutant("PE7", T, "PackedLinear(fan_in, fan_out, expert_bits[e], group_size, sym)",
           "PackedLinear(fan_in, fan_out, expert_bits[0], group_size, sym)", "one width for all experts in the runtime",
           PER_EXPERT_TESTS),
    Mutant("PE8", "eacmoe/plan.py", 'if not spec.linear or spec.component != "routed_experts" or table is None:',
           "if True:", "the planner ignores the per-expert widths", PER_EXPERT_TESTS),
    Mutant("PE9", "eacmoe/workflow.py", "expert=name not in attention)", "expert=True)",
           "attention counted as expert weights in the average", PER_EXPERT_TESTS),
]
MUTANTS += PER_EXPERT_MUTANTS

# ------------------------------------------- shared experts in the sensitivity file and the allocation (issue #14)
SENS = "eacmoe/sensitivity.py"
SHARED_SENSITIVITY_TESTS = ("tests/test_sensitivity.py", "-k", "shared")
SHARED_ALLOCATION_TESTS = ("tests/test_bit_allocation.py", "tests/test_per_expert_bits.py", "-k", "shared")
SHARED_MUTANTS = [
    Mutant("SH1", SENS, "            linear.weight.data.copy_(perturb(linear.weight.data, quantized))",
           "            perturb(linear.weight.data, quantized)", "the shared-expert target perturbs nothing",
           SHARED_SENSITIVITY_TESTS),
    Mutant("SH2", SENS, "            linear.weight.data.copy_(weight)", "            pass",
           "the shared experts are not restored after their cell", SHARED_SENSITIVITY_TESTS),
    Mutant("SH3", SENS, '"expert": gptq, "shared": gptq}', '"expert": gptq, "shared": noise}',
           "the shared target gets noise cells instead of GPTQ ones", SHARED_SENSITIVITY_TESTS),
    Mutant("SH4", BA, "((_shared_score(layer) or 0.0) if with_shared else 0.0)", "0.0",
           "the per-layer score leaves out the layer's shared experts", SHARED_ALLOCATION_TESTS),
    Mutant("SH5", BA, "        if n and layer.rest and shared_cell is not None:", "        if False:",
           "the per-module allocation ignores the shared cell", SHARED_ALLOCATION_TESTS),
]
MUTANTS += SHARED_MUTANTS

# ------------------------------------- per-expert auto:B by default, the schedule file, no autograd (session 11)
JC, WF = "eacmoe/job_checks.py", "eacmoe/workflow.py"
DEFAULT_ALLOCATION_TESTS = ("tests/test_per_expert_bits.py", "-k",
                            "end_to_end_with_the_proxy or long_schedule or falls_back or with_a_file_by_default")
NO_GRAD_TESTS = ("tests/test_bit_allocation.py", "-k", "autograd or no_grad_anywhere")
SESSION11_MUTANTS = [
    Mutant("AD1", BA, "    if per_expert is not False:\n        modules = layer_modules(model)",
           "    if per_expert:\n        modules = layer_modules(model)",
           "--bits auto:B per layer unless --per-expert-bits (the old default)", DEFAULT_ALLOCATION_TESTS),
    Mutant("AD4", BA, "                elif per_expert is None:", "                elif False:",
           "the default splits a file without cells by selection frequency", DEFAULT_ALLOCATION_TESTS),
    Mutant("AD5", JC, 'getattr(job, "per_expert_bits", None) is not False', 'getattr(job, "per_expert_bits", None) is True',
           "a file with per-expert cells allocated per layer by default", DEFAULT_ALLOCATION_TESTS),
    Mutant("AD2", WF, "(partial / SCHEDULE_FILE).write_text(allocation.schedule", "(partial / \"s.txt\").write_text(allocation.schedule",
           "the schedule written to another file than the summary names", DEFAULT_ALLOCATION_TESTS),
    Mutant("AD3", "eacmoe/schedule.py", 'f"{sum(experts) / len(experts):.2f}"', 'f"{experts[0]:.2f}"',
           "a long schedule summarised by its first expert's width", DEFAULT_ALLOCATION_TESTS),
    Mutant("NG1", BA, "@torch.no_grad()  # the stream would otherwise", "# the stream would otherwise",
           "the per-layer proxy runs under autograd", NO_GRAD_TESTS),
    Mutant("NG2", WF, "model.eval().requires_grad_(False)", "model.eval()", "loaded weights left requiring grad",
           NO_GRAD_TESTS),
]
MUTANTS += SESSION11_MUTANTS


def copy_project(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float, every_failure: bool = False) -> tuple[bool, str]:
    """(passed, the failing test(s) or a reason) of pytest on `tests` in the copy: `-x` (the first failure) unless
    `every_failure`."""
    env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", *([] if every_failure else ["-x"]), "-q", "-rfE", "-p", "no:cacheprovider",
           *tests]
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout:.0f} s"
    if done.returncode == 0:
        return True, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.MULTILINE)
    return False, ", ".join(failed) if failed else f"pytest exit {done.returncode}"


def check_import(copy: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(copy))
    where = subprocess.run([sys.executable, "-c", "import eacmoe; print(eacmoe.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"error: `import eacmoe` in the copy loads {where}, not the copy")


def apply(copy: Path, mutant: Mutant) -> str | None:
    """Write the mutant into the copy; returns the original text, or None when the snippet is not there once."""
    path = copy / mutant.file
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return None
    path.write_text(original.replace(mutant.old, mutant.new))
    return original


def select(mutants: list[Mutant], only: list[str] | None) -> list[Mutant]:
    if not only:
        return mutants
    return [m for m in mutants if m.id in only or any(o in m.file for o in only)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", help="mutant ids or file name fragments (e.g. P1 E1 packing)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    parser.add_argument("--skip-baseline", action="store_true", help="do not first run the tests unmutated")
    parser.add_argument("--every-failure", action="store_true",
                        help="run each mutant's tests to the end and list every failing test (slower)")
    args = parser.parse_args(argv)
    mutants = select(MUTANTS, args.only)
    if not mutants:
        print("error: no mutant matches --only", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id}\t{m.file}\t{m.description}\t{' '.join(m.tests)}")
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="eacmoe_mutants_") as tmp:
        copy = Path(tmp)
        copy_project(copy)
        check_import(copy)
        if not args.skip_baseline:
            for tests in sorted({m.tests for m in mutants}):
                passed, failure = run_tests(copy, tests, args.timeout)
                if not passed:
                    print(f"error: the unmutated tests fail ({failure}); fix them first", file=sys.stderr)
                    return 2
        for m in mutants:
            t0 = time.perf_counter()
            original = apply(copy, m)
            if original is None:
                result, by = "stale", "snippet not found exactly once: update the mutant"
            else:
                try:
                    py_compile.compile(str(copy / m.file), doraise=True)
                    passed, by = run_tests(copy, m.tests, args.timeout, args.every_failure)
                    result = "survived" if passed else "killed"
                except py_compile.PyCompileError as err:
                    result, by = "invalid", str(err).splitlines()[-1]
                finally:
                    (copy / m.file).write_text(original)
            if result == "survived":
                by = m.survivor or "UNEXPECTED: add a test that fails"
            elif result == "killed" and m.survivor:
                by += " (listed as a survivor: update its note)"
            rows.append((m, result, by, time.perf_counter() - t0))
            print(f"{m.id:4} {result:8} {time.perf_counter() - t0:6.1f} s  {by}", file=sys.stderr, flush=True)

    killed = sum(r == "killed" for _, r, _, _ in rows)
    survived = sum(r == "survived" for _, r, _, _ in rows)
    lines = ["| id | file | mutant | result | killed by / why harmless |", "|---|---|---|---|---|"]
    for m, result, by, _ in rows:
        lines.append(f"| {m.id} | `{m.file}` | {m.description} | {result} | {by.replace('|', '/')} |")
    lines.append("")
    lines.append(f"{len(rows)} mutants: {killed} killed, {survived} survived, "
                 f"{len(rows) - killed - survived} stale or invalid.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    unexpected = [m.id for m, r, _, _ in rows if (r == "survived") != bool(m.survivor) or r in ("stale", "invalid")]
    if unexpected:
        print(f"unexpected results: {' '.join(unexpected)}", file=sys.stderr)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
