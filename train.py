"""LoRA fine-tuning of Qwen2-VL-2B-Instruct into a LaTeX OCR model (transformers + peft), tracked in SwanLab.

    python train.py                                   # one GPU (or the CPU, slowly)
    torchrun --nproc_per_node 4 train.py              # data-parallel on 4 GPUs
    accelerate launch --config_file configs/accelerate_zero2.yaml train.py --deepspeed configs/ds_zero2.json

Reads latex_ocr_train.json / latex_ocr_val.json (csv2json.py), writes checkpoints to OUTPUT_DIR
and the final adapter (TUNE=full: the whole model) to OUTPUT_DIR/final (where infer.py looks by
default), then scores the validation set with the same generation code infer.py uses.
"""
# ---- settings: edit here, or pass as flags (LEARNING_RATE -> --learning-rate) -----------------
from latexocr.sample import DEFAULT_MAX_NEW_TOKENS

# the tutorial's own knobs
MODEL_ID = "Qwen/Qwen2-VL-2B-Instruct"  # hub id (Qwen2/2.5/3-VL, Qwen3.5) or a local model folder
MODEL_SOURCE = "modelscope"             # where MODEL_ID downloads from: modelscope | huggingface | local
TRAIN_JSON = "latex_ocr_train.json"     # training conversations (csv2json.py)
VAL_JSON = "latex_ocr_val.json"         # validation conversations, scored during/after training; skipped if absent
OUTPUT_DIR = "output/Qwen2-VL-2B-LatexOCR"  # checkpoints; the final adapter goes to OUTPUT_DIR/final
LORA_R = 64              # LoRA rank: the width of each adapter's low-rank update
LORA_ALPHA = 16          # LoRA scaling numerator: updates are scaled by alpha / r
LORA_DROPOUT = 0.05      # dropout probability on the LoRA input (0-1)
EPOCHS = 2.0             # passes over the training set (fractions allowed)
LEARNING_RATE = 1e-4     # peak learning rate, decayed linearly to 0
BATCH_SIZE = 16          # samples per optimizer step, all GPUs together
SWANLAB_PROJECT = "Qwen2-VL-LatexOCR"  # SwanLab project name
EXPERIMENT_NAME = ""     # SwanLab run name; empty = SwanLab picks one
SWANLAB_MODE = "auto"    # auto (cloud if logged in, else local) | cloud | local | offline | disabled;
                         # local and offline runs go to $SWANLAB_LOG_DIR, else ./swanlog
# ---- what is trained (README "Training modes")
TUNE = "lora"            # lora (the tutorial: LoRA on the LLM) | lora_vision (LoRA on the vision tower
                         # and merger too) | full (every LLM weight; the vision tower frozen)
UNFREEZE_MERGER = False  # also train the merger's (vision -> LLM projector's) own weights
UNFREEZE_VISION = False  # TUNE=full: train the whole vision tower too
VISION_LEARNING_RATE = 0.0  # > 0: the learning rate of the vision side's trainable weights (else LEARNING_RATE)
QUANTIZATION = "none"    # none | 4bit (QLoRA: NF4 LLM weights via bitsandbytes; LoRA modes only)
# ---- optimisation
MAX_STEPS = -1           # > 0 stops after this many optimizer steps (EPOCHS is then ignored)
SEED = 42                # seeds the LoRA init, data order and dropout
# ---- samples (latexocr/sample.py); None: with --resume the checkpoint's, else the default in brackets
MAX_LENGTH = 1024        # tokens per sample; longer samples are skipped and counted, never cut
IMAGE_MIN_PIXELS: int = None  # lower image area bound in pixels, aspect ratio kept [32*28*28]
IMAGE_MAX_PIXELS: int = None  # upper area bound in pixels: caps large handwritten photos at 512 visual tokens [512*28*28]
IMAGE_SIZE: str = None   # "500x100" forces one size in pixels for every image (the tutorial's), "" keeps aspect [""]
# ---- memory: what one GPU holds
MICRO_BATCH_SIZE: int = "auto"  # samples per forward pass on one GPU (gradient accumulation makes up the
                         # rest); auto: the fastest that fits the GPU's free memory, measured on a large
                         # batch of the data (the rare larger one runs in halves: latexocr/memory.py);
                         # the whole batch on a CPU
