"""The study's outputs: the terminal table, results.json and the accuracy-against-batch-size plot."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# study.summarize's {variant: {batch size: {"accuracy", "std", "per_seed", "diverged"}}}
Summary = Mapping[str, Mapping[int, Mapping[str, Any]]]

REFERENCES = ("none", "BatchNorm2d")  # drawn on both panels of the plot, for comparison
STANDARD = ("none", "BatchNorm2d", "GroupNorm", "InstanceNorm2d", "LayerNorm", "RMSNorm")


def format_table(summary: Summary, batch_sizes: Iterable[int], seeds: int) -> str:
    """Test accuracy (%) per variant (rows) and batch size (columns), mean over the seeds, with
    the spread (population standard deviation over the seeds) and a `!` where a seed diverged."""
    sizes = sorted(batch_sizes)
    name_width = max(len("variant"), *(len(v) for v in summary))
    cells = {v: [_cell(summary[v][bs], seeds) for bs in sizes] for v in summary}
    width = max(len("batch 32"), *(len(c) for row in cells.values() for c in row))
    head = "variant".ljust(name_width) + "".join(f"  {'batch ' + str(bs):>{width}}" for bs in sizes)
    lines = [head, "-" * len(head)]
    for v, row in cells.items():
        lines.append(v.ljust(name_width) + "".join(f"  {c:>{width}}" for c in row))
    spread = " +- std over the seeds" if seeds > 1 else ""
    lines.append(f"test accuracy (%), mean of {seeds} seed{'s' if seeds > 1 else ''}{spread}; "
                 f"! = a seed diverged (non-finite loss)")
    return "\n".join(lines)


def _cell(entry: Mapping[str, Any], seeds: int) -> str:
    text = f"{100 * entry['accuracy']:.1f}"
    if seeds > 1:
        text += f" +-{100 * entry['std']:.1f}"
    return text + ("!" if entry["diverged"] else "")


def write_json(path: str, config: Mapping[str, Any], summary: Summary) -> None:
    payload = {"config": config,
               "results": {v: {str(bs): entry for bs, entry in row.items()} for v, row in summary.items()}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def plot(path: str, summary: Summary, batch_sizes: Iterable[int], title: str) -> None:
    """Accuracy against batch size (log2 axis), one line per variant: the standard layers on the
    left, the research variants on the right, `none` and BatchNorm2d on both for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    sizes = sorted(batch_sizes)
    standard = [v for v in summary if v in STANDARD]
    research = [v for v in summary if v not in STANDARD]
    panels = [(t, vs) for t, vs in (("standard layers", standard), ("research variants", research)) if vs]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    assert isinstance(cmap, ListedColormap) and isinstance(cmap.colors, tuple)  # tab20's 20 colors
    colors = cmap.colors
    for ax, (name, names) in zip(axes[0], panels):
        shown = list(names) + [r for r in REFERENCES if r in summary and r not in names]
        for i, v in enumerate(shown):
            reference = v not in names
            acc = [100 * summary[v][bs]["accuracy"] for bs in sizes]
            ax.plot(sizes, acc, marker=None if reference else "o",
                    linestyle=(":" if v == "none" else "--") if reference else "-",
                    color="0.35" if reference else colors[i % len(colors)], label=v + (" (ref.)" if reference else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(shown) > 8 else 1, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
