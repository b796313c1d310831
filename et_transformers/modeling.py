"""``ETModelForCausalLM``: the facade users meet. It orchestrates; the stages do the work.

``from_pretrained`` reads like the recipe it is: resolve the files (:mod:`.hub`), compute what we
would build (:mod:`.cache` key), load it from the cache or export it (:mod:`.export`, imported only
then), load the program (:mod:`.runtime`) and warm it up; a folder or Hub repo written by
``save_pretrained`` is checked against its manifest and loaded as is. ``generate`` hands over to
:mod:`.generation`; ``save_pretrained`` to :mod:`.saving` (folder and model card) and
``push_to_hub`` to it and :mod:`.hub`. Loading a cached or pre-exported model never imports the
export stack.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import hub
from .cache import ArtifactCache
from .config import DEFAULT_RECIPE, ExportConfig, recipe_name
from .delegates import check_runnable
from .config import recipe as make_recipe
from .errors import InvalidConfigError, ModelNotFoundError, ProgramError
from .generation import GenerationStats, Generator, peak_rss_bytes
from .generation_fields import drop_refused_fields
from .manifest import PTE_NAME, Manifest
from .model_card import CardData
from .runtime import Program
from .tokenization import load_tokenizer, missing_tokenizer, resolve_tokenizer
from .streaming import GenerationResponse, stream


__all__ = ["ETModelForCausalLM", "load_tokenizer"]

logger = logging.getLogger(__name__)


def _read_config_dict(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _load_generation_config(folder: Path, config=None):
    """``generation_config.json`` beside the ``.pte``, else one derived from the model config."""
    from transformers import GenerationConfig, PretrainedConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    if config is None and (folder / "config.json").is_file():
        config = PretrainedConfig.from_dict(_read_config_dict(folder))
    return GenerationConfig.from_model_config(config) if config is not None else GenerationConfig()


class ETModelForCausalLM:
    """A causal language model running on ExecuTorch, with the transformers API.

    Build one with :meth:`from_pretrained` (Hub id, local folder, GGUF file, or a folder/repo of
    an exported model) or :meth:`from_pte`.

    A model object owns its program's KV cache, which holds one sequence at a time, so calls on one
    object from several threads (``generate``, ``stream_generate``, ``forward``, chat turns) run one
    after another, each holding the program's lock for the whole call. To generate N sequences in
    parallel, load N objects (each loads the ``.pte`` again, with a KV cache of its own).

    Attributes:
        config: the transformers config of the source model (``None`` for a bare ``.pte``).
        generation_config: default ``GenerationConfig`` for :meth:`generate`.
        tokenizer: the model's tokenizer (``None`` when its checkpoint had none: text features
            then raise :class:`~et_transformers.errors.TokenizerError`).
        export_config: the :class:`ExportConfig` the program was built with (``None`` if unknown).
        pte_path: path of the loaded ``.pte``.
        manifest: the program's :class:`~et_transformers.manifest.Manifest`, when it has one.
        stats: :class:`~et_transformers.generation.GenerationStats` of the last load/generate.
        program: the loaded :class:`~et_transformers.runtime.Program`.
    """

    #: The runtime class of this model's programs.
    _program_class = Program
    #: The images-related keywords a text model refuses by name (see :meth:`generate`).
    _IMAGE_KEYWORDS = ("pixel_values", "pixel_attention_mask", "image_sizes", "images")

    def __init__(
        self,
        program: Program,
        *,
        config=None,
        generation_config=None,
        tokenizer=None,
        export_config: ExportConfig | None = None,
        manifest: Manifest | None = None,
        stats: GenerationStats | None = None,
    ):
        from transformers import GenerationConfig

        self.program = program
        self._config = config
        self.generation_config = generation_config or GenerationConfig()
        drop_refused_fields(self.generation_config, f"{program.path.parent}/generation_config.json")
        self.export_config = export_config
        self.manifest = manifest
        self.stats = stats or GenerationStats()
        raw = config.to_dict() if config is not None else _read_config_dict(program.path.parent)
        raw = raw.get("text_config") or raw  # an image-text-to-text config nests the decoder's
        weight_bytes = manifest.weight_bytes_per_token if manifest is not None else None
        self._generator = Generator(program, raw.get("max_position_embeddings"), tokenizer, weight_bytes)

    @property
    def tokenizer(self):
        """The model's tokenizer (``None`` when its checkpoint had none). Setting it gives one to a
        model exported without: ``generate(stop_strings=...)``, streamed text and chat use it."""
        return self._generator.tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._generator.tokenizer = value

    @property
    def config(self):
        """The transformers config of the source model, loaded on first access (``None`` if unknown).

        Loading it imports the model family's modeling code, which costs seconds; ``generate`` does
        not need it.
        """
        if self._config is None and (self.program.path.parent / "config.json").is_file():
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.program.path.parent)
        return self._config

    @config.setter
    def config(self, value) -> None:
        self._config = value

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike,
        *,
        export_config: ExportConfig | None = None,
        recipe: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        force_export: bool = False,
        gguf_file: str | None = None,
        subfolder: str | None = None,
        trust_remote_code: bool = False,
        use_safetensors: bool = True,
        warmup: bool = True,
        tokenizer=None,
        **export_overrides: Any,
    ) -> "ETModelForCausalLM":
        """Load a model, exporting it to ExecuTorch the first time and from the cache afterwards.

        Args:
            model_id_or_path: Hub id (``"org/name"``), local model folder, ``.gguf`` file, or a
                folder/repo written by :meth:`save_pretrained` (loaded without export, after its
                manifest is checked: the ``.pte``'s sha256, and that this ExecuTorch can run it).
            export_config: what program to build.
            recipe: a named recipe (see :data:`et_transformers.config.RECIPES`) instead of
                ``export_config``; with neither, :data:`~et_transformers.config.DEFAULT_RECIPE`.
            revision: Hub branch, tag or commit.
            token: Hub token (never logged).
            cache_dir: root for downloads and exported artifacts (default: see
                :func:`et_transformers.cache.default_cache_dir`).
            local_files_only: use only local files and the cache (also ``HF_HUB_OFFLINE=1``).
            force_download: download the source files again.
            force_export: export again even if the cache holds the program (an already exported
                folder or repo has nothing to export: raises).
            gguf_file: GGUF file inside the folder or repository.
            subfolder: folder inside the repository or local folder that holds the model.
            trust_remote_code: allow models whose config declares custom code.
            use_safetensors: ``False`` allows pickled ``pytorch_model*.bin`` weights when the
                checkpoint has no safetensors (pickles can run code: trusted sources only).
            warmup: run one token through the program while loading, so XNNPACK packs its weights
                now (counted in ``stats.load_time``) rather than during the first ``generate``.
            tokenizer: a tokenizer object or a folder holding one, used instead of the files beside
                the program (for a checkpoint saved without its tokenizer: it exports and
                generates from ids without one, and text features raise ``TokenizerError``).
            **export_overrides: :class:`ExportConfig` fields overriding ``export_config``
                (e.g. ``max_seq_len=2048``); any other keyword raises.

        Raises:
            InvalidConfigError: an unknown keyword or invalid export option, or export options or
                ``force_export`` given for an already exported folder or repo.
            ProgramError: a pre-exported ``.pte`` does not match its manifest, or was built by an
                ExecuTorch newer than the installed runtime; or the backend's delegates cannot run on
                this runtime (checked before exporting; the message says what to install).
            TokenizerError: a ``tokenizer`` path holds no tokenizer files.
            UnsupportedModelError, ModelNotFoundError, HubError, ExportError, CacheError.
        """
        t0 = time.perf_counter()
        tokenizer = resolve_tokenizer(tokenizer)
        if export_config is not None and recipe is not None:
            raise InvalidConfigError(f"pass either export_config or recipe={recipe!r}, not both.")
        explicit_export = export_config is not None or recipe is not None or bool(export_overrides)
        base = export_config if export_config is not None else make_recipe(recipe or DEFAULT_RECIPE)
        export_config = base.replace(**export_overrides)
        source = hub.resolve(
            model_id_or_path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            gguf_file=gguf_file,
            subfolder=subfolder,
            use_safetensors=use_safetensors,
        )
        if source.is_program:
            if explicit_export or force_export:
                given = (
                    "force_export=True" if force_export else f"export options ({export_overrides or export_config})"
                )
                raise InvalidConfigError(
                    f"{source.name} holds an already exported program; {given} cannot apply to it: there is "
                    f"nothing to export. Load it without them, or export the original checkpoint."
                )
            manifest = Manifest.read(source.path)
            manifest.check_runtime(where=source.name)
            model = cls._load(
                source.path / PTE_NAME, t0=t0, warmup=warmup, manifest=manifest, tokenizer=tokenizer, verify=True
            )
            logger.info("Loaded the exported program of %s (no export)", source.name)
            return model

        check_runnable(export_config.backends)  # not minutes of export for a program this runtime cannot load
        cache = ArtifactCache(Path(cache_dir) / "et_transformers" if cache_dir else None)
        key = cache.key_for(source, export_config)
        export_time: list[float] = []

        def build(folder: Path) -> None:
            t_export = time.perf_counter()
            cls._exporter_class()(source, export_config, trust_remote_code=trust_remote_code).run(folder)
            export_time.append(time.perf_counter() - t_export)

        entry, built = cache.get_or_build(key, build, rebuild=force_export)
        if built:
            logger.info("Exported %s in %.1f s to %s", source.name, export_time[0], entry.path)
        model = cls._load(entry.pte_path, t0=t0, warmup=warmup, manifest=entry.manifest, tokenizer=tokenizer)
        model.stats.export_time = export_time[0] if export_time else None
        return model

    @staticmethod
    def _exporter_class():
        """The :class:`~et_transformers.export.Exporter` (sub)class that builds this model's programs."""
        from .export import Exporter

        return Exporter

    @classmethod
    def _load(
        cls,
        pte: Path,
        *,
        t0: float,
        warmup: bool,
        manifest: Manifest | None = None,
        tokenizer=None,
        config=None,
        generation_config=None,
        verify: bool = False,
    ) -> "ETModelForCausalLM":
        """Load a ``.pte`` plus the files beside it; warm it up; time the load.

        With ``verify``, the ``.pte``'s sha256 is checked against ``manifest`` on a second thread
        while the tokenizer and configs load (hashing releases the GIL), and before the program
        is opened: a corrupted file raises ``ProgramError`` and is never handed to the runtime.
        """
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            check = pool.submit(manifest.verify_pte, pte) if verify and manifest is not None else None
            if generation_config is None:
                generation_config = _load_generation_config(pte.parent, config)
            if tokenizer is None:
                tokenizer = load_tokenizer(pte.parent)
            if check is not None:
                check.result()
        program = cls._program_class(pte)
        if generation_config.eos_token_id is None and program.metadata.eos_ids:
            generation_config.eos_token_id = list(program.metadata.eos_ids)
        model = cls(
            program,
            config=config,
            generation_config=generation_config,
            tokenizer=tokenizer,
            export_config=ExportConfig.from_dict(manifest.export_config) if manifest else None,
            manifest=manifest,
        )
        if warmup:
            model.warmup()
        model.stats.load_time = time.perf_counter() - t0
        model.stats.peak_rss_bytes = peak_rss_bytes()
        return model

    @classmethod
    def from_pte(
        cls,
        path: str | os.PathLike,
        tokenizer=None,
        *,
        config=None,
        generation_config=None,
        warmup: bool = True,
    ) -> "ETModelForCausalLM":
        """Load a ``.pte`` file directly.

        Tokenizer, config and generation config are taken from the arguments, else from files
        beside the ``.pte`` (as :meth:`save_pretrained` writes them). A manifest beside it is
        verified (sha256) when present.

        Args:
            path: the ``.pte`` file.
            tokenizer: a tokenizer object, or a folder (or its ``tokenizer.json``) to load one from.
            config: the transformers config, if known.
            generation_config: default generation settings, if known.
            warmup: see :meth:`from_pretrained`.

        Raises:
            ProgramError: not a loadable LLM program, or it does not match its manifest.
            TokenizerError: a ``tokenizer`` path holds no tokenizer files.
        """
        t0 = time.perf_counter()
        path = Path(path)
        if path.suffix != ".pte":
            raise ProgramError(f"{path} is not a .pte file.")
        if not path.is_file():
            raise ModelNotFoundError(f"{path} does not exist.")
        manifest = None
        if (path.parent / "manifest.json").is_file() and path.name == PTE_NAME:
            manifest = Manifest.read(path.parent)
            manifest.check_runtime(where=str(path))
        tokenizer = resolve_tokenizer(tokenizer)
        return cls._load(
            path,
            t0=t0,
            warmup=warmup,
            manifest=manifest,
            tokenizer=tokenizer,
            config=config,
            generation_config=generation_config,
            verify=manifest is not None,
        )

    # -- saving and sharing --------------------------------------------------------------

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, card: CardData | dict | None = None
    ) -> Path:
        """Write the model as a folder that :meth:`from_pretrained` loads without exporting.

        The folder holds ``model.pte``, ``manifest.json`` (export config, source id and revision,
        stack versions, the ``.pte``'s sha256), ``config.json``, ``generation_config.json``, the
        tokenizer files (``tokenizer.json`` is also what ExecuTorch's C++ runner loads) and a
        ``README.md`` model card rendered from ``model_cards/template.md``. The tokenizer and
        generation config are saved as they are now on this object.

        Args:
            save_directory: the folder (created if needed).
            card: model card data: a :class:`~et_transformers.model_card.CardData` or a dict of its
                fields (``repo_id``, ``base_model``, ``license``, ``metrics``, ``quality_table``).

        Returns:
            The folder's path.

        Raises:
            ProgramError: the model has no manifest (it was loaded from a bare ``.pte``).
            ValueError: unknown card fields or metrics.
        """
        from .saving import write_model_folder

        return write_model_folder(
            save_directory,
            pte=self.pte_path,
            manifest=self._require_manifest("save_pretrained"),
            config=self._config,
            generation_config=self.generation_config,
            tokenizer=self.tokenizer,
            card=CardData.coerce(card),
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        card: CardData | dict | None = None,
    ):
        """Upload the :meth:`save_pretrained` folder to the Hub in one commit.

        The folder is written to a temporary directory (the ``.pte`` hard-linked when possible)
        and removed afterwards; the model card's examples load ``repo_id``. A failed upload leaves
        the cache and any saved folder as they were.

        Args:
            repo_id: ``"org/name"``; created if missing.
            token: Hub token with write access (default: the logged-in token / ``HF_TOKEN``).
                Never logged or put in messages or the card.
            private: create the repository private (applies only when it is created).
            revision: branch to commit to (created if missing).
            commit_message: the commit summary (default names the model and recipe).
            create_pr: open a pull request instead of committing to the branch.
            card: model card data, as for :meth:`save_pretrained`.

        Returns:
            huggingface_hub's ``CommitInfo``: a ``str`` (the commit URL) with ``.oid`` (the commit
            sha, a ``revision=`` for :meth:`from_pretrained`) and ``.pr_url``.

        Raises:
            HubError: the Hub refused or failed the upload (the message says which step).
            ProgramError, ValueError: as :meth:`save_pretrained`.
        """
        import tempfile

        from .saving import write_model_folder

        manifest = self._require_manifest("push_to_hub")
        card = CardData.coerce(card).replace(repo_id=repo_id)
        if commit_message is None:
            recipe = recipe_name(self.export_config) if self.export_config else None
            commit_message = f"Upload ExecuTorch program ({recipe or 'custom recipe'}) with et_transformers"
        with tempfile.TemporaryDirectory(prefix="et-transformers-push-") as tmp:
            folder = write_model_folder(
                Path(tmp) / repo_id.rsplit("/", 1)[-1],
                pte=self.pte_path,
                manifest=manifest,
                config=self._config,
                generation_config=self.generation_config,
                tokenizer=self.tokenizer,
                card=card,
                link_pte=True,
            )
            return hub.upload_folder(
                folder,
                repo_id,
                token=token,
                private=private,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    def _require_manifest(self, action: str) -> Manifest:
        if self.manifest is None:
            raise ProgramError(
                f"{action} needs the program's manifest.json (export config, source, hash), but "
                f"{self.pte_path} was loaded without one. Load the model from its exported folder or "
                f"export it with from_pretrained(<checkpoint>)."
            )
        return self.manifest

    def require_tokenizer(self, feature: str):
        """The model's tokenizer, for a feature that needs one.

        Args:
            feature: what needs it, for the message (``"a chat"``, ``"a text prompt"``).

        Raises:
            TokenizerError: the model has none; the message names its source and the fix.
        """
        if self.tokenizer is None:
            source = (self.manifest.source if self.manifest else {}) or {}
            where = source.get("repo_id") or source.get("path")
            raise missing_tokenizer(f"{where} (exported to {self.pte_path.parent})" if where else
                                    str(self.pte_path.parent), feature)
        return self.tokenizer

    def replica(self, *, warmup: bool = True) -> "ETModelForCausalLM":
        """Another model object on the same ``.pte``, with a KV cache of its own, for parallel work.

        The program is loaded again (ExecuTorch memory-maps the file, so the weights' pages are
        shared with this object; the KV cache, activations and any weights the backend repacks
        are the replica's own); tokenizer, configs and manifest are shared, the generation config
        is copied. Nothing is exported or verified again.

        Args:
            warmup: see :meth:`from_pretrained`.
        """
        import copy

        return type(self)._load(
            self.pte_path,
            t0=time.perf_counter(),
            warmup=warmup,
            manifest=self.manifest,
            tokenizer=self.tokenizer,
            config=self._config,
            generation_config=copy.deepcopy(self.generation_config),
        )

    def warmup(self) -> None:
        """Run one token through the program so XNNPACK packs its weights now.

        The token lands in cache position 0, which the next generation overwrites: positions are
        only ever read after being written in the same sequence.
        """
        with self.program.lock:
            self.program.forward(torch.zeros(1, 1, dtype=torch.long), 0)

    # -- properties ----------------------------------------------------------------------

    @property
    def pte_path(self) -> Path:
        """Path of the loaded ``.pte``."""
        return self.program.path

    @property
    def device(self) -> torch.device:
        """Always CPU: inputs and outputs are CPU tensors."""
        return torch.device("cpu")

    def __repr__(self) -> str:
        meta = self.program.metadata
        return (
            f"{type(self).__name__}(pte={str(self.pte_path)!r}, context={meta.max_context_len}, "
            f"vocab={meta.vocab_size}, export_config={self.export_config})"
        )

    # -- logits ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Logits for every position, as ``transformers``' ``model(input_ids).logits``.

        Each row is run from cache position 0 (left padding skipped; padded positions get zero
        logits). An evaluation program (``ExportConfig(logits="all")``) computes each chunk of up to
        ``max_seq_len`` tokens in one call; a generation program runs one call per token, which
        gives the same logits, only slower.

        Args:
            input_ids: LongTensor ``[batch, seq]`` (left-padded batches with ``attention_mask``).
            attention_mask: ``[batch, seq]``.

        Returns:
            ``CausalLMOutput`` with ``logits`` ``[batch, seq, vocab]`` (float32).

        Raises:
            ValueError: bad ids, right padding, or a row longer than the program's context.
        """
        from transformers.modeling_outputs import CausalLMOutput

        from .planning import attention_mask_for, check_input_ids

        meta = self.program.metadata
        ids = check_input_ids(input_ids, meta.vocab_size)
        mask = attention_mask_for(ids, attention_mask, None, None)
        logits = torch.zeros(*ids.shape, meta.vocab_size)
        with self.program.lock:
            for b in range(ids.shape[0]):
                tokens = ids[b][mask[b].bool()].unsqueeze(0)  # [1, n]
                logits[b, ids.shape[1] - tokens.shape[-1] :] = self._all_logits(tokens, b)
        return CausalLMOutput(logits=logits)

    def _all_logits(self, tokens: torch.Tensor, b: int) -> torch.Tensor:
        """Every position's logits ``[n, V]`` of one unpadded row ``[1, n]``, from position 0."""
        meta = self.program.metadata
        n = tokens.shape[-1]
        if n > meta.max_context_len:
            raise ValueError(
                f"row {b} has {n} tokens but the program's context holds {meta.max_context_len}; "
                f"evaluate in windows of at most {meta.max_context_len} tokens."
            )
        chunks = [
            self.program.forward_all(tokens[:, s : s + meta.max_seq_len], s) for s in range(0, n, meta.max_seq_len)
        ]
        return torch.cat(chunks, dim=1)[0]

    __call__ = forward

    # -- generation ----------------------------------------------------------------------

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config=None,
        streamer=None,
        logits_processor=None,
        stopping_criteria=None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """Generate continuations, as ``transformers``' ``generate()`` does.

        Args:
            input_ids: LongTensor ``[batch, seq]``; batches must be left-padded.
            attention_mask: ``[batch, seq]`` (inferred from ``pad_token_id`` when omitted).
            generation_config: a ``GenerationConfig``; the model's own is the default, as in
                transformers; ``kwargs`` override its fields.
            streamer: a ``TextStreamer`` / ``TextIteratorStreamer`` (batch of one).
            logits_processor: extra transformers ``LogitsProcessor``s.
            stopping_criteria: extra transformers ``StoppingCriteria``.
            **kwargs: ``GenerationConfig`` fields (``max_new_tokens``, ``do_sample``,
                ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
                ``eos_token_id``, ``stop_strings``, ``max_time``, ``return_dict_in_generate``,
                ``output_scores``, ``output_logits``...), ``tokenizer`` (for ``stop_strings``) and
                ``rng`` (a ``torch.Generator`` that sampling draws from instead of torch's global
                RNG: reproducible sampling while other threads sample too).
                Unknown or unsupported keywords raise ``ValueError``. Assisted generation, as in
                transformers: ``prompt_lookup_num_tokens=N`` (with ``max_matching_ngram_size``)
                drafts by n-gram lookup in the text so far; ``assistant_model=`` another
                ``ETModelForCausalLM`` with the same tokenizer drafts (``num_assistant_tokens``,
                ``num_assistant_tokens_schedule``). Each draft is verified in one program call;
                the output is what the call gives without assistance (greedy: the same tokens on
                float32 programs, where quantized ones may flip a near tie because a multi-row
                call rounds differently; sampling: the same distribution), and ``stats`` counts drafted and
                accepted tokens. One prompt at a time; at most ``verify_tokens - 1`` drafted
                tokens per step (see ``ExportConfig``).
                Images (``ETModelForImageTextToText`` only; a text model refuses them by name): the
                processor's ``pixel_values``, ``pixel_attention_mask``, ``image_sizes`` and
                ``token_type_ids``, with ``input_ids`` of one prompt holding the image tokens.
                Structured output: ``response_format=`` a JSON schema (dict or pydantic model
                class), or ``{"type": "json_schema" | "json_object" | "regex" | "choice" |
                "grammar", ...}`` (see :func:`et_transformers.constraints.grammar_for`): every
                token the format does not allow is masked before the other processors run, and
                generation ends (finish reason ``"grammar"``) when the format is complete. Needs
                the ``structured`` extra and a tokenizer.

        Returns:
            LongTensor ``[batch, seq + new]``: prompts followed by new tokens, padded with
            ``pad_token_id`` after a row stopped. With ``return_dict_in_generate=True``,
            transformers' ``GenerateDecoderOnlyOutput``: ``sequences`` (that tensor), and with
            ``output_scores=True`` / ``output_logits=True`` ``scores`` / ``logits``: one
            ``[batch, vocab]`` float32 tensor per step, the processed scores / raw logits, filled
            as transformers fills them (a row that stopped gets the steps it takes with
            ``pad_token_id`` fed back until the batch stops).

        Raises:
            ValueError: bad input (empty prompt, ids outside the vocabulary, prompt or requested
                length beyond the context, out-of-range sampling values, unknown keywords),
                raised before the program runs.
            TokenizerError: ``stop_strings`` or ``response_format`` with no tokenizer (passed or the model's).
            ConstraintError: an invalid ``response_format``, one that does not compile, or one
                whose text the vocabulary cannot spell; also raised while generating if a grammar
                reaches a state no token of the vocabulary can continue.
        """
        kwargs = self._image_inputs(kwargs, input_ids, attention_mask)
        tokenizer = kwargs.pop("tokenizer", None)
        if tokenizer is None and kwargs.get("stop_strings") is not None:
            self.require_tokenizer("stop_strings")  # raises, naming the model and the fix, when it has none
        out, stats = self._generator.generate(
            self.generation_config,
            input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            streamer=streamer,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            tokenizer=tokenizer,
            **kwargs,
        )
        self._keep_stats(stats)
        return out

    def _image_inputs(self, kwargs: dict, input_ids, attention_mask) -> dict:
        """``kwargs`` of a generate call without its image inputs, which the generation loop takes as
        ``image_features`` (see ``ETModelForImageTextToText``); a text model given images says so,
        rather than calling them unknown keywords."""
        given = [k for k in self._IMAGE_KEYWORDS if kwargs.get(k) is not None]
        if given:
            raise ValueError(
                f"{given[0]} was given, but {self.pte_path.parent.name} is a text-only model: it has no "
                f"vision encoder. Drop the image, or load an image-text-to-text model with "
                f"ETModelForImageTextToText."
            )
        for k in self._IMAGE_KEYWORDS:
            kwargs.pop(k, None)
        return kwargs

    def _keep_stats(self, stats: GenerationStats) -> None:
        """Make ``stats`` the model's, keeping the load figures."""
        stats.load_time, stats.export_time = self.stats.load_time, self.stats.export_time
        self.stats = stats

    def stream_generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config=None,
        logits_processor=None,
        stopping_criteria=None,
        *,
        logprobs: bool = True,
        top_logprobs: int = 0,
        **kwargs: Any,
    ) -> Iterator[GenerationResponse]:
        """Generate from one prompt, yielding a record per new token as it is produced.

        The tokens are exactly ``generate()``'s (the same loop runs; seeded sampling draws the
        same numbers). Pull-based: the program runs only while you iterate. From its first record
        until it ends, the stream holds the model (other threads' calls wait): an unfinished stream
        keeps holding it until it is closed (``close()``, or leaving a ``with
        contextlib.closing(...)`` block) or garbage collected. A paused stream may be resumed
        from any thread; the thread that paused it gets ``RuntimeError`` if it calls the model
        before finishing or closing the stream (the call would overwrite the stream's cache).

        Example::

            for r in model.stream_generate(ids, max_new_tokens=64, top_logprobs=3):
                print(r.text, end="", flush=True)
            print(r.finish_reason, model.stats.summary())

        Args:
            input_ids: one prompt, LongTensor ``[1, seq]`` (or ``[seq]``).
            attention_mask, generation_config, logits_processor, stopping_criteria, **kwargs: as
                :meth:`generate` takes them (``tokenizer=`` also decodes the text).
            logprobs: fill each record's ``logprob`` (log-softmax of the processed scores at the
                chosen token); ``False`` skips that per-token work.
            top_logprobs: also fill ``top_logprobs`` with this many ``(token id, logprob)`` pairs.

        Returns:
            An iterator of :class:`~et_transformers.streaming.GenerationResponse`; the last one
            carries ``finish_reason``. When it ends, :attr:`stats` describes the stream.

        Raises:
            ValueError: as :meth:`generate`, a batch of more than one prompt, or a bad
                ``top_logprobs``; raised by this call, before the first record.
        """
        kwargs = self._image_inputs(kwargs, input_ids, attention_mask)
        return stream(
            self._generator,
            self.generation_config,
            input_ids,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            on_finish=lambda stats, _: self._keep_stats(stats),
            attention_mask=attention_mask,
            generation_config=generation_config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            **kwargs,
        )

