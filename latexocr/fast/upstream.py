"""What the project relies on in transformers, peft, swanlab, torch and pykatex that is not public API, and a check of it.

A private method the Trainer stops calling, a renamed peft attribute, or a change in the Qwen2-VL
forward that latexocr/fast/vision.py re-implements would not break training: it would silently
run slower, or (for the re-implemented forward) compute something else. So every such hook is
listed here with the versions it was checked against, and `drift()` says which ones changed in
the installed libraries. tests/test_fast.py fails on any drift, with the message below saying what
to re-check; build_trainer prints it in its summary line.

To accept a new version: re-read each changed source against the code named in `used_by`, fix
that code if needed, then run `python -m latexocr.fast.upstream` and add its hashes here (next to
the older ones, so every version in CHECKED_AGAINST passes), and the version to CHECKED_AGAINST.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
from functools import lru_cache

CHECKED_AGAINST = {"transformers": ("5.24.0", "5.25.0"), "peft": ("0.21.2",), "torch": ("2.14.1",),
                   "swanlab": ("0.10.3",), "fla-core": ("0.6.0",)}  # fla-core: flash-linear-attention's kernels
# (optional: its entries below are checked only where it is installed)
ABSENT = None  # in a hash tuple: a checked version that has no such source (it was added later)

# Sources whose behaviour the project copies or depends on: (module, qualified name) ->
# (what of ours depends on it, the sha256[:16] of its source text in each version checked, or
# ABSENT: an unchanged source passes whatever the version; any other text fails).
SOURCES = {
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel.forward"):
        ("fast/vision.py supervised_step_loss re-implements its image path (features scattered into the "
         "embeddings, then the language model)", ("dae72733e5152e32",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel.get_image_features"):
        ("fast/vision.py supervised_step_loss calls the vision tower as this does", ("561e0953b7c00787",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel.forward"):
        ("fast/vision.py passes position_ids / cu_seqlens / max_seqlen, which this pops from its kwargs",
         ("9a5e94aee1d7a5e7",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention.forward"):
        ("fast/attention.py _packed_sdpa: one varlen call over all images when the name contains 'flash'",
         ("40e4a17c0ea9da79",)),
    ("transformers.vision_utils", "get_vision_position_ids"):
        ("batching.py vision_inputs (the collators: fast/vision.py precompute_packed, and the static decoder's loader) "
         "calls it on the CPU; fast/standins.py "
         "_given_vision_function stands in for it, by its module-level name in each modeling module, while a prefill "
         "runs, and returns those positions for the chunk's grid", ("6d2193802eadae1c",)),
    ("transformers.vision_utils", "get_vision_cu_seqlens"):
        ("batching.py vision_inputs (the collators: fast/vision.py precompute_packed, and the static decoder's loader) "
         "calls it on the CPU", ("aee13f15c32efcfe",)),
    ("transformers.vision_utils", "get_vision_attention_seqlens"):
        ("fast/vision.py passes cu_seqlens / max_seqlen so that this reads nothing back from the GPU; "
         "fast/standins.py _given_vision_function stands in for it while a prefill runs and returns the loader's "
         "(batching.py vision_inputs: get_vision_cu_seqlens, the longest image where flash attention is requested, "
         "as get_max_seqlen answers)", ("daf3fb20a25fd480",)),
    ("transformers.utils.generic", "is_flash_attention_requested"):
        ("fast/attention.py PACKED_VISION_ATTENTION's name must pass this test", ("0beadd3a3e26c607",)),
    ("torch._inductor.runtime.cache_dir_utils", "cache_dir"):
        ("fast/compile.py CompileCache: torch reads $TORCHINDUCTOR_CACHE_DIR at every access, else its default",
         ("c105dff8eaf76e1a", "226ac4b2a182a50e")),
    ("torch._inductor.runtime.cache_dir_utils", "default_cache_dir"):
        ("fast/compile.py CompileCache tells torch's default from a folder the user chose", ("0167e10c543c3e2b", "2373431b645f0805")),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5GatedDeltaNet.forward"):
        ("fast/linear_attention.py sets each such layer's module.forward, which hands it packed rows as one "
         "right-padded batch (or cu_seq_lens_q / seq_idx), or re-does it with fla's kernels (fla_forward), and "
         "decoding.py _SlotCache answers the cache calls of its one-token path (get_recurrent_state, "
         "update_recurrent_state; get_recurrent_states_to_keep when more than one token)",
         ("92cffc53f026e24e", "5e2cca71e0338396")),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "causal_conv1d_forward"):
        ("decoding.py _SlotCache answers the cache calls of the one-token convolution (get_conv_state, "
         "is_recording_past, increase_count; 5.24 made them in Qwen3_5GatedDeltaNet.forward), and "
         "fast/linear_attention.py's seq_idx reaches the kernel through its kwargs", (ABSENT, "00508074eb0425eb")),
    ("transformers.integrations.hub_kernels", "use_kernel_func_from_hub_with_fallback"):
        ("fast/linear_attention.py use_reference_delta_rule: the wrapped function (__wrapped__) is the reference "
         "PyTorch kernel; fla's kernel, when importable, is chosen once, at the model module's import",
         ("a35dbcf06772cc69", "846809cf54a02648")),
    ("fla.ops.common.chunk_o", "chunk_bwd_dqkwg"):
        ("fast/linear_attention.py fla_refusal mirrors the condition under which this raises (Hopper, "
         "Triton >= 3.4, < 3.7.1) unless tilelang takes the call", ("68829e5783ca47b0",)),
    ("fla.ops.common.backends.tilelang", "CommonTileLangBackend"):
        ("fast/linear_attention.py fla_refusal: is_available / is_enabled say whether tilelang takes "
         "chunk_bwd_dqkwg", ("99f0ceb69111e9dd",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "torch_recurrent_gated_delta_rule"):
        ("fast/standins.py one_token_delta_rule and fast/kernels.py delta_rule_step compute what this computes "
         "for one token (regrouped), and stand in for it (the module attribute) while a decode step runs",
         ("cbbbdaff2ca53496",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "torch_chunk_gated_delta_rule"):
        ("fast/kernels.py delta_rule (through fast/standins.py prefill_delta_rule) computes what this computes, "
         "token by token, and stands in for it (the module attribute) while the static decoder's prefill runs",
         ("97b5ac0b26967658",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "causal_conv1d_update"):
        ("fast/kernels.py conv_update computes what this computes for one token, and fast/standins.py "
         "one_token_conv_update stands in for it (the module attribute) while a decode step runs; the layer "
         "calls it by that module-level name, activation positional (5.24) or by keyword (5.25)",
         ("87df0578144f0b82",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "causal_conv1d_fn"):
        ("fast/kernels.py causal_conv computes what this computes (no cache: zeros before the first token), and "
         "fast/standins.py prefill_conv stands in for it (the module attribute) while the static decoder's "
         "prefill runs; the layer (5.24) or causal_conv1d_forward (5.25) calls it by that module-level name and "
         "transposes its output back to tokens x channels before splitting q, k and v; fast/linear_attention.py "
         "shifted_causal_conv1d computes its PyTorch form (F.conv1d) and takes its place for compiled training",
         ("4332465371f21918",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLRMSNorm.forward"):
        ("fast/kernels.py rms_norm computes this (offset False) and fast/standins.py _standing_in stands in for "
         "it (the class attribute) while the static decoder's prefill and step run; NORM_FORMS names its hash",
         ("0d702ef8d7d8a129",)),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLRMSNorm.forward"):
        ("as Qwen2VLRMSNorm.forward (the same text)", ("0d702ef8d7d8a129",)),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextRMSNorm.forward"):
        ("as Qwen2VLRMSNorm.forward (the same text)", ("0d702ef8d7d8a129",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5RMSNorm.forward"):
        ("fast/kernels.py rms_norm computes this (offset True: times 1 + weight in fp32) and fast/standins.py "
         "_standing_in stands in for it while the static decoder's prefill and step run", ("6bc29e6eecca35b2",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5RMSNormGated.forward"):
        ("fast/kernels.py rms_norm computes this (a gate: the plain form times silu(gate) in fp32) and "
         "fast/standins.py _standing_in stands in for it while the static decoder's prefill and step run",
         ("cc5787a1b20e963f",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "apply_rotary_pos_emb"):
        ("fast/kernels.py rotary computes this (in the dtype q * cos has, each product rounded) and fast/standins.py "
         "_standing_in stands in for it (the module attribute, which the text attention calls by that name) while "
         "the static decoder's prefill and step run; ROTARY_FORMS names its hash", ("dcce26b5d7674297",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "apply_rotary_pos_emb_vision"):
        ("fast/kernels.py rotary computes this (fp32 arithmetic, the result in q's dtype) and fast/standins.py "
         "_standing_in stands in for it while the static decoder's prefill runs the vision tower",
         ("e174399e546c23a4",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "rotate_half"):
        ("the rotary functions above call it: fast/kernels.py rotary computes it (ROTATE_HALF)", ("c3e95bb5f330fa3c",)),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "apply_rotary_pos_emb"):
        ("as Qwen2-VL's (the same text)", ("dcce26b5d7674297",)),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "apply_rotary_pos_emb_vision"):
        ("as Qwen2-VL's (the same text)", ("e174399e546c23a4",)),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "rotate_half"):
        ("as Qwen2-VL's (the same text)", ("c3e95bb5f330fa3c",)),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "apply_rotary_pos_emb"):
        ("as Qwen2-VL's (the same text)", ("dcce26b5d7674297",)),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "apply_rotary_pos_emb_vision"):
        ("as Qwen2-VL's (the same text)", ("e174399e546c23a4",)),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "rotate_half"):
        ("as Qwen2-VL's (the same text)", ("c3e95bb5f330fa3c",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "apply_rotary_pos_emb"):
        ("fast/kernels.py rotary computes this (the first cos.shape[-1] columns rotated, the rest passed) and "
         "fast/standins.py _standing_in stands in for it while the static decoder's prefill and step run",
         ("358cf3e549acf8ba",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "apply_rotary_pos_emb_vision"):
        ("as Qwen2-VL's (the same text)", ("e174399e546c23a4",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "rotate_half"):
        ("as Qwen2-VL's (the same text)", ("c3e95bb5f330fa3c",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2MLP.forward"):
        ("fast/standins.py _kernel_mlp_forward copies it (gated form: its projections around kernels.gated_silu) "
         "and _standing_in stands in for it while the static decoder's prefill and step run; MLP_FORMS names its "
         "hash; likewise Qwen2.5-VL's Qwen2MLP, Qwen3VLTextMLP and Qwen3_5MLP (the same text)", ("3997a4458faa14a5",)),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2MLP.forward"):
        ("as Qwen2-VL's Qwen2MLP.forward (the same text)", ("3997a4458faa14a5",)),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextMLP.forward"):
        ("as Qwen2-VL's Qwen2MLP.forward (the same text)", ("3997a4458faa14a5",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5MLP.forward"):
        ("as Qwen2-VL's Qwen2MLP.forward (the same text)", ("3997a4458faa14a5",)),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLMLP.forward"):
        ("fast/standins.py _kernel_mlp_forward copies it (gated form, the vision tower's MLP) while the static "
         "decoder's prefill runs", ("4e40d65545624eb0",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionMlp.forward"):
        ("fast/standins.py _kernel_mlp_forward copies it (quick form: fc1, kernels.quick_gelu, fc2) while the "
         "static decoder's prefill runs the vision tower", ("3c21c8c99fed5bb7",)),
    ("transformers.activations", "SiLUActivation.forward"):
        ("fast/kernels.py gated_silu computes it (x / (1 + e^-x), rounded to x's dtype) where standins.py "
         "mlp_classes finds it as a gated MLP's act_fn (ACTIVATION_FORMS)", ("252dabf3436933c3",)),
    ("transformers.activations", "QuickGELUActivation.forward"):
        ("fast/kernels.py quick_gelu computes it (each intermediate rounded to x's dtype) where standins.py "
         "mlp_classes finds it as Qwen2-VL's vision MLP's act (ACTIVATION_FORMS)", ("db567a68bddd0ec8",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "PatchEmbed.forward"):
        ("fast/standins.py _matmul_patch_embed_forward computes it as one matrix product and _standing_in stands in "
         "for it (the class attribute) while the static decoder's prefill runs; PATCH_EMBED_FORM names its hash; "
         "likewise Qwen2.5-VL's, Qwen3-VL's and Qwen3.5's (the same text)", ("7bb723b89b6761a2",)),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionPatchEmbed.forward"):
        ("as Qwen2-VL's PatchEmbed.forward (the same text)", ("7bb723b89b6761a2",)),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionPatchEmbed.forward"):
        ("as Qwen2-VL's PatchEmbed.forward (the same text)", ("7bb723b89b6761a2",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionPatchEmbed.forward"):
        ("as Qwen2-VL's PatchEmbed.forward (the same text)", ("7bb723b89b6761a2",)),
    ("transformers.integrations.sdpa_attention", "sdpa_attention_forward"):
        ("fast/standins.py _kernel_sdpa stands in for it (AttentionInterface's 'sdpa' entry) while the static decoder "
         "runs, and answers a decode step's call through fast/kernels.py decode_attention, which returns what this "
         "returns ((batch, 1, heads, dim), contiguous); SDPA_FORM names its hash", ("a2825ebbe8e42494",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "l2norm"):
        ("fast/standins.py one_token_delta_rule normalises q and k with it, as the reference rule does",
         ("3f6ba696c2827c7e",)),
    ("fla.ops.gated_delta_rule.chunk", "chunk_gated_delta_rule"):
        ("fast/linear_attention.py fla_forward calls it (q, k, v, g, beta, use_qk_l2norm_in_kernel, cu_seqlens, "
         "cu_seqlens_cpu)", ("cedafdb7ed0a2d1c",)),
    ("fla.modules.causal_conv1d.ops", "causal_conv1d"):
        ("fast/linear_attention.py fla_forward calls it ([1, T, D] input, [D, W] weight, cu_seqlens, "
         "cu_seqlens_cpu); conv_tunes_per_length reads its kernels' autotune keys", ("d3254a7938d64720",)),
    ("peft.tuners.tuners_utils", "BaseTunerLayer._cast_input_dtype"):
        ("fast/trainer.py NoLoraInputCast sets cast_input_dtype_enabled, which this reads", ("91af84e1fa8af626",)),
    # ---- outside latexocr/fast/: tests/test_structure.py finds each private import, method patch and
    # private read there and fails on one whose file and name no entry's text names
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLAttention.forward"):
        ("decoding.py _SlotCache.update answers its cache call (key/value written at a slot, whole buffers back); "
         "standins.py qkv_swaps (LATEXOCR_SPEED fused_qkv) rely on it calling q_proj, k_proj and v_proj on one hidden-states "
         "tensor and viewing their outputs (strided parts of one product); likewise Qwen2.5-VL's (the same text), "
         "Qwen3VLTextAttention.forward and Qwen3_5Attention.forward", ("14df6827003f9bae",)),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLAttention.forward"):
        ("as Qwen2-VL's Qwen2VLAttention.forward (the same text)", ("14df6827003f9bae",)),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextAttention.forward"):
        ("standins.py qkv_swaps, as for Qwen2VLAttention.forward", ("9ff50172c1575e50",)),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5Attention.forward"):
        ("standins.py qkv_swaps, as for Qwen2VLAttention.forward", ("146ccbec3a9ef7a3",)),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel.get_rope_index"):
        ("decoding.py _prefill calls it by keyword (input_ids, image_grid_thw, attention_mask, mm_token_type_ids)",
         ("4771812b6278dd7d",)),
    ("transformers.cache_utils", "DynamicLayer.update"):
        ("decoding.py _layer_states reads a full-attention layer's cache as .keys / .values", ("64886715e6c0d2da",)),
    ("transformers.cache_utils", "LinearAttentionLayer"):
        ("decoding.py _layer_states reads a linear-attention layer's cache as .conv_states[0] / "
         ".recurrent_states[0]", ("a376279f411e079c", "fbc41e661e6211e9")),
    ("transformers.configuration_utils", "PreTrainedConfig._attn_implementation"):
        ("decoding.py static_decode_supported reads the text config's _attn_implementation; fast/attention.py "
         "set_attention writes it (getter and setter: the setter also sets nested sub-configs)", ("be7be45af1d52295",)),
    ("transformers.models.qwen2_vl.image_processing_qwen2_vl", "smart_resize"):
        ("sample.py imports smart_resize from inside the Qwen2-VL image processor's module: the processor's own "
         "rounding rule", ("149e5137bc02253c",)),
    ("transformers.trainer", "Trainer.create_optimizer"):
        ("training.py OcrTrainer.get_optimizer_cls_and_kwargs: a kwargs['params'] it returns replaces the "
         "parameter groups built here", ("20cdcac4c9fe5ea2",)),
    ("swanlab.integration.transformers", "SwanLabCallback.setup"):
        ("tracking.py SwanLabCallback.setup: skipped without a run, as this would start one", ("935535b3aa01467a",)),
    ("swanlab.integration.transformers", "SwanLabCallback.on_train_begin"):
        ("tracking.py SwanLabCallback.on_train_begin calls it, then adds to the config", ("b388a327742cb4b2",)),
    ("swanlab.integration.transformers", "SwanLabCallback.on_log"):
        ("tracking.py SwanLabCallback.on_log replaces it (rewrite_logs, then Tracker.log)", ("d592a557796c92cc",)),
    ("bitsandbytes.nn.modules", "Linear4bit.forward"):
        ("modeling.py keep_4bit_layout_trainable clears support_avx512bf16_for_cpu, which this reads before "
         "repacking the weight for CPU inference (bitsandbytes 0.50.2)", ("6d41f286252b9797",)),
    **{(f"transformers.models.{family}.modeling_{family}", f"{cls}.forward"):
       ("fast/head.py hidden_states_out: the head (self.lm_head), applied last to the kept positions, is what "
        "the forward returns as logits; replaced by nn.Identity it returns the hidden states", (digest,))
       for family, cls, digest in (("qwen2_vl", "Qwen2VLForConditionalGeneration", "d0870797b7c0a6d5"),
                                   ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "b2a1671060a5c517"),
                                   ("qwen3_vl", "Qwen3VLForConditionalGeneration", "8b4984f6f3de1566"),
                                   ("qwen3_5", "Qwen3_5ForConditionalGeneration", "d5b968e01c29a28f"))},
}
# Compiled libraries driven below their public API (no Python source to hash): name -> (the version
# checked, what of ours depends on it). Another version may lay out its extension differently.
COMPILED = {
    "pykatex": ("0.1.1", "fast/katex.py drives the QuickJS-ng 0.10.1 C API its extension exports and the KaTeX "
                "0.16.22 bytecode in it (qjsc_katex, module katex/katex.mjs, katex.__parse; its Lexer.lex and "
                "MacroExpander.expandNextToken get fast paths while their sources hash to FAST_PATH_SOURCES)"),
}
# Private methods FastTrainer overrides: (class path, method) -> its parameters.
OVERRIDDEN = {
    ("transformers.Trainer", "_clip_grad_norm"): ["self", "model"],
    ("transformers.Trainer", "_track_num_input_tokens"): ["self", "inputs"],
    ("transformers.Trainer", "floating_point_ops"): ["self", "inputs"],
    ("transformers.Trainer", "_get_train_sampler"): ["self", "train_dataset"],
}
# Calls the Trainer's training loop must still make, else an override or instance patch
# (fast/trainer.py skip_redundant_module_walks: model.train / model.zero_grad) is never reached.
CALLED_BY_TRAINER = ("self._clip_grad_norm(model)", "self._track_num_input_tokens(inputs)",
                     "self.floating_point_ops(inputs)", "model.zero_grad()", "model.train()",
                     "sampler_fn=self._get_train_sampler")
# Private attributes and settings set directly: (module, attribute path) -> what of ours sets it.
PRIVATE_ATTRIBUTES = {
    ("transformers.models.qwen3_5.modeling_qwen3_5", "torch_recurrent_gated_delta_rule"):
        ("fast/standins.py _one_token_functions: one_token_delta_rule while a decode step runs, then restored; "
         "fast/linear_attention.py use_reference_delta_rule(recurrent=True): the reference where fla is switched off"),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "causal_conv1d_update"):
        "fast/standins.py _one_token_functions: one_token_conv_update while a decode step runs, then restored",
    ("transformers.models.qwen3_5.modeling_qwen3_5", "torch_chunk_gated_delta_rule"):
        ("fast/standins.py _prefill_functions: prefill_delta_rule while the static decoder's prefill runs, then "
         "restored; fast/linear_attention.py use_reference_delta_rule: where fla refuses to train, the reference"),
    ("transformers.models.qwen3_5.modeling_qwen3_5", "causal_conv1d_fn"):
        ("fast/standins.py _prefill_functions: prefill_conv while the static decoder's prefill runs, then restored; "
         "fast/linear_attention.py convolution_traces_dynamically: shifted_causal_conv1d, process-wide, before "
         "blocks compile"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLRMSNorm.forward"):
        ("fast/standins.py _standing_in: kernels.rms_norm while the static decoder's prefill and step run, then "
         "restored; likewise Qwen2_5_VLRMSNorm, Qwen3VLTextRMSNorm, Qwen3_5RMSNorm and Qwen3_5RMSNormGated (found "
         "by norm_classes)"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "apply_rotary_pos_emb"):
        ("fast/standins.py _standing_in: kernels.rotary while the static decoder's prefill and step run, then "
         "restored; likewise apply_rotary_pos_emb_vision, and both in Qwen2.5-VL's, Qwen3-VL's and Qwen3.5's "
         "modules (found by rotary_functions)"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2MLP.forward"):
        ("fast/standins.py _standing_in: _kernel_mlp_forward while the static decoder's prefill and step run, then "
         "restored; likewise the other MLP classes mlp_classes finds"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "PatchEmbed.forward"):
        ("fast/standins.py _standing_in: _matmul_patch_embed_forward while the static decoder's prefill runs, then "
         "restored; likewise the other families' patch embeddings (found by patch_embed_classes)"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "get_vision_position_ids"):
        ("fast/standins.py vision_input_swaps: _given_vision_function while the static decoder's prefill runs, then "
         "restored; likewise get_vision_attention_seqlens, and both in the other families' modeling modules"),
    ("transformers.modeling_utils", "AttentionInterface._global_mapping"):
        ("fast/standins.py _standing_in: its 'sdpa' entry is _kernel_sdpa while the static decoder's prefill and step "
         "run, then restored (the text attention looks it up at each call)"),
    ("transformers.utils.generic", "GeneralInterface._local_mapping"):
        "fast/standins.py attention_swaps: an 'sdpa' entry set there would be looked up first, so no swap then",
    ("torch._dynamo.config", "specialize_float"):
        "fast/compile.py compile_decoder_layers: Python floats the blocks read become constants",
    ("torch.nn.modules.module", "Module._compiled_call_impl"):
        "fast/compile.py uncompile: clears what Module.compile() set",
}
# Attributes patched on instances: (module, class, attribute) -> parameters of the method they shadow.
PATCHED = {
    ("torch.nn", "Module", "train"): ["self", "mode"],
    ("torch.nn", "Module", "zero_grad"): ["self", "set_to_none"],
}


@lru_cache(maxsize=None)
def _module_tree(module: str) -> tuple[str, ast.Module]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(module)
    text = open(spec.origin, encoding="utf-8").read()
    return text, ast.parse(text)


def source_of(module: str, qualname: str) -> str | None:
    """The source text of a function or method, read from the installed file without importing it
    (None if it no longer exists); every definition of that name together: a property's getter and setter,
    a method's @overload signatures."""
    text, node = _module_tree(module)
    nodes = [node]
    for part in qualname.split("."):
        nodes = [n for n in ast.iter_child_nodes(nodes[0])
                 if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == part]
        if not nodes:
            return None
    return "\n".join(ast.get_source_segment(text, n) for n in nodes)


