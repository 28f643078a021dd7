"""What ``ultrasam evaluate`` writes: per-data-set summary, Markdown table, JSON, Dice plot (PNG).

Means and standard deviations are over objects (2D) or volumes (3D); the standard deviation is
the population one (``numpy.std``, ddof 0).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ultrasam.atomic import atomic_path, write_text_atomic

# (row key, column title, colour in the plot); ellipse next to box, the figure it qualifies.
IMAGE_SCORES = [("box_dice", "box", (31, 119, 180)), ("ellipse_dice", "ellipse", (150, 150, 150)),
                ("point_dice", "point", (230, 120, 20))]
VOLUME_SCORES = [("dice3d", "3D point", (40, 150, 40))]


def _stats(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4),
            "median": round(float(np.median(values)), 4)}


def summarise(objects: list[dict], volumes: list[dict]) -> dict:
    """Per data set: ``kind``, ``n`` (objects or volumes), and mean/std of every score present.

    Image data sets also get ``images``, ``points_moved`` (centroids moved onto the mask),
    ``free_boxes`` (objects whose box could be moved clear of every object; the free-box figures
    are over those), ``free_boxes_left`` (how many of those masks left their free box),
    ``negative_clicks`` and ``negatives_obeyed`` (corrective clicks, summed over objects).
    """
    summary: dict[str, dict] = {}
    image_keys = ("box_dice", "box_iou", "box_inside", "ellipse_dice", "point_dice", "point_iou",
                  "free_inside", "free_left", "corrected_dice")
    for kind, rows, keys in (("images", objects, image_keys), ("volumes", volumes, ("dice3d", "iou3d"))):
        groups = defaultdict(list)
        for row in rows:
            groups[row["dataset"]].append(row)
        for name, members in groups.items():
            entry = {"kind": kind, "n": len(members)}
            for key in keys:  # a free box may fit nowhere (None): its figures are over those that fit
                values = [r[key] for r in members if r.get(key) is not None]
                if values:
                    entry[key] = _stats(values)
            if kind == "images":
                entry["images"] = len({r["image"] for r in members})
                entry["points_moved"] = sum(bool(r["point_moved"]) for r in members)
                entry["free_boxes"] = sum(r.get("free_inside") is not None for r in members)
                entry["free_boxes_left"] = sum(r.get("free_left") == 1.0 for r in members)
                entry["negative_clicks"] = sum(r.get("negative_clicks", 0) for r in members)
                entry["negatives_obeyed"] = sum(r.get("negatives_obeyed", 0) for r in members)
            summary[name if name not in summary else f"{name} ({kind})"] = entry
    return summary


def _cell(entry: dict, key: str) -> str:
    return f"{entry[key]['mean']:.3f} ± {entry[key]['std']:.3f}" if key in entry else "–"


def _median(entry: dict, key: str) -> str:
    return f"{entry[key]['median']:.3f}" if key in entry else "–"


def _count(entry: dict, part: str, whole: str) -> str:
    return f"{entry[part]} of {entry[whole]}" if entry.get(whole) else "–"


def markdown(results: dict) -> str:
    """Markdown tables of ``results["datasets"]`` (2D, then 3D), headed by the model."""
    datasets = results["datasets"]
    lines = [f"Model: {results['model']}", ""]
    images = {name: entry for name, entry in datasets.items() if entry["kind"] == "images"}
    volumes = {name: entry for name, entry in datasets.items() if entry["kind"] == "volumes"}
    if images:
        lines += ["| data set | objects | box Dice | ellipse-in-box Dice | box IoU | inside box (median) "
                  "| point Dice | point IoU | free box: inside (median) | free box: left it "
                  "| corrected Dice | negative clicks obeyed |",
                  "|---|---:|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {e['n']} | {_cell(e, 'box_dice')} | {_cell(e, 'ellipse_dice')} | {_cell(e, 'box_iou')} "
                  f"| {_median(e, 'box_inside')} | {_cell(e, 'point_dice')} | {_cell(e, 'point_iou')} "
                  f"| {_median(e, 'free_inside')} | {_count(e, 'free_boxes_left', 'free_boxes')} "
                  f"| {_cell(e, 'corrected_dice')} | {_count(e, 'negatives_obeyed', 'negative_clicks')} |"
                  for name, e in images.items()]
        lines.append("")
    if volumes:
        lines += ["| data set | volumes | 3D Dice (one point) | 3D IoU |", "|---|---:|---|---|"]
        lines += [f"| {name} | {e['n']} | {_cell(e, 'dice3d')} | {_cell(e, 'iou3d')} |" for name, e in volumes.items()]
        lines.append("")
    moved = [f"{name} {e['points_moved']} of {e['n']}" for name, e in images.items() if e["points_moved"]]
    if moved:
        lines += ["Centroids outside their object, clicked at the nearest object pixel instead: "
                  + ", ".join(moved) + ".", ""]
    lines.append("Mean ± standard deviation over objects (volumes for 3D). Ellipse-in-box: the ellipse "
                 "inscribed in the box prompt, no model. Inside box: median share of the box prompt's "
                 "predicted pixels inside the box. Free box: each object's box moved to the nearest "
                 "place clear of every object; the median share of its predicted pixels inside it, and "
                 "how many of those masks left it (less than 95 % inside). Corrected: the point, then up to two "
                 "corrective clicks, each on the deepest pixel of the answer's error; a negative click is "
                 "obeyed when its pixel leaves the mask. Protocol: docs/EVALUATION.md.")
    return "\n".join(lines) + "\n"


def plot_columns(objects: list[dict], volumes: list[dict]) -> list[tuple[str, list[float], tuple]]:
    """(label, per-object Dice values, colour) of every plotted column, data set by data set."""
    columns = []
    for rows, scores in ((objects, IMAGE_SCORES), (volumes, VOLUME_SCORES)):
        names = list(dict.fromkeys(r["dataset"] for r in rows))
        for name in names:
            members = [r for r in rows if r["dataset"] == name]
            columns += [(f"{name}\n{title}", [r[key] for r in members], colour)
                        for key, title, colour in scores if key in members[0]]
    return columns


def dice_plot(columns: list[tuple[str, list[float], tuple]], seed: int = 0) -> Image.Image:
    """Strip plot with a quartile box per column: every dot one object's Dice (y from 0 to 1)."""
    left, top, column_width, plot_height, bottom = 48, 34, 96, 300, 50
    width, height = left + column_width * max(len(columns), 1) + 16, top + plot_height + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def y_of(value: float) -> float:
        return top + (1.0 - value) * plot_height

    draw.text((left, 8), "Dice per object (per volume for 3D)", fill="black", font=font)
    for tick in np.linspace(0, 1, 6):
        draw.line([(left, y_of(tick)), (width - 16, y_of(tick))], fill=(225, 225, 225))
        draw.text((8, y_of(tick) - 6), f"{tick:.1f}", fill="black", font=font)
    rng = np.random.default_rng(seed)  # fixed jitter: the same results draw the same picture
    for n, (label, values, colour) in enumerate(columns):
        centre = left + column_width * (n + 0.5)
        values = np.clip(np.asarray(values, dtype=float), 0, 1)
        for x, v in zip(centre + rng.uniform(-0.3, 0.3, len(values)) * column_width, values):
            draw.ellipse([x - 2, y_of(v) - 2, x + 2, y_of(v) + 2], fill=colour)
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        half = 0.38 * column_width
        draw.rectangle([centre - half, y_of(q3), centre + half, y_of(q1)], outline="black")
        draw.line([(centre - half, y_of(median)), (centre + half, y_of(median))], fill="black", width=3)
        draw.multiline_text((centre - half, top + plot_height + 6), f"{label}\nmean {values.mean():.3f}",
                            fill="black", font=font, spacing=2)
    return image


def write_results(results: dict, folder: Path) -> str:
    """Write ``results.json``, ``results.md`` and ``dice.png`` into ``folder`` (each atomically);
    returns the Markdown."""
    table = markdown(results)
    write_text_atomic(folder / "results.json", json.dumps(results, indent=1, default=str))
    write_text_atomic(folder / "results.md", table)
    with atomic_path(folder / "dice.png", suffix=".png") as temporary:
        dice_plot(plot_columns(results["objects"], results["volumes"])).save(temporary)
    return table

