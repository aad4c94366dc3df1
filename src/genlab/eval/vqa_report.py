"""The files of a VQA evaluation: answers.csv, report.md, report.json and qa_grid.png.

Every file is rendered in memory and written atomically (``genlab.io``), so a killed run leaves the
previous report or the new one, never half of one. ``before`` and ``after`` are what
``genlab.eval.vqa.evaluate_vqa`` returns, ``{"exact_match": score_vqa(...), "rouge": rouge(...) | None}``,
or a flat ``score_vqa`` dict with a ``"rouge"`` key added.
"""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from genlab.eval.vqa import exact_match
from genlab.io import atomic_write_json, atomic_write_text

CSV_COLUMNS = ("image", "question", "reference", "prediction")
CSV_OPTIONAL = ("family", "before")
MAX_GRID = 16


def write_answers_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write one CSV line per row: image, question, reference, prediction, then family and before
    when any row has them. Quoting follows RFC 4180 (Python's ``csv``), so commas, quotes and line
    breaks in a question read back unchanged with ``csv.DictReader``; a ``None`` reference (test
    split) is written as an empty field. Other keys of a row are ignored; a missing required key is a
    ``ValueError`` naming the row."""
    columns = list(CSV_COLUMNS) + [c for c in CSV_OPTIONAL if any(c in r for r in rows)]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for i, row in enumerate(rows):
        missing = [c for c in CSV_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"answers row {i} has no {', '.join(missing)}")
        writer.writerow({c: "" if row.get(c) is None else str(row.get(c)) for c in columns})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())
    return path


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _n(before: int | None, after: int | None) -> str:
    return str(after) if before is None or before == after else f"{before} / {after}"


def _parts(scores: Mapping[str, Any] | None) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(exact-match scores, ROUGE scores) of either shape a caller may hand in: ``evaluate_vqa``'s
    ``{"exact_match": ..., "rouge": ...}`` or a flat ``score_vqa`` dict with a ``"rouge"`` key added."""
    if not scores:
        return {}, {}
    em = scores["exact_match"] if "exact_match" in scores else scores
    return em, scores.get("rouge") or {}


def report_table(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the report: ``{"metric", "n", "n_before", "before", "after"}`` for exact match
    overall, per family (in sorted order) and ROUGE-1/2/L/Lsum F1, precision and recall. ``before``
    is ``None`` in every row when there is no before-model; a value is ``None`` where it cannot be
    computed (no reference, no ROUGE)."""
    (b_em, b_rouge), (a_em, a_rouge) = _parts(before), _parts(after)
    rows = [{"metric": "exact match", "n": a_em["n"], "n_before": b_em.get("n"),
             "before": b_em.get("accuracy"), "after": a_em["accuracy"]}]
    families = sorted(set(a_em.get("per_family", {})) | set(b_em.get("per_family", {})))
    for f in families:
        bf, af = b_em.get("per_family", {}).get(f, {}), a_em.get("per_family", {}).get(f, {})
        rows.append({"metric": f"exact match: {f}", "n": af.get("n", 0), "n_before": bf.get("n"),
                     "before": bf.get("accuracy"), "after": af.get("accuracy")})
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        for k, label in (("f1", "F1"), ("precision", "P"), ("recall", "R")):
            rows.append({"metric": f"{t} {label}", "n": a_em["n"], "n_before": b_em.get("n"),
                         "before": b_rouge.get(t, {}).get(k), "after": a_rouge.get(t, {}).get(k)})
    return rows


def render_report_md(before: Mapping[str, Any] | None, after: Mapping[str, Any],
                     n_rows: int, grid: str | None) -> str:
    """report.md's text: a line on what was scored, the metric | n | before | after table, the grid."""
    table = report_table(before, after)
    em = _parts(after)[0]
    lines = ["# VQA evaluation", "",
             f"{n_rows} questions answered greedily; {em['n']} scored against a reference"
             + (f", {em['skipped']} without one skipped" if em.get("skipped") else "") + ". "
             "Exact match compares answers after CLEVR normalisation (case, trailing punctuation, "
             "number words as digits, a leading article); ROUGE uses rouge-score with stemming.", "",
             "| metric | n | before | after |", "|---|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['metric']} | {_n(r['n_before'], r['n'])} | {_fmt(r['before'])} | {_fmt(r['after'])} |")
    if grid:
        lines += ["", f"![questions and answers]({grid})", "",
                  "Green: the answer is right (exact match); red: wrong. The reference is printed below."]
    return "\n".join(lines) + "\n"


def _as_rgb(image: Any) -> np.ndarray:
    """A displayable (H, W, 3) or (H, W) array from an array, PIL image or tensor. Channels-first
    input is transposed; floats in [-1, 1] (a processor's normalisation) are mapped to [0, 1]."""
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype.kind == "f":
        if a.size and a.min() < 0:
            a = (a + 1.0) / 2.0
        a = np.clip(a, 0.0, 1.0)
    return a


def plot_qa_grid(rows: Sequence[Mapping[str, Any]], images: Sequence[Any], path: str | Path,
                 cols: int = 4) -> Path:
    """A grid of up to 16 images, each titled with its question, the prediction in green when it is
    an exact match with the reference and red when not (black without a reference), the reference
    below it and, when the row has one, the answer before fine-tuning (same colours).
    ``images[i]`` belongs to ``rows[i]``; an image of ``None`` is skipped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from genlab.eval.plots import save_figure

    items = [(r, im) for r, im in zip(rows, images) if im is not None][:MAX_GRID]
    if not items:
        raise ValueError("plot_qa_grid: no image to draw")
    cols = min(cols, len(items))
    nrows = -(-len(items) // cols)
    fig = Figure(figsize=(2.6 * cols, 3.4 * nrows), dpi=120)
    FigureCanvasAgg(fig)  # raster canvas, no pyplot: nothing opens a window
    wrap = lambda s, w=34: "\n".join(textwrap.wrap(str(s), w)) or "''"  # noqa: E731
    for i, (row, image) in enumerate(items):
        ax = fig.add_subplot(nrows, cols, i + 1)
        a = _as_rgb(image)
        ax.imshow(a, interpolation="nearest", cmap="gray" if a.ndim == 2 else None)
        ax.set_axis_off()
        ax.set_title(wrap(f"Q: {row['question']}"), fontsize=7)
        ref, pred = row.get("reference"), row.get("prediction")
        color = "black" if ref is None else ("green" if exact_match(pred, ref) else "red")
        ax.text(0.5, -0.03, wrap(f"A: {pred}"), transform=ax.transAxes, ha="center", va="top",
                fontsize=7, color=color)
        ax.text(0.5, -0.14, wrap(f"ref: {'—' if ref is None else ref}"), transform=ax.transAxes,
                ha="center", va="top", fontsize=6, color="black")
        if row.get("before") is not None:  # the model before fine-tuning, same colour rule
            b_color = "black" if ref is None else ("green" if exact_match(row["before"], ref) else "red")
            ax.text(0.5, -0.25, wrap(f"before: {row['before']}"), transform=ax.transAxes,
                    ha="center", va="top", fontsize=6, color=b_color)
    fig.subplots_adjust(left=0.02, right=0.98, hspace=0.8, wspace=0.12, top=0.93, bottom=0.08)
    return save_figure(fig, path)


def write_vqa_report(out_dir: str | Path, before: Mapping[str, Any] | None, after: Mapping[str, Any],
                     rows: Sequence[Mapping[str, Any]], images: Sequence[Any] | None = None) -> dict[str, Path]:
    """Write ``answers.csv``, ``report.json``, ``report.md`` and, when ``images`` holds any,
    ``qa_grid.png`` into ``out_dir``; return their paths by name.

    ``before``/``after`` are ``evaluate_vqa`` results, or flat ``score_vqa`` dicts with a ``"rouge"``
    key (``before`` may be ``None``); ``rows`` are the
    answered questions as ``write_answers_csv`` takes them; ``images[i]`` is the image of ``rows[i]``
    (the first 16 are drawn). report.json holds ``before``, ``after`` and the table rows of report.md,
    so both files carry the same numbers.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"answers": write_answers_csv(out / "answers.csv", rows)}
    grid = None
    if images is not None and any(im is not None for im in images):
        paths["grid"] = plot_qa_grid(rows, images, out / "qa_grid.png")
        grid = "qa_grid.png"
    atomic_write_json(out / "report.json", {"before": before, "after": after, "n_rows": len(rows),
                                            "table": report_table(before, after)})
    paths["json"] = out / "report.json"
    atomic_write_text(out / "report.md", render_report_md(before, after, len(rows), grid))
    paths["md"] = out / "report.md"
    return paths
