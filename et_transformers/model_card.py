"""Model cards: the ``README.md`` that ``save_pretrained`` writes beside an exported program.

This module owns :class:`CardData` (what only the caller knows: the Hub id, base model, license,
measured figures and a recipe-comparison table) and :func:`render`, which fills the template
``model_cards/template.md`` from a :class:`~et_transformers.manifest.Manifest` plus that data:
YAML front matter (``library_name``, ``tags``, ``base_model``, quantization, measured figures)
and sections on how to run the folder from Python, the CLI and ExecuTorch's C++ runner. It also
owns the markers between which ``benchmarks/quality.py`` writes its table. Nothing here reads
credentials; a card holds only what the manifest and the caller put in it.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import BACKEND_TITLES, OWN_KERNEL_SCHEMES, ExportConfig, recipe_name
from .manifest import Manifest

#: The card template (``string.Template`` syntax: ``${name}``).
#: Shipped inside the package (``model_cards/template.md`` in the repository links to it).
TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
#: The card template of image-text-to-text programs (same placeholders; their "Run it" section).
VLM_TEMPLATE_PATH = TEMPLATE_PATH.with_name("model_card_vlm.md")
#: ``benchmarks/quality.py --write`` replaces the text between these markers.
QUALITY_MARKERS = ("<!-- quality-table:start -->", "<!-- quality-table:end -->")

#: Figures a card can report: key -> (label, unit, format). Anything else in ``CardData.metrics``
#: raises, so a misspelt figure never silently disappears from the card.
METRICS: dict[str, tuple[str, str, str]] = {
    "load_seconds": ("load (`from_pretrained` of the folder, fresh process)", "s", ".2f"),
    "prefill_tokens_per_s": ("prefill", "tok/s", ".0f"),
    "decode_tokens_per_s": ("decode", "tok/s", ".0f"),
    "peak_rss_mb": ("peak RSS while generating", "MB", ".0f"),
    "perplexity": ("perplexity", "", ".2f"),
    "perplexity_fp32": ("perplexity of the float32 eager model", "", ".2f"),
    "top1_agreement": ("next-token top-1 agreement with the float32 eager model", "%", ".1%"),
}
#: Free-text keys allowed beside :data:`METRICS`: how and where the figures were measured.
METRIC_NOTES = ("measured_on",)

_TOKENIZER_NOTES = {
    "tokenizer.json": " with pytorch/tokenizers' Hugging Face tokenizer (BOS/EOS ids come from the program)",
    "tokenizer.model": " (SentencePiece or tiktoken model)",
}


@dataclass(frozen=True)
class CardData:
    """What the card says beyond the manifest.

    Attributes:
        repo_id: the Hub id the folder is (to be) published as; the examples load it. Without one
            they load the folder by its name.
        base_model: Hub id of the model the program was exported from (defaults to the manifest's
            source repo, when the weights came from the Hub).
        license: license identifier of the weights (e.g. ``"apache-2.0"``).
        metrics: measured figures, keys from :data:`METRICS` (plus ``measured_on``, a sentence).
            They are also stored in the saved manifest.
        quality_table: a markdown table comparing recipes, written between :data:`QUALITY_MARKERS`.
    """

    repo_id: str | None = None
    base_model: str | None = None
    license: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    quality_table: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS) - set(METRIC_NOTES))
        if unknown:
            raise ValueError(
                f"unknown card metrics {unknown}; use {sorted(METRICS)} (and 'measured_on' for how they "
                f"were measured)."
            )

    @classmethod
    def coerce(cls, value: "CardData | Mapping[str, Any] | None") -> "CardData":
        """``value`` as a :class:`CardData` (a mapping gives its fields; ``None`` the defaults).

        Raises:
            ValueError: a mapping with keys that are not fields.
        """
        if value is None:
            return cls()
        if isinstance(value, CardData):
            return value
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"unknown model card fields {unknown}; use {sorted(fields)}.")
        return cls(**value)

    def replace(self, **changes: Any) -> "CardData":
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)


def quantization_summary(cfg: ExportConfig) -> dict[str, Any]:
    """How each part of the model is stored, in words a card reader knows."""

    def scheme(name: str | None, group: int | None) -> str:
        if name is None:
            return cfg.dtype
        return f"{name}, groups of {group}" if group else f"{name}, per channel"

    summary: dict[str, Any] = {
        "linear": scheme(cfg.qlinear, cfg.linear_group_size(cfg.qlinear)),
        "head": scheme(cfg.head_scheme, cfg.linear_group_size(cfg.head_scheme)),
        "embedding": scheme(cfg.qembedding, cfg.qembedding_group_size),
        "kv_cache": cfg.kv_cache_dtype or cfg.dtype,
    }
    if cfg.qlinear and cfg.qlinear_8bit:
        summary["kept_8bit"] = list(cfg.qlinear_8bit)
    return summary


def quality_block(text: str) -> str | None:
    """The table between :data:`QUALITY_MARKERS` in ``text`` (a card or README), or ``None``."""
    start, end = QUALITY_MARKERS
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def _lowered_to(cfg: ExportConfig) -> str:
    """Who runs the layers: "delegated to XNNPACK", "... to OpenVINO, then XNNPACK", or the portable kernels."""
    if cfg.backends == ("portable",):
        return "run by ExecuTorch portable kernels"
    return "delegated to " + ", then ".join(BACKEND_TITLES[b] for b in cfg.backends)


def _front_matter(manifest: Manifest, cfg: ExportConfig, card: CardData, base_model: str | None) -> str:
    import yaml  # a dependency of transformers

    quantized = any((cfg.qlinear, cfg.qembedding, cfg.kv_cache_dtype))
    tags = ["executorch", *cfg.backends, "et_transformers", "on-device"] + (["quantized"] if quantized else [])
    data: dict[str, Any] = {"library_name": "et_transformers", "pipeline_tag": "text-generation", "tags": tags}
    if card.license:
        data["license"] = card.license
    if base_model:
        data["base_model"] = base_model
        if quantized:
            data["base_model_relation"] = "quantized"
    data["quantization"] = {"recipe": recipe_name(cfg) or "custom", **quantization_summary(cfg)}
    data["executorch"] = {
        "backend": cfg.to_dict()["backend"],
        "max_seq_len": cfg.max_seq_len,
        "pte_sha256": manifest.pte_sha256,
        "versions": {k: v for k, v in manifest.versions.items() if k in ("et-transformers", "executorch", "torch")},
    }
    data["metrics"] = {"pte_mb": round(manifest.pte_size / 1e6, 1), **_metrics(manifest, card)}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100).strip()


def _metrics(manifest: Manifest, card: CardData) -> dict[str, Any]:
    merged = {**manifest.metrics, **card.metrics}
    return {k: merged[k] for k in (*METRICS, *METRIC_NOTES) if merged.get(k) is not None}


def _measured(manifest: Manifest, card: CardData) -> str:
    metrics = _metrics(manifest, card)
    lines = ["| figure | value |", "|---|---:|", f"| `model.pte` size | {manifest.pte_size / 1e6:.1f} MB |"]
    for key, (label, unit, fmt) in METRICS.items():
        if key in metrics:
            value = format(metrics[key], fmt)
            lines.append(f"| {label} | {value}{'' if unit in ('', '%') else ' ' + unit} |")
    if len(lines) == 3:
        lines.append("\nSpeed and quality were not measured for this folder.")
    if metrics.get("measured_on"):
        lines.append(f"\n{metrics['measured_on']}")
    return "\n".join(lines)


def _source(manifest: Manifest, base_model: str | None) -> str:
    src = manifest.source
    if src.get("repo_id"):
        where = f"[{src['repo_id']}](https://huggingface.co/{src['repo_id']})"
        where += f" at `{src['revision'][:12]}`" if src.get("revision") else ""
        return where + (f", subfolder `{src['subfolder']}`" if src.get("subfolder") else "")
    text = f"`{src['gguf_file']}` (GGUF)" if src.get("gguf_file") else "a local checkpoint"
    return text + (f" of [{base_model}](https://huggingface.co/{base_model})" if base_model else "")


def render(
    manifest: Manifest,
    card: CardData | None = None,
    *,
    folder_name: str,
    runner_tokenizer: str | None,
    chat: bool,
    template: str | Path | None = None,
) -> str:
    """The ``README.md`` of an exported model folder.

    Args:
        manifest: the folder's manifest (export config, source, hash, versions, metrics).
        card: what the caller adds (see :class:`CardData`).
        folder_name: the folder's name, loaded by the examples when ``card.repo_id`` is unset.
        runner_tokenizer: the tokenizer file ExecuTorch's runner loads (``None`` when absent).
        chat: whether the tokenizer has a chat template (the examples then use it).
        template: the template file; :data:`TEMPLATE_PATH` by default (:data:`VLM_TEMPLATE_PATH` for
            an image-text-to-text program).

    Returns:
        The card's text.

    Raises:
        FileNotFoundError: the template is missing (e.g. an install without ``model_cards/``).
        KeyError: the template names a placeholder this function does not fill.
    """
    card = card or CardData()
    from .architectures import VISION_MODEL_TYPES

    vision = manifest.model_type in VISION_MODEL_TYPES
    template_path = Path(template) if template else (VLM_TEMPLATE_PATH if vision else TEMPLATE_PATH)
    if not template_path.is_file():
        raise FileNotFoundError(
            f"model card template {template_path} does not exist; pass template= or run from a checkout "
            f"of et_transformers that has model_cards/."
        )
    cfg = ExportConfig.from_dict(manifest.export_config)
    base_model = card.base_model or manifest.source.get("repo_id")
    name = (base_model or manifest.source.get("repo_id") or folder_name).rsplit("/", 1)[-1]
    recipe = recipe_name(cfg)
    quant = quantization_summary(cfg)
    versions = manifest.versions
    ref = card.repo_id or f"./{folder_name}"
    question = "What is the capital of France?"
    python_prompt = (
        f'ids = tok.apply_chat_template([{{"role": "user", "content": "{question}"}}],\n'
        f'                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]'
        if chat
        else 'ids = tok("The capital of France is", return_tensors="pt").input_ids'
    )
    quality = ""
    if card.quality_table:
        start, end = QUALITY_MARKERS
        quality = f"\n## Recipes compared\n\n{start}\n{card.quality_table.strip()}\n{end}\n"
    own = [s for s in dict.fromkeys((cfg.qlinear, cfg.head_scheme)) if s in OWN_KERNEL_SCHEMES]
    if own:
        linears = (f"run by et_transformers' own `{own[0]}` kernel (x86-64 with AVX2; it ships with "
                   f"et_transformers and is compiled on first use), the rest "
                   f"{_lowered_to(cfg)}")
        runner_note = (f" This program's `{own[0]}` layers need et_transformers' kernel library, which a stock "
                       f"ExecuTorch build (`llama_main`, a phone app) does not have: run it through Python as "
                       f"below, or export with a stock recipe such as `xnnpack-8da4w` for other runtimes.")
    else:
        linears = _lowered_to(cfg)
        runner_note = ""
    values = {
        "front_matter": _front_matter(manifest, cfg, card, base_model),
        "title": f"{name} for ExecuTorch ({recipe or 'custom recipe'})",
        "summary": (
            f"An ExecuTorch program of {name}, exported by et_transformers: attention runs as "
            f"`llama.custom_sdpa` over an in-place KV cache, and the linear layers are {linears}. "
            f"It loads with `{'ETModelForImageTextToText' if vision else 'ETModelForCausalLM'}.from_pretrained` "
            f"and with ExecuTorch's C++ {'multimodal' if vision else 'LLM'} runner."
        ),
        "source": _source(manifest, base_model),
        "recipe": f"`{recipe}`" if recipe else "custom (see `manifest.json`)",
        "quantization": "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(f'`{p}`' for p in v) if isinstance(v, list) else v}"
            for k, v in quant.items()
        ),
        "max_seq_len": str(cfg.max_seq_len),
        "pte_mb": f"{manifest.pte_size / 1e6:.1f}",
        "pte_sha256": manifest.pte_sha256,
        "stack": ", ".join(f"{k} {versions[k]}" for k in ("et-transformers", "executorch", "torch", "transformers")
                           if versions.get(k)),
        "measured": _measured(manifest, card),
        "model_ref": ref,
        "python_prompt": python_prompt,
        "cli_chat": " --chat" if chat else "",
        "cli_prompt": question if chat else "The capital of France is",
        "raw_prompt": "The capital of France is",
        "runner_tokenizer": runner_tokenizer or "tokenizer.json",
        "runner_tokenizer_note": _TOKENIZER_NOTES.get(runner_tokenizer or "", " (missing from this folder: add it)"),
        "quality_section": quality,
        "own_kernels_note": runner_note,
    }
    return string.Template(template_path.read_text()).substitute(values)
