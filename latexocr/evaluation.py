"""Scoring a model on labelled images: generation (shared with infer.py) + the field's metrics."""
from __future__ import annotations

from .batching import SampleEncoder
from .generation import predict
from .metrics import render_ok, sample_scores, summarize


def score_row(prediction: str | None, label: str, truncated: bool = False) -> dict:
    """The per-row columns of a predictions file: the four scores, render_ok, truncated."""
    return {**sample_scores(prediction, label), "render_ok": render_ok(prediction), "truncated": bool(truncated)}


def summarize_rows(rows: list[dict]) -> dict:
    """The summary of rows that carry score_row's columns (render_ok reused, not re-parsed)."""
    return summarize([r["prediction"] for r in rows], [r["label"] for r in rows],
                     truncated=[r["truncated"] for r in rows], rendered=[r["render_ok"] for r in rows])


def comparison_table(base: dict | None, tuned: dict) -> tuple[list[str], list[list]]:
    """(headers, rows) of the end-of-training table: one row per metric, base vs fine-tuned."""
    headers = ["metric", "base", "fine-tuned"]
    rows = [[key, "not run (--eval-base-model)" if base is None else _cell(base.get(key)), _cell(value)]
            for key, value in tuned.items()]
    return headers, rows


def _cell(value):
    return round(value, 4) if isinstance(value, float) else value


def evaluate(model, encoder: SampleEncoder, pairs: list[tuple[str, str]], batch_size: int = 64,
             max_new_tokens: int = 256, num_workers: int = 2, progress: bool = True) -> tuple[dict, list[dict]]:
    """(summary metrics, one row per sample) for (image_path, label) pairs.

    Under torch.distributed every process generates for its own share of the pairs and the
    rows are gathered, so every process returns the same full result.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    mine = list(range(rank, len(pairs), world))
    results = predict(model, encoder, [pairs[i][0] for i in mine], batch_size=batch_size,
                      max_new_tokens=max_new_tokens, num_workers=num_workers, progress=progress and rank == 0)
    rows = []
    for i, result in zip(mine, results):
        image, label = pairs[i]
        row = {"index": i, "image": image, "prediction": result["prediction"], "label": label,
               "error": result["error"]}
        row.update(score_row(result["prediction"], label, result.get("truncated", False)))
        rows.append(row)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    summary = summarize_rows(rows)
    summary["errors"] = sum(r["error"] is not None for r in rows)
    return summary, rows
