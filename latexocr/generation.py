"""Batched greedy generation over many images: the one code path of infer.py and train.py's evaluation."""
from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .batching import END_OF_TURN, SampleEncoder, generation_batch
from .sample import load_image
from .speed import plain_text_attention

# The longest LaTeX_OCR label is ~223 Qwen2 tokens; 256 leaves room and stops runaway repetition.
DEFAULT_MAX_NEW_TOKENS = 256


class _Images(Dataset):
    def __init__(self, paths, sizing):
        self.paths, self.sizing = paths, sizing

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, load_image(self.paths[i], self.sizing), None
        except OSError as exc:
            return i, None, str(exc)


class _Collate:
    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, items):
        ok = [(i, im) for i, im, err in items if im is not None]
        failed = [(i, err) for i, im, err in items if im is None]
        batch = generation_batch(self.encoder, [im for _, im in ok]) if ok else None
        return [i for i, _ in ok], failed, batch


def _size_order(paths) -> list[int]:
    """Indices sorted by image area (header only), so a batch holds similar lengths and pads little."""
    def area(p):
        try:
            with Image.open(p) as im:
                return im.size[0] * im.size[1]
        except Exception:
            return 0
    return sorted(range(len(paths)), key=lambda i: area(paths[i]))


@torch.inference_mode()
def predict(model, encoder: SampleEncoder, image_paths: list[str], batch_size: int = 64,
            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, num_workers: int = 2,
            progress: bool = True, **generate_kwargs) -> list[dict]:
    """Greedy LaTeX for each image, in input order: [{"prediction": str | None, "error": str | None}].

    An image that cannot be read gives an error row (prediction None) and the run continues.
    Batches are left-padded so every prompt ends where generation starts; generation stops at
    <|im_end|> (end of turn), the token the model was trained to emit after the formula.
    """
    from tqdm.auto import tqdm

    order = _size_order(image_paths)
    dataset = _Images([image_paths[i] for i in order], encoder.sizing)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_Collate(encoder), persistent_workers=False)
    tok = encoder.tokenizer
    stop_ids = [tok.convert_tokens_to_ids(END_OF_TURN)] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[dict] = [{"prediction": None, "error": None} for _ in image_paths]
    try:
        # Blocks compiled for training (COMPILE_LAYERS) would recompile for eval mode, the KV cache
        # and every new length: generation runs them eagerly.
        with plain_text_attention(model), torch.compiler.set_stance("force_eager"):
            for indices, failed, batch in tqdm(loader, desc="generate", disable=not progress, unit="batch"):
                for i, err in failed:
                    results[order[i]]["error"] = err
                if batch is None:
                    continue
                batch = batch.to(device)
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     eos_token_id=stop_ids, pad_token_id=tok.pad_token_id, use_cache=True,
                                     temperature=None, top_p=None, top_k=None, **generate_kwargs)
                texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, text in zip(indices, texts):
                    results[order[i]]["prediction"] = text.strip()
    finally:
        model.train(was_training)
    return results
