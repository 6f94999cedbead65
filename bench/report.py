"""Turn ``fos bench`` JSON files into a Markdown table and PNG plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(files: list[Path]) -> list[dict]:
    rows = []
    for f in files:
        data = json.loads(f.read_text())
        rows.extend(data["levels"])
    return rows


def markdown(rows: list[dict], baseline: str | None) -> str:
    base = {(r["workload"], r["concurrency"]): r["tokens_per_s"] for r in rows if r["label"] == baseline}
    lines = [
        "| workload | concurrency | server | tokens/s | inputs/s | req/s | p50 ms | p95 ms | p99 ms | errors |"
        + (f" × {baseline} |" if baseline else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if baseline else ""),
    ]
    for r in sorted(rows, key=lambda r: (r["workload"], r["concurrency"], -r["tokens_per_s"])):
        ratio = base.get((r["workload"], r["concurrency"]))
        cells = [
            r["workload"],
            str(r["concurrency"]),
            r["label"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['inputs_per_s']:.1f}",
            f"{r['requests_per_s']:.2f}",
            f"{r['p50_ms']:.0f}",
            f"{r['p95_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            str(sum(r["errors"].values()) if r["errors"] else 0),
        ]
        if baseline:
            cells.append(f"{r['tokens_per_s'] / ratio:.2f}" if ratio else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for workload in sorted({r["workload"] for r in rows}):
        subset = [r for r in rows if r["workload"] == workload]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for n, label in enumerate(sorted({r["label"] for r in subset})):
            color = f"C{n}"  # one colour per server in both panels
            pts = sorted((r for r in subset if r["label"] == label), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in pts]
            ax1.plot(xs, [r["tokens_per_s"] for r in pts], marker="o", color=color, label=label)
            ax2.plot(xs, [r["p99_ms"] for r in pts], marker="o", color=color, label=f"{label} p99")
            ax2.plot(xs, [r["p50_ms"] for r in pts], marker=".", linestyle="--", color=color, label=f"{label} p50")
        ax1.set(title=f"{workload}: throughput", xlabel="concurrency", ylabel="tokens/s", xscale="log")
        ax2.set(title=f"{workload}: latency", xlabel="concurrency", ylabel="ms", xscale="log", yscale="log")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"bench-{workload}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--baseline", help="label the ratio column divides by")
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args()
    rows = load(args.files)
    args.out.mkdir(parents=True, exist_ok=True)
    print(markdown(rows, args.baseline))
    for path in plots(rows, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