GRADIENT_CHECKPOINTING: bool = "auto"  # recompute activations in the backward pass: less memory, ~1/3 more
                         # work; auto: on only where it measured faster than the micro-batch that fits
                         # without it | on | off
EVAL_BATCH_SIZE: int = "auto"  # images per generation batch in evaluation; auto: as many as fit (<= 512)
# ---- hardware
DTYPE = "auto"           # weights and compute: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
NUM_WORKERS: int = "auto"  # DataLoader processes per training process that load images and build batches;
                         # auto: half the machine's cores shared by its training processes, 2 to 8 each
DEEPSPEED = ""           # path to a DeepSpeed config (configs/ds_zero2.json, configs/ds_zero3.json)
# ---- evaluation (generation + exact match / edit distance / BLEU-4 on VAL_JSON)
EVAL_STEPS = 0           # > 0 also evaluates every N optimizer steps; 0 = only at the end
EVAL_SAMPLES = 0         # validation samples scored; 0 = the whole validation file
EVAL_BASE_MODEL = True   # score the base model (adapter off) first: step 0 of eval/*; --no-eval-base-model skips
MAX_NEW_TOKENS = DEFAULT_MAX_NEW_TOKENS  # generation limit in tokens; the longest LaTeX_OCR label is ~223
# ---- checkpoints and logging
SAVE_STEPS = 100         # a checkpoint every N optimizer steps (the newest 3 are kept)
RESUME = False           # continue from the last checkpoint in OUTPUT_DIR
LOGGING_STEPS = 10       # log loss, lr and throughput every N optimizer steps
# Speed choices (packing, packed attention, torch.compile...): latexocr/fast/choices.py, $LATEXOCR_SPEED.
# ---- reinforcement (METHOD=grpo): README "Reinforcement after fine-tuning (GRPO)", latexocr/grpo.py
METHOD = "sft"           # sft (supervised training on the labels, the tutorial) | grpo (reinforcement of
                         # INIT_ADAPTER, written to the folder OUTPUT_DIR + "-grpo"; BATCH_SIZE and
                         # MICRO_BATCH_SIZE then count images)
INIT_ADAPTER = ""        # the LoRA adapter GRPO starts from (its own rank, targets and sample definition);
                         # "" = OUTPUT_DIR/final, the SFT run's
NUM_GENERATIONS = 8      # completions sampled per image, compared with each other
TEMPERATURE = 1.0        # sampling temperature of the completions (evaluation and infer.py stay greedy)
TOP_P = 1.0              # nucleus sampling: only the most likely tokens making up this probability mass
REWARD_WEIGHTS = "edit=1,exact=1,render=0.5"  # reward = weighted 1 - token edit distance, exact match, KaTeX
                         # renders (no credit when truncated); unnamed ones weigh 0; add your own as
                         # module:function=W or file.py:function=W, fn(predictions, labels) -> floats
KL_BETA = 0.0            # weight of each token's KL to the base model (adapter off); 0 skips that forward
STEPS_PER_ROLLOUT = 1    # optimizer steps on each rollout's completions (> 1: generation paid once for them)
CLIP_EPSILON = 0.2       # with STEPS_PER_ROLLOUT > 1: the most a token's probability ratio to the rollout's
                         # may move before its gradient stops (the objective's clip)
SETTINGS = {k: v for k, v in dict(globals()).items() if k.isupper() and not k.startswith("DEFAULT_")}
# -----------------------------------------------------------------------------------------------

import contextlib
import dataclasses
import functools
import math
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork
import sys
from pathlib import Path

from latexocr.cli import parse_settings, started_as_command
from latexocr.records import LabelledFileError, check_usable, read_labelled


def check_inputs(args) -> None:
    """The training and validation files, read and checked before torch is imported or a model
    loaded or downloaded: --help and a wrong path answer in a second, not after minutes."""
    try:
        check_usable(args.train_json, read_labelled(args.train_json), need_label=True)
        if Path(args.val_json).exists():
            check_usable(args.val_json, read_labelled(args.val_json), need_label=False)
    except LabelledFileError as exc:
        raise SystemExit(f"error: {exc}") from None


