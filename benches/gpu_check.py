"""Validate a CUDA GPU in one command and keep its numbers: ``bash benches/gpu_check.sh`` or
``patchrec bench gpu`` (both run this file). ``--dry-run`` prints the plan and runs nothing (no GPU needed).

Steps, in this order, each a child process with its own time limit inside one budget (570 s by default, so
that the check ends within 10 minutes on one H100); a step that fails is recorded and the next one runs, a
step that no longer fits the budget is skipped and recorded as such:

- install: wheels carried in ``--wheels DIR`` (for a machine without a package registry); flash-attn through
  pip (a prebuilt wheel, or a source build if it finishes within ``--flash-attn-s``; without flash-attn the
  attention runs on torch's varlen backend) and gguf (to read SmolLM2's GGUF file), each only when it does not
  import already;
- environment: versions, the device, the attention backend ``auto`` picks, whether ../shared is there;
- gpu-tests: every ``@pytest.mark.gpu`` test in tests/ (SmolLM2 apart);
- kernel-tests: the kernel tests that are not GPU-marked, on CUDA tensors this time;
- kernel-benches: the HBM bandwidth of a plain copy, then ``patch_embed`` at Llama-3.2-1B shapes (random
  weights) and the attention backends, in the same run (their GB/s read as a fraction of the copy's);
- smollm2: real-weight parity, ``tests/test_real_model.py`` (CPU, against transformers' own forward) and
  ``tests/test_gpu_real_model.py`` (the GPU kernels against that path, and beam search);
- train-step: ``bench_train_step`` at L = 50 and 200; inference: ``bench_inference`` (Figure 8);
- compile-report: ``python -m patchrec_kernels.compile_report`` with this machine's Triton;
- results: ``benches/results/gpu-<device>/gpu.json`` (every benchmark, pytest-benchmark format, with a
  ``gpu_check`` section: environment, steps, test counts, copy bandwidth) and ``gpu_check.md`` (the summary),
  then ``report/`` (``patchrec bench report``) and ``logs/`` (each step's output).

The benches and the SmolLM2 tests read ../shared (ML-1M, the Llama-3 tokenizer, SmolLM2); ``--shared DIR``
links ../shared to DIR when it is missing (a checkout copied to a lent machine has no ../shared).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BUDGET_S = 570
REPORT_RESERVE_S = 45  # kept for the results step whatever the benches take
MIN_STEP_S = 10  # a step with less time left than this is not started
TRAIN_LENGTHS = (50, 200)
KERNEL_TESTS = ["tests/test_patch_embed.py", "tests/test_patch_embed_checks.py",
                "tests/test_varlen_attention.py", "tests/test_varlen_attention_backends.py"]  # fmt: skip
SHARED_FILES = {
    "ml-1m": "data/patchrec/ml-1m/sequences.jsonl",
    "ml-100k": "data/patchrec/ml-100k/sequences.jsonl",
    "llama3-tokenizer": "tokenizers/llama3",
    "smollm2": "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
}

PROBE = r"""
import json, sys, torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count)
for name in ("triton", "transformers", "flash_attn", "gguf"):
    try:
        info[name] = __import__(name).__version__
    except Exception as error:
        info[name] = f"unavailable ({type(error).__name__}: {error})"[:300]
