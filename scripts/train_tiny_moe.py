"""Train one of eacmoe's bundled tiny MoE language models from scratch (seeded, resumable).

    python scripts/train_tiny_moe.py --arch mixtral  --out runs/tiny-mixtral  --total-steps 6000
    python scripts/train_tiny_moe.py --arch qwen2_moe --out runs/tiny-qwen-moe --total-steps 6000
    # interrupt any time; the same command resumes from runs/<name>/ckpt. --export writes the bf16 model
    python scripts/train_tiny_moe.py --arch mixtral --out runs/tiny-mixtral --export eacmoe/assets/models/tiny-mixtral
    # continue an exported model with a fresh optimizer and a new schedule (steps and tokens count on)
    python scripts/train_tiny_moe.py --arch mixtral --out runs/tiny-mixtral-2 --init-from eacmoe/assets/models/tiny-mixtral \
        --seed 1 --total-steps 6320 --lr 1e-3 --warmup 100

The data are random windows of the tokenised train split (documents joined by <|endoftext|>). The
load-balancing loss is computed PER LAYER and averaged, unlike transformers' pooled auxiliary loss, which
can read "balanced" while one layer starves an expert; per-layer expert usage is logged at every eval.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from eacmoe.assets import TOKENIZER_DIR
from eacmoe.corpus import DOMAINS, iter_documents

log = logging.getLogger("train")

ARCHS = {
    # Mixtral-8x7B in miniature: 8 experts, top-2, balanced routing.
    "mixtral": lambda vocab: MixtralForCausalLM(MixtralConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=False, router_aux_loss_coef=0.0, output_router_logits=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    # Qwen1.5-MoE / DeepSeek-MoE in miniature: 32 fine-grained experts, top-4, plus a gated shared expert.
    "qwen2_moe": lambda vocab: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
        shared_expert_intermediate_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True, router_aux_loss_coef=0.0,
        output_router_logits=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
}


def tokenize_split(split: str, tokenizer, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """All documents of a split as one uint16 token stream (eos between documents) plus a domain id per token."""
    path = cache / f"tokens-{split}.npz"
    if path.exists():
        z = np.load(path)
        return z["tokens"], z["domains"]
    toks, doms = [], []
    for doc in iter_documents(split):
        ids = tokenizer(doc["text"])["input_ids"] + [tokenizer.eos_token_id]
        toks.append(np.asarray(ids, dtype=np.uint16))
        doms.append(np.full(len(ids), DOMAINS.index(doc["domain"]), dtype=np.uint8))
    tokens, domains = np.concatenate(toks), np.concatenate(doms)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, tokens=tokens, domains=domains)
    return tokens, domains


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_e f_e * p_e computed for each layer separately, then averaged."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        frac_tokens = F.one_hot(chosen, num_experts).float().sum(1).mean(0) / top_k
        losses.append(num_experts * (frac_tokens * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def expert_usage(router_logits: tuple[torch.Tensor, ...], top_k: int) -> list[list[float]]:
    """Per layer, the fraction of top-k slots each expert received."""
    out = []
    for logits in router_logits:
        chosen = logits.topk(top_k, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=logits.shape[-1]).float()
        out.append((counts / counts.sum()).tolist())
    return out


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, domains: np.ndarray, seqlen: int, max_windows: int, top_k: int) -> dict:
    """Mean next-token loss overall and per domain on non-overlapping windows of the validation stream."""
    model.eval()
    n = min(max_windows, (len(tokens) - 1) // seqlen)
    starts = np.linspace(0, len(tokens) - seqlen - 1, n).astype(np.int64)
    loss_sum = np.zeros(len(DOMAINS)); count = np.zeros(len(DOMAINS))
    usage = None
    for b in range(0, n, 16):
        idx = starts[b:b + 16]
        x = torch.from_numpy(np.stack([tokens[s:s + seqlen + 1] for s in idx]).astype(np.int64))
        d = np.stack([domains[s + 1:s + seqlen + 1] for s in idx])
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        nll = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none").numpy()
        for k in range(len(DOMAINS)):
            m = d.flatten() == k
            loss_sum[k] += nll[m].sum(); count[k] += m.sum()
        u = np.asarray(expert_usage(out.router_logits, top_k))
        usage = u if usage is None else usage + u
    model.train()
    per_domain = {DOMAINS[k]: float(loss_sum[k] / count[k]) for k in range(len(DOMAINS)) if count[k]}
    usage = usage / usage.sum(-1, keepdims=True)
    return {"loss": float(loss_sum.sum() / count.sum()), "per_domain": per_domain,
            "min_expert_share_per_layer": usage.min(-1).round(4).tolist()}


def lr_at(step: int, args, schedule_start: int = 0) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at step --total-steps; a schedule begins at
    schedule_start (0, or the step a run continued with --init-from began at)."""
    step, length = step - schedule_start, args.total_steps - schedule_start
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, length - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(ckpt: Path, model, optimizer, state: dict) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if ckpt.exists():
        old = ckpt.with_name(ckpt.name + ".old")
        os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, ckpt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True, help="model family to train")
    ap.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, log); resumed if present")
    ap.add_argument("--total-steps", type=int, default=6000, help="length of the cosine schedule (default: %(default)s)")
    ap.add_argument("--stop-after-minutes", type=float, default=None, help="save and stop after this wall time")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (default: %(default)s)")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=200, help="warm-up steps (default: %(default)s)")
    ap.add_argument("--balance-coef", type=float, default=0.02, help="per-layer balance loss weight (default: %(default)s)")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between evals/checkpoints (default: %(default)s)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast for the forward (master weights stay fp32; default: on)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start a new run (fresh optimizer, new schedule) from an exported model directory, e.g. to "
                         "continue a bundled model (pass a new --seed so the batches differ); its training_log.json is carried on and "
                         "--total-steps counts from its step")
    ap.add_argument("--export", type=Path, default=None, help="write the bf16 model + tokenizer here and exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(args.seed)
    model = ARCHS[args.arch](len(tokenizer))
    model.config.use_cache = False
    model.set_experts_implementation("eager")  # 3-5x faster than grouped_mm on CPU
    top_k = model.config.num_experts_per_tok
    ckpt = args.out / "ckpt"
    state = {"step": 0, "tokens_seen": 0, "wall_seconds": 0.0, "history": [], "args": {k: str(v) for k, v in vars(args).items()}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    if ckpt.exists():
        state = json.loads((ckpt / "state.json").read_text())
        if args.init_from and "initialised_from" not in state:
            ap.error(f"{args.out} holds a run from scratch, which would be resumed instead of continuing "
                     f"{args.init_from}; give the continuation its own --out")
        load_model(model, str(ckpt / "model.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt"))
        log.info("resumed at step %d (%d tokens)", state["step"], state["tokens_seen"])
    elif args.init_from:
        init = type(model).from_pretrained(args.init_from, dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        previous = json.loads((args.init_from / "training_log.json").read_text())
        # steps, tokens and wall time count on, so the log and the model card show one continuous run; "args"
        # stay those of the run from scratch, this run's own are recorded in "sessions" below
        state.update(args=previous["args"], step=previous["step"], schedule_start=previous["step"],
                     tokens_seen=previous["tokens_seen"],
                     wall_seconds=previous["wall_seconds"], history=previous["history"],
                     sessions=previous.get("sessions", []),
                     initialised_from={"path": str(args.init_from), "step": previous["step"]})
        log.info("initialised from %s at step %d (%d tokens seen); new schedule from here to step %d",
                 args.init_from, state["step"], state["tokens_seen"], args.total_steps)
    if not args.export:  # every (re)start records its own arguments: schedules may change between sessions
        session = {"from_step": state["step"], "args": {k: str(v) for k, v in vars(args).items()}}
        if args.init_from and not ckpt.exists():
            session["note"] = (f"continued from the exported bf16 model: fresh AdamW state, seed {args.seed}, "
                               f"new {args.warmup}-step warm-up and cosine schedule")
        state.setdefault("sessions", []).append(session)

    if args.export:
        export(model, tokenizer, state, args.export)
        return

    (args.out / "STOP").unlink(missing_ok=True)
    cache = args.out.parent / "token-cache"
    train_tokens, _ = tokenize_split("train", tokenizer, cache)
    val_tokens, val_domains = tokenize_split("validation", tokenizer, cache)
    log.info("%s: %.2fM parameters, %.2fM train tokens", args.arch, sum(p.numel() for p in model.parameters()) / 1e6,
             len(train_tokens) / 1e6)
    model.train()
    t_start = time.time() - state["wall_seconds"]
    session_start = time.time()
    while state["step"] < args.total_steps:
        step = state["step"]
        rng = np.random.default_rng([args.seed, step])  # the batch of a step depends only on (seed, step): resumable
        starts = rng.integers(0, len(train_tokens) - args.seqlen - 1, args.batch)
        x = torch.from_numpy(np.stack([train_tokens[s:s + args.seqlen + 1] for s in starts]).astype(np.int64))
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args, state.get("schedule_start", 0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):  # bf16 matmuls: ~5x on AVX512-BF16
            out = model(input_ids=x[:, :-1], output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
        balance = per_layer_balance_loss(out.router_logits, top_k)
        (lm_loss + args.balance_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens_seen"] += args.batch * args.seqlen
        if state["step"] % 50 == 0:
            log.info("step %d lm %.3f balance %.3f lr %.2e %.0f tok/s", state["step"], lm_loss.item(), balance.item(),
                     lr_at(step, args, state.get("schedule_start", 0)), state["tokens_seen"] / (time.time() - t_start))
        done = state["step"] >= args.total_steps
        out_of_time = (args.stop_after_minutes and time.time() - session_start > args.stop_after_minutes * 60) \
            or (args.out / "STOP").exists()  # `touch <out>/STOP`: save a checkpoint and stop cleanly
        if state["step"] % args.eval_every == 0 or done or out_of_time:
            ev = evaluate(model, val_tokens, val_domains, args.seqlen, 64, top_k)
            state["wall_seconds"] = time.time() - t_start
            state["history"].append({"step": state["step"], "tokens": state["tokens_seen"], "train_lm": lm_loss.item(),
                                     "wall_seconds": round(state["wall_seconds"]), **ev})
            log.info("eval step %d: val loss %.3f (ppl %.1f) %s min share/layer %s", state["step"], ev["loss"],
                     math.exp(ev["loss"]), {k: round(v, 2) for k, v in ev["per_domain"].items()},
                     ev["min_expert_share_per_layer"])
            save_checkpoint(ckpt, model, optimizer, state)
            if out_of_time:
                log.info("stopping after %.1f minutes (time limit or STOP file); run again to resume",
                         (time.time() - session_start) / 60)
                return


def export(model, tokenizer, state: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    # the context the model was trained on: lm-eval and eacmoe size their windows from this field
    model.config.max_position_embeddings = int(state["args"]["seqlen"])
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(state, indent=1) + "\n")
    log.info("exported step %d to %s", state["step"], out)


if __name__ == "__main__":
    main()
