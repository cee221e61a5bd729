"""Tiny random Hugging Face models, built locally with transformers + torch."""

import copy

import torch
import transformers

VOCAB = 96
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)

# name -> (config class, model class, overrides). Between them they cover GQA,
# head_dim != hidden/heads, tied and untied heads, rope scaling, sliding windows, biases.
SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_tied_headdim": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, head_dim=24, tie_word_embeddings=True, attention_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=5,
                                                             tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32,
                                                       tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=32)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}


# The families of tests/test_families.py, smaller (hidden 32) and not in SPECS, so the
# suites that run every SPECS entry do not grow. Each switches on every quirk of its family,
# at sizes where it bites on ~10-token sequences: sliding windows of 3-4, soft-caps of 2 and
# 3, head_dim != hidden/heads, GQA, local/global RoPE, partial rotary, longrope.
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA3_TEXT = dict(_SMALL, num_hidden_layers=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                   query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                   rope_parameters=dict(full_attention=dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
                                        sliding_attention=dict(rope_type="default", rope_theta=100.0)))
# longrope switches from the short to the long factors above 10 positions.
PHI3_ORIGINAL_MAX = 10
FAMILY_SPECS = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _SMALL, head_dim=16, sliding_window=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        query_pre_attn_scalar=12)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3_TEXT),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        _SMALL, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4 * PHI3_ORIGINAL_MAX,
        original_max_position_embeddings=PHI3_ORIGINAL_MAX, sliding_window=4,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                             short_factor=[1.0, 1.3, 1.7, 2.1], long_factor=[1.5, 3.0, 6.0, 12.0],
                             original_max_position_embeddings=PHI3_ORIGINAL_MAX))),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_SMALL)),
    # Gemma 3's text decoder inside a Gemma3ForConditionalGeneration, with a one-layer vision tower.
    "gemma3_mm": ("Gemma3Config", "Gemma3ForConditionalGeneration", dict(
        text_config=GEMMA3_TEXT, mm_tokens_per_image=4,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))),
}


def make_hf_model(name: str, seed: int = 0):
    """A random HF model whose every weight (norms included) is perturbed away from its init."""
    if name in FAMILY_SPECS:
        cfg_cls, model_cls, kwargs = FAMILY_SPECS[name]
        # A copy: transformers' configs write into the (nested) dicts they are given.
        config = getattr(transformers, cfg_cls)(**copy.deepcopy(kwargs))
        overrides = ()
    else:
        cfg_cls, model_cls, overrides = SPECS[name]
    if overrides is None:  # GPT-2 spells its config differently
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif name not in FAMILY_SPECS:
        config = getattr(transformers, cfg_cls)(**{**_BASE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(name: str, path: str, seed: int = 0):
    model = make_hf_model(name, seed)
    model.save_pretrained(path)
    return model


def hf_logits_and_hidden(model, tokens, mask, positions):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def make_tokenizer():
    """A character-level fast tokenizer (82 ids < VOCAB): <pad>=0, <s>=1 (prepended), </s>=2, <unk>=3."""
    import string

    import tokenizers
    from tokenizers import decoders, models, processors

    chars = string.ascii_lowercase + string.digits + " .,:;!?+-*=()'\"\n" + string.ascii_uppercase
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + list(chars))}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
