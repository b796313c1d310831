"""Where a model's files are: Hub id + revision, local folder or GGUF file → a local :class:`ModelSource`.

This is the only module that imports ``huggingface_hub``. :func:`resolve` turns what the user
typed into a local folder holding just the files we need (config, tokenizer, generation config and
safetensors weights for a plain Transformers repo; ``model.pte`` and its manifest for a repo of
ours) plus the identity that keys the artifact cache (repo id + resolved commit, or the local
files). ``revision``, ``token``, ``cache_dir``, ``force_download``, ``local_files_only`` and
``HF_HUB_OFFLINE`` mean what they mean in transformers. Tokens are passed to ``huggingface_hub``
and never logged or put in messages.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import HubError, ModelNotFoundError
from .manifest import MANIFEST_NAME, PTE_NAME

logger = logging.getLogger(__name__)

#: Files a Transformers checkpoint needs besides its weights.
METADATA_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: Weights we download: safetensors only, never pickles.
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json")
#: Files of a pre-exported et_transformers model.
PROGRAM_PATTERNS: tuple[str, ...] = (PTE_NAME, MANIFEST_NAME, "README.md")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to local files.

    Attributes:
        path: local folder holding the files.
        gguf_file: name of the GGUF file inside ``path`` when the weights come from one.
        repo_id: Hub repository id when the files came from the Hub.
        revision: the resolved commit sha of ``repo_id``.
        subfolder: folder inside the repository the model lives in, if any.
    """

    path: Path
    gguf_file: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None

    @property
    def is_program(self) -> bool:
        """True when the folder holds a pre-exported model (``model.pte`` + ``manifest.json``)."""
        return (self.path / PTE_NAME).is_file() and (self.path / MANIFEST_NAME).is_file()

    @property
    def name(self) -> str:
        """A short human-readable name (repo id, GGUF file name or folder name)."""
        if self.repo_id:
            return self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
        if self.gguf_file:
            return Path(self.gguf_file).stem
        return self.path.name

    def model_files(self) -> list[Path]:
        """The local files that define the model's weights, config and tokenizer (sorted)."""
        if self.gguf_file:
            names = [self.path / self.gguf_file]
            names += [self.path / n for n in METADATA_PATTERNS if (self.path / n).is_file()]
            return sorted(set(names))
        files = [p for pat in (*METADATA_PATTERNS, *WEIGHT_PATTERNS) for p in self.path.glob(pat)]
        return sorted(p for p in set(files) if p.is_file())

    def describe(self) -> dict:
        """The source as recorded in a manifest (no hashes: see ``cache.source_identity``)."""
        if self.repo_id:
            return {"repo_id": self.repo_id, "revision": self.revision, "subfolder": self.subfolder}
        return {"path": str(self.path), "gguf_file": self.gguf_file}


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(".gguf")
        or os.sep in name.strip(os.sep).replace("/", os.sep, 1)
        or name.count("/") != 1
    )


def _resolve_local(path: Path, gguf_file: str | None, subfolder: str | None) -> ModelSource:
    if subfolder:
        path = path / subfolder
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(
                f"{path} is a file but not a GGUF file; pass a model folder, a .gguf file or a Hub id."
            )
        return ModelSource(path=path.parent.resolve(), gguf_file=path.name)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} does not exist; pass a model folder, a .gguf file or a Hub id.")
    path = path.resolve()
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ModelNotFoundError(f"gguf_file={gguf_file!r} is not in {path}.")
        return ModelSource(path=path, gguf_file=gguf_file)
    source = ModelSource(path=path)
    if not source.is_program and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds GGUF files {ggufs}: pass gguf_file=." if ggufs else ""
        raise ModelNotFoundError(
            f"{path} holds neither a Transformers model (config.json) nor an exported model "
            f"({PTE_NAME} + {MANIFEST_NAME}).{hint}"
        )
    return source


