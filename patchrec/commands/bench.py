"""``patchrec bench report``: pytest-benchmark JSON -> ``report.md`` (ratio tables) + PNG plots.
``patchrec bench gpu``: validate a CUDA GPU in one command (``benches/gpu_check.sh``).
``patchrec bench plan-gpu``: one training and one evaluation step of a configuration traced on the meta
device (no GPU, no weights): FLOPs, bytes, memory and roofline times, all PROJECTED
(``patchrec.experiments.gpu_plan``).

Example::

    pytest benches --benchmark-json=benches/results/cpu.json
    patchrec bench report benches/results/cpu.json --out benches/results/cpu-report
    patchrec bench gpu --dry-run        # the GPU check's plan; without --dry-run, on a CUDA machine, runs it
    patchrec bench plan-gpu --data data/ml-1m --tokenizer path/to/llama3 --model llama-3.2-1b

Ratios only divide numbers of the same results file (see ``patchrec.reports.bench_report``). Plots need
matplotlib (the ``plot`` extra: ``pip install 'patchrec[plot]'``). The GPU check lives in the source
checkout (``benches/gpu_check.py``), beside the benches it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

GPU_CHECK = Path(__file__).resolve().parents[2] / "benches" / "gpu_check.py"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark reports (ratio tables and plots from pytest-benchmark JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)
    report = sub.add_parser(
        "report",
        help="write report.md and PNG plots from pytest-benchmark JSON files",
        description="Turn pytest-benchmark JSON files into a Markdown table of ratios and PNG plots.",
    )
    report.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json output)")
    report.add_argument("--out", default="bench-report", help="output directory (default: bench-report)")
    report.set_defaults(run=run)
    gpu = sub.add_parser(
        "gpu",
        help="validate a CUDA GPU: GPU tests, kernel / training / inference benches, SmolLM2 parity",
        description="The check benches/gpu_check.sh runs: every GPU test and bench within one budget, "
        "results under benches/results/gpu-<device>/. --dry-run prints the plan on any machine.",
    )
    try:
        check = _gpu_check()
    except Exception:  # a broken check must not break the other commands; running it shows the error
        check = None
    if check is not None:
        check.add_arguments(gpu)
    gpu.set_defaults(run=run_gpu)
    add_plan_gpu(sub)
    return parser


def add_plan_gpu(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan-gpu",
        help="PROJECTED FLOPs, bytes, memory and roofline time of one training / evaluation step (no GPU)",
        description="Trace one training step and one evaluation step (prompts + beam steps) per plan on the "
        "meta device through patchrec's own code, over a release's real samples and a model's config "
        "(no weights), and print FLOPs, bytes moved, memory and roofline times for H100 and A100. Every "
        "figure is PROJECTED, never measured (definitions: patchrec.experiments.gpu_plan).",
    )
    io = plan.add_argument_group("inputs")
    io.add_argument("--data", required=True, help="release directory (id2title.txt, sequences.jsonl)")
    io.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory (local)")
    io.add_argument("--model", default="llama-3.2-1b",
                    help="model preset (tiny, llama-3.2-1b) or a local HF directory / .gguf file: only its "
                         "config is read (default llama-3.2-1b)")  # fmt: skip
    io.add_argument("--json", default=None, help="also write the projections and the settings to this file")
    step = plan.add_argument_group("the step")
    step.add_argument("--plans", default="vanilla,pft-i,pft-s", help="comma-separated plans (default: all)")
    step.add_argument("--preset", default=None,
                      help="released settings (batch, G) of ml-100k / ml-1m / goodreads (default: inferred "
                           "from the data)")  # fmt: skip
    step.add_argument("--max-items", type=int, default=100, help="history length L (default 100)")
    step.add_argument("--k", type=int, default=5, help="PFT-I: recent items kept as text (default 5)")
    step.add_argument("--g", type=int, default=None, help="PFT-S session size (default: the released G)")
    step.add_argument("--batch-size", type=int, default=None,
                      help="samples per optimizer step (default: the released batch)")  # fmt: skip
    step.add_argument("--max-rows", type=int, default=16384, help="micro-batch rows (default 16384)")
    step.add_argument("--beams", type=int, default=20, help="beams per sample (default 20)")
    step.add_argument("--steps", type=int, default=None,
                      help="beam steps after the first token (default: the authors' protocol's bound for "
                           "this catalog)")  # fmt: skip
    plan.set_defaults(run=run_plan_gpu)


def run_plan_gpu(args: argparse.Namespace) -> int:
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
    from patchrec.data.dataset import make_samples
    from patchrec.data.release import load_release
    from patchrec.experiments import gpu_plan
    from patchrec.experiments.reproduce_settings import RELEASES, infer_preset, released

    dataset = load_release(args.data)
    preset = args.preset or infer_preset(dataset)
    if preset is not None and preset not in RELEASES:
        raise ValueError(f"--preset must be one of {sorted(RELEASES)}, got {preset!r}")
    hyper = released(preset, "vanilla") if preset else {}
    batch_size, g = args.batch_size or hyper.get("batch_size"), args.g or hyper.get("g")
    if batch_size is None or g is None:
        raise ValueError(f"--data {args.data} is not a released dataset: pass --batch-size and --g")
    tokens = tokenize_dataset(load_tokenizer(args.tokenizer), dataset)
    steps = gpu_plan.authors_steps(tokens) if args.steps is None else args.steps
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    settings = [gpu_plan.StepSettings(p, args.max_items, args.k, g, batch_size, args.max_rows, args.beams,
                                      steps) for p in plans]  # fmt: skip
    config = gpu_plan.model_config(args.model, tokens.vocab_size)
    train = make_samples(dataset, "train", args.max_items)
    test = make_samples(dataset, "test", args.max_items)
    results = gpu_plan.project(config, tokens, train, test, settings)
    print(f"PROJECTED for {args.model} on {args.data} (preset {preset or 'none'}), L={args.max_items}")
    print(gpu_plan.format_projection(results))
    print(f"\nPROJECTED summary (L={args.max_items}, K={args.k}, G={g}, batch {batch_size}, "
          f"{args.beams} beams, {steps} beam steps)\n{gpu_plan.markdown_table(results)}")  # fmt: skip
    if args.json:
        resolved = {"data": str(args.data), "tokenizer": str(args.tokenizer), "model": args.model,
                    "preset": preset, "command": " ".join(["patchrec", *sys.argv[1:]])}  # fmt: skip
        Path(args.json).write_text(json.dumps({"config": resolved, "results": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _gpu_check():
    """benches/gpu_check.py of the source checkout, or None (an installed package has no benches/)."""
    if not GPU_CHECK.is_file():
        return None
    name = "patchrec_gpu_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GPU_CHECK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def run_gpu(args: argparse.Namespace) -> int:
    check = _gpu_check()
    if check is None:
        raise FileNotFoundError(f"{GPU_CHECK}: the GPU check needs the source checkout (benches/)")
    return check.run(args)


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'patchrec[plot]'") from None
    from patchrec.reports.bench_report import write_report

    report = write_report(args.results, args.out)
    print(f"wrote {report} and its plots in {report.parent}")
    return 0
