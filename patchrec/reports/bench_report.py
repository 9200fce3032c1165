"""pytest-benchmark JSON -> a Markdown report of ratios and PNG plots (``patchrec bench report``).

Benches tag every benchmark with ``benchmark.group`` and ``extra_info`` keys ``provider``, ``plan``, ``L``
(history items), ``items_per_s``, ``peak_mem_bytes`` (optional), ``device``, and optionally
``latency_per_user_s``, ``reference`` (the provider the ratios divide by; default "patchrec") and
``max_items_in_budget`` + ``budget``. Only numbers from the same JSON file (one run, one machine, measured
side by side) are ever divided by each other: on a shared machine absolute times are not comparable
between runs, ratios within one run are.

Tables (per file and group):
- providers: rows (plan, L); the reference provider's median, and for each other provider its median and
  ``time ratio`` = provider median / reference median (> 1: the reference is that many times faster), plus a
  memory ratio when both carry ``peak_mem_bytes``;
- plans: for each provider and L, vanilla median / plan median (the speed-up the compression buys);
- budget: the longest history each plan fits in the stated budget, when the bench reports it.

Plots (matplotlib, Agg, imported only here): throughput (items/s) vs L per provider, one panel per plan;
latency per user vs history length per plan; peak memory vs L per provider when present.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PLAN_ORDER = ("vanilla", "pft-i", "pft-s", "pretrain", "dropout")
# The provider ratios divide by, when a bench names none: the first of these present in the group.
REFERENCE_ORDER = ("patchrec", "triton", "exact", "reference")


@dataclass(frozen=True)
class Record:
    """One benchmark of one results file, reduced to what the report joins on."""

    source: str  # results file stem: ratios never cross it
    group: str
    name: str
    provider: str
    plan: str
    L: int | None
    median_s: float
    items_per_s: float | None
    peak_mem_bytes: int | None
    latency_per_user_s: float | None
    reference: str  # extra_info "reference", "" when the bench names none
    mode: str | None  # extra_info "mode" (e.g. fwd / bwd of a kernel bench): part of the row key
    device: str
    extra: dict


def _plan_key(plan: str) -> tuple[int, str]:
    return (PLAN_ORDER.index(plan) if plan in PLAN_ORDER else len(PLAN_ORDER), plan)


def load_records(paths: list[str | Path]) -> list[Record]:
    """Benchmarks of every file that carry ``extra_info.provider`` (others, e.g. kernel benches without it,
    are listed under their group with their median only)."""
    records: list[Record] = []
    stems: dict[str, int] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such results file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from exc
        if not isinstance(data, dict) or "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks')")
        # Two files with the same stem (e.g. cpu.json from two folders) stay apart.
        source = path.stem if path.stem not in stems else f"{path.stem}-{stems[path.stem] + 1}"
        stems[path.stem] = stems.get(path.stem, 0) + 1
        for bench in data["benchmarks"]:
            info = bench.get("extra_info") or {}
            get = info.get
            length = get("L")
            records.append(
                Record(
                    source=source,
                    group=bench.get("group") or "(no group)",
                    name=bench.get("name", "?"),
                    provider=str(get("provider") or bench.get("name", "?")),
                    plan=str(get("plan") or "-"),
                    L=int(length) if length is not None else None,
                    median_s=float(bench["stats"]["median"]),
                    items_per_s=float(get("items_per_s")) if get("items_per_s") is not None else None,
                    peak_mem_bytes=int(get("peak_mem_bytes")) if get("peak_mem_bytes") is not None else None,
                    latency_per_user_s=(
                        float(get("latency_per_user_s")) if get("latency_per_user_s") is not None else None
                    ),
                    reference=str(get("reference") or ""),
                    mode=str(get("mode")) if get("mode") is not None else None,
                    device=str(
                        get("device") or data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
                    ),
                    extra=info,
                )
            )
    return records


def _by(records, *keys) -> dict[tuple, list[Record]]:
    out: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        out[tuple(getattr(r, k) for k in keys)].append(r)
    return dict(out)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}" if seconds < 10 else f"{seconds * 1e3:,.0f}"


def _ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}x" if x >= 1 else f"{x:.3g}x"


def _row_key(r: Record) -> tuple:
    return (_plan_key(r.plan), r.L if r.L is not None else -1, r.mode or "")


def group_reference(records: list[Record]) -> str | None:
    """The provider a group's ratios divide by (see ``REFERENCE_ORDER``), None when there is none."""
    named = [r.reference for r in records if r.reference]
    if named:
        return named[0]
    present = {r.provider for r in records}
    return next((p for p in REFERENCE_ORDER if p in present), None)


