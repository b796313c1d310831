"""``ETModelForImageTextToText``: vision-language models on ExecuTorch, with transformers' image inputs.

The model is an :class:`~et_transformers.modeling.ETModelForCausalLM` whose program is a
:class:`~et_transformers.runtime.MultimodalProgram` (``vision_encoder``, ``token_embedding``,
``text_decoder``, built by :class:`~et_transformers.export.multimodal.MultimodalExporter`), so
loading, the cache, recipes, save/push and every generation feature are the causal LM's. What this
module adds is the images: ``generate()`` takes what the model's processor returns (``input_ids``
with the image placeholder tokens, ``pixel_values``), runs the vision encoder once per image, and
hands the generation loop the features that replace the placeholders' embeddings, checked against
the prompt before anything runs.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Any

import torch

from .errors import ETTransformersError
from .modeling import ETModelForCausalLM
from .runtime import MultimodalProgram

__all__ = ["ETModelForImageTextToText"]

logger = logging.getLogger(__name__)

#: Images whose features a model keeps (by content), so a chat does not encode its history again.
_FEATURE_CACHE_SIZE = 16
#: Families whose processors return tiles as ``[batch, tiles, 3, H, W]`` (all-zero tiles are padding).
_TILED = ("idefics3", "smolvlm")


class ETModelForImageTextToText(ETModelForCausalLM):
    """An image-text-to-text model (LLaVA, SmolVLM / Idefics3, Gemma 3) running on ExecuTorch.

    Build one with :meth:`from_pretrained` (the causal LM's options; the recipe quantizes the text
    decoder, ``qvision`` the vision encoder). Its folder holds the processor, so
    ``AutoProcessor.from_pretrained(model.pte_path.parent)`` (or :attr:`processor`) prepares
    inputs as for the transformers model::

        model = ETModelForImageTextToText.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")
        inputs = model.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=64)

    The program runs unchanged in ExecuTorch's C++ ``MultimodalRunner``.
    """

    _program_class = MultimodalProgram

    @staticmethod
    def _exporter_class():
        from .export.multimodal import MultimodalExporter

        return MultimodalExporter

    # -- images ---------------------------------------------------------------------------------

    @property
    def processor(self):
        """The model's processor (``AutoProcessor`` of the files beside the program), or ``None``
        when the folder has no processor files.

        Raises:
            ETTransformersError: the files are there but transformers cannot build the processor
                on this machine (the message says why).
        """
        if not hasattr(self, "_processor"):
            folder = self.pte_path.parent
            self._processor = None
            if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
                from transformers import AutoProcessor

                try:
                    self._processor = AutoProcessor.from_pretrained(folder)
                except (ImportError, AttributeError, TypeError, ValueError) as e:
                    raise ETTransformersError(
                        f"transformers cannot build the processor in {folder} here ({type(e).__name__}: {e}). "
                        f"Prepare input_ids and pixel_values another way (SmolVLM's processor needs torchvision "
                        f"for its video part) and pass them to generate()."
                    ) from e
        return self._processor

    def prepare_inputs(self, prompt: str | list[dict[str, Any]], images: list, *, chat: bool = True) -> dict:
        """The processor's inputs (``input_ids``, ``pixel_values``, ...) for a prompt showing ``images``.

        Args:
            prompt: chat messages (content a string, or a list of ``{"type": "image"}`` and
                ``{"type": "text", "text": ...}`` parts), rendered with the processor's chat
                template and the generation prompt; or a text, as a user message when ``chat``,
                else as is (with the family's image placeholder put in front of it, one per image,
                unless it has them).
            images: PIL images, in the order the prompt shows them.

        Raises:
            ETTransformersError: the model folder has no processor.
        """
        processor = self.processor
        if processor is None:
            raise ETTransformersError(
                f"{self.pte_path.parent} has no processor files (processor_config.json): pass input_ids and "
                f"pixel_values to generate() yourself."
            )
        if isinstance(prompt, str) and chat:
            prompt = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": prompt}]}]
        if isinstance(prompt, str):
            token = getattr(processor, "image_token", None) or "<image>"
            text = prompt if token in prompt else token * len(images) + prompt
        else:
            text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        tiled = self.model_type in _TILED
        encoded = processor(images=[list(images)] if tiled else list(images), text=text, return_tensors="pt",
                            add_special_tokens=isinstance(prompt, str))
        return {k: v for k, v in encoded.items() if k in ("input_ids", "pixel_values", "pixel_attention_mask")}

    @property
    def image_token_id(self) -> int:
        """The placeholder token whose embeddings an image's features replace."""
        return self.program.image_token_id

    @property
    def model_type(self) -> str | None:
        """The source model's ``model_type`` (from the manifest or ``config.json``)."""
        if self.manifest is not None:
            return self.manifest.model_type
        config = self.config
        return getattr(config, "model_type", None)

    def _tiles(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """The images (or tiles) of ``pixel_values`` in prompt order, each ``[1, 3, H, W]``."""
        shape = list(pixel_values.shape)
        expected = list(self.program.image_shape)
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor (the processor's output), got {type(pixel_values)}.")
        if pixel_values.dim() == 5:  # [batch, tiles, 3, H, W]
            if pixel_values.shape[0] != 1:
                raise ValueError(
                    f"pixel_values of shape {shape} hold {shape[0]} prompts' images; generate one prompt at a time."
                )
            tiles = list(pixel_values[0])
            if pixel_attention_mask is not None:
                masks = pixel_attention_mask.reshape(-1, *pixel_attention_mask.shape[-2:])
                for i, tile in enumerate(tiles):
                    if bool((tile != 0).any()) and not bool(masks[i].all()):
                        raise ValueError(
                            f"image tile {i} is padded (pixel_attention_mask has zeros): this program encodes whole "
                            f"{expected[-2]}x{expected[-1]} tiles only. Process each image on its own (one image per "
                            f"processor call pads nothing)."
                        )
            return [t.unsqueeze(0) for t in tiles if bool((t != 0).any())]  # all-zero tiles are padding
        if pixel_values.dim() == 4:
            return [p.unsqueeze(0) for p in pixel_values]
        if pixel_values.dim() == 3:
            return [pixel_values.unsqueeze(0)]
        raise ValueError(
            f"pixel_values of shape {shape} are not images: expected [images, 3, H, W] (or [3, H, W]) with "
            f"each image {expected[1:]}."
        )

    def image_features(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Run the vision encoder on the prompt's images: ``(positions, features)`` for the generation
        loop, or ``None`` for a prompt without images.

        Positions count the prompt's unpadded tokens. Everything is checked before the encoder runs.

        Raises:
            ValueError: images without image tokens in ``input_ids`` or the reverse, more than one
                prompt, a prompt (images included) longer than the context, pixel values of a
                shape the encoder was not exported for, or a number of image tokens that differs
                from the features the images give.
        """
        ids = torch.as_tensor(input_ids)
        ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
        image_id = self.image_token_id
        placeholders = int((ids == image_id).sum())
        if pixel_values is None:
            if placeholders:
                raise ValueError(
                    f"input_ids hold {placeholders} image token(s) (id {image_id}) but no pixel_values were "
                    f"given: pass the processor's pixel_values with them."
                )
            return None
        if ids.shape[0] != 1:
            raise ValueError(
                f"images go with one prompt at a time, and input_ids holds {ids.shape[0]}: generate each image "
                f"prompt in its own call."
            )
        row = ids[0]
        if attention_mask is not None:
            row = row[torch.as_tensor(attention_mask).reshape(ids.shape)[0].bool()]
        context = self.program.metadata.max_context_len
        tiles = self._tiles(pixel_values, pixel_attention_mask)
        per_image = self.program.tokens_per_image
        if placeholders == 0:
            raise ValueError(
                f"pixel_values hold {len(tiles)} image(s) but input_ids have no image token (id {image_id}) to put "
                f"them at: build the prompt with the model's processor, which inserts them."
            )
        if row.shape[0] > context:
            raise ValueError(
                f"the prompt is {row.shape[0]} tokens, {placeholders} of them for {len(tiles)} image(s) of {per_image} "
                f"tokens each, and the program's context holds {context}: use fewer images, or export with a larger "
                f"max_seq_len."
            )
        if placeholders != len(tiles) * per_image:
            raise ValueError(
                f"input_ids hold {placeholders} image tokens, but the {len(tiles)} image(s) of pixel_values give "
                f"{len(tiles) * per_image} features ({per_image} per image): pass input_ids and pixel_values from "
                f"the same processor call."
            )
        for i, tile in enumerate(tiles):  # the shape check for every image before any runs
            if list(tile.shape) != list(self.program.image_shape):
                raise ValueError(
                    f"image {i} has shape {list(tile.shape[1:])}, and this program's vision encoder takes "
                    f"{list(self.program.image_shape[1:])}: use the model's own processor (AutoProcessor from "
                    f"{self.pte_path.parent}), which resizes images to that size."
                )
        features = torch.cat([self._encode(t) for t in tiles], dim=0)
        positions = (row == image_id).nonzero()[:, 0]
        return positions, features

    def _encode(self, tile: torch.Tensor) -> torch.Tensor:
        """One image's features, from the last :data:`_FEATURE_CACHE_SIZE` images' when it is one
        of them (a chat re-sends its earlier images every turn)."""
        pixels = tile.float().contiguous()
        key = hashlib.sha256(pixels.numpy().tobytes()).digest()
        cache = self.__dict__.setdefault("_features", OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        with self.program.lock:
            features = self.program.encode_image(pixels)
        cache[key] = features
        while len(cache) > _FEATURE_CACHE_SIZE:
            cache.popitem(last=False)
        return features

    def _image_inputs(self, kwargs: dict, input_ids, attention_mask) -> dict:
        """``kwargs`` of a ``generate()`` / ``stream_generate()`` call with what the processor returns
        (``pixel_values`` as ``[images, 3, H, W]``, or ``[1, tiles, 3, H, W]`` for SmolVLM /
        Idefics3; ``pixel_attention_mask``, ``image_sizes``, ``token_type_ids``) replaced by the
        ``image_features`` the generation loop takes; the images are encoded here, before the
        generation starts. One prompt when it has images.

        Raises:
            ValueError: as :meth:`image_features`.
        """
        pixel_values = kwargs.pop("pixel_values", None)
        pixel_attention_mask = kwargs.pop("pixel_attention_mask", None)
        token_type_ids = kwargs.pop("token_type_ids", None)
        image_sizes = kwargs.pop("image_sizes", None)
        if kwargs.get("images") is not None:
            raise ValueError(
                "images= takes no PIL images here: run the model's processor (model.processor(images=..., "
                "text=...)) and pass its input_ids and pixel_values."
            )
        kwargs.pop("images", None)
        if image_sizes is not None:
            sizes = torch.as_tensor(image_sizes).reshape(-1, 2).tolist()
            expected = list(self.program.image_shape[-2:])
            if any(s != expected for s in sizes):
                raise ValueError(
                    f"image_sizes {sizes} differ from the {expected} this program's encoder takes; this family's "
                    f"variable-resolution images are not supported."
                )
        if token_type_ids is not None and self.model_type == "gemma3" and pixel_values is not None:
            logger.warning(
                "Gemma 3: this program lets image tokens attend causally (as transformers does without "
                "token_type_ids); transformers' own generate() lets each image's tokens see each other when "
                "token_type_ids is passed."
            )
        if input_ids is None and pixel_values is not None:
            raise ValueError("pixel_values need input_ids with the image tokens (the processor's output).")
        if input_ids is not None:
            features = self.image_features(input_ids, pixel_values, attention_mask, pixel_attention_mask)
            if features is not None:
                kwargs["image_features"] = features
        return kwargs

    def warmup(self) -> None:
        """Run one token and one blank image through the program, so XNNPACK packs every method's
        weights now."""
        super().warmup()
        with self.program.lock:
            self.program.encode_image(torch.zeros(self.program.image_shape))