def offline_mode(local_files_only: bool = False) -> bool:
    """True when downloads are forbidden (``local_files_only`` or ``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return local_files_only or bool(constants.HF_HUB_OFFLINE)


def resolve(
    model_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    gguf_file: str | None = None,
    subfolder: str | None = None,
) -> ModelSource:
    """Resolve a Hub id, local folder or GGUF file to local files.

    Args:
        model_id_or_path: ``"org/name"`` on the Hub, a local folder, or a ``.gguf`` file.
        revision: branch, tag or commit on the Hub (ignored for local paths).
        token: Hub token; passed to ``huggingface_hub`` only.
        cache_dir: Hub download cache (defaults to huggingface_hub's).
        local_files_only: never touch the network (also set by ``HF_HUB_OFFLINE=1``).
        force_download: download again even when cached.
        gguf_file: GGUF file name inside the folder or repository.
        subfolder: folder inside the repository or local folder that holds the model.

    Returns:
        The resolved :class:`ModelSource`.

    Raises:
        ModelNotFoundError: the path or repository does not exist, or holds no model, or it is not
            cached while offline.
        HubError: the Hub could not be reached or refused the request.
    """
    name = os.fspath(model_id_or_path)
    local = Path(name).expanduser()
    if local.exists():
        return _resolve_local(local, gguf_file, subfolder)
    if _looks_like_path(name):
        raise ModelNotFoundError(
            f"{name} does not exist; pass an existing model folder, a .gguf file, or a Hub id "
            f"like 'org/name'."
        )
    return _download(
        name,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=offline_mode(local_files_only),
        force_download=force_download,
        gguf_file=gguf_file,
        subfolder=subfolder,
    )


def _patterns(prefix: str, patterns: tuple[str, ...]) -> list[str]:
    return [prefix + p for p in patterns]


def _download(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    force_download: bool,
    gguf_file: str | None,
    subfolder: str | None,
) -> ModelSource:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    kwargs = dict(
        repo_id=repo_id,
        cache_dir=cache_dir,
        token=token,
        force_download=force_download,
        local_files_only=local_files_only,
    )
    try:
        if local_files_only:
            # Offline: take whatever the cache holds for this revision; a program repo wins.
            folder = Path(
                snapshot_download(
                    revision=revision,
                    allow_patterns=_patterns(prefix, (*PROGRAM_PATTERNS, *METADATA_PATTERNS, *WEIGHT_PATTERNS))
                    + ([prefix + gguf_file] if gguf_file else []),
                    **kwargs,
                )
            )
            commit = folder.name
        else:
            info = HfApi().model_info(repo_id, revision=revision, token=token)
            commit = info.sha
            files = {s.rfilename for s in info.siblings or ()}
            if {prefix + PTE_NAME, prefix + MANIFEST_NAME} <= files:
                wanted = (*PROGRAM_PATTERNS, *METADATA_PATTERNS)
            elif gguf_file:
                if prefix + gguf_file not in files:
                    raise ModelNotFoundError(f"gguf_file={gguf_file!r} is not in {repo_id}@{commit[:12]}.")
                wanted = (gguf_file, *METADATA_PATTERNS)
            else:
                if not any(f.startswith(prefix) and f.endswith(".safetensors") for f in files):
                    raise ModelNotFoundError(
                        f"{repo_id}@{commit[:12]} has no safetensors weights{' in ' + prefix if prefix else ''};"
                        f" et_transformers never loads pickled (.bin) weights. Convert the checkpoint "
                        f"to safetensors, or pass a GGUF file with gguf_file=."
                    )
                wanted = (*METADATA_PATTERNS, *WEIGHT_PATTERNS)
            folder = Path(snapshot_download(revision=commit, allow_patterns=_patterns(prefix, wanted), **kwargs))
    except hf_errors.RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a Hub repository you can access (check the id and your token)."
        ) from e
    except hf_errors.RevisionNotFoundError as e:
        raise ModelNotFoundError(f"revision={revision!r} does not exist in {repo_id!r}.") from e
    except hf_errors.LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} (revision {revision or 'main'}) is not in the local cache and downloads are "
            f"disabled (local_files_only=True or HF_HUB_OFFLINE=1). Run once online, or pass a local path."
        ) from e
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"the Hub refused a request for {repo_id!r}: {_redact(str(e), token)}") from e
    except OSError as e:
        raise HubError(f"could not download {repo_id!r}: {_redact(str(e), token)}") from e
    source = ModelSource(
        path=folder / prefix if prefix else folder,
        gguf_file=gguf_file,
        repo_id=repo_id,
        revision=commit,
        subfolder=subfolder,
    )
    if not source.path.is_dir() or not (source.is_program or (source.path / "config.json").is_file() or gguf_file):
        raise ModelNotFoundError(
            f"{repo_id!r} (revision {commit}) holds no model we can load"
            + (f" in subfolder {subfolder!r}" if subfolder else "")
            + (" in the local cache" if local_files_only else "")
            + "."
        )
    logger.info("Resolved %s to %s", source.name, source.path)
    return source


def _redact(text: str, token: str | bool | None) -> str:
    if isinstance(token, str) and token:
        text = text.replace(token, "***")
    return text