def check_settings(args) -> None:
    """Settings no run can take stop here with one line, before any model loads."""
    import torch

    from latexocr.fast import speed_choices
    from latexocr.memory import parse_auto
    from latexocr.modeling import check_training_mode, list_checkpoints, quantization_config

    speed_choices()  # a wrong $LATEXOCR_SPEED
    parse_auto(args.micro_batch_size, "MICRO_BATCH_SIZE")  # auto or a number, else one line
    parse_auto(args.gradient_checkpointing, "GRADIENT_CHECKPOINTING", bool)
    parse_auto(args.eval_batch_size, "EVAL_BATCH_SIZE")
    parse_auto(args.num_workers, "NUM_WORKERS", minimum=0)
    check_training_mode(args.tune, args.unfreeze_vision, args.quantization)
    quantization_config(args.quantization, torch.bfloat16)  # a wrong value or missing bitsandbytes
    if args.resume and not list_checkpoints(args.output_dir):
        raise SystemExit(f"--resume: no checkpoint in {args.output_dir} (checkpoint-N folders); "
                         f"start without --resume.")
    if args.dtype == "fp16" and not torch.cuda.is_available():
        raise SystemExit("DTYPE=fp16 needs a CUDA GPU (its loss scaling runs only there); on this machine "
                         "use DTYPE=fp32 (auto) or bf16")


