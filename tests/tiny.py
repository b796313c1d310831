"""Tiny models and tokenizers built in code, for fast tests (no Hub, no downloads).

``make_tokenizer`` trains a small byte-level BPE tokenizer on a fixed English text; ``make_model_dir``
writes a random-weight model of any supported family plus that tokenizer to a folder, exactly the
layout of a Hub checkpoint (config.json, safetensors, tokenizer files, generation_config.json).
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A small model runs on a phone. "
    "Paris is the capital of France. Rome is the capital of Italy. Berlin is the capital of "
    "Germany. Once upon a time there was a little robot who liked to count numbers: one, two, "
    "three, four, five, six, seven, eight, nine, ten. The weather today is sunny with a light "
    "breeze. Questions and answers help people learn. What is the capital of Spain? Madrid. "
) * 4

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 256
#: Prompts of different lengths (a left-padded batch when tokenized together).
PROMPTS = ["Paris is the capital", "Once upon a time there was a little robot who", "one"]


def make_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with chat template, BOS/EOS/PAD = specials.

    The alphabet is the corpus's (ASCII) characters only, so every token decodes to whole
    characters; that keeps token-by-token text comparisons (e.g. with ExecuTorch's C++ runner,
    whose callback receives text pieces) exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


#: JSON the structured-output tests' tokenizer learns its merges from (besides :data:`CORPUS`).
JSON_CORPUS = (
    '{"name": "Paris", "age": 42, "tags": ["a", "b"], "ok": true, "score": 0.5, "items": [1, 2, 3]} '
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> '
    '{"name": "get_time", "parameters": {"zone": "UTC"}} null false '
) * 4


def make_json_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Like :func:`make_tokenizer`, but its alphabet is all of printable ASCII (plus newline), so it can
    spell JSON, tool-call tags and any ASCII regex; same specials, chat template and size, so it
    fits the tiny models' vocabulary. (:func:`make_tokenizer`'s alphabet lacks ``{``: the
    structured-output tests use that to check unspellable formats are refused.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Byte-level BPE writes bytes as printable stand-ins: '!'..'~' as themselves, space 'Ġ', newline 'Ċ'.
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["\u0120", "\u010a"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator([CORPUS, JSON_CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(**overrides):
    """A 2-layer Llama config with GQA, sized for the tiny tokenizer."""
    from transformers import LlamaConfig

    tok_ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    base = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.2,
        **tok_ids,
    )
    base.update(overrides)
    return LlamaConfig(**base)


#: Token ids shared by every tiny config (they match ``make_tokenizer``'s specials).
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
#: Sliding window of the tiny sliding-window families: short prompts already cross it.
WINDOW = 16
#: Original (pre-scaling) context of the tiny rope-scaled configs: the golden prompts cross it.
ORIGINAL_CONTEXT = 32

_SMALL = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.2, **TOKEN_IDS)


# Gemma ties its head to an embedding scaled by sqrt(hidden): with random weights every token then
# predicts itself and greedy output collapses to one repeated id, which would prove nothing.
_UNTIED = {"tie_word_embeddings": False}


def _config(class_name: str, **fields):
    import transformers

    return getattr(transformers, class_name)(**fields)


def mistral_config(**overrides):
    """A 2-layer Mistral with a sliding window of ``WINDOW`` tokens."""
    return _config("MistralConfig", **{**_SMALL, "sliding_window": WINDOW, **overrides})


def qwen2_config(**overrides):
    """A 2-layer Qwen2 (q/k/v biases)."""
    return _config("Qwen2Config", **{**_SMALL, **overrides})


def qwen3_config(**overrides):
    """A 2-layer Qwen3 (QK-norm, explicit head_dim); its second layer has a sliding window."""
    return _config("Qwen3Config", **{
        **_SMALL, "head_dim": 16, "use_sliding_window": True, "sliding_window": WINDOW,
        "max_window_layers": 1, **overrides,
    })


def phi3_config(**overrides):
    """A 2-layer Phi-3 (fused qkv and gate_up projections)."""
    return _config("Phi3Config", **{**_SMALL, "original_max_position_embeddings": 512, **overrides})


def phi3_longrope_config(**overrides):
    """Phi-4-mini's shape in small: partial rotary (0.75), tied head and longrope over
    ``ORIGINAL_CONTEXT``; plus Phi-3-mini's sliding window."""
    rotary_half = int(16 * 0.75) // 2
    rope = {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
        "long_factor": [1.5 + 0.5 * i for i in range(rotary_half)],
        "partial_rotary_factor": 0.75,
        "rope_theta": 10000.0,
    }
    return phi3_config(
        max_position_embeddings=4 * ORIGINAL_CONTEXT,
        original_max_position_embeddings=ORIGINAL_CONTEXT,
        rope_parameters=rope,
        tie_word_embeddings=True,
        sliding_window=WINDOW,
        **overrides,
    )


