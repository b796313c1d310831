"""The Hugging Face Hub, both ways: model id + revision → local files, and a model folder → a commit.

This is the only module that imports ``huggingface_hub``. :func:`resolve` turns what the user
typed (Hub id, local folder or GGUF file) into a :class:`ModelSource`: a local folder holding just
the files we need (config, tokenizer, generation config and safetensors weights for a plain
Transformers repo; ``model.pte``, its manifest and those files for a repo of ours) plus the identity
that keys the artifact cache (repo id + resolved commit, or the local files). ``revision``,
``token``, ``cache_dir``, ``force_download``, ``local_files_only`` and ``HF_HUB_OFFLINE`` mean what
they mean in transformers, and offline resolution picks files exactly as online resolution would.
:func:`upload_folder` pushes a folder written by ``save_pretrained`` as one commit. Tokens are
passed to ``huggingface_hub`` only: never logged, and removed from every message we raise.
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
    "preprocessor_config.json",  # image-text-to-text models' processors
    "processor_config.json",
    "video_preprocessor_config.json",
)
#: Weights we download: safetensors only, never pickles.
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json")
#: Pickled weights, downloaded and loaded only with ``use_safetensors=False`` (they can run code).
PICKLE_WEIGHT_PATTERNS: tuple[str, ...] = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
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
        use_safetensors: False when the caller allowed pickled ``.bin`` weights.
    """

    path: Path
    gguf_file: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    use_safetensors: bool = True

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
        weights = WEIGHT_PATTERNS if self.use_safetensors else (*WEIGHT_PATTERNS, *PICKLE_WEIGHT_PATTERNS)
        files = [p for pat in (*METADATA_PATTERNS, *weights) for p in self.path.glob(pat)]
        return sorted(p for p in set(files) if p.is_file())

    def describe(self) -> dict:
        """The source as recorded in a manifest (no hashes: see ``cache.source_identity``)."""
        if self.repo_id:
            return {"repo_id": self.repo_id, "revision": self.revision, "subfolder": self.subfolder}
        return {"path": str(self.path), "gguf_file": self.gguf_file}


def _looks_like_path(name: str) -> bool:
    """True when ``name`` cannot be a Hub id (``"org/name"``, or a legacy ``"name"``)."""
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(".gguf")
        or "\\" in name
        or name.count("/") > 1
    )


def _resolve_local(path: Path, gguf_file: str | None, subfolder: str | None, use_safetensors: bool) -> ModelSource:
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
    source = ModelSource(path=path, use_safetensors=use_safetensors)
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
    use_safetensors: bool = True,
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
        use_safetensors: ``False`` allows pickled ``pytorch_model*.bin`` weights when a repository
            has no safetensors (pickles can run code: trusted repositories only).

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
        return _resolve_local(local, gguf_file, subfolder, use_safetensors)
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
        use_safetensors=use_safetensors,
    )


def _patterns(prefix: str, patterns: tuple[str, ...]) -> list[str]:
    return [prefix + p for p in patterns]


def _select_files(
    files: set[str], *, where: str, prefix: str, gguf_file: str | None, use_safetensors: bool
) -> tuple[str, ...]:
    """The patterns (relative to ``prefix``) to download from a repository holding ``files``.

    One rule for online and offline resolution: a repo of ours (``model.pte`` + manifest) gets the
    program and its tokenizer/config files; a GGUF file its metadata; a Transformers checkpoint its
    metadata and safetensors weights (pickles only when ``use_safetensors=False`` and there are no
    safetensors).
    """
    if {prefix + PTE_NAME, prefix + MANIFEST_NAME} <= files:
        return (*PROGRAM_PATTERNS, *METADATA_PATTERNS)
    if gguf_file:
        if prefix + gguf_file not in files:
            raise ModelNotFoundError(f"gguf_file={gguf_file!r} is not in {where}.")
        return (gguf_file, *METADATA_PATTERNS)
    inside = [f[len(prefix):] for f in files if f.startswith(prefix)]
    if any(f.endswith(".safetensors") for f in inside):
        return (*METADATA_PATTERNS, *WEIGHT_PATTERNS)
    has_pickles = any(f.startswith("pytorch_model") and f.endswith(".bin") for f in inside)
    if has_pickles and not use_safetensors:
        return (*METADATA_PATTERNS, *PICKLE_WEIGHT_PATTERNS)
    hint = (
        " It has pickled pytorch_model*.bin weights, which can run code when loaded: convert them to "
        "safetensors, or pass use_safetensors=False if you trust the repository."
        if has_pickles
        else " Pass a GGUF file with gguf_file= if the repository holds one."
    )
    raise ModelNotFoundError(
        f"{where} has no safetensors weights{' in ' + prefix if prefix else ''}; et_transformers loads "
        f"pickled weights only when asked.{hint}"
    )


