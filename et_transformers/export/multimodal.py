"""Export of image-text-to-text models: one ``.pte`` with the three methods of ExecuTorch's ``MultimodalRunner``.

A vision-language checkpoint (:data:`~et_transformers.architectures.VISION_MODEL_TYPES`) becomes

- ``vision_encoder(pixel_values [1, 3, H, W]) -> [1, T, hidden]``: the family's vision tower and
  projector (the features transformers puts in place of an image's ``T`` placeholder tokens);
- ``token_embedding(input_ids [1, S]) -> [1, S, hidden]``: the text decoder's input embedding;
- ``text_decoder(inputs_embeds [1, S, hidden], cache_position [S]) -> logits``: the text decoder,
  built exactly as a causal LM of the same family is (:class:`~.wrapper.ExportableCausalLM`: custom
  SDPA over an in-place KV cache, last-position logits), the only method with state.

:class:`MultimodalExporter` is the :class:`~.pipeline.Exporter` with these three programs: the
text decoder is quantized with the export config's recipe, the vision encoder with its own
(``ExportConfig.qvision``), and the processor's files (image processor, chat template) are copied
beside the program, so the folder is everything ``ETModelForImageTextToText`` and ExecuTorch's C++ runner need.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..architectures import VisionArchitecture, check_config, resolve_vision_architecture
from ..errors import InvalidConfigError, ModelNotFoundError
from ..hub import ModelSource
from .loading import LoadedModel
from .pipeline import Exporter
from .wrapper import ExportableCausalLM

logger = logging.getLogger(__name__)

#: The method names ExecuTorch's ``MultimodalRunner`` calls (``extension/llm/runner/constants.h``).
VISION_METHOD, EMBEDDING_METHOD, DECODER_METHOD = "vision_encoder", "token_embedding", "text_decoder"
#: Backends whose partitioners lower all three methods (the one-token ones are text-only for now).
MULTIMODAL_BACKENDS = ("xnnpack", "portable")


class ExportableTextDecoder(ExportableCausalLM):
    """The text decoder of a vision-language model: :class:`ExportableCausalLM` on embeddings.

    ``forward(inputs_embeds [1, S, hidden], cache_position [S])``; given int64 token ids instead it
    embeds them itself (the calibration and eager checks feed text).
    """

    def forward(self, inputs: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Logits of the last positions of ``inputs`` (embeddings, or ids) at ``cache_position``."""
        if not inputs.is_floating_point():
            return super().forward(inputs, cache_position)
        return self._logits(cache_position, inputs.shape[1], inputs_embeds=inputs)


