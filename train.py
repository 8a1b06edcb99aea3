"""LoRA fine-tuning of Qwen2-VL-2B-Instruct into a LaTeX OCR model (transformers + peft), tracked in SwanLab.

    python train.py                                   # one GPU (or the CPU, slowly)
    torchrun --nproc_per_node 4 train.py              # data-parallel on 4 GPUs
    accelerate launch --config_file configs/accelerate_zero2.yaml train.py --deepspeed configs/ds_zero2.json

Reads latex_ocr_train.json / latex_ocr_val.json (csv2json.py), writes checkpoints to OUTPUT_DIR
and the final adapter to OUTPUT_DIR/final (where infer.py looks by default), then scores the
validation set with the same generation code infer.py uses.
"""
# ---- settings: edit here, or pass as flags (MICRO_BATCH_SIZE -> --micro-batch-size) ----------
MODEL_ID = "Qwen/Qwen2-VL-2B-Instruct"  # hub id (Qwen2/2.5/3-VL) or a local model folder
MODEL_SOURCE = "modelscope"             # modelscope | huggingface | local
TRAIN_JSON = "latex_ocr_train.json"
VAL_JSON = "latex_ocr_val.json"
OUTPUT_DIR = "output/Qwen2-VL-2B-LatexOCR"  # checkpoints; the final adapter goes to OUTPUT_DIR/final
# LoRA, as the tutorial
LORA_R = 64
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
# optimisation, as the tutorial: 2 epochs, lr 1e-4, 16 samples per optimizer step
EPOCHS = 2.0
LEARNING_RATE = 1e-4
BATCH_SIZE = 16          # samples per optimizer step, all GPUs together
MICRO_BATCH_SIZE = 16    # samples per forward pass on one GPU (gradient accumulation makes up the rest)
MAX_STEPS = -1           # > 0 stops after this many optimizer steps
WARMUP_STEPS = 0
MAX_LENGTH = 1024        # tokens per sample; longer samples are skipped and counted, never cut
PACKING = True           # padding-free batches: samples concatenated, per-sample positions
SUPERVISED_LOGITS_ONLY = True  # vocabulary projection only where a label is supervised (~1/3 of tokens)
GRADIENT_CHECKPOINTING = False  # 18 -> 8 GiB on the 2B model but 2.4x slower (docs/BENCHMARKS.md)
IMAGE_MIN_PIXELS = 32 * 28 * 28  # image area bounds (aspect ratio kept); see latexocr/sample.py
IMAGE_MAX_PIXELS = 512 * 28 * 28
IMAGE_SIZE = ""          # "500x100" forces one size for every image (the tutorial's), "" keeps aspect
NUM_WORKERS = 4          # DataLoader processes that load images and build batches
DTYPE = "auto"           # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
ATTN_IMPLEMENTATION = "sdpa"  # sdpa | flash_attention_2 | eager
PACKED_VISION_ATTENTION = True  # one attention call over all images of a batch (sdpa only)
PACKED_TEXT_ATTENTION = True    # with PACKING: per-sample flash varlen attention on GPU (sdpa only)
COMPILE_LAYERS = "auto"  # torch.compile each block: ~1 min once per machine (cached), then 4-5x faster steps;
                         # auto = on a GPU, for runs of >= 300 optimizer steps (>= 220 once this setup's
                         # compile cache is warm), without DeepSpeed or gradient checkpointing | on | off
CUDA_GRAPHS = True       # with compiled blocks on one GPU, without gradient accumulation: replay the
                         # LLM's blocks and the vision tower as CUDA graphs (rows padded to x256 tokens
                         # and x256 patches so that few shapes occur)
SEED = 42
DEEPSPEED = ""           # path to a DeepSpeed config (configs/ds_zero2.json, configs/ds_zero3.json)
# evaluation (generation + exact match / edit distance / BLEU-4 on VAL_JSON)
EVAL_STEPS = 0           # > 0 also evaluates every N steps; 0 = only at the end
EVAL_SAMPLES = 0         # 0 = the whole validation file
EVAL_BATCH_SIZE = 256
EVAL_BASE_MODEL = False  # also score the base model (adapter off) before training
MAX_NEW_TOKENS = 256
# checkpoints
SAVE_STEPS = 100
SAVE_TOTAL_LIMIT = 3
RESUME = False           # continue from the last checkpoint in OUTPUT_DIR
# tracking
SWANLAB_MODE = "auto"    # auto (cloud if logged in, else local) | cloud | local | offline | disabled
SWANLAB_PROJECT = "Qwen2-VL-LatexOCR"
EXPERIMENT_NAME = ""
SWANLAB_LOGDIR = "swanlog"
LOGGING_STEPS = 10
SETTINGS = {k: v for k, v in dict(globals()).items() if k.isupper()}
# -----------------------------------------------------------------------------------------------

import math
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainingArguments, set_seed

from latexocr.batching import SampleEncoder, TrainCollator
from latexocr.cli import parse_settings
from latexocr.evaluation import evaluate
from latexocr.modeling import add_lora, list_checkpoints, load_model, load_processor, pick_dtype, resolve_model
from latexocr.records import read_labelled
from latexocr.sample import sizing_for
from latexocr.tracking import SwanLabCallback, Tracker
from latexocr.speed import plan_training
from latexocr.training import OcrDataset, ThroughputCallback
from transformers import TrainerCallback


