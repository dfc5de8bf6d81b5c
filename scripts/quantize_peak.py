"""One quantization run (`eacmoe.workflow.run_job`, as `python -m eacmoe.quantize` runs it) with the peak memory of its
layer loop next to the formula of docs/MEMORY.md (eacmoe/quant_memory.py).

    python scripts/quantize_peak.py --model /tmp/slices/mixtral-1l --device cuda --nsamples 128 --seqlen 2048 \\
        --out /tmp/q --json-out peak.json --threads 1

On CUDA the layer loop's peak is `torch.cuda.max_memory_allocated` (reset when the loop starts), compared with the
formula's device phases (the layer, its FP copy, the block inputs, the GPTQ workspace; the streams are in host
memory); on the CPU it is the process's peak RSS (ru_maxrss, which includes everything before the loop too) next to
the formula's CPU phases. Used on real-shape slices, the numbers measure cost, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eacmoe.cli import OneLineErrorParser, positive_int, setup_logging  # noqa: E402
from eacmoe.threads import add_threads_argument, command_line, set_threads  # noqa: E402

log = logging.getLogger("quantize_peak")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def main(argv: list[str] | None = None) -> int:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. a real-shape slice)")
    p.add_argument("--out", type=Path, required=True, help="output directory of the quantized model (replaced)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="compute dtype")
    p.add_argument("--method", default="qesc", choices=["gptq", "qesc"], help="quantization method")
    p.add_argument("--bits", default="2", help="expert bits")
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration sequences")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--router-steps", type=positive_int, default=1000, help="router calibration steps")
    p.add_argument("--sparse-expert-policy", default="pool", choices=["pool", "rtn"],
                   help="experts under their token threshold: pooled tokens (GPTQ) or round to nearest")
    p.add_argument("--eval-samples", type=positive_int, default=4, help="held-out sequences of the evaluation")
    p.add_argument("--gptq-target", default="quantized",
                   help="what the experts' GPTQ fits: quantized, fp or fp:A (eacmoe/gptq_target.py; fp needs qesc)")
    p.add_argument("--json-out", type=Path, default=None, help="write the measurement here as JSON")
    add_threads_argument(p)
    args = p.parse_args(argv)
    args.threads = set_threads(args.threads)
    setup_logging()
    command = command_line("python scripts/quantize_peak.py", argv if argv is not None else sys.argv[1:],
                           args.threads)

    import torch
    from transformers import AutoConfig

    from eacmoe import pipeline
    from eacmoe.quant_memory import layer_peak, layer_shapes
    from eacmoe.workflow import QuantizeJob, run_job

    cuda = args.device.startswith("cuda")
    loop: dict[str, float] = {}
    original_run = pipeline.LayerwiseQuantizer.run

    def measured_run(self, *a, **kw):  # the layer loop alone: device peak from here to its end
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            return original_run(self, *a, **kw)
        finally:
            if cuda:
                torch.cuda.synchronize()
                loop["device_peak"] = torch.cuda.max_memory_allocated()
            loop["host_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            loop["seconds"] = time.perf_counter() - t0

    pipeline.LayerwiseQuantizer.run = measured_run
    t0 = time.perf_counter()
    try:
        report = run_job(QuantizeJob(model=args.model, out=str(args.out), overwrite=True, method=args.method,
                                     bits=args.bits, nsamples=args.nsamples, seqlen=args.seqlen,
                                     router_steps=args.router_steps, sparse_expert_policy=args.sparse_expert_policy,
                                     eval_samples=args.eval_samples, eval_seqlen=256, device=args.device,
                                     dtype=args.dtype, lazy=True, threads=args.threads, gptq_target=args.gptq_target))
    finally:
        pipeline.LayerwiseQuantizer.run = original_run
    total = time.perf_counter() - t0
    config = AutoConfig.from_pretrained(args.model)
    formula = layer_peak(layer_shapes(config), args.nsamples * args.seqlen, DTYPE_BYTES[args.dtype], args.method,
                         gptq_experts=args.sparse_expert_policy == "pool",
                         fp_target=args.gptq_target != "quantized")
    device_formula = max(formula.device_phases.values())
    result = {"command": command, "threads": args.threads, "device": args.device,
              "device_name": torch.cuda.get_device_name() if cuda else "cpu", "tokens": args.nsamples * args.seqlen,
              "loop_seconds": loop.get("seconds"), "total_seconds": total, "loop_device_peak": loop.get("device_peak"),
              "loop_host_peak": loop.get("host_peak"), "formula_device_peak": device_formula,
              "formula_device_phases": formula.device_phases, "formula_cpu_phases": formula.phases,
              "layers": config.num_hidden_layers, "out": str(args.out), "note": "real-shape slices measure cost, "
              "not accuracy", "report_keys": sorted(report)}
    if cuda:
        result["device_over_formula"] = loop["device_peak"] / device_formula
        log.info("layer loop: %.0f s, device peak %.2f GB, formula %.2f GB (ratio %.2f)", loop["seconds"],
                 loop["device_peak"] / 1e9, device_formula / 1e9, result["device_over_formula"])
    else:
        log.info("layer loop: %.0f s, host peak %.2f GB (formula's CPU phases: %s)", loop["seconds"],
                 loop["host_peak"] / 1e9, {k: round(v / 1e9, 2) for k, v in formula.phases.items()})
    print(json.dumps(result))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
