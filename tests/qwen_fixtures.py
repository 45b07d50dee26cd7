"""Offline Qwen3 fixtures: the real Qwen BPE vocabulary (shipped inside PyPI ``dashscope``) and random-weight models.

Used by the tests and the CPU benchmarks. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.metadata
import os

QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The Qwen3 added tokens, in id order from 151643. <think> and </think> are ordinary added tokens, as upstream.
QWEN3_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN3_ADDED = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
QWEN3_VOCAB = 151669
EOD_ID = 151643

SMALL_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=256,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
# The real architectures (design.md), for GPU benchmarks with random weights.
QWEN3_ARCHS = {
    "0.6B": dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        tie_word_embeddings=True,
    ),
    "4B": dict(
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=9728,
        tie_word_embeddings=True,
    ),
    "8B": dict(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        tie_word_embeddings=False,
    ),
}


def tiktoken_path() -> str:
    path = importlib.metadata.distribution("dashscope").locate_file("dashscope/resources/qwen.tiktoken")
    return str(path)


def build_qwen_tokenizer(eos_postprocessor: bool = False):
    """A ``PreTrainedTokenizerFast`` with the real Qwen vocabulary and Qwen3's added tokens.

    ``eos_postprocessor=True`` mimics the newer Qwen3-Embedding tokenizer.json whose post-processor appends
    <|endoftext|> when special tokens are requested.
    """
    from tokenizers import AddedToken, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=tiktoken_path(), pattern=QWEN2_SPLIT).converted()
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED])
    assert tok.token_to_id("<|endoftext|>") == EOD_ID and tok.token_to_id("</think>") == QWEN3_VOCAB - 1
    if eos_postprocessor:
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>",
            pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", EOD_ID)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )


def qwen3_config(causal_lm: bool = False, **overrides):
    from transformers import Qwen3Config

    cfg = dict(SMALL_CONFIG, vocab_size=QWEN3_VOCAB)
    cfg.update(overrides)
    cfg.setdefault("tie_word_embeddings", True)
    # pad_token_id stays None: a padding_idx would zero the <|endoftext|> embedding, which real checkpoints train.
    return Qwen3Config(
        bos_token_id=EOD_ID,
        eos_token_id=151645,
        pad_token_id=None,
        architectures=["Qwen3ForCausalLM"] if causal_lm else ["Qwen3Model"],
        **cfg,
    )


def make_qwen3_dir(out_dir: str, *, causal_lm: bool = False, seed: int = 0, tokenizer=None, **overrides) -> str:
    """Save a random-weight Qwen3Model / Qwen3ForCausalLM plus the real-vocabulary tokenizer into ``out_dir``."""
    import torch
    from transformers import Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    cfg = qwen3_config(causal_lm=causal_lm, **overrides)
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg).eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (tokenizer or build_qwen_tokenizer()).save_pretrained(out_dir)
    return out_dir
