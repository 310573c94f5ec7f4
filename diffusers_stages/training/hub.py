"""Model card and Hub upload of a training run's output folder (checkpoints, logs and sample history left out)."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub.utils import filter_repo_objects

UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "logs/*", "samples/*", "*.pkl", "*.bin"]
MODEL_CARD_TODO_START = "## Intended uses & limitations"


class LocalHubApi:
    """The two `huggingface_hub.HfApi` calls a push makes, writing to ``root/<repo_id>`` instead of the Hub.

    Files are chosen by the same `filter_repo_objects` selection `HfApi.upload_folder` uses, so a push tested
    offline uploads exactly what a real one would.
    """

    def __init__(self, root: str):
        self.root = root

    def create_repo(self, repo_id: str, exist_ok: bool = False, private: bool | None = None, token=None, **kwargs):
        path = os.path.join(self.root, repo_id)
        if os.path.isdir(path) and not exist_ok:
            raise ValueError(f"Repository {repo_id!r} already exists under {self.root!r}.")
        os.makedirs(path, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id, url=path)

    def upload_folder(self, repo_id: str, folder_path: str, ignore_patterns=None, allow_patterns=None, **kwargs):
        files = []
        for root, _, names in os.walk(folder_path):
            files += [os.path.relpath(os.path.join(root, n), folder_path).replace(os.sep, "/") for n in names]
        for relative in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            target = os.path.join(self.root, repo_id, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(folder_path, relative), target)
        return os.path.join(self.root, repo_id)


def write_model_card(
    output_dir: str, repo_id: str, description: str, tags: list[str], token: str | None = None
) -> str:
    """Write ``output_dir/README.md`` from diffusers' training model card template and ``description``."""
    card = load_or_create_model_card(repo_id, token=token, from_training=True, model_description=description)
    card = populate_model_card(card, tags=["diffusers", "diffusers-stages", "unconditional-image-generation", *tags])
    # the template's placeholder sections ("TODO: ...") are answered by the description above
    if MODEL_CARD_TODO_START in card.text:
        card.text = card.text.split(MODEL_CARD_TODO_START)[0].rstrip() + "\n"
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


def push_output_folder(
    output_dir: str,
    repo_id: str,
    description: str,
    tags: list[str],
    api=None,
    token: str | None = None,
    private: bool = False,
) -> str:
    """Create the repository, write the model card and upload ``output_dir`` without checkpoints and logs."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    write_model_card(output_dir, repo_id, description, tags, token=token)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="End of training",
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        token=token,
    )