def batch_split(batch_size: int, micro_batch_size: int, processes: int) -> tuple[int, int]:
    """(samples per forward pass, gradient accumulation) making BATCH_SIZE samples per optimizer step."""
    micro = min(micro_batch_size, max(1, batch_size // processes))
    accumulation = batch_size // (micro * processes)
    if micro * processes * accumulation != batch_size:
        raise SystemExit(f"BATCH_SIZE={batch_size} is not a multiple of MICRO_BATCH_SIZE={micro} x "
                         f"{processes} processes; choose sizes that divide evenly.")
    return micro, accumulation


def fit_micro_batch(args, model, train_set, encoder, processes: int, speed, say, dtype):
    """A memory.Choice: MICRO_BATCH_SIZE, GRADIENT_CHECKPOINTING (the size over which a micro-batch runs in
    halves, the probed batch's tokens): the values given, else on a GPU the fastest pair that fits its free memory, measured by probe steps
    on a large batch of the run and checked on the longest samples (latexocr/memory.py); on a CPU or
    under DeepSpeed (whose sharding the probe does not model) the whole per-process batch. dtype: the
    model's compute dtype (pick_dtype), which decides the Trainer's autocast; speed: the SpeedChoices (packing,
    and the step the trainer will run, whose memory the probe measures)."""
    import torch

    from latexocr.batching import TrainCollator, sample_boundaries
    from latexocr.fast import has_linear_attention
    from latexocr.fast.trainer import probe_step_loss
    from latexocr.memory import Choice, divisors_descending, fit_training_batch, parse_auto, set_checkpointing

    micro = parse_auto(args.micro_batch_size, "MICRO_BATCH_SIZE")
    checkpointing = parse_auto(args.gradient_checkpointing, "GRADIENT_CHECKPOINTING", bool)
    share = max(1, args.batch_size // processes)
    if (micro is None or checkpointing is None) and torch.cuda.is_available() and not args.deepspeed:
        model.to(torch.device("cuda", torch.cuda.current_device()))  # where the Trainer would put it
        # the trainer's step on plain batches (the fast path's compiled step needs less memory, not more)
        packed = speed.packed
        boundaries = sample_boundaries if packed and has_linear_attention(model) else None
        collator = TrainCollator(encoder, packed=packed, packed_extras=boundaries)
        # the micro-batch given, or every one that divides this process's share of BATCH_SIZE
        candidates = [min(micro, share)] if micro else divisors_descending(share)
        # the forward under the autocast the Trainer's runs in (trainer_arguments: bf16 / fp16 on a GPU)
        half = dtype if dtype in (torch.bfloat16, torch.float16) else None
        step_loss = probe_step_loss(model, speed, autocast=half is not None)
        choice = fit_training_batch(model, train_set, collator, step_loss, candidates, checkpointing, processes,
                                    autocast_dtype=half)
        if processes > 1:  # every process trains the same way: the smallest micro-batch, checkpointing if any
            import torch.distributed as dist
            agreed = torch.tensor([choice.micro, -int(choice.checkpointing)], device=next(model.parameters()).device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            choice.micro, choice.checkpointing = int(agreed[0]), bool(agreed[1])
            set_checkpointing(model, choice.checkpointing)
        say(f"micro-batch {choice.micro}, gradient checkpointing {'on' if choice.checkpointing else 'off'} "
            f"(MICRO_BATCH_SIZE={args.micro_batch_size}, GRADIENT_CHECKPOINTING={args.gradient_checkpointing}): "
            f"{choice.reason}")
        return choice
    if micro is None or checkpointing is None:  # auto without a probe: the line says so, as on a GPU
        say(f"micro-batch {micro or share}, gradient checkpointing {'on' if checkpointing else 'off'} "
            f"(MICRO_BATCH_SIZE={args.micro_batch_size}, GRADIENT_CHECKPOINTING={args.gradient_checkpointing}): "
            f"{'DeepSpeed' if args.deepspeed else 'no GPU'}: nothing probed, the whole per-process batch")
    checkpointing = bool(checkpointing)
    set_checkpointing(model, checkpointing)
    return Choice(micro or share, checkpointing, "given")


def trainer_arguments(args, micro: int, accumulation: int, dtype, cpu_ddp: bool, main_process: bool, packed: bool):
    """transformers' TrainingArguments for these settings (the loop, logging, checkpoints, DataLoader)."""
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=3,            # older checkpoints are deleted
        seed=args.seed,
        dataloader_num_workers=args.num_workers,
        dataloader_persistent_workers=args.num_workers > 0,
        dataloader_pin_memory=on_gpu,
        dataloader_prefetch_factor=4 if args.num_workers > 0 else None,
        remove_unused_columns=False,   # the collator needs the raw (path, label) pairs
        label_names=["labels"],
        # packed rows: the fast path counts their real tokens on the host (the CUDA-graph padding excluded)
        include_num_input_tokens_seen="all" if packed else "non_padding",
        # transformers checks every step's loss for NaN/inf with a GPU->CPU sync (only to keep such
        # a step out of the logged average): the host then cannot queue the next step in advance
        logging_nan_inf_filter=False,
        accelerator_config={"non_blocking": on_gpu},  # asynchronous copies of the (pinned) batches
        ddp_find_unused_parameters=False,
        use_cpu=cpu_ddp,               # TrainingArguments re-creates the state: keep gloo DDP on CPU
        deepspeed=args.deepspeed or None,
        report_to="none",              # SwanLab is wired in below, with the real config
        disable_tqdm=not main_process,
    )


def evaluate_and_log(model, encoder, pairs, args, tracker, throughput, say, step: int, what: str = ""):
    """Score the validation pairs (infer.py's generation and metrics) and log them at `step`."""
    from latexocr.evaluation import evaluate
    from latexocr.memory import parse_auto

    if not pairs:
        return None
    with throughput.excluded():  # samples/s counts training only
        summary, rows = evaluate(model, encoder, pairs, parse_auto(args.eval_batch_size, "EVAL_BATCH_SIZE"),
                                 args.max_new_tokens, num_workers=min(2, args.num_workers),
                                 batch_setting="EVAL_BATCH_SIZE")
    say(f"[eval{' ' + what if what else ''} @ step {step}] " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    # the base model is step 0 of the same eval/* charts: every curve starts at the "before"
    tracker.log({f"eval/{k}": v for k, v in summary.items()}, step=step)
    tracker.log_predictions(rows, step=step, key="eval/predictions")
    tracker.log_worst(rows, step=step, key="eval/worst")
    return summary


def main(argv=None):
    args = parse_settings(SETTINGS, __doc__, argv)
    check_inputs(args)
    if started_as_command(__file__):  # a process of its own: no 4-bit model, no bitsandbytes (~2 s, run AH)
        from latexocr.fast.imports import leave_out_bitsandbytes
        leave_out_bitsandbytes(args.quantization)
    # ---- reinforcement (METHOD=grpo, latexocr/grpo.py): its settings checked, args.output_dir its own ----
    grpo = None
    if args.method == "grpo":
        from latexocr.grpo import setup_grpo
        grpo = setup_grpo(args, [label for _, label in read_labelled(args.train_json) if label])
    elif args.method != "sft":
        raise SystemExit(f"METHOD must be sft or grpo, not {args.method!r}")
    # --------------------------------------------------------------------------------------------------
    check_settings(args)

    import torch
    from accelerate import PartialState
    from transformers import AutoConfig, set_seed

    from latexocr.evaluation import comparison_table
    from latexocr.fast import (avoid_refused_kernels, describe_linear_attention, describe_padded_linear_attention,
                               keep_packed_samples_apart, prepare_model, resolve_packing, speed_choices)
    from latexocr.fast.trainer import build_trainer
    from latexocr.memory import grpo_images_per_pass, out_of_memory_message, parse_auto
    from latexocr.modeling import (list_checkpoints, load_model, load_processor, parameter_counts, pick_dtype,
                                   quantization_config, resolve_model, setup_training_mode)
    from latexocr.sample import setup_sample, write_sample_definition
    from latexocr.tracking import SwanLabCallback, Tracker
    from latexocr.training import (EvaluateEvery, Fp16OverflowStop, OcrDataset, SaveOnInterrupt,
                                   SaveSampleDefinition, ThroughputCallback)
    from latexocr.generation import default_loader_workers
    from latexocr.profiling import StepProfile

    if (workers := parse_auto(args.num_workers, "NUM_WORKERS", minimum=0)) is None:  # auto
        args.num_workers = default_loader_workers(processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    else:
        args.num_workers = workers

    # one process per GPU under torchrun / accelerate launch; without CUDA, accelerate needs cpu=True
    # to see a multi-process launch (gloo), else every process would train alone
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=cpu_ddp)
    set_seed(args.seed)
    say = print if state.is_main_process else (lambda *a, **k: None)
    out_dir = Path(args.output_dir)
    # --resume continues from the newest checkpoint, with the sample definition saved in it
    resume_from = str(list_checkpoints(out_dir)[-1]) if args.resume else None

    # ---- the processor, and what one sample is: prompt, image sizing, answer ----
    with state.main_process_first():  # download once, the other processes read the cache
        model_path = resolve_model(args.model_id, args.model_source)
    processor = load_processor(model_path)
    model_type = AutoConfig.from_pretrained(model_path).model_type  # the config only: weights load below
    # (GRPO: the sample definition of the adapter it starts from, so rollouts see what inference sees)
    trained = resume_from or (args.init_adapter if grpo else None)
    encoder, definition = setup_sample(processor, args, model_type, trained, verbose=state.is_main_process)

    # ---- data: paths and labels only; images are loaded by the DataLoader workers ----
    # (built before the model: a MAX_LENGTH below every sample stops here, before the weights load)
    try:
        train_set = OcrDataset(args.train_json, encoder, args.max_length)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    say(f"train: {len(train_set)} samples from {args.train_json}; {train_set.report()}")
    val_pairs = read_labelled(args.val_json) if Path(args.val_json).exists() else []
    val_pairs = val_pairs[: args.eval_samples] if args.eval_samples > 0 else val_pairs
    say(f"validation: {len(val_pairs)} samples from {args.val_json}")

    # ---- the model: loaded, prepared for the fast path, with the weights of TUNE trainable ----
    speed = speed_choices()  # packing, packed attention, compiled blocks...: latexocr/fast/choices.py
    dtype = pick_dtype(args.dtype)
    quantization = quantization_config(args.quantization, dtype)
    model = load_model(model_path, dtype, speed.attention, quantization=quantization,
                       device_map={"": state.device} if quantization else None)  # bnb quantises on load
    # process-wide: cuDNN's attention off, TF32 on (CUDA); the vision tower's attention packed (sdpa)
    prepare_model(model, speed)
    model.config.use_cache = False
    if grpo:  # GRPO trains the adapter it starts from
        from latexocr.grpo import load_trainable_adapter
        model = load_trainable_adapter(model, args.init_adapter)
    else:
        model = setup_training_mode(model, args.tune, args.lora_r, args.lora_alpha, args.lora_dropout,
                                    unfreeze_merger=args.unfreeze_merger, unfreeze_vision=args.unfreeze_vision)
    speed, packing_note = resolve_packing(speed, model)  # auto: off where Qwen3.5's layers would pad packed rows again
    if packing_note:
        say(packing_note)
    if speed.packed and keep_packed_samples_apart(model):  # Qwen3.5: no recurrent state across samples
        say(describe_linear_attention(model))
    elif not speed.packed:
        avoid_refused_kernels(model)  # Qwen3.5 where fla imports but refuses to train: its reference kernels
        if (padded_path := describe_padded_linear_attention(model)) is not None:
            say(padded_path)
    counts = parameter_counts(model)
    say(f"TUNE={args.tune}: trainable params: {counts['trainable']:,} ({counts['trainable_vision']:,} in the "
        f"vision tower) of {counts['total']:,}")
    if args.vision_learning_rate > 0 and counts["trainable_vision"] == 0:
        say("note: VISION_LEARNING_RATE has no effect: nothing on the vision side trains (TUNE=lora_vision, "
            "UNFREEZE_MERGER or UNFREEZE_VISION)")

    # ---- batch arithmetic: BATCH_SIZE samples per optimizer step whatever the GPU count; the
    # micro-batch and gradient checkpointing that fit this GPU, measured unless given ----
    world = state.num_processes
    fit = fit_micro_batch(args, model, train_set, encoder, world, speed, say, dtype)
    micro, args.gradient_checkpointing, split_over = fit.micro, fit.checkpointing, fit.split_over
    if grpo and fit.tokens and parse_auto(args.micro_batch_size, "MICRO_BATCH_SIZE") is None:  # auto, probed: the probe measured SFT samples, but a GRPO
        # pass holds NUM_GENERATIONS completions of up to MAX_NEW_TOKENS per image: as many images as
        # the probed batch's tokens allow
        tokens = fit.tokens_within_budget()  # the probe's batch, scaled to the memory left beside it
        micro = grpo_images_per_pass(tokens, max(1, args.batch_size // world), args.num_generations,
                                     max(train_set.lengths), args.max_new_tokens)
        say(f"GRPO: {micro} images per pass ({micro * args.num_generations} completions of up to "
            f"{max(train_set.lengths)} + {args.max_new_tokens} tokens; the probe fitted {fit.tokens} tokens in "
            f"{fit.peak / 2**30:.1f} GiB, {tokens} within the budget)")
    micro, accumulation = batch_split(args.batch_size, micro, world)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    planned_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.epochs * steps_per_epoch)

    training_args = trainer_arguments(args, micro, accumulation, dtype, cpu_ddp, state.is_main_process, speed.packed)
    tracker = Tracker(args.swanlab_mode, args.swanlab_project, args.experiment_name or None,
                      config={**vars(args), "model_path": model_path, "world_size": world,
                              "micro_batch_size": micro, "gradient_accumulation": accumulation,
                              "gradient_checkpointing": args.gradient_checkpointing,
                              "train_samples": len(train_set), "val_samples": len(val_pairs),
                              "image_factor": encoder.sizing.factor, "speed": dataclasses.asdict(speed)},
                      enabled=state.is_main_process)
    throughput, interrupt = ThroughputCallback(args.batch_size), SaveOnInterrupt()
    evaluate = functools.partial(evaluate_and_log, model, encoder, val_pairs, args, tracker, throughput, say)
    # ---- the trainer and its step: FastTrainer's (packed attention, compiled blocks, CUDA graphs
    # where they pay) unless $LATEXOCR_SPEED says fast=off; latexocr/fast/trainer.py ----
    loop = dict(args=training_args, train_dataset=train_set, processing_class=processor,
                callbacks=[throughput, SwanLabCallback(tracker), EvaluateEvery(args.eval_steps, evaluate),
                           Fp16OverflowStop(), SaveSampleDefinition(out_dir, definition), interrupt,
                           *StepProfile.from_env(out_dir)],  # bench/: $LATEXOCR_PROFILE_STEPS (latexocr/profiling.py)
                vision_learning_rate=args.vision_learning_rate)
    if grpo:  # rollouts, rewards and GRPO's loss on the plain path (latexocr/grpo.py)
        from latexocr.grpo import build_grpo_trainer
        trainer, summary = build_grpo_trainer(model, encoder, grpo, speed.packed, speed.sliced_head, **loop)
    else:
        trainer, summary = build_trainer(model, args, encoder, speed, processes=world, accumulation=accumulation,
                                         planned_steps=planned_steps, split_over=split_over, **loop)
    say(summary)
    say(f"{len(train_set)} samples, {steps_per_epoch} steps/epoch, {args.batch_size} samples/step = "
        f"{micro} per pass x {accumulation} accumulation x {world} processes; packing={speed.packed}")

    outcome = {"state": "crashed", "error": None}  # what the dashboard shows if we leave early
    try:
        base_summary = None
        if args.eval_base_model and grpo:  # GRPO's "before" is the adapter it starts from
            base_summary = evaluate(0, what="starting adapter")
        elif args.eval_base_model:  # TUNE=full: nothing is trained yet, the model is the base model
            with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
                base_summary = evaluate(0, what="base model")

        # ---- train; Ctrl-C saves a checkpoint at the end of the step (SaveOnInterrupt) ----
        try:
            try:
                trainer.train(resume_from_checkpoint=resume_from)
            except torch.OutOfMemoryError:  # outside a step, or several processes: no checkpoint to save
                raise SystemExit(out_of_memory_message("MICRO_BATCH_SIZE", micro, "in training")) from None
            if trainer.out_of_memory.hit:  # one GPU: the Trainer saved a checkpoint and stopped
                raise SystemExit(out_of_memory_message("MICRO_BATCH_SIZE", micro, f"in training ({trainer.out_of_memory.hit})")
                                 + f"; {out_dir}/checkpoint-{trainer.state.global_step} saved, add --resume")
            if trainer.out_of_memory.split or trainer.out_of_memory.retried:
                say(f"memory: {trainer.out_of_memory.split} micro-batches over {split_over} tokens ran in parts, "
                    f"{trainer.out_of_memory.retried} passes ran again in halves after running out of memory")
        except SystemExit as stop:  # a verdict (out of memory, fp16 overflow): the dashboard shows why the run ended
            outcome["error"] = str(stop.code)
            raise
        if interrupt.interrupted:
            say(f"saved {out_dir}/checkpoint-{trainer.state.global_step}; continue with --resume")
            outcome["state"] = "success"
            sys.exit(130)

        # ---- save: the adapter (or the whole model) where infer.py looks, with its sample definition ----
        final_dir = out_dir / "final"
        if args.tune == "full":  # fp32 master weights back to the loaded dtype: the folder infer.py loads
            model.to(dtype)
        trainer.save_model(str(final_dir))  # adapter (or the full model) + processor files, main process only
        if state.is_main_process:
            write_sample_definition(final_dir, definition)
        say(f"final {'model' if args.tune == 'full' else 'adapter'}: {final_dir}")

        # ---- evaluate: the before/after, same data, same scoring ----
        final_summary = evaluate(trainer.state.global_step)
        if final_summary is not None:
            headers, table = comparison_table(base_summary, final_summary)
            say("\n" + "\n".join(" | ".join(f"{c:>16}" for c in line) for line in [headers] + table))
            tracker.log_table("eval/base_vs_finetuned", headers, table)
        outcome["state"] = "success"
    finally:
        tracker.finish(**outcome)
        # While the interpreter is whole: a gloo group left to interpreter finalization can abort
        # the process (SIGABRT) when its worker threads release tensors (pytorch/pytorch#179291).
        state.destroy_process_group()


if __name__ == "__main__":
    main()