def provider_ratios(records: list[Record]) -> list[dict]:
    """Per (plan, L, mode) of one group of one file: every non-reference provider's time and memory ratio."""
    out = []
    name = group_reference(records)
    rows = _by(records, "plan", "L", "mode")
    for (plan, length, mode), rs in sorted(rows.items(), key=lambda kv: _row_key(kv[1][0])):
        by_provider = {r.provider: r for r in rs}
        ref = by_provider.get(name)
        for r in rs:
            if ref is None or r is ref:
                continue
            mem = None
            if r.peak_mem_bytes and ref.peak_mem_bytes:
                mem = r.peak_mem_bytes / ref.peak_mem_bytes
            out.append(
                dict(
                    plan=plan,
                    L=length,
                    mode=mode,
                    reference=ref.provider,
                    provider=r.provider,
                    reference_s=ref.median_s,
                    provider_s=r.median_s,
                    time_ratio=r.median_s / ref.median_s,
                    mem_ratio=mem,
                )
            )
    return out


def plan_ratios(records: list[Record]) -> list[dict]:
    """Per (provider, L) of one group of one file: vanilla median / each other plan's median."""
    out = []
    for (provider, length, _), rs in sorted(
        _by(records, "provider", "L", "mode").items(), key=lambda kv: (kv[0][0], _row_key(kv[1][0])[1:])
    ):
        by_plan = {r.plan: r for r in rs}
        base = by_plan.get("vanilla")
        for r in sorted(rs, key=lambda r: _plan_key(r.plan)):
            if base is None or r is base:
                continue
            out.append(
                dict(
                    provider=provider,
                    L=length,
                    mode=r.mode,
                    plan=r.plan,
                    vanilla_s=base.median_s,
                    plan_s=r.median_s,
                    speedup=base.median_s / r.median_s,
                )
            )
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _provider_table(records: list[Record]) -> str | None:
    ratios = provider_ratios(records)
    if not ratios:
        return None
    others = sorted({d["provider"] for d in ratios}, key=lambda p: p)
    has_mem = any(d["mem_ratio"] is not None for d in ratios)
    ref = ratios[0]["reference"]
    has_mode = any(d["mode"] is not None for d in ratios)
    header = ["plan", "L"] + (["mode"] if has_mode else []) + [f"{ref} ms"]
    for p in others:
        header += [f"{p} ms", f"{p} / {ref} time"] + ([f"{p} / {ref} mem"] if has_mem else [])
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for d in ratios:  # already in (plan, L) order
        cells[(d["plan"], d["L"], d["mode"])][d["provider"]] = d
    rows = []
    for (plan, length, mode), found in cells.items():
        first = next(iter(found.values()))
        row = [plan, "-" if length is None else str(length)] + ([mode or "-"] if has_mode else [])
        row.append(_ms(first["reference_s"]))
        for p in others:
            d = found.get(p)
            row += [_ms(d["provider_s"]) if d else "-", _ratio(d["time_ratio"]) if d else "-"]
            if has_mem:
                row.append(_ratio(d["mem_ratio"]) if d else "-")
        rows.append(row)
    return _table(header, rows)


def _plan_table(records: list[Record]) -> str | None:
    ratios = plan_ratios(records)
    if not ratios:
        return None
    rows = [
        [
            d["provider"] + (f" ({d['mode']})" if d["mode"] else ""),
            str(d["L"]),
            d["plan"],
            _ms(d["vanilla_s"]),
            _ms(d["plan_s"]),
            _ratio(d["speedup"]),
        ]
        for d in ratios
    ]
    return _table(["provider", "L", "plan", "vanilla ms", "plan ms", "vanilla / plan time"], rows)


def _budget_table(records: list[Record]) -> str | None:
    seen: dict[str, Record] = {}
    for r in records:
        if r.extra.get("max_items_in_budget") is not None:
            seen.setdefault(r.plan, r)
    if not seen:
        return None
    rows = []
    for plan, r in sorted(seen.items(), key=lambda kv: _plan_key(kv[0])):
        per_item = r.extra.get("rows_per_history_item")
        rows.append(
            [plan, "-" if per_item is None else f"{per_item:.3g}", f"{r.extra['max_items_in_budget']:,}"]
        )
    budget = next(iter(seen.values())).extra.get("budget", "the bench's budget")
    return f"Budget: {budget}.\n\n" + _table(
        ["plan", "rows per history item", "longest history (items)"], rows
    )


