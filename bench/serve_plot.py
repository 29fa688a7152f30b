"""`--plot DIR`: a TTFT CDF and output/request throughput over time, as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from bench.serve_client import RequestOutput
from bench.serve_metrics import per_second_output


def write_plots(outputs: list[RequestOutput], start: float, out_dir: str, label: str) -> list[Path]:
    """Write `<label>-ttft-cdf.png` and `<label>-throughput.png` under `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{label}-ttft-cdf.png", directory / f"{label}-throughput.png"]
    ttfts_ms = sorted(o.ttft * 1000.0 for o in outputs if o.success)

    figure, axes = plt.subplots(figsize=(6, 4))
    if ttfts_ms:
        fractions = [(i + 1) / len(ttfts_ms) for i in range(len(ttfts_ms))]
        axes.step(ttfts_ms, fractions, where="post")
    axes.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title=f"TTFT CDF ({label})", ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=100)
    plt.close(figure)

    tokens_per_s, _ = per_second_output(outputs, start)
    finished = [int(o.start_time + o.latency - start) for o in outputs if o.success]
    requests_per_s = [finished.count(second) for second in range(len(tokens_per_s))]
    figure, axes = plt.subplots(figsize=(6, 4))
    (line,) = axes.plot(range(len(tokens_per_s)), tokens_per_s, label="output tokens/s")
    axes.set(xlabel="time since start (s)", ylabel="output tokens/s", title=f"Throughput over time ({label})")
    twin = axes.twinx()
    bars = twin.bar(range(len(requests_per_s)), requests_per_s, alpha=0.3, color="tab:orange", label="requests done/s")
    twin.set_ylabel("requests completed/s")
    axes.legend(handles=[line, bars], loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=100)
    plt.close(figure)
    return paths