def source_hash(module: str, qualname: str) -> str | None:
    source = source_of(module, qualname)
    return None if source is None else hashlib.sha256(source.encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def forward_hash(cls) -> str | None:
    """source_hash of a class's forward: how fast/standins.py recognises the RMSNorm, MLP and activation
    classes its kernels compute (once per class, however many layers hold one)."""
    return source_hash(cls.__module__, f"{cls.__qualname__}.forward")


def _installed_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for name in CHECKED_AGAINST:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:  # an optional library (fla-core) that is not installed
            versions[name] = "not installed"
    return versions


def drift() -> list[str]:
    """One line per hook that differs in the installed libraries from what was checked; [] if none."""
    problems = []
    for (module, qualname), (used_by, expected) in SOURCES.items():
        if importlib.util.find_spec(module.split(".")[0]) is None:
            continue  # an optional library (bitsandbytes) that is not installed: nothing relies on it
        try:
            found = source_hash(module, qualname)
        except ModuleNotFoundError:
            found = None
        if found is None and ABSENT not in expected:
            problems.append(f"{module}.{qualname} is gone; re-check {used_by}")
        elif found not in expected:
            checked = ", ".join("absent" if h is ABSENT else h for h in expected)
            problems.append(f"{module}.{qualname} changed (source hash {found}, checked {checked}); "
                            f"re-check {used_by}")
    for name, (checked, used_by) in COMPILED.items():
        from importlib.metadata import PackageNotFoundError, version
        try:
            found = version(name)
        except PackageNotFoundError:
            continue  # not installed: latex.py says so in one line when a verdict is asked
        if found != checked:
            problems.append(f"{name} {found} is installed (checked: {checked}); re-check {used_by}")
    for (owner, method), params in OVERRIDDEN.items():
        module, cls = owner.rsplit(".", 1)
        function = getattr(getattr(importlib.import_module(module), cls), method, None)
        found = list(inspect.signature(function).parameters) if function else None
        if found != params:
            problems.append(f"{owner}.{method}{f' now takes {found}' if found else ' is gone'} (checked: {params}); "
                            f"re-check FastTrainer.{method} in latexocr/fast/trainer.py")
    trainer_source = _module_tree("transformers.trainer")[0]
    for call in CALLED_BY_TRAINER:
        if call not in trainer_source:
            problems.append(f"transformers' Trainer no longer calls {call}; re-check latexocr/fast/trainer.py")
    for (module, path), used_by in PRIVATE_ATTRIBUTES.items():
        owner_name, _, attribute = path.rpartition(".")
        owner = importlib.import_module(module)
        owner = getattr(owner, owner_name) if owner_name else owner
        if not hasattr(owner, attribute) and attribute not in _module_tree(module)[0]:
            problems.append(f"{module}.{path} is gone; re-check {used_by}")
    for (module, cls, attribute), params in PATCHED.items():
        found = list(inspect.signature(getattr(getattr(importlib.import_module(module), cls), attribute)).parameters)
        if found != params:
            problems.append(f"{module}.{cls}.{attribute} now takes {found} (checked: {params}); re-check "
                            f"skip_redundant_module_walks in latexocr/fast/trainer.py")
    if problems:
        versions = ", ".join(f"{k} {v}" for k, v in _installed_versions().items())
        checked = ", ".join(f"{k} {' / '.join(v)}" for k, v in CHECKED_AGAINST.items())
        problems.insert(0, f"installed {versions}; the fast path was checked against {checked}:")
    return problems


if __name__ == "__main__":  # the hashes of the installed versions, to paste into SOURCES after re-checking
    print(_installed_versions())
    for (module, qualname), (used_by, _) in SOURCES.items():
        if importlib.util.find_spec(module.split(".")[0]) is None:
            continue  # an optional library that is not installed
        print(f"{module}:{qualname}  {source_hash(module, qualname)}")
