"""Peak memory of `python -m eacmoe.quantize` on real-shape slices, next to the formula (eacmoe/quant_memory.py).

    python scripts/measure_real_shape_memory.py --families qwen3-30b-a3b mixtral-8x7b --threads 1 --write docs/MEMORY.md

REAL-SHAPE SLICES MEASURE COST, NOT ACCURACY (random weights with the layer dimensions of the real models; see
scripts/make_real_shape_slice.py).

For each family it builds (or reuses, --slices-dir) a slice with --layers decoder layers, then in subprocesses:
  1. the formula's measured inputs: the base RSS (the same quantize command on a tiny slice of the family: Python,
     torch, transformers, tokenizer, calibration text), lambda_load (peak RSS increase while the lazy loader reads
     one layer, over the layer's bytes) and lambda_save (the increase while safetensors writes it);
  2. the quantization itself, its RSS sampled every 50 ms from /proc (the peak of the layer loop, up to the
     progress file of the last layer) and the kernel's ru_maxrss of the whole process (loop, evaluation, export);
and prints both next to the formula's prediction for the loop. This process never imports torch (a parent's peak
RSS would be inherited by the children's ru_maxrss across fork+exec).

--component-gptq adds one GPTQ of a full Mixtral-8x7B down_proj (4096 x 14336, Hessian 14336^2) in a subprocess:
its peak RSS increase next to ws(r, c) of the formula (the term that dominates Mixtral's expert phase on a GPU).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402  (does not import torch)

log = logging.getLogger("measure_real_shape_memory")
SECTION_BEGIN, SECTION_END = "<!-- real-shape-memory:begin -->", "<!-- real-shape-memory:end -->"
# the tiny slices of the base measurement: every width a multiple of the group size (128)
TINY = {"mixtral-8x7b": ["hidden_size=128", "intermediate_size=128", "num_attention_heads=4", "num_key_value_heads=2"],
        "qwen3-30b-a3b": ["hidden_size=128", "moe_intermediate_size=128", "num_attention_heads=4",
                          "num_key_value_heads=2", "head_dim=32"]}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def child_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO))


def make_slice(family: str, out: Path, layers: int, extra: list[str] | None = None) -> dict:
    if not (out / "slice.json").is_file():
        command = [sys.executable, str(REPO / "scripts" / "make_real_shape_slice.py"), "--family", family,
                   "--out", str(out), "--layers", str(layers), "--overwrite"]
        for item in extra or []:
            command += ["--set", item]
        subprocess.run(command, check=True, env=child_env(), capture_output=True, text=True)
    return json.loads((out / "slice.json").read_text())


_CONSTANTS = """
import gc, json, resource, sys, torch
from safetensors.torch import save_file
from eacmoe.lazy_loading import LayerLoader
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
loader = LayerLoader(sys.argv[1], getattr(torch, sys.argv[2]))
before = rss()
layer = loader.load(0)
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in layer.parameters())
gc.collect()
held = rss()
save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, sys.argv[3])
save_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"weights": weights, "lambda_load": (load_peak - before) / weights,
                  "lambda_save": (max(save_peak, held) - held) / weights, "held_after_load": (held - before) / weights}))
"""

_GPTQ_COMPONENT = """
import json, resource, sys, torch
from eacmoe.quant import GPTQ, QuantSpec
from eacmoe.quant_memory import gptq_workspace
rows, columns, tokens = (int(a) for a in sys.argv[1:4])
g = torch.Generator().manual_seed(0)
x = torch.empty(tokens, columns, dtype=torch.bfloat16).normal_(generator=g)
w = (torch.empty(rows, columns, dtype=torch.bfloat16).normal_(generator=g) * 0.02)
small = GPTQ(64); small.add_batch(torch.randn(128, 64)); small.quantize(torch.randn(32, 64), QuantSpec(bits=2, group_size=32))
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
before = max(rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
solver = GPTQ(columns)
solver.add_batch(x)
result = solver.quantize(w, QuantSpec(bits=2, group_size=128))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rows": rows, "columns": columns, "tokens": tokens, "measured": peak - before,
                  "formula": gptq_workspace(rows, columns, tokens)}))