def _plain_table(records: list[Record]) -> str:
    rows = [
        [
            r.name,
            r.provider,
            r.plan,
            "-" if r.L is None else str(r.L),
            _ms(r.median_s),
            "-" if r.items_per_s is None else f"{r.items_per_s:,.1f}",
            "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:,.1f}",
        ]
        for r in sorted(records, key=lambda r: (r.provider, _row_key(r)))
    ]
    return _table(["benchmark", "provider", "plan", "L", "median ms", "items/s", "peak MiB"], rows)


def render_markdown(records: list[Record], images: dict[tuple[str, str], list[str]]) -> str:
    parts = [
        "# Benchmark report",
        "",
        "Ratios divide medians of the same results file only (one run, measured side by side). "
        "`X / ref time` > 1 means the reference provider is that many times faster than X; "
        "`vanilla / plan time` > 1 means the plan is that many times faster than vanilla.",
        "",
    ]
    for (source, group), rs in sorted(_by(records, "source", "group").items()):
        devices = ", ".join(sorted({r.device for r in rs}))
        parts += [f"## {group}", "", f"Results file `{source}`, device: {devices}.", ""]
        for title, table in (
            ("Providers", _provider_table(rs)),
            ("Plans", _plan_table(rs)),
            ("Longest history in budget", _budget_table(rs)),
        ):
            if table:
                parts += [f"### {title}", "", table, ""]
        parts += ["### All benchmarks", "", _plain_table(rs), ""]
        parts += [f"![{name}]({name})" for name in images.get((source, group), [])] + [""]
    return "\n".join(parts)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def plot_group(source: str, group: str, records: list[Record], out: Path) -> list[str]:
    """The group's PNGs (file names in ``out``): throughput, latency and memory, where the data allow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    prefix = f"{_slug(source)}_{_slug(group)}"
    plans = sorted({r.plan for r in records}, key=_plan_key)
    providers = sorted({r.provider for r in records})

    def panels(metric, ylabel, title, suffix, scale=1.0, log=True):
        fig, axes = plt.subplots(1, len(plans), figsize=(4.2 * len(plans), 3.6), squeeze=False, sharey=True)
        for ax, plan in zip(axes[0], plans, strict=True):
            for provider in providers:
                mine = [r for r in records if r.plan == plan and r.provider == provider and r.L is not None]
                pts = sorted((r.L, metric(r) * scale) for r in mine if metric(r))
                if pts:
                    # Providers can coincide (same logits-bound memory): distinct styles keep both visible.
                    k = providers.index(provider)
                    style = dict(
                        marker="os^Dv"[k % 5], linestyle=("-", "--", ":", "-.")[k % 4], markersize=7 - k
                    )
                    ax.plot(*zip(*pts, strict=True), label=provider, **style)
            ax.set_title(plan)
            ax.set_xticks(sorted({r.L for r in records if r.L is not None}))
            ax.set_xlabel("history items L")
            ax.grid(True, alpha=0.3)
            if log:
                ax.set_yscale("log")
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize="small")
        fig.suptitle(f"{group}: {title} ({source})")
        fig.tight_layout()
        name = f"{prefix}_{suffix}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)

    with_l = [r for r in records if r.L is not None]
    # A throughput curve needs several L; a single point per provider is already in the tables.
    if len(providers) > 1 and len({r.L for r in with_l}) > 1 and any(r.items_per_s for r in with_l):
        panels(lambda r: r.items_per_s, "history items / s", "throughput", "throughput")
    if any(r.peak_mem_bytes for r in with_l):
        panels(lambda r: r.peak_mem_bytes, "peak MiB", "peak memory", "memory", scale=2**-20)
    if any(r.latency_per_user_s for r in with_l):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for (provider, plan), rs in sorted(
            _by(with_l, "provider", "plan").items(), key=lambda kv: _plan_key(kv[0][1])
        ):
            pts = sorted((r.L, r.latency_per_user_s) for r in rs if r.latency_per_user_s)
            label = plan if len(providers) == 1 else f"{provider} {plan}"
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xlabel("history items in the prompt")
        ax.set_ylabel("latency per user (s)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_title(f"{group}: latency vs history length ({source})")
        fig.tight_layout()
        name = f"{prefix}_latency.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    """Write ``report.md`` and the PNGs into ``out``; returns the report's path."""
    records = load_records(paths)
    if not records:
        raise ValueError("the results files hold no benchmarks")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = {key: plot_group(*key, rs, out) for key, rs in _by(records, "source", "group").items()}
    report = out / "report.md"
    report.write_text(render_markdown(records, images))
    return report