def _cached_files(repo_id: str, revision: str | None, cache_dir) -> set[str] | None:
    """The file list of ``repo_id`` at ``revision`` as cached by an earlier download (no network)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return {f.path for f in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)}
    except CachedRepoTreeNotFoundError:
        return None


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
    use_safetensors: bool,
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
    select = dict(prefix=prefix, gguf_file=gguf_file, use_safetensors=use_safetensors)
    try:
        if local_files_only:
            # Offline: choose from the file list cached by the online download, so the same files
            # are asked for (asking for more, e.g. a README we never fetched, would fail).
            files = _cached_files(repo_id, revision, cache_dir)
            if files is None:  # no cached listing: take whatever the snapshot holds
                wanted = (*PROGRAM_PATTERNS, *METADATA_PATTERNS, *WEIGHT_PATTERNS, *PICKLE_WEIGHT_PATTERNS)
                wanted += (gguf_file,) if gguf_file else ()
            else:
                wanted = _select_files(files, where=f"{repo_id!r} (cached)", **select)
            folder = Path(snapshot_download(revision=revision, allow_patterns=_patterns(prefix, wanted), **kwargs))
            commit = folder.name
        else:
            info = HfApi().model_info(repo_id, revision=revision, token=token)
            commit = info.sha
            files = {s.rfilename for s in info.siblings or ()}
            wanted = _select_files(files, where=f"{repo_id}@{commit[:12]}", **select)
            folder = Path(snapshot_download(revision=commit, allow_patterns=_patterns(prefix, wanted), **kwargs))
            _remember_ref(folder, revision or "main", commit)
    except ModelNotFoundError:
        raise  # ours, already clear (and an OSError, which the last clause would rewrap)
    except hf_errors.RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a Hub repository you can access (check the id and your token)."
        ) from _cause(e, token)
    except hf_errors.RevisionNotFoundError as e:
        raise ModelNotFoundError(f"revision={revision!r} does not exist in {repo_id!r}.") from _cause(e, token)
    except hf_errors.LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} (revision {revision or 'main'}) is not in the local cache and downloads are "
            f"disabled (local_files_only=True or HF_HUB_OFFLINE=1). Run once online, or pass a local path."
        ) from _cause(e, token)
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"the Hub refused a request for {repo_id!r}: {_redact(str(e), token)}") from _cause(e, token)
    except OSError as e:
        raise HubError(f"could not download {repo_id!r}: {_redact(str(e), token)}") from _cause(e, token)
    source = ModelSource(
        path=folder / prefix if prefix else folder,
        gguf_file=gguf_file,
        repo_id=repo_id,
        revision=commit,
        subfolder=subfolder,
        use_safetensors=use_safetensors,
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


def _remember_ref(snapshot: Path, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` in the download cache, as huggingface_hub does for the
    revisions it resolves itself, so the same ``revision`` also resolves offline."""
    refs = snapshot.parent.parent / "refs" / revision
    if revision == commit:
        return
    try:
        if not refs.is_file() or refs.read_text() != commit:
            refs.parent.mkdir(parents=True, exist_ok=True)
            tmp = refs.with_name(f".{refs.name}.{os.getpid()}.tmp")
            tmp.write_text(commit)
            os.replace(tmp, refs)
    except OSError as e:
        logger.warning("Could not record revision %s of %s in the download cache: %s", revision, snapshot, e)


# -- upload ----------------------------------------------------------------------------------


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str,
    create_pr: bool = False,
):
    """Upload every file in ``folder`` to the model repository ``repo_id`` in one commit.

    The repository is created if needed (``private`` applies only then), and so is the branch
    ``revision``. Nothing local is changed: on failure the folder, and the cache it was written
    from, are as they were.

    Args:
        folder: a folder written by ``ETModelForCausalLM.save_pretrained``.
        repo_id: ``"org/name"``.
        token: Hub token with write access (default: the logged-in token / ``HF_TOKEN``).
        private: create the repository private (``None``: the Hub's default).
        revision: branch to commit to (created from the default branch if missing);
            with ``create_pr``, the branch the pull request targets.
        commit_message: the commit's summary.
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        huggingface_hub's ``CommitInfo``: a ``str`` (the commit URL) with ``.oid`` (commit sha)
        and ``.pr_url``.

    Raises:
        HubError: the Hub refused or failed a request; the message names the step and the fix.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import errors as hf_errors

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    api = HfApi()
    step = "create the repository"
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        if revision and not create_pr:
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        step = "commit the files"
        # One create_commit (not upload_folder, which may split a folder into several commits).
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        fix = (
            "Check that the token has write access to this namespace (hf auth login, or pass token=)"
            if status in (401, 403)
            else "Retry, or check the repository id and revision"
        )
        raise HubError(
            f"uploading to {repo_id!r} failed while trying to {step}{f' (HTTP {status})' if status else ''}; "
            f"nothing was committed, and the local files and the et_transformers cache are unchanged. "
            f"{fix}. The Hub said: {_redact(str(e), token)}"
        ) from _cause(e, token)
    logger.info("Uploaded %d files to %s in commit %s", len(files), repo_id, info.oid)
    return info


def _redact(text: str, token: str | bool | None) -> str:
    """``text`` with the token (given, or the one huggingface_hub would send) replaced by ``***``."""
    for secret in {token if isinstance(token, str) else None, _default_token()}:
        if secret:
            text = text.replace(secret, "***")
    return text


def _cause(error: BaseException, token: str | bool | None) -> BaseException | None:
    """The exception to chain under ours: ``error``, unless its text holds the token (a server that
    echoes request headers), since a printed traceback shows the cause too."""
    text = str(error)
    return error if _redact(text, token) == text else None


def _default_token() -> str | None:
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # noqa: BLE001  (only used to scrub messages; never fail because of it)
        return None