from patchrec_kernels.runtime import flash_attn_problem
from patchrec_kernels.varlen_attention import resolve_varlen_backend
info["flash_attn_problem"] = flash_attn_problem()
if torch.cuda.is_available():
    q = torch.zeros(1, 32, 64, device="cuda", dtype=torch.bfloat16)
    info["attention_backend_bf16"] = resolve_varlen_backend(q, return_lse=True)
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
"""


@dataclass
class Step:
    name: str
    what: str
    command: list[str]
    limit_s: int
    bench_json: str | None = None  # pytest-benchmark JSON it writes, relative to the output directory
    junit: str | None = None  # JUnit XML it writes, relative to the output directory
    unless_imports: str | None = None  # skipped when this module imports already (install steps)
    optional: bool = False  # its failure does not fail the check (installs: there are fallbacks)
    env: dict = field(default_factory=dict)


def _pytest(*args: str, junit: str | None = None, bench_json: str | None = None, out: Path) -> list[str]:
    command = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    if junit:
        command.append(f"--junitxml={out / junit}")
    if bench_json:
        command.append(f"--benchmark-json={out / bench_json}")
    return command


def build_plan(args, out: Path) -> list[Step]:
    pip = [PY, "-m", "pip", "install", "--retries", "0", "--timeout", "15"]
    steps = []
    if args.wheels:
        wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl"))
        command = [PY, "-m", "pip", "install", "--no-index", "--no-deps", *wheels]
        steps.append(Step("install-wheels", f"the wheels in {args.wheels}", command, 120, optional=True))
    if not args.skip_install:
        steps += [
            Step("install-flash-attn", "flash-attn (else attention runs on torch's varlen backend)",
                 [*pip, "--no-build-isolation", "flash-attn"], args.flash_attn_s, unless_imports="flash_attn",
                 optional=True, env={"MAX_JOBS": str(os.cpu_count() or 4)}),
            Step("install-gguf", "gguf, to read SmolLM2's GGUF file", [*pip, "gguf"], 60,
                 unless_imports="gguf", optional=True),
        ]  # fmt: skip
    train_cases = [
        f"benches/bench_train_step.py::test_train_step[{plan}-{length}-{provider}]"
        for length in TRAIN_LENGTHS
        for plan in ("vanilla", "pft-i", "pft-s")
        for provider in ("patchrec", "hf-padded", "authors-loop")
    ]
    kernel_benches = ["benches/bench_hbm_copy.py", "benches/bench_patch_embed.py",
                      "benches/bench_varlen_attention.py"]  # fmt: skip
    # Parity only: the CPU file's training and evaluation tests belong to the CPU suite.
    smollm2 = ["tests/test_real_model.py::test_packed_path_matches_transformers_own_forward",
               "tests/test_gpu_real_model.py"]  # fmt: skip
    gpu = ["-m", "gpu", "tests", "--ignore=tests/test_gpu_real_model.py"]
    compiled = [PY, "-m", "patchrec_kernels.compile_report", "--json", str(out / "logs" / "compile.json")]

    def tests(name, what, args, limit):
        junit = f"logs/{name}.xml"
        return Step(name, what, _pytest(*args, junit=junit, out=out), limit, junit=junit)

    def benches(name, what, args, limit):
        bench_json = f"logs/{name}.json"
        return Step(name, what, _pytest(*args, bench_json=bench_json, out=out), limit, bench_json=bench_json)

    return steps + [
        Step("environment", "versions, device, attention backend",
             [PY, "-c", PROBE, str(out / "logs" / "environment.json")], 60),
        tests("gpu-tests", "every @pytest.mark.gpu test (SmolLM2 apart)", gpu, 240),
        tests("kernel-tests", "kernel tests not GPU-marked, on CUDA", ["-m", "not gpu", *KERNEL_TESTS], 120),
        benches("kernel-benches", "HBM copy, patch_embed (Llama-3.2-1B), attention", kernel_benches, 150),
        tests("smollm2", "SmolLM2-135M: CPU vs transformers, GPU kernels vs CPU, beam search", smollm2, 180),
        benches("train-step", f"training step at L in {TRAIN_LENGTHS}, three providers", train_cases, 200),
        benches("inference", "Figure 8: prefill and exact ranking, long ML-1M histories",
                ["benches/bench_inference.py"], 150),
        Step("compile-report", "registers and spills of every kernel, sm_80 and sm_90", compiled, 90),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- running


def _child_env(step: Step) -> dict:
    # Benches refuse the interpreter; on CUDA the tests turn it off themselves.
    return {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1", **step.env}


def _imports(module: str) -> bool:
    return subprocess.run([PY, "-c", f"import {module}"], cwd=ROOT, capture_output=True).returncode == 0


def junit_counts(path: Path) -> dict | None:
    if not path.is_file():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = lambda key: sum(int(s.get(key, 0)) for s in suites)
    tests, failed, errors, skipped = count("tests"), count("failures"), count("errors"), count("skipped")
    passed = tests - failed - errors - skipped
    return {"passed": passed, "failed": failed, "errors": errors, "skipped": skipped}


def run_step(step: Step, out: Path, deadline: float) -> dict:
    result = {"step": step.name, "what": step.what, "command": shlex.join(step.command)}
    limit = min(step.limit_s, deadline - time.monotonic())
    if limit < MIN_STEP_S:
        return {**result, "status": "not run", "reason": "out of budget", "seconds": 0.0}
    if step.unless_imports and _imports(step.unless_imports):
        reason = f"{step.unless_imports} imports already"
        return {**result, "status": "skipped", "reason": reason, "seconds": 0.0}
    log = out / "logs" / f"{step.name}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {result['command']}\n")
        f.flush()
        # A session of its own, so that a step over its limit is stopped with all its children.
        proc = subprocess.Popen(step.command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=_child_env(step), start_new_session=True)  # fmt: skip
        try:
            returncode, timed_out = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest then ends its session normally, so pytest-benchmark still writes its JSON.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                returncode = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                returncode = proc.wait()
            timed_out = True
    status = "timed out" if timed_out else "passed" if returncode in (0, 5) else "failed"  # 5: no tests
    result.update(status=status, returncode=returncode, seconds=round(time.monotonic() - start, 1),
                  limit_s=round(limit), log=str(log.relative_to(out)), optional=step.optional)  # fmt: skip
    if step.junit:
        result["tests"] = junit_counts(out / step.junit)
    print(f"[gpu-check] {step.name}: {status} in {result['seconds']} s", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- results


def merge_benchmarks(paths: list[Path]) -> dict:
    """One pytest-benchmark document holding the benchmarks of every file; kernel GB/s as a fraction of the
    copy bandwidth measured in the same check."""
    merged: dict = {"benchmarks": []}
    for path in paths:
        if path.is_file():
            data = json.loads(path.read_text())
            for key in ("machine_info", "commit_info", "datetime", "version"):
                merged.setdefault(key, data.get(key))
            merged["benchmarks"] += data.get("benchmarks", [])
    copies = [b for b in merged["benchmarks"] if b.get("group") == "hbm_copy"]
    copy_gb_s = copies[0]["extra_info"].get("gb_per_s") if copies else None
    for bench in merged["benchmarks"]:
        info = bench.setdefault("extra_info", {})
        if copy_gb_s and info.get("gb_per_s") and bench.get("group") != "hbm_copy":
            info["fraction_of_copy"] = info["gb_per_s"] / copy_gb_s
    merged["copy_gb_per_s"] = copy_gb_s
    return merged


def _summary_md(check: dict, benchmarks: list[dict]) -> str:
    env = check["environment"]
    lines = [
        f"# GPU check: {env.get('device', '?')}",
        "",
        f"torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, flash-attn "
        f"{env.get('flash_attn')}, transformers {env.get('transformers')}; attention backend (bf16): "
        f"{env.get('attention_backend_bf16', '?')}. Budget {check['budget_s']} s, took {check['seconds']} s.",
        "",
        "| step | status | seconds | tests passed / failed / errors / skipped |",
        "|---|---|---|---|",
    ]
    for r in check["steps"]:
        tests = r.get("tests")
        counts = " / ".join(map(str, tests.values())) if tests else "-"
        status = r["status"] + (f" ({r['reason']})" if r.get("reason") else "")
        lines.append(f"| {r['step']} | {status} | {r['seconds']} | {counts} |")
    copy = check.get("copy_gb_per_s")
    kernels = [b for b in benchmarks if b["extra_info"].get("gb_per_s") and b.get("group") != "hbm_copy"]
    if copy:
        lines += ["", f"Plain copy: {copy:,.0f} GB/s (read + write).", ""]
    if kernels:
        lines += ["| benchmark | GB/s | fraction of copy |", "|---|---|---|"]
        for b in kernels:
            info = b["extra_info"]
            fraction = f"{info['fraction_of_copy']:.2f}" if "fraction_of_copy" in info else "-"
            lines.append(f"| {b['name']} | {info['gb_per_s']:,.0f} | {fraction} |")
    lines += ["", "Benchmarks: `gpu.json`; tables and plots: `report/report.md`; step outputs: `logs/`.", ""]
    return "\n".join(lines)


def write_results(out: Path, steps: list[Step], results: list[dict], *, budget_s: int, seconds: float):
    """gpu.json and gpu_check.md from the steps' outputs; returns the path of gpu.json."""
    probe = out / "logs" / "environment.json"
    environment = json.loads(probe.read_text()) if probe.is_file() else {}
    shared = ROOT.parent / "shared"
    environment["shared"] = {name: (shared / rel).exists() for name, rel in SHARED_FILES.items()}
    merged = merge_benchmarks([out / s.bench_json for s in steps if s.bench_json])
    ok = all(r["status"] in ("passed", "skipped") or r.get("optional") for r in results)
    check = {"environment": environment, "steps": results, "budget_s": budget_s, "seconds": round(seconds, 1),
             "copy_gb_per_s": merged.pop("copy_gb_per_s"), "ok": ok}  # fmt: skip
    path = out / "gpu.json"
    path.write_text(json.dumps({"gpu_check": check, **merged}, indent=1))
    (out / "gpu_check.md").write_text(_summary_md(check, merged["benchmarks"]))
    return path


