"""scripts/model_card.py on a tiny random Mixtral: writes the card, plots and consistent usage counts."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("model_card", REPO / "scripts" / "model_card.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from eacmoe.assets import TOKENIZER_DIR

    out = tmp_path_factory.mktemp("tiny-random-mixtral")
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    history = [{"step": s, "tokens": s * 4096, "train_lm": 9.0 - s / 100, "wall_seconds": s,
                "loss": 9.1 - s / 100, "per_domain": {"sotu": 9.0 - s / 100, "pydoc": 9.2 - s / 100},
                "min_expert_share_per_layer": [0.2, 0.21]} for s in (100, 200, 300, 400)]
    (out / "training_log.json").write_text(json.dumps({
        "step": 400, "tokens_seen": 400 * 4096, "wall_seconds": 400.0, "history": history,
        "args": {"arch": "mixtral", "out": "runs/tiny-test", "total_steps": "300", "batch": "16", "seqlen": "256",
                 "lr": "0.002", "warmup": "20", "balance_coef": "0.02", "eval_every": "100", "bf16": "True",
                 "threads": "None", "seed": "0", "stop_after_minutes": "None", "export": "None"},
        # two restarts (the second changed the schedule and the balance coefficient), then a continuation of the
        # exported model with --init-from: fresh optimizer, its own schedule and seed
        "sessions": [{"from_step": 0, "args": {"total_steps": "400", "balance_coef": "0.02", "lr": "0.002"}},
                     {"from_step": 150, "args": {"total_steps": "300", "balance_coef": "0.05", "lr": "0.002"}},
                     {"from_step": 300, "note": "continued from the exported bf16 model",
                      "args": {"arch": "mixtral", "out": "runs/tiny-test-2", "total_steps": "400", "batch": "16",
                               "seqlen": "256", "lr": "0.001", "warmup": "10", "balance_coef": "0.05",
                               "eval_every": "100", "bf16": "True", "threads": "None", "seed": "1",
                               "init_from": "eacmoe/assets/models/tiny-test", "export": "None"}}]}))
    return out


def test_model_card_outputs(tiny_model_dir):
    mc = _load_script()
    mc.main([str(tiny_model_dir), "--max-tokens", "1024", "--seqlen", "128", "--no-train-token-count"])

    for name in ("README.md", "expert_usage.png", "expert_usage.json", "training_curve.png"):
        assert (tiny_model_dir / name).stat().st_size > 0, name

    usage = json.loads((tiny_model_dir / "expert_usage.json").read_text())
    counts = torch.tensor(usage["counts"])  # [layer][domain][expert]
    assert counts.shape == (2, len(mc.DOMAINS), 4)
    n_tokens = usage["tokens"]  # tokens scored for perplexity on the usage split
    assert 1024 - 128 < n_tokens <= 1024  # evenly spaced 128-token windows, the last one may be short
    assert (counts.sum(dim=(1, 2)) == n_tokens * usage["top_k"]).all()  # every token routed to top_k experts per layer
    per_domain = torch.tensor([usage["tokens_per_domain"][d] for d in mc.DOMAINS])
    assert per_domain.sum() == n_tokens and (counts.sum(-1) == per_domain * usage["top_k"]).all()
    assert usage["top_k"] == 2 and usage["num_experts"] == 4 and usage["split"] == "test"
    assert usage["threads"] == 1  # the default thread count, recorded (and stated in the card's command below)

    for split in ("validation", "test"):
        ppl = usage["perplexity"][split]
        assert set(mc.DOMAINS) <= set(ppl), ppl  # evenly spaced windows reach every domain
        assert all(math.isfinite(v) and v > 1 for v in ppl.values()), ppl

    card = (tiny_model_dir / "README.md").read_text()
    for needle in ("## Architecture", "## Evaluation: perplexity per domain", "validation ppl", "test ppl",
                   "## Load balance", "expert_usage.png", "training_curve.png", "scripts/train_tiny_moe.py --arch mixtral",
                   "scripts/model_card.py", "Intended use", "fp32"):
        assert needle in card, needle
    # the schedule changes come from the sessions each start recorded; the summary uses the last one's arguments
    assert "| 0-150 | 400 | 0.002 | 20 | 0.02 | 0 |" in card and "| 150-300 | 300 | 0.002 | 20 | 0.05 | 0 |" in card
    assert "| 300-400 | 400 | 0.001 | 10 | 0.05 | 1 | continued from the exported bf16 model |" in card
    assert "steps: 400 of a 400-step cosine schedule" in card and "coefficient 0.05; per session below" in card
    assert "the validation loss changed by -3.000" in card
    # the commands that reproduce it: from scratch, the continuation, the export of the continued run
    assert "--out runs/tiny-test --total-steps 300" in card
    assert "--no-train-token-count --threads 1\n" in card
    assert "--out runs/tiny-test-2 --total-steps 400 --batch 16 --seqlen 256 --lr 0.001 --warmup 10" in card
    assert "--seed 1 --init-from eacmoe/assets/models/tiny-test" in card
    assert "--arch mixtral --out runs/tiny-test-2 --export" in card


def test_window_starts_cover_every_token_once():
    mc = _load_script()
    starts = mc.window_starts(1000, 128, None)
    assert starts.tolist() == list(range(0, 1000, 128))
    sub = mc.window_starts(100_000, 512, 5200)  # at most 5200 tokens: 10 windows
    assert len(sub) == 10 and len(set(sub.tolist())) == 10 and (sub % 512 == 0).all()
    assert sub[0] == 0 and sub[-1] == mc.window_starts(100_000, 512, None)[-1]  # spread over the whole stream


def test_js_divergence_bounds():
    import numpy as np
    mc = _load_script()
    p = np.array([1.0, 0.0]); q = np.array([0.0, 1.0])
    assert mc.js_divergence(p, p) == pytest.approx(0.0)
    assert mc.js_divergence(p, q) == pytest.approx(1.0)


def test_training_curve_marks_continuations_and_epochs(tiny_model_dir, tmp_path):
    mc = _load_script()
    log = json.loads((tiny_model_dir / "training_log.json").read_text())
    assert mc.continuation_tokens(log) == [300 * 4096]  # the --init-from session began at step 300
    out = tmp_path / "curve.png"
    mc.plot_training_curve(log["history"], 4, "tiny", out, train_tokens=500_000, restarts=mc.continuation_tokens(log))
    assert out.stat().st_size > 0
