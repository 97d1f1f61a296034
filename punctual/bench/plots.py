"""Plots of a rate sweep: latency percentiles and SLO attainment against request rate, a curve per system."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("TTFT (ms)", "ttft_ms"), ("TPOT (ms)", "tpot_ms"), ("E2E latency (ms)", "e2e_ms"))


def plot_sweep(runs: list[dict], path: str | Path, target: float = 0.9) -> list[Path]:
    """One PNG per workload (named PATH-WORKLOAD.png when there are several); returns the files."""
    rate_runs = [r for r in runs if r.get("rate") is not None and not math.isinf(r["rate"])]
    workloads = sorted({r["workload"] for r in rate_runs})
    path = Path(path)
    written = []
    for workload in workloads:
        out = path if len(workloads) == 1 else path.with_name(f"{path.stem}-{workload}{path.suffix or '.png'}")
        plot_workload([r for r in rate_runs if r["workload"] == workload], workload, out, target)
        written.append(out)
    return written


def plot_workload(runs: list[dict], workload: str, out: Path, target: float) -> None:
    systems = list(dict.fromkeys(r["system"] for r in runs))
    has_slo = any("slo" in r["summary"] for r in runs)
    fig, axes = plt.subplots(1, len(PANELS) + has_slo, figsize=(4.2 * (len(PANELS) + has_slo), 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, system in enumerate(systems):
        points = sorted((r["rate"], r["summary"]) for r in runs if r["system"] == system)
        rates = [rate for rate, _ in points]
        color = colors[i % len(colors)]
        for ax, (label, key) in zip(axes, PANELS):
            for stat, style in (("median", "-"), ("p99", "--")):
                values = [(s.get(key) or {}).get(stat, math.nan) for _, s in points]
                ax.plot(rates, values, style, marker="o", color=color, label=f"{system} {stat}")
            ax.set_ylabel(label)
        if has_slo:
            attainment = [s["slo"]["attainment"] * 100 if "slo" in s else math.nan for _, s in points]
            axes[-1].plot(rates, attainment, marker="o", color=color, label=system)
    slo = next((r["summary"]["slo"] for r in runs if "slo" in r["summary"]), None)
    if slo is not None:  # the SLO lines on the panels they bound
        axes[0].axhline(slo["ttft_ms"], color="gray", linestyle=":", label="SLO")
        axes[1].axhline(slo["tpot_ms"], color="gray", linestyle=":", label="SLO")
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if has_slo:
        axes[-1].axhline(target * 100, color="gray", linestyle=":", label=f"{target:.0%} target")
        axes[-1].set_ylabel("SLO attainment (%)")
        axes[-1].set_ylim(-2, 102)
        axes[-1].legend(fontsize=7)
    fig.suptitle(f"{workload}: median (solid) and p99 (dashed)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