"""


def run_python(code: str, args: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], check=True, env=child_env(), capture_output=True,
                            text=True, cwd=REPO)
    return json.loads(result.stdout.strip().splitlines()[-1])


def quantize_command(model: Path, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "eacmoe.quantize", "--model", str(model), "--out", str(out), "--overwrite",
            "--method", args.method, "--bits", "2", "--group-size", "128", "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--router-steps", str(args.router_steps), "--sparse-expert-policy",
            args.sparse_expert_policy, "--eval-samples", "2", "--eval-seqlen", "64", "--dtype", args.dtype,
            "--device", "cpu", "--lazy", "--threads", str(args.threads)]


def measure_run(command: list[str], out: Path, layers: int, log_file: Path) -> dict:
    """Peak RSS of the layer loop (sampled) and of the whole process (ru_maxrss), and the wall time."""
    state = out.with_name(out.name + ".partial") / ".progress" / "state.json"
    samples = {"loop": 0, "loop_done": False}
    timeline: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    with open(log_file, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)

        def poll() -> None:
            status = Path(f"/proc/{proc.pid}/status")
            while proc.poll() is None:
                try:
                    rss = int(status.read_text().split("VmRSS:")[1].split()[0]) * 1024
                except (OSError, IndexError):
                    break
                timeline.append((time.perf_counter() - t0, rss))
                if not samples["loop_done"]:
                    samples["loop"] = max(samples["loop"], rss)
                    try:
                        if json.loads(state.read_text())["completed_layers"] >= layers:
                            samples["loop_done"] = True
                            samples["loop_seconds"] = time.perf_counter() - t0
                    except (OSError, ValueError, KeyError):
                        pass
                time.sleep(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        poller.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}; see {log_file}")
    result = {"loop_peak": samples["loop"], "process_peak": usage.ru_maxrss * 1024,
              "loop_seconds": samples.get("loop_seconds"), "seconds": time.perf_counter() - t0}
    report = out / "report.json"
    if report.is_file() and result["loop_seconds"] is not None:  # the sampled peaks after the loop, by stage
        evaluate = json.loads(report.read_text())["timings_seconds"].get("evaluate", 0.0)
        end_eval = result["loop_seconds"] + evaluate
        result["evaluate_peak"] = max((r for t, r in timeline if result["loop_seconds"] < t <= end_eval), default=0)
        result["export_peak"] = max((r for t, r in timeline if t > end_eval), default=0)
    return result


def predict(family: str, slice_dir: Path, args, base: int, constants: dict) -> dict:
    code = f"""
import json
from transformers import AutoConfig
from eacmoe.quant_memory import layer_shapes, layer_peak
config = AutoConfig.from_pretrained({str(slice_dir)!r})
shapes = layer_shapes(config)
m = layer_peak(shapes, {args.nsamples * args.seqlen}, {DTYPE_BYTES[args.dtype]}, {args.method!r}, base={base},
               lambda_load={constants['lambda_load']}, lambda_save={constants['lambda_save']},
               gptq_experts={args.sparse_expert_policy == 'pool'})
print(json.dumps(m.as_dict()))
"""
    return run_python(code, [])


def project(family: str, tokens: int, dtype_bytes: int, constants: dict) -> dict:
    code = f"""
import json
from eacmoe.plan import load_config
from eacmoe.quant_memory import layer_shapes, layer_peak
config, _ = load_config({family!r})
m = layer_peak(layer_shapes(config), {tokens}, {dtype_bytes}, "qesc", lambda_load={constants['lambda_load']},
               lambda_save={constants['lambda_save']})
