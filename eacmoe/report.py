"""Human-facing views of a quantization report: the terminal summary table and report.png."""
from __future__ import annotations

import shlex
from pathlib import Path

from .schedule import format_schedule_means

# `--bits auto:B` writes its schedule here in the output directory: per module it is one width per routed expert, too
# long for a terminal line on a real model (Qwen3-30B-A3B: 48 layers x 128 experts)
SCHEDULE_FILE = "bits_schedule.txt"
SCHEDULE_INLINE_CHARS = 120


def _allocation_line(allocation: dict, out: str | None) -> str:
    schedule = allocation.get("schedule") or ",".join(map(str, allocation["bits"]))
    per = "module" if allocation.get("expert_bits") else "layer"
    shown = again = schedule
    if len(schedule) > SCHEDULE_INLINE_CHARS:
        shown = format_schedule_means(allocation["bits"], allocation.get("expert_bits"))
        if allocation.get("expert_bits"):
            shown += " (per layer: the routed experts' mean width, the shared experts' before a colon)"
        again = f'"$(cat {shlex.quote(str(Path(out or ".") / SCHEDULE_FILE))})"'
    return (f"{allocation['spec']}: expert bits per {per} {shown} (average {allocation['achieved_average']:.4f} over "
            f"the expert weights; sensitivities: {allocation['source']}); the same schedule for --bits / eacmoe.plan: "
            f"{again}")


def format_summary(report: dict) -> str:
    """A compact table: FP vs quantized perplexity, oracle, KL, shift rates, bits, size, time per stage."""
    lines = [f"model {report['model']}  method {report['job']['method']}  expert bits {report['job']['bits']}  "
             f"attention bits {report['job']['attn_bits'] or 16}  device {report['device']}  "
             f"threads {report.get('threads', '?')}",
             f"average bits: {report['average_bits_paper']:.2f} per quantized weight (paper's measure), "
             f"{report['average_bits_true']:.2f} per parameter incl. scales/zeros/16-bit tensors; "
             f"size {report['size_bytes'] / 2**20:.1f} MiB"]
    allocation = report.get("bit_allocation")
    if allocation:
        lines.append(_allocation_line(allocation, report.get("out")))
    lines.append("")
    header = f"{'held-out':<13}{'FP ppl':>9}{'quant ppl':>11}{'oracle':>9}{'FP+qroute':>11}{'KL(FP||q)':>11}" \
             f"{'shift all':>11}{'any':>7}{'half':>7}"
    lines.append(header)
    lines.append("-" * len(header))
    for source, ev in report["evaluation"].items():
        p, s = ev["perplexity"], ev["shift_mean"]
        lines.append(f"{source:<13}{p['fp/fp']:>9.2f}{p['q/q']:>11.2f}{p['q/fp']:>9.2f}{p['fp/q']:>11.2f}"
                     f"{ev['kl_from_fp']['q/q']:>11.4f}{100 * s['all']:>10.1f}%{100 * s['any']:>6.1f}%"
                     f"{100 * s['half']:>6.1f}%")
    lines.append("")
    stages = report["layer_seconds_by_stage"]
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_seconds"].items()) +
                 "  | per stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
    lines.append("oracle = quantized model with the FP model's routing forced; FP+qroute = FP model with the "
                 "quantized model's routing forced")
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    """Per-layer expert-shift rates and router TopK-MSE before/after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluations = report["evaluation"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for source, ev in evaluations.items():
        layers = [s["layer"] for s in ev["shift_per_layer"]]
        ax.plot(layers, [100 * s["any"] for s in ev["shift_per_layer"]], marker="o", label=f"{source}: any changed")
        ax.plot(layers, [100 * s["all"] for s in ev["shift_per_layer"]], marker="x", ls="--", label=f"{source}: all changed")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("tokens whose top-k changed (%)")
    ax.set_title("expert shift vs the FP model")
    ax.legend(fontsize=8)
    ax = axes[1]
    routers = [(r["layer"], r["router"]) for r in report["layers"] if r.get("router")]
    if routers:
        ax.bar([l - 0.2 for l, _ in routers], [r["loss_before"] for _, r in routers], width=0.4, label="FP router")
        ax.bar([l + 0.2 for l, _ in routers], [r["loss_after"] for _, r in routers], width=0.4, label="calibrated")
        ax.set_ylabel("held-out TopK-MSE on router logits")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no router calibration ({report['job']['method']})", ha="center", va="center")
    ax.set_xlabel("decoder layer")
    ax.set_title("router calibration")
    fig.suptitle(f"{report['model']} {report['job']['method']} w{report['job']['bits']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
