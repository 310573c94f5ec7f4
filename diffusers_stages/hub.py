"""`save_pretrained(..., push_to_hub=True)` of the package's models and pipelines: the folder is written first, then
pushed, so that a push that fails (offline, no token, no right to the namespace) leaves a complete local folder and
an error that names the repository. diffusers itself creates the repository before it saves anything."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

PUSH_KWARGS = ("repo_id", "token", "private", "commit_message", "create_pr")
PACKAGE_TAG = "diffusers-stages"


def error_summary(error: BaseException) -> str:
    """``"<type>: <first line of the message>"``: enough to tell offline, HTTP 401/403 and network errors apart."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"


def is_missing_local_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a local folder that is not there, rather than a Hub repository id: it is no folder, and
    absolute, relative (``./``, ``../``, ``~``) or deeper than ``namespace/name``, which no repository id is. Loading
    it would otherwise ask the Hub and report an offline or connection error for a mistyped path."""
    path = os.fspath(path)
    return not os.path.isdir(path) and (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1)


def pop_push_kwargs(kwargs: dict, save_directory: str | os.PathLike | None = None, push_to_hub: bool = False) -> dict:
    """Take the push arguments of `save_pretrained` (``repo_id``, ``token``, ``private``, ``commit_message``,
    ``create_pr``) out of ``kwargs``, so that the save itself never sees them. With ``push_to_hub`` the repository id
    (default: the name of ``save_directory``, as in diffusers) is checked before anything is saved: a `ValueError`
    naming it, where the push would fail only after the save."""
    push = {key: kwargs.pop(key) for key in PUSH_KWARGS if key in kwargs}
    if push_to_hub:
        push["repo_id"] = check_repo_id(push.get("repo_id"), save_directory)
    return push


def check_repo_id(repo_id: str | None, save_directory: str | os.PathLike) -> str:
    """``repo_id``, or the name of ``save_directory`` when it is not given, if it is a valid Hub repository id
    (``name`` or ``namespace/name``); a `ValueError` naming it otherwise (``../x``, an absolute path, a space)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    given = repo_id is not None
    repo_id = repo_id if given else os.path.basename(os.path.normpath(str(save_directory)))
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        where = "" if given else f" (the name of `save_directory` {str(save_directory)!r}: pass `repo_id`)"
        raise ValueError(
            f"`repo_id` must be a Hub repository id ('name' or 'namespace/name' of letters, digits, '-', '_' and "
            f"'.'), got {repo_id!r}{where}; nothing was saved. {error_summary(error)}"
        ) from None
    return repo_id


def check_upload_folder(folder: str | os.PathLike, ignore_patterns: list[str] | None = None) -> None:
    """Refuse to push ``folder`` if a file it would upload (one not matched by ``ignore_patterns``) is a symbolic link
    to a file outside it: `HfApi.upload_folder` follows links, so the target (any file of the user's: a token, a key)
    would be published. A `ValueError` naming the link; nothing is uploaded. (Linked folders are not followed.)"""
    from huggingface_hub.utils import filter_repo_objects

    root = os.path.join(os.path.realpath(folder), "")
    links = {}
    for current, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(current, name)
            if os.path.islink(path) and not os.path.realpath(path).startswith(root):
                links[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.realpath(path)
    for relative in filter_repo_objects(sorted(links), ignore_patterns=ignore_patterns):
        raise ValueError(
            f"{relative!r} in {str(folder)!r} links to {links[relative]!r}, outside the folder: a push would publish "
            "that file. Remove the link (or copy the file in, if it belongs to the model) and push again."
        )


def package_model_card(repo_id: str, token: str | None = None, is_pipeline: bool = False) -> ModelCard:
    """The model card every push of the package's models and pipelines uploads (`push_saved_folder`,
    `PackageCardPushMixin.push_to_hub`): diffusers' (the Hub repository's README when it has one, else diffusers'
    template for a model, or a pipeline with ``is_pipeline``), with ``library_name: diffusers`` and the
    ``diffusers-stages`` tag, listed once however often the repository is pushed."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    card = load_or_create_model_card(repo_id, token=token, is_pipeline=is_pipeline)
    tags = [tag for tag in [PACKAGE_TAG] if tag not in (card.data.tags or [])]  # a re-push's card has it
    return populate_model_card(card, tags=tags)


class PackageCardPushMixin:
    """`push_to_hub` as diffusers' `PushToHubMixin.push_to_hub` (the repository created first, then the object saved
    to a temporary folder and uploaded, with no card for a ``subfolder``), but with the package's model card
    (`package_model_card`): the card `save_pretrained(..., push_to_hub=True)` uploads."""

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
    ) -> str:
        """Save to a temporary folder and upload it to ``repo_id``, as diffusers' `push_to_hub` (same arguments: the
        ``commit_message``, ``private`` for a new repository, ``token``, ``create_pr``, ``safe_serialization``,
        ``variant``, and ``subfolder``, where the files go without a model card); returns the upload's commit URL."""
        from diffusers import DiffusionPipeline
        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        card = None
        if not subfolder:
            card = package_model_card(repo_id, token, is_pipeline=isinstance(self, DiffusionPipeline))
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            if card is not None:
                card.save(os.path.join(folder, "README.md"))
            return self._upload_folder(
                folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr, subfolder=subfolder
            )


def push_saved_folder(
    saved,
    save_directory: str | os.PathLike,
    is_pipeline: bool,
    repo_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload the folder `saved.save_pretrained` has just written to ``repo_id`` (default: the folder's name), with
    the package's model card (`package_model_card`); returns the repository id. Any failure is an `OSError` that
    names the repository and says that the local folder is complete."""
    from huggingface_hub import create_repo

    save_directory = str(save_directory)
    check_upload_folder(save_directory)
    repo_id = repo_id or os.path.basename(os.path.normpath(save_directory))
    try:
        repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
        package_model_card(repo_id, token, is_pipeline).save(os.path.join(save_directory, "README.md"))
        saved._upload_folder(save_directory, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)
    except Exception as error:  # noqa: BLE001 (offline, HTTP 401/403, network errors: all named below)
        raise OSError(
            f"Saved the {type(saved).__name__} to {save_directory!r}, but pushing it to the Hub repository "
            f"{repo_id!r} failed ({error_summary(error)}). The local folder is complete: upload it later with "
            f"`hf upload {repo_id} {save_directory}` (after `hf auth login`)."
        ) from error
    return repo_id


class SaveThenPushMixin(PackageCardPushMixin):
    """`save_pretrained(..., push_to_hub=True)` that writes the whole folder before it contacts the Hub, and then
    pushes it with `push_saved_folder` (a failed push is an `OSError` naming the repository); `push_to_hub` uploads
    the same model card (`PackageCardPushMixin`).

    The signature names every argument `ModelMixin.save_pretrained` has: `DiffusionPipeline.save_pretrained` passes
    ``safe_serialization``, ``variant`` and ``max_shard_size`` on only to save methods whose signature lists them.
    """

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ) -> None:
        from .models.checks import check_savable  # here: the models import this module

        check_savable(self, f"the {type(self).__name__}")
        push = pop_push_kwargs(kwargs, save_directory, push_to_hub)
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            use_flashpack=use_flashpack,
            **kwargs,
        )
        if push_to_hub and is_main_process:
            push_saved_folder(self, save_directory, is_pipeline=False, **push)