print(json.dumps(m.as_dict()))
"""
    return run_python(code, [])


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def stage_peaks(measured: dict) -> str:
    if "evaluate_peak" not in measured:
        return "not sampled"
    return f"{gb(measured['evaluate_peak'])} / {gb(measured['export_peak'])}"


def report(command: str, args, rows: list[dict], component: dict | None, projections: list[dict]) -> str:
    lines = [SECTION_BEGIN, "", "### Measured on real-shape slices (they measure cost, not accuracy)", "",
             "Generated by `scripts/measure_real_shape_memory.py`:", "", f"    {command}", "",
             f"CPU, {args.threads} torch thread(s), {args.dtype}, lazy loading, `--method {args.method} --bits 2 "
             f"--group-size 128 --nsamples {args.nsamples} --seqlen {args.seqlen} --router-steps {args.router_steps} "
             f"--sparse-expert-policy {args.sparse_expert_policy}` ({args.nsamples * args.seqlen} calibration tokens"
             + ("; experts under their token threshold, here all of them, are rounded to nearest, so the expert "
                "phase has no GPTQ workspace: that term is measured on its own below" if args.sparse_expert_policy
                == "rtn" else "") + "). The loop peak is the process's RSS sampled every 50 ms until the progress "
             "file of the last layer exists; the process peak is the kernel's ru_maxrss of the whole run "
             "(evaluation and export included). lambda_load, lambda_save and the base are measured first, in "
             "separate processes (see the script), and enter the formula as inputs.", "",
             "| slice | layer weights | base | lambda_load | lambda_save | formula: peak phase | formula: loop peak "
             "| measured loop peak | measured / formula | evaluation / export peak (sampled) | process peak "
             "| time (loop) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["prediction"]
        lines.append(f"| {r['family']} ({r['layers']} layer) | {gb(r['weights'])} | {gb(r['base'])} | "
                     f"{r['constants']['lambda_load']:.2f} | {r['constants']['lambda_save']:.2f} | {p['peak_phase']} | "
                     f"{gb(p['peak'])} | {gb(r['measured']['loop_peak'])} | "
                     f"{r['measured']['loop_peak'] / p['peak']:.2f} | {stage_peaks(r['measured'])} | "
                     f"{gb(r['measured']['process_peak'])} | "
                     f"{r['measured']['seconds']:.0f} s ({(r['measured']['loop_seconds'] or 0):.0f} s) |")
    lines.append("")
    for r in rows:
        phases = ", ".join(f"{k} {gb(v)}" for k, v in r["prediction"]["phases"].items())
        lines.append(f"- {r['family']}: formula phases: {phases}."
                     + (f" Measured by `{r['command']}`." if r.get("command", command) != command else ""))
    if component:
        lines += ["", f"GPTQ workspace alone (one Mixtral-8x7B down_proj, [{component['rows']}, {component['columns']}], "
                  f"Hessian from {component['tokens']} bf16 tokens, 2 bits, group 128): measured peak RSS increase "
                  f"{gb(component['measured'])}, ws(r, c) = {gb(component['formula'])}, ratio "
                  f"{component['measured'] / component['formula']:.2f}."]
    if projections:
        lines += ["", "### Projected (formula only, not measured): full models at 128 x 2048 calibration tokens, bf16",
                  "", "Per layer, with the lambdas measured above; on a GPU the device holds the layer, its FP copy, "
                  "the block inputs and the GPTQ workspace; the streams (2 x 128 x 2048 x H x 2 bytes), the skeleton "
                  "and the codes stay in host memory.", "",
                  "| model | device peak (phase) | fits 24 GB | host: streams + skeleton | host: load / save transients |",
                  "|---|---|---|---|---|"]
        for p in projections:
            device = p["device_phases"]
            phase = max(device, key=device.get)
            lines.append(f"| {p['family']} | {gb(device[phase])} ({phase}) | {'yes' if device[phase] < 24e9 else 'no'} "
                         f"| {gb(p['terms']['streams'] + p['terms']['skeleton'])} | "
                         f"{gb(p['phases']['load'] - p['terms']['streams'] - p['terms']['skeleton'])} / "
                         f"{gb(p['phases']['save'] - p['terms']['streams'] - p['terms']['skeleton'])} |")
    lines += ["", SECTION_END]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    current = path.read_text() if path.exists() else ""
    if SECTION_BEGIN in current and SECTION_END in current:
        head, rest = current.split(SECTION_BEGIN, 1)
        current = head + text + rest.split(SECTION_END, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(current)


def main(argv: list[str] | None = None) -> int:
    from eacmoe.cli import OneLineErrorParser, positive_int, setup_logging

    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="*", default=["qwen3-30b-a3b", "mixtral-8x7b"],
                   choices=["qwen3-30b-a3b", "mixtral-8x7b"], help="real-shape slices to measure, in this order")
    p.add_argument("--layers", type=positive_int, default=1, help="decoder layers of each slice")
    p.add_argument("--slices-dir", type=Path, default=Path("/tmp/eacmoe-slices"),
                   help="where the slices are written (kept and reused: a Mixtral layer is 2.9 GB)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/eacmoe-real-shape-memory"),
                   help="outputs and logs of the runs")
    p.add_argument("--method", default="qesc", choices=["gptq", "qesc"], help="quantization method")
    p.add_argument("--nsamples", type=positive_int, default=16, help="calibration sequences")
    p.add_argument("--seqlen", type=positive_int, default=512, help="tokens per calibration sequence")
    p.add_argument("--router-steps", type=positive_int, default=50, help="router calibration steps")
    p.add_argument("--sparse-expert-policy", default="rtn", choices=["rtn", "pool"],
                   help="rtn keeps CPU runs short (every expert is under its threshold at this calibration size)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="compute dtype")
    p.add_argument("--component-gptq", action="store_true",
                   help="also measure one GPTQ of a Mixtral-8x7B down_proj against ws(r, c) (~3-5 min on one core)")
    p.add_argument("--gptq-tokens", type=positive_int, default=1024, help="tokens of that Hessian")
    p.add_argument("--project", action="store_true", help="add the formula's projection for the full models")
    p.add_argument("--rows-from", type=Path, nargs="*", default=[],
                   help="results.json of earlier runs of this script: their rows go into the report too (a run per "
                        "family keeps each under 15 minutes here)")
    p.add_argument("--write", type=Path, default=None, help="replace the generated section of this markdown file")
    add_threads_argument(p)
    args = p.parse_args(argv)
    args.threads = set_threads(args.threads)
    setup_logging()
    command = command_line("python scripts/measure_real_shape_memory.py", argv if argv is not None else sys.argv[1:],
                           args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows, constants = [], {}
    by_family: dict[str, dict] = {}
    for path in args.rows_from:
        for row in json.loads(path.read_text()):
            rows.append(row)
            by_family[row["family"]] = constants = row["constants"]
    for family in args.families:
        slice_dir = args.slices_dir / f"{family}-{args.layers}l"
        info = make_slice(family, slice_dir, args.layers)
        tiny = make_slice(family, args.slices_dir / f"{family}-tiny", 1, TINY[family])
        del tiny
        base = measure_run(quantize_command(args.slices_dir / f"{family}-tiny", args.work_dir / f"{family}-tiny",
                                            args), args.work_dir / f"{family}-tiny", 1,
                           args.work_dir / f"{family}-tiny.log")["process_peak"]
        constants = run_python(_CONSTANTS, [str(slice_dir), args.dtype, str(args.work_dir / "layer.safetensors")])
        (args.work_dir / "layer.safetensors").unlink(missing_ok=True)
        by_family[family] = constants
        log.info("%s: base %s, constants %s", family, gb(base), constants)
        prediction = predict(family, slice_dir, args, base, constants)
        log.info("%s: formula %s in phase %s", family, gb(prediction["peak"]), prediction["peak_phase"])
        out = args.work_dir / f"{family}-out"
        measured = measure_run(quantize_command(slice_dir, out, args), out, args.layers,
                               args.work_dir / f"{family}.log")
        log.info("%s: measured loop peak %s (formula %s, ratio %.2f), process peak %s, %.0f s", family,
                 gb(measured["loop_peak"]), gb(prediction["peak"]), measured["loop_peak"] / prediction["peak"],
                 gb(measured["process_peak"]), measured["seconds"])
        rows.append({"family": family, "layers": args.layers, "weights": constants["weights"], "base": base,
                     "constants": constants, "prediction": prediction, "measured": measured, "slice": info,
                     "command": command})
        (args.work_dir / "results.json").write_text(json.dumps([r for r in rows if r["family"] in args.families],
                                                               indent=2))
    component = None
    if args.component_gptq:
        component = run_python(_GPTQ_COMPONENT, ["4096", "14336", str(args.gptq_tokens)])
        log.info("GPTQ workspace of a Mixtral down_proj: measured %s, formula %s", gb(component["measured"]),
                 gb(component["formula"]))
    projections = []
    if args.project and constants:
        for family in ("mixtral-8x7b", "qwen3-30b-a3b"):
            projections.append({"family": family, **project(family, 128 * 2048, 2, by_family.get(family, constants))})
    text = report(command, args, rows, component, projections)
    print(text)
    if args.write:
        write_section(args.write, text)
        log.info("wrote %s", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