def gemma_config(**overrides):
    """A 2-layer Gemma (scaled embeddings, (1 + w) RMSNorm, GeLU-tanh MLP)."""
    return _config("GemmaConfig", **{**_SMALL, **_UNTIED, "head_dim": 16, "num_key_value_heads": 1, **overrides})


def gemma2_config(**overrides):
    """A 2-layer Gemma2: sliding then global attention, attention and final logit softcapping
    (caps low enough that random weights reach them; Gemma2's own 50/30 would never bind here)."""
    return _config("Gemma2Config", **{
        **_SMALL, **_UNTIED, "initializer_range": 0.3, "head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0, **overrides,
    })


def gemma3_text_config(**overrides):
    """A 2-layer Gemma3 text model: one local (sliding, own rope base) and one global layer,
    QK-norm, linear rope scaling on the global layer (as the 4B+ checkpoints have)."""
    return _config("Gemma3TextConfig", **{
        **_SMALL, **_UNTIED, "initializer_range": 0.3, "head_dim": 16, "sliding_window": WINDOW,
        "query_pre_attn_scalar": 16, "sliding_window_pattern": 2, "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        **overrides,
    })


def gpt2_config(**overrides):
    """A 2-layer GPT-2: learned positions, Conv1D projections, tied head."""
    fields = dict(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                  initializer_range=0.2, **TOKEN_IDS)
    return _config("GPT2Config", **{**fields, **overrides})


def gpt_neox_config(**overrides):
    """A 2-layer GPT-NeoX: partial rotary (25%), parallel residual, fused qkv."""
    fields = {k: v for k, v in _SMALL.items() if k != "num_key_value_heads"}
    return _config("GPTNeoXConfig", **{**fields, "rotary_pct": 0.25, **overrides})


def olmo_config(**overrides):
    """A 2-layer OLMo (non-parametric LayerNorm, q/k/v clipping)."""
    return _config("OlmoConfig", **{**_SMALL, "clip_qkv": 2.0, **overrides})


def olmo2_config(**overrides):
    """A 2-layer OLMo2 (post-norms, QK-norm over all heads); smaller weights keep its greedy
    output varied."""
    return _config("Olmo2Config", **{**_SMALL, "initializer_range": 0.1, **overrides})


def granite_config(**overrides):
    """A 2-layer Granite (embedding, residual, attention and logit multipliers)."""
    return _config("GraniteConfig", **{
        **_SMALL, "embedding_multiplier": 4.0, "residual_multiplier": 0.5,
        "attention_multiplier": 0.2, "logits_scaling": 2.0, **overrides,
    })


def smollm3_config(**overrides):
    """A 2-layer SmolLM3: its second layer has no rotary embedding (NoPE)."""
    return _config("SmolLM3Config", **{**_SMALL, "no_rope_layers": [1, 0], **overrides})


def llama3_rope_config(**overrides):
    """Llama with llama3 rope scaling over an original context of ``ORIGINAL_CONTEXT``."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL_CONTEXT, "rope_theta": 10000.0}
    return llama_config(rope_parameters=rope, **overrides)


def yarn_rope_config(**overrides):
    """Qwen2 with YaRN rope scaling (factor 4 over ``ORIGINAL_CONTEXT``)."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT,
            "rope_theta": 10000.0}
    return qwen2_config(max_position_embeddings=4 * ORIGINAL_CONTEXT, rope_parameters=rope, **overrides)


