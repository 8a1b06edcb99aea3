"""How much padding train.py's padded batches carry, in random order and length-grouped (issue 31). CPU only.

    python bench/train_padding.py                          # bench_train.py's data (996 real samples), Qwen2-VL-2B
    python bench/train_padding.py --samples full_val       # the 4,096 full_val images and their labels
    python bench/train_padding.py --model /tmp/w/model_qwen3_5-2b   # another family: a folder with its processor

Each sample's length as train.py counts it (latexocr.training.OcrDataset.lengths: prompt, the image's tokens
after the sizing, answer, end of turn), then the run's order cut into micro-batches: the order of
transformers' RandomSampler (train.py's default) and of its LengthGroupedSampler
(`LATEXOCR_SPEED=group_by_length=on`, a window of up to 50 optimizer steps sorted by length), each over
--epochs epochs. Prints the tokens a right-padded micro-batch computes (its rows x its longest sample) over
the samples' own tokens: what every layer of a padded model computes beyond the real tokens (Qwen3.5's
padded default; packed rows carry none of it). And the supervised tokens (one row of logits each) of the
memory probe's padded batch beside those of random micro-batches. With --multiples, the padding and the number
of distinct micro-batch shapes when each length is rounded up as compiled training with CUDA graphs does.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import DEFAULT_SHARED, full_val_samples, real_samples, write_json


def micro_batches(order: list[int], lengths: list[int], micro: int, multiple: int = 1):
    """(padded length, samples' lengths) of each right-padded micro-batch of `micro` consecutive samples of
    `order`, its length rounded up to a multiple of `multiple` (the collator's pad_to_multiple_of)."""
    for i in range(0, len(order), micro):
        batch = [lengths[j] for j in order[i:i + micro]]
        yield -(-max(batch) // multiple) * multiple, batch


def padded_ratio(order: list[int], lengths: list[int], micro: int, multiple: int = 1) -> float:
    """Tokens of the right-padded micro-batches (micro_batches) over their samples' own tokens."""
    padded = real = 0
    for length, batch in micro_batches(order, lengths, micro, multiple):
        padded += length * len(batch)
        real += sum(batch)
    return padded / real


def shapes(order: list[int], lengths: list[int], micro: int, multiple: int) -> int:
    """Distinct micro-batch lengths after rounding: a CUDA graph (and, where a block's graph specialises on
    the length, a compile) each."""
    return len({length for length, _ in micro_batches(order, lengths, micro, multiple)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--model", type=Path, help="a folder with the processor's files (default: shared/qwen2vl-2b)")
    ap.add_argument("--samples", default="996", help="a count of bench_train.py's cycled samples, or full_val")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per optimizer step (BATCH_SIZE)")
    ap.add_argument("--micro", default="16,8,4", help="micro-batch sizes (MICRO_BATCH_SIZE), comma-separated")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--multiples", default="256,128,64,32",
                    help="also round each micro-batch's length up to these multiples, as the collator does for "
                         "CUDA graphs (latexocr/fast/compile.py CUDA_GRAPH_ROW_MULTIPLE: 256)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/latexocr_bench"))
    a = ap.parse_args()

    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from latexocr.batching import SampleEncoder
    from latexocr.modeling import load_processor
    from latexocr.sample import sizing_for
    from latexocr.training import OcrDataset

    a.work.mkdir(parents=True, exist_ok=True)
    pairs = full_val_samples(a.shared) if a.samples == "full_val" else real_samples(a.shared)
    count = len(pairs) if a.samples == "full_val" else int(a.samples)
    data = write_json(pairs, count, a.work / "padding.json")
    processor = load_processor(str(a.model or a.shared / "qwen2vl-2b"))
    encoder = SampleEncoder(processor, sizing_for(processor))
    dataset = OcrDataset(data, encoder, 4096)
    lengths = dataset.lengths
    # supervised tokens a sample (its answer and the end of turn: OcrDataset's count), for the loss's logits
    supervised = [len(ids) + 1 for ids in encoder.tokenizer([label for _, label in dataset.samples],
                                                            add_special_tokens=False).input_ids]
    quantiles = statistics.quantiles(lengths, n=10)
    print(f"{len(lengths)} samples: mean {statistics.mean(lengths):.1f} tokens, median {statistics.median(lengths):g}, "
          f"p10 {quantiles[0]:g}, p90 {quantiles[-1]:g}, max {max(lengths)}")
    torch.manual_seed(42)  # train.py's SEED
    for micro in (int(m) for m in a.micro.split(",")):
        random_order, grouped_order = [], []
        for _ in range(a.epochs):
            random_order += torch.randperm(len(lengths)).tolist()
            grouped_order += list(LengthGroupedSampler(a.batch_size, lengths=lengths))
        print(f"micro-batch {micro}: random order {padded_ratio(random_order, lengths, micro):.3f} x the samples' "
              f"tokens, length-grouped {padded_ratio(grouped_order, lengths, micro):.3f} x")
        for multiple in (int(m) for m in a.multiples.split(",") if m):
            print(f"  lengths rounded up to a multiple of {multiple} (compiled with CUDA graphs: "
                  f"pad_to_multiple_of): random order {padded_ratio(random_order, lengths, micro, multiple):.3f} x, "
                  f"{shapes(random_order, lengths, micro, multiple)} shapes; length-grouped "
                  f"{padded_ratio(grouped_order, lengths, micro, multiple):.3f} x, "
                  f"{shapes(grouped_order, lengths, micro, multiple)} shapes")
        probe_batch(lengths, supervised, micro)


def probe_batch(lengths: list[int], supervised: list[int], micro: int) -> None:
    """The supervised tokens of train.py's memory probe batch (padded batches: memory.percentile_samples) beside
    those of random micro-batches of the same size: the loss's logits are one row per supervised token."""
    import random

    from latexocr.memory import percentile_samples
    picked = percentile_samples(lengths, micro, packed=False)
    rng = random.Random(0)
    draws = sorted(sum(supervised[i] for i in rng.sample(range(len(lengths)), micro)) for _ in range(2000))
    print(f"  memory probe's batch: {micro * max(lengths[i] for i in picked)} padded tokens, "
          f"{sum(supervised[i] for i in picked)} supervised; 2,000 random micro-batches: supervised median "
          f"{draws[1000]}, p90 {draws[1800]}, most {draws[-1]}")


if __name__ == "__main__":
    main()