# ------------------------------------------------------------------------------------------------ main


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _device_name(dry_run: bool) -> str | None:
    """The first CUDA device's name, or None. The dry run asks nvidia-smi, so that it imports no torch."""
    if dry_run:
        smi = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        try:
            names = subprocess.run(smi, capture_output=True, text=True, timeout=20).stdout.split("\n")
        except (OSError, subprocess.TimeoutExpired):
            return None
        return names[0].strip() or None
    probe = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    return subprocess.run([PY, "-c", probe], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The check's options (also those of ``patchrec bench gpu``)."""
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--out", help="output directory (default: benches/results/gpu-<device>)")
    parser.add_argument("--budget-s", type=int, default=BUDGET_S, help=f"whole check (default {BUDGET_S})")
    parser.add_argument("--flash-attn-s", type=int, default=150, help="flash-attn install limit, s")
    parser.add_argument("--skip-install", action="store_true", help="install nothing")
    parser.add_argument("--wheels", metavar="DIR", help="install the *.whl in DIR first (no registry needed)")
    parser.add_argument("--shared", metavar="DIR", help="link ../shared to DIR when ../shared is missing")


def run(args: argparse.Namespace) -> int:
    device = _device_name(args.dry_run)
    if device is None and not args.dry_run:
        print("gpu_check: no CUDA device here; --dry-run prints the plan", file=sys.stderr)
        return 2
    name = _slug(device) if device else "<device>"  # only the dry run goes on without a device
    out = Path(args.out) if args.out else ROOT / "benches" / "results" / f"gpu-{name}"
    steps = build_plan(args, out)
    if args.dry_run:
        print(f"GPU check, dry run: nothing runs. Device: {device or '<none>'}; budget {args.budget_s} s.")
        print(f"Writes {out}/gpu.json, gpu_check.md, report/ and logs/.")
        for i, step in enumerate(steps, 1):
            extra = f", skipped when {step.unless_imports} imports" if step.unless_imports else ""
            print(f"\n{i:2d}. {step.name} (at most {step.limit_s} s{extra}): {step.what}")
            print(f"    {shlex.join(step.command) if step.name != 'environment' else '$PY -c <probe>'}")
        print(f"\n{len(steps) + 1:2d}. results: gpu.json, gpu_check.md, then: {PY} -m patchrec bench report "
              f"{out}/gpu.json --out {out}/report")  # fmt: skip
        return 0

    shared = ROOT.parent / "shared"
    if args.shared and not shared.exists():
        shared.symlink_to(Path(args.shared).resolve(), target_is_directory=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget_s - REPORT_RESERVE_S
    results = [run_step(step, out, deadline) for step in steps]
    path = write_results(out, steps, results, budget_s=args.budget_s, seconds=time.monotonic() - start)
    report = [PY, "-m", "patchrec", "bench", "report", str(path), "--out", str(out / "report")]
    report = subprocess.run(report, cwd=ROOT, capture_output=True, text=True, timeout=120)
    (out / "logs" / "report.log").write_text(report.stdout + report.stderr)
    ok = json.loads(path.read_text())["gpu_check"]["ok"]
    print(f"[gpu-check] {'OK' if ok else 'FAILED'}: {path}, {out / 'gpu_check.md'}, {out / 'report'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benches/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
