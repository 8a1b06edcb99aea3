"""Scoring a model on labelled images: generation (shared with infer.py) + the field's metrics."""
from __future__ import annotations

from .batching import SampleEncoder
from .generation import predict
from .scoring import Scorer, default_workers, scored_summary


def comparison_table(base: dict | None, tuned: dict) -> tuple[list[str], list[list]]:
    """(headers, rows) of the end-of-training table: one row per metric, base vs fine-tuned."""
    headers = ["metric", "base", "fine-tuned"]
    rows = [[key, "skipped (--no-eval-base-model)" if base is None else _cell(base.get(key)), _cell(value)]
            for key, value in tuned.items()]
    return headers, rows


def _cell(value):
    return round(value, 4) if isinstance(value, float) else value


def evaluate(model, encoder: SampleEncoder, pairs: list[tuple[str, str]], batch_size: int | None = 64,
             max_new_tokens: int = 256, num_workers: int = 2, progress: bool = True,
             score_workers: int | None = None, batch_setting: str = "BATCH_SIZE") -> tuple[dict, list[dict]]:
    """(summary metrics, one row per sample) for (image_path, label) pairs.

    batch_size None: as many images as fit the GPU (generation.predict). Each batch's rows are scored
    in ``score_workers`` processes (default: scoring.default_workers; 0: in this process) while the
    next batch generates. Under torch.distributed every process
    generates and scores its own share of the pairs and the rows are gathered, so every process
    returns the same full result.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    mine = list(range(rank, len(pairs), world))
    workers = default_workers(len(mine), processes_per_host=world) if score_workers is None else score_workers
    with Scorer(workers) as scorer:
        def score_batch(indices, results):  # positions in `mine`, their results
            scorer.submit(indices, [(r["prediction"], pairs[mine[k]][1], r["truncated"]) for k, r in zip(indices, results)])

        results = predict(model, encoder, [pairs[i][0] for i in mine], batch_size=batch_size,
                          max_new_tokens=max_new_tokens, num_workers=num_workers, progress=progress and rank == 0,
                          on_batch=score_batch, batch_setting=batch_setting)
        rows = [{"index": i, "image": pairs[i][0], "prediction": result["prediction"], "label": pairs[i][1],
                 "error": result["error"]} for i, result in zip(mine, results)]
        rows, summary = scored_summary(scorer, rows, gather=_gather_rows if world > 1 else None)
    return summary, rows


def _gather_rows(rows: list) -> list:
    """Every process's [(row, BLEU statistics)], in input order (torch.distributed)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    return sorted((r for part in gathered for r in part), key=lambda r: r[0]["index"])