class TokenEmbedding(nn.Module):
    """``input_ids [1, S] -> [1, S, hidden]``: the text decoder's (possibly quantized) input embedding."""

    def __init__(self, embedding: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.embedding = embedding
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``input_ids``, in the decoder's dtype."""
        return self.embedding(input_ids).to(self.dtype)


class VisionEncoder(nn.Module):
    """``pixel_values [1, 3, H, W] -> [1, T, hidden]``: one image (or tile) as its family encodes it.

    Holds only the vision tower and the projector, so the method's program carries no text weights.
    """

    def __init__(self, vlm: nn.Module, arch: VisionArchitecture, image_shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        base, config = vlm.model, vlm.config
        self.kind = arch.model_type
        self.dtype = dtype
        if self.kind in ("idefics3", "smolvlm"):
            self.tower, self.projector = base.vision_model, base.connector
            self.register_buffer("position_ids", _tile_position_ids(self.tower.embeddings, image_shape), persistent=False)
        else:  # llava, gemma3
            self.tower, self.projector = base.vision_tower, base.multi_modal_projector
        # Eager attention (matmul, softmax, matmul): XNNPACK takes all of it, where SDPA's export
        # leaves its mask handling (eq / any / where per layer) to portable kernels; measured on a
        # 6-layer SigLIP at 1024 patches, 399 vs 893 ms per image, the same features.
        self.tower.config._attn_implementation = "eager"
        if self.kind == "llava":
            self.feature_layer = config.vision_feature_layer
            self.select = config.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image's features, as the family's ``get_image_features`` computes them."""
        pixels = pixel_values.to(self.dtype)
        if self.kind == "llava":
            states = self.tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
            layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
            picked = [states[i][:, 1:] if self.select == "default" else states[i] for i in layers]
            features = self.projector(torch.cat(picked, dim=-1))
        elif self.kind in ("idefics3", "smolvlm"):
            # The tower's own forward with an all-ones patch mask, its position ids fixed at export
            # (transformers derives them from the mask with bucketize, which no kernel here runs).
            embeddings = self.tower.embeddings
            hidden = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
            hidden = hidden + embeddings.position_embedding(self.position_ids)
            hidden = self.tower.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
            features = self.projector(self.tower.post_layernorm(hidden))
        else:  # gemma3
            features = self.projector(self.tower(pixel_values=pixels, return_dict=True).last_hidden_state)
        return features.float()


def _tile_position_ids(embeddings: nn.Module, image_shape: tuple[int, ...]) -> torch.Tensor:
    """The position ids Idefics3 / SmolVLM's vision embeddings compute for a whole (unpadded) tile of
    ``image_shape``: recorded from one eager call of the module itself, so they are transformers' own."""
    seen: list[torch.Tensor] = []
    hook = embeddings.position_embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    patch = int(embeddings.patch_size)
    mask = torch.ones(1, image_shape[-2] // patch, image_shape[-1] // patch, dtype=torch.bool)
    try:
        with torch.no_grad():
            embeddings(pixel_values=torch.zeros(image_shape), patch_attention_mask=mask)
    finally:
        hook.remove()
    return seen[0].clone()


#: Processor files copied verbatim from the checkpoint to the program's folder (the tokenizer's
#: are written by the tokenizer): copying, not loading, also carries a processor this machine cannot
#: build (SmolVLM's needs torchvision for its video half).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def text_causal_lm(vlm: nn.Module, arch: VisionArchitecture, max_seq_len: int) -> nn.Module:
    """The text decoder of ``vlm`` as its family's ``*ForCausalLM``, sharing ``vlm``'s modules.

    The causal LM is built on the meta device (no memory), then given ``vlm``'s decoder and head,
    so every later stage (source transforms, custom SDPA, quantization) treats it exactly as a text
    model of that family.
    """
    import transformers

    text_config = vlm.config.get_text_config()
    text_arch = check_config(text_config, max_seq_len)
    with torch.device("meta"):
        lm = getattr(transformers, text_arch.model_class)(text_config)
    lm.model = getattr(vlm.model, arch.language_model)
    lm.lm_head = vlm.lm_head
    lm.generation_config = vlm.generation_config
    return lm.eval()


def load_vision_model(source: ModelSource, *, trust_remote_code: bool = False, max_seq_len: int | None = None):
    """Load an image-text-to-text checkpoint: ``(LoadedModel, VisionArchitecture)``.

    The architecture (and its text decoder's) is checked on the config before any weight is read.

    Raises:
        UnsupportedModelError: not a supported vision-language type (a text-only one is pointed
            to ``ETModelForCausalLM``), or its text decoder is not a supported family.
        ModelNotFoundError: files are missing or unreadable.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read the config of {source.name}: {e}") from e
    arch = resolve_vision_architecture(config)
    text_arch = check_config(config.get_text_config(), max_seq_len)
    try:
        model = getattr(transformers, arch.model_class).from_pretrained(
            source.path, config=config, dtype=torch.float32, use_safetensors=None if not source.use_safetensors else True
        )
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load {source.name}: {e}") from e
    model.eval()
    import copy

    loaded = LoadedModel(model, tokenizer, config, copy.deepcopy(model.generation_config), text_arch)
    return loaded, arch


class MultimodalExporter(Exporter):
    """:class:`~.pipeline.Exporter` for image-text-to-text models (see the module docstring).

    Attributes (besides the base class's):
        vision_arch: the family's :class:`~et_transformers.architectures.VisionArchitecture`.
        vision_encoder: the :class:`VisionEncoder` module.
        exported_program: ``{method name: ExportedProgram}`` after :meth:`export`.
    """

    decoder_method = DECODER_METHOD

    def __init__(self, source: ModelSource, export_config=None, **kwargs: Any):
        super().__init__(source, export_config, **kwargs)
        backends = self.export_config.backends
        unsupported = [b for b in backends if b not in MULTIMODAL_BACKENDS]
        if unsupported:
            raise InvalidConfigError(
                f"backend={unsupported[0]!r} is not available for image-text-to-text programs yet; use one of "
                f"{list(MULTIMODAL_BACKENDS)} (for example recipe='xnnpack-fp32' or the default recipe)."
            )
        self.vision_arch: VisionArchitecture | None = None
        self.vision_encoder: VisionEncoder | None = None

    def load(self) -> "MultimodalExporter":
        """Load the vision-language model, its tokenizer and configs (float32, eval mode)."""
        with self._stage("load"):
            self.loaded, self.vision_arch = load_vision_model(
                self.source, trust_remote_code=self.trust_remote_code, max_seq_len=self.export_config.max_seq_len
            )
            self._check_one_token_calls()
            self.module = self.loaded.model
        return self

    def source_transform(self, transforms=()) -> "MultimodalExporter":
        """Split the model into its vision encoder and its text decoder (a causal LM of the text
        family, given ``transforms`` and the built-in ones, wrapped as :class:`ExportableTextDecoder`)."""
        from .layer_ops import apply_layer_ops
        from .transforms import apply_builtin_transforms

        self._require("loaded", "load")
        with self._stage("source_transform"):
            vlm, cfg = self.loaded.model, self.export_config
            lm = text_causal_lm(vlm, self.vision_arch, cfg.max_seq_len)
            for transform in transforms:
                lm = transform(lm)
            lm = apply_builtin_transforms(lm)
            if cfg.uses_own_kernels:
                lm = apply_layer_ops(lm)
            self.vision_encoder = VisionEncoder(vlm, self.vision_arch, self.image_shape()).eval()
            self.module = ExportableTextDecoder(
                lm, cfg.max_seq_len, kv_cache_dtype=cfg.kv_cache_dtype, logits=cfg.logits,
                verify_tokens=cfg.verify_tokens or 1, own_kernels=cfg.uses_own_kernels,
            ).eval()
        return self

    def to_dtype(self) -> "MultimodalExporter":
        """Cast the text decoder as the base class does, and the vision encoder to the same dtype."""
        super().to_dtype()
        dtype = self.export_config.torch_dtype
        self.vision_encoder.to(dtype)
        self.vision_encoder.dtype = dtype
        return self

    def quantize(self) -> "MultimodalExporter":
        """Quantize the text decoder with the recipe, and the vision encoder's linears with
        ``export_config.qvision`` (none: float)."""
        super().quantize()
        cfg = self.export_config
        if cfg.qvision:
            from .quantize import quantize_model

            group = cfg.qlinear_group_size if isinstance(cfg.qlinear_group_size, int) else 32
            vision_cfg = type(cfg)(
                max_seq_len=cfg.max_seq_len, dtype=cfg.dtype, qlinear=cfg.qvision, qhead=None,
                qlinear_group_size=group if cfg.qvision == "8da4w" else None,
            )
            with self._stage("quantize_vision"):
                report = quantize_model(self.vision_encoder, vision_cfg, cfg.torch_dtype)
            self.quantization_report["vision"] = {"scheme": cfg.qvision, **report}
        return self

    def image_shape(self) -> tuple[int, int, int, int]:
        """``[1, 3, H, W]``: the one image the vision encoder takes."""
        vision = self.loaded.model.config.vision_config
        side = int(vision.image_size)  # the processors resize (or tile) to the tower's own size
        return 1, int(getattr(vision, "num_channels", 3)), side, side

    def export(self) -> "MultimodalExporter":
        """``torch.export`` the three methods: the decoder and the embedding with a dynamic length,
        the vision encoder for one image of :meth:`image_shape`."""
        from .passes import apply_xnnpack_friendly_rewrites

        module = self._require("module", "source_transform")
        cfg = self.export_config
        hidden = int(self.loaded.model.config.get_text_config().hidden_size)
        n = min(3, cfg.tokens_per_call)
        embeds, positions = torch.zeros(1, n, hidden, dtype=cfg.torch_dtype), torch.arange(n, dtype=torch.long)
        seq = torch.export.Dim("seq_len", min=1, max=cfg.max_seq_len) if cfg.tokens_per_call > 1 else None
        with self._stage("export"), torch.no_grad():
            with module.for_export():
                decoder = torch.export.export(
                    module, (embeds, positions), dynamic_shapes=None if seq is None else ({1: seq}, {0: seq}), strict=False
                )
            embedding = TokenEmbedding(module.model.get_input_embeddings(), cfg.torch_dtype).eval()
            tokens = torch.export.export(
                embedding, (torch.zeros(1, n, dtype=torch.long),),
                dynamic_shapes=None if seq is None else ({1: seq},), strict=False,
            )
            vision = torch.export.export(self.vision_encoder, (torch.zeros(self.image_shape()),), strict=False)
            self.exported_program = {
                VISION_METHOD: apply_xnnpack_friendly_rewrites(vision),
                EMBEDDING_METHOD: tokens,
                DECODER_METHOD: apply_xnnpack_friendly_rewrites(decoder),
            }
        return self

    def metadata(self) -> dict[str, Any]:
        """The text program's constant methods, plus the image placeholder token (ours)."""
        meta = super().metadata()
        meta["get_image_token_id"] = int(self.loaded.model.config.image_token_id)
        return meta

    def write_extras(self, folder) -> None:
        """Copy the processor's files (image processor, chat template) beside the program."""
        import shutil

        for name in PROCESSOR_FILES:
            if (self.source.path / name).is_file():
                shutil.copyfile(self.source.path / name, folder / name)