def dynamic_rope_config(**overrides):
    """Llama with dynamic NTK rope scaling past ``ORIGINAL_CONTEXT`` positions."""
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    return llama_config(max_position_embeddings=ORIGINAL_CONTEXT, rope_parameters=rope, **overrides)


#: Golden-test cases: id -> config builder. One per family; rope-scaling variants ride on the
#: family that ships them (Llama 3.x: llama3, Qwen2.5: YaRN, Phi-3/4: longrope, Gemma3: linear).
FAMILY_CASES = {
    "llama-llama3rope": llama3_rope_config,
    "llama-dynamicrope": dynamic_rope_config,
    "smollm3": smollm3_config,
    "mistral": mistral_config,
    "qwen2-yarn": yarn_rope_config,
    "qwen3": qwen3_config,
    "phi3-longrope": phi3_longrope_config,
    "gemma": gemma_config,
    "gemma2": gemma2_config,
    "gemma3_text": gemma3_text_config,
    "gpt2": gpt2_config,
    "gpt_neox": gpt_neox_config,
    "olmo": olmo_config,
    "olmo2": olmo2_config,
    "granite": granite_config,
}


def cpp_runner_text(folder: str | Path, prompt: str, max_new_tokens: int) -> str:
    """What ExecuTorch's C++ ``TextLLMRunner`` writes for ``prompt`` (greedy) from the program and
    tokenizer in ``folder``, with our kernel libraries loaded (as for any program of ours)."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from et_transformers.runtime import load_kernel_libraries, load_own_kernels

    folder = Path(folder)
    load_kernel_libraries()
    load_own_kernels(folder / "model.pte")
    runner = TextLLMRunner(str(folder / "model.pte"), str(folder / "tokenizer.json"))
    pieces: list[str] = []
    runner.generate(prompt, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, echo=False), pieces.append)
    return "".join(pieces)


def make_model(config, seed: int = 0):
    """A random-weight ``*ForCausalLM`` for ``config`` (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def make_model_dir(path: str | Path, config=None, seed: int = 0, generation_config: dict | None = None) -> Path:
    """Write a tiny checkpoint (weights, config, tokenizer, generation config) to ``path``."""
    path = Path(path)
    config = config or llama_config()
    model = make_model(config, seed)
    if generation_config is not None:
        for key, value in generation_config.items():
            setattr(model.generation_config, key, value)
    model.save_pretrained(path)
    make_tokenizer(config.vocab_size).save_pretrained(path)
    return path


# -- image-text-to-text -------------------------------------------------------------------------

#: Tiny vision towers see 32x32 images in 8x8 patches.
IMAGE_SIDE, PATCH = 32, 8
#: The tiny VLM tokenizers' extra specials (what each family's processor looks for), after SPECIAL_TOKENS.
VLM_SPECIALS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                "<start_of_image>", "<end_of_image>"]
VLM_VOCAB = VOCAB_SIZE + 8


def make_vlm_tokenizer():
    """:func:`make_tokenizer` plus the image specials of :data:`VLM_SPECIALS` (ids 256..261)."""
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": VLM_SPECIALS})
    return tok


