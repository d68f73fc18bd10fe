"""What ``camserve evaluate`` writes: means over images, the Markdown table, the curves plot
and ``evaluation.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def summarise(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over images; pointing and IoU over the images that have boxes (None if none)."""
    count = len(scores)
    curves = {}
    for curve in ("deletion_curve", "insertion_curve"):
        columns = zip(*(s[curve] for s in scores))
        curves[curve] = [sum(col) / count for col in columns]
    boxed = [s for s in scores if s["pointing_hit"] is not None]
    return {
        "images": count,
        "deletion_auc": sum(s["deletion_auc"] for s in scores) / count,
        "insertion_auc": sum(s["insertion_auc"] for s in scores) / count,
        "average_drop": sum(s["average_drop"] for s in scores) / count,
        "increase": sum(bool(s["increase"]) for s in scores) / count,
        "images_with_boxes": len(boxed),
        "pointing": sum(bool(s["pointing_hit"]) for s in boxed) / len(boxed) if boxed else None,
        "iou": sum(s["iou"] for s in boxed) / len(boxed) if boxed else None,
        **curves,
    }


def markdown_table(records: list[dict[str, Any]], summary: dict[str, Any],
                   kinds: list[str]) -> str:
    """Per image and map one row, then one mean row per map."""
    lines = [("| image | map | class | deletion AUC ↓ | insertion AUC ↑ | avg drop ↓ | "
              "increase ↑ | pointing ↑ | IoU ↑ |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        label = f"{record['class_index']} {record['label']} ({record['probability']:.1%})"
        for kind in kinds:
            s = record[kind]
            pointing = "–" if s["pointing_hit"] is None else ("hit" if s["pointing_hit"]
                                                               else "miss")
            iou = "–" if s["iou"] is None else f"{s['iou']:.3f}"
            lines.append(f"| {record['image']} | {kind} | {label} | {s['deletion_auc']:.3f} | "
                         f"{s['insertion_auc']:.3f} | {s['average_drop']:.1%} | "
                         f"{'yes' if s['increase'] else 'no'} | {pointing} | {iou} |")
    for kind in kinds:
        s = summary[kind]
        pointing = "–" if s["pointing"] is None else f"{s['pointing']:.0%}"
        iou = "–" if s["iou"] is None else f"{s['iou']:.3f}"
        lines.append(f"| **mean of {s['images']}** | {kind} | | {s['deletion_auc']:.3f} | "
                     f"{s['insertion_auc']:.3f} | {s['average_drop']:.1%} | "
                     f"{s['increase']:.0%} | {pointing} | {iou} |")
    return "\n".join(lines)


def plot_curves(path: Path, fractions: list[float], summary: dict[str, Any],
                method_name: str) -> bool:
    """Mean deletion and insertion curves, one line per map, into a PNG at ``path``.

    Uses matplotlib's object API on the Agg canvas (no pyplot, no global backend); returns
    False without writing when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for ax, curve, title in ((axes[0], "deletion_curve", "Deletion (lower AUC is better)"),
                             (axes[1], "insertion_curve", "Insertion (higher AUC is better)")):
        for kind, s in summary.items():
            name = curve.split("_")[0] + "_auc"
            ax.plot(fractions, s[curve], linestyle="--" if kind == "random" else "-",
                    marker=".", label=f"{kind} (AUC {s[name]:.3f})")
        ax.set_title(title)
        ax.set_xlabel("fraction of pixels " + ("removed" if curve == "deletion_curve"
                                               else "inserted"))
        ax.set_ylabel("probability of the class")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    count = next(iter(summary.values()))["images"]
    figure.suptitle(f"{method_name}: mean over {count} image{'s' * (count != 1)}")
    figure.tight_layout()
    figure.savefig(path)
    return True


def write(out: Path, report: dict[str, Any], kinds: list[str]) -> None:
    """``evaluation.json`` and ``curves.png`` (when matplotlib is installed) into ``out``,
    the Markdown table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=1))
    print(markdown_table(report["images"], report["mean"], kinds))
    print(f"\nwrote {out / 'evaluation.json'}")
    if plot_curves(out / "curves.png", report["fractions"], report["mean"], report["method"]):
        print(f"wrote {out / 'curves.png'}")
    else:
        print("camserve evaluate: note: matplotlib is not installed, so curves.png was not "
              "written (pip install matplotlib)", file=sys.stderr)