def main(argv=None):
    args = parse_settings(SETTINGS, __doc__, argv)
    # one process per GPU under torchrun / accelerate launch; without CUDA, accelerate needs cpu=True
    # to see a multi-process launch (gloo), else every process would train alone
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=cpu_ddp)
    set_seed(args.seed)
    out_dir = Path(args.output_dir)
    say = print if state.is_main_process else (lambda *a, **k: None)

    # ---- the model and its processor ----
    with state.main_process_first():  # download once, the other processes read the cache
        model_path = resolve_model(args.model_id, args.model_source)
    processor = load_processor(model_path)
    sizing = sizing_for(processor, args.image_min_pixels, args.image_max_pixels, args.image_size)
    encoder = SampleEncoder(processor, sizing)
    dtype = pick_dtype(args.dtype)
    model = load_model(model_path, dtype, args.attn_implementation,
                       packed_vision_attention=args.packed_vision_attention)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
    if state.is_main_process:
        model.print_trainable_parameters()

    # ---- data: paths and labels only; images are loaded by the DataLoader workers ----
    train_set = OcrDataset(args.train_json, encoder, args.max_length)
    say(f"train: {len(train_set)} samples from {args.train_json}; {train_set.report()}")
    val_pairs = [(p, t) for p, t in read_labelled(args.val_json)] if Path(args.val_json).exists() else []
    if args.eval_samples > 0:
        val_pairs = val_pairs[: args.eval_samples]
    say(f"validation: {len(val_pairs)} samples from {args.val_json}")

    # ---- batch arithmetic: BATCH_SIZE samples per optimizer step whatever the GPU count ----
    world = state.num_processes
    micro = min(args.micro_batch_size, max(1, args.batch_size // world))
    accumulation = args.batch_size // (micro * world)
    if micro * world * accumulation != args.batch_size:
        raise SystemExit(f"BATCH_SIZE={args.batch_size} is not a multiple of MICRO_BATCH_SIZE={micro} x "
                         f"{world} processes; choose sizes that divide evenly.")
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    planned_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.epochs * steps_per_epoch)
    # ---- the fast path (latexocr/fast/): packed attention, compiled blocks, CUDA graphs where they pay ----
    fast = plan_training(model, args, processes=world, accumulation=accumulation, planned_steps=planned_steps)
    say(fast.summary)

    if args.resume and not list_checkpoints(out_dir):
        raise SystemExit(f"--resume: no checkpoint in {out_dir} (checkpoint-N folders); start without --resume.")

    tracker = Tracker(args.swanlab_mode, args.swanlab_project, args.experiment_name or None,
                      config={**vars(args), "model_path": model_path, "world_size": world,
                              "micro_batch_size": micro, "gradient_accumulation": accumulation,
                              "train_samples": len(train_set), "val_samples": len(val_pairs),
                              "image_factor": sizing.factor},
                      logdir=args.swanlab_logdir, enabled=state.is_main_process)

    on_gpu = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        dataloader_num_workers=args.num_workers,
        dataloader_persistent_workers=args.num_workers > 0,
        dataloader_pin_memory=on_gpu,
        dataloader_prefetch_factor=4 if args.num_workers > 0 else None,
        remove_unused_columns=False,   # the collator needs the raw (path, label) pairs
        label_names=["labels"],
        # packed rows: the fast path counts their real tokens on the host (the CUDA-graph padding excluded)
        include_num_input_tokens_seen="all" if args.packing else "non_padding",
        # transformers checks every step's loss for NaN/inf with a GPU->CPU sync (only to keep such
        # a step out of the logged average): the host then cannot queue the next step in advance
        logging_nan_inf_filter=False,
        accelerator_config={"non_blocking": on_gpu},  # asynchronous copies of the (pinned) batches
        ddp_find_unused_parameters=False,
        use_cpu=cpu_ddp,               # TrainingArguments re-creates the state: keep gloo DDP on CPU
        deepspeed=args.deepspeed or None,
        report_to="none",              # SwanLab is wired in below, with the real config
        disable_tqdm=not state.is_main_process,
    )

    def run_eval(step, prefix="eval"):
        if not val_pairs:
            return
        summary, rows = evaluate(model, encoder, val_pairs, args.eval_batch_size, args.max_new_tokens,
                                 num_workers=min(2, args.num_workers))
        say(f"[{prefix} @ step {step}] " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        tracker.log({f"{prefix}/{k}": v for k, v in summary.items()}, step=step)
        tracker.log_predictions(rows, step=step, key=f"{prefix}/predictions")
        return summary

    class EvalEverySteps(TrainerCallback):
        def on_step_end(self, a, s, control, **kw):
            if args.eval_steps > 0 and s.global_step % args.eval_steps == 0 and s.global_step < s.max_steps:
                run_eval(s.global_step)

    trainer = fast.trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=TrainCollator(encoder, packed=args.packing, **fast.collator_options),
        processing_class=processor,
        callbacks=[ThroughputCallback(args.batch_size), SwanLabCallback(tracker), EvalEverySteps()],
        **fast.trainer_options,
    )
    trainer.supervised_logits_only = args.supervised_logits_only
    say(f"{len(train_set)} samples, {steps_per_epoch} steps/epoch, {args.batch_size} samples/step = "
        f"{micro} per pass x {accumulation} accumulation x {world} processes; packing={args.packing}")

    if args.eval_base_model:
        with model.disable_adapter():
            run_eval(0, prefix="eval_base")

    # ---- train; Ctrl-C saves a checkpoint that --resume continues from ----
    try:
        trainer.train(resume_from_checkpoint=True if args.resume else None)
    except KeyboardInterrupt:
        say("\ninterrupted: saving a checkpoint ...")
        trainer._save_checkpoint(trainer.model, trial=None)
        say(f"saved {out_dir}/checkpoint-{trainer.state.global_step}; continue with --resume")
        tracker.finish()
        sys.exit(130)

    final_dir = out_dir / "final"
    trainer.save_model(str(final_dir))  # adapter + processor files, from the main process only
    say(f"final adapter: {final_dir}")
    run_eval(trainer.state.global_step)
    tracker.finish()


if __name__ == "__main__":
    main()