def random_image(seed: int = 0, size: tuple[int, int] = (40, 48)):
    """A PIL RGB image of random pixels (height, width)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))


def _vision_tower(kind: str, **extra):
    import transformers

    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIDE, patch_size=PATCH, **extra)
    return getattr(transformers, kind)(**fields).to_dict()


def vlm_config(kind: str):
    """A tiny image-text-to-text config of family ``kind`` (llava, smolvlm, idefics3, gemma3)."""
    import transformers

    tok = make_vlm_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    text = {**_SMALL, "vocab_size": VLM_VOCAB}
    if kind == "llava":
        return transformers.LlavaConfig(
            vision_config=_vision_tower("CLIPVisionConfig", projection_dim=32),
            text_config=transformers.LlamaConfig(**text, tie_word_embeddings=False).to_dict(),
            image_token_index=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
    if kind in ("smolvlm", "idefics3"):
        prefix = "SmolVLM" if kind == "smolvlm" else "Idefics3"
        return getattr(transformers, f"{prefix}Config")(
            vision_config=_vision_tower(f"{prefix}VisionConfig"),
            text_config=transformers.LlamaConfig(**text, tie_word_embeddings=False).to_dict(),
            image_token_id=image_id, scale_factor=2, **TOKEN_IDS,
        )
    if kind == "gemma3":
        return transformers.Gemma3Config(
            vision_config=_vision_tower("SiglipVisionConfig"),
            text_config=transformers.Gemma3TextConfig(**{**text, "head_dim": 16}, sliding_window=WINDOW,
                                                      **_UNTIED).to_dict(),
            mm_tokens_per_image=4, image_token_index=image_id,
            boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"), **_UNTIED,
        )
    raise ValueError(kind)


#: A chat template in the processors' style: a message's content is text, or a list of image and
#: text parts (an image part renders as the family's placeholder, which the processor expands).
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Image tokens per image of the tiny configs: LLaVA drops CLS of 16 patches; SmolVLM / Idefics3
#: shuffle 16 patches by 2x2; Gemma 3 pools 16 patches to 4.
VLM_TOKENS_PER_IMAGE = {"llava": 16, "smolvlm": 4, "idefics3": 4, "gemma3": 4}


def vlm_processor(kind: str, tok=None):
    """The family's processor over :func:`make_vlm_tokenizer` for 32x32 images (no tiling), or
    ``None`` for Gemma 3 (whose processor needs a Gemma tokenizer) and SmolVLM (whose processor needs
    torchvision): tests build their prompts by hand, as those processors lay them out."""
    import transformers

    tok = tok or make_vlm_tokenizer()
    template = VLM_CHAT_TEMPLATE
    if kind == "llava":
        images = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
        return transformers.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                           chat_template=template)
    if kind == "idefics3":
        images = transformers.Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": IMAGE_SIDE}, max_image_size={"longest_edge": IMAGE_SIDE})
        return transformers.Idefics3Processor(
            image_processor=images, tokenizer=tok, image_seq_len=VLM_TOKENS_PER_IMAGE[kind], chat_template=template)
    return None  # SmolVLM's processor needs a video processor, which needs torchvision


def make_vlm_dir(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write a random-weight tiny VLM of family ``kind``, its tokenizer and (but Gemma 3) processor."""
    import transformers

    config = vlm_config(kind)
    arch = {"llava": "LlavaForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration",
            "idefics3": "Idefics3ForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}[kind]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    if kind == "gemma3":  # its projection starts at zero: every image would give zero features
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    model.save_pretrained(folder)
    tok = make_vlm_tokenizer()
    processor = vlm_processor(kind, tok)
    (processor or tok).save_pretrained(folder)
    return Path(folder)


def vlm_inputs(kind: str, folder: Path, text: str = "Paris is the capital", seed: int = 0) -> dict:
    """Processor outputs for one random image and ``text`` (built by hand for Gemma 3,
    ``<bos> <start_of_image> <image>*4 <end_of_image> text``, and SmolVLM, ``<fake_token_around_image>
    <global-img> <image>*4 <fake_token_around_image> text``, with random pixels in [-1, 1])."""
    from transformers import AutoProcessor, AutoTokenizer

    if kind in ("gemma3", "smolvlm"):
        tok = AutoTokenizer.from_pretrained(folder)
        special = tok.convert_tokens_to_ids
        image = [special("<image>")] * VLM_TOKENS_PER_IMAGE[kind]
        if kind == "gemma3":
            ids = [tok.bos_token_id, special("<start_of_image>"), *image, special("<end_of_image>")]
        else:
            ids = [special("<fake_token_around_image>"), special("<global-img>"), *image, special("<fake_token_around_image>")]
        ids += tok(text)["input_ids"]
        g = torch.Generator().manual_seed(seed)
        pixels = torch.rand(1, 3, IMAGE_SIDE, IMAGE_SIDE, generator=g) * 2 - 1
        out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if kind == "smolvlm":
            return {**out, "pixel_values": pixels.unsqueeze(0),
                    "pixel_attention_mask": torch.ones(1, 1, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.long)}
        return {**out, "pixel_values": pixels}
    processor = AutoProcessor.from_pretrained(folder)
    return dict(processor(images=random_image(seed), text="<image>" + text, return_tensors="pt"))
