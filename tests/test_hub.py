"""`save_pretrained(..., push_to_hub=True)`: the folder is saved first, then pushed; a failed push names the repository."""

import os
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_stages import ExpertRoutingModel, MultiStagePipeline, MultiStageUNet2DModel
from diffusers_stages.training import LocalHubApi
from tests.conftest import TINY_UNET


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


def _sample(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_pipeline_push_saves_the_folder_then_names_the_repository(tiny_multistage, tmp_path, offline):
    pipe = MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler())
    folder = tmp_path / "pipe"
    with pytest.raises(OSError, match=r"Saved the MultiStagePipeline to .*pipe', but pushing it to the Hub repository "
                       r"'me/pipe' failed \(OfflineModeIsEnabled: .*hf upload me/pipe"):  # fmt: skip
        pipe.save_pretrained(folder, push_to_hub=True, repo_id="me/pipe", commit_message="first")
    # the local folder is complete: re-export files included, same images after a reload
    assert "pipeline_multistage.py" in os.listdir(folder)
    assert torch.equal(_sample(MultiStagePipeline.from_pretrained(folder)), _sample(pipe))


@pytest.mark.parametrize("kind", ["multistage", "experts"])
def test_offline_model_push_saves_the_folder_then_names_the_repository(tiny_multistage, tmp_path, offline, kind):
    model = tiny_multistage
    if kind == "experts":
        model = ExpertRoutingModel([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=[500])
    folder = tmp_path / "model"
    with pytest.raises(OSError, match=f"Saved the {type(model).__name__} .*'model' failed"):  # repo id: the folder
        model.save_pretrained(folder, push_to_hub=True)
    reloaded = type(model).from_pretrained(folder)
    x = torch.randn(1, 3, 8, 8, generator=torch.manual_seed(0))
    assert torch.equal(reloaded(x, 500).sample, model(x, 500).sample)


def test_push_uploads_the_complete_folder_with_a_card(tiny_multistage, tmp_path, offline, monkeypatch):
    hub = LocalHubApi(str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    uploads = []

    def upload(self, folder, repo_id, token=None, commit_message=None, create_pr=False):
        uploads.append((repo_id, commit_message))
        hub.upload_folder(repo_id=repo_id, folder_path=folder)

    monkeypatch.setattr(MultiStagePipeline, "_upload_folder", upload)
    pipe = MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe", push_to_hub=True, repo_id="me/pipe", commit_message="first")
    pushed = tmp_path / "hub" / "me" / "pipe"
    assert uploads == [("me/pipe", "first")]
    assert _files(pushed) == _files(tmp_path / "pipe") and "pipeline_multistage.py" in _files(pushed)
    assert "diffusers-stages" in (pushed / "README.md").read_text()
    assert torch.equal(_sample(MultiStagePipeline.from_pretrained(pushed)), _sample(pipe))


def test_push_keyword_arguments_never_reach_the_save(tmp_path):
    model = MultiStageUNet2DModel(**TINY_UNET, stage_boundaries=(500,))
    model.save_pretrained(tmp_path / "m", repo_id="me/m", token="unused", private=True)  # no push: nothing contacted
    assert "config.json" in os.listdir(tmp_path / "m")


def test_push_refuses_a_file_that_links_out_of_the_folder(tiny_multistage, tmp_path, offline, monkeypatch):
    # `HfApi.upload_folder` follows links: the file a link leads to (a token, a key) would be published
    hub = LocalHubApi(str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    upload = lambda self, folder, repo_id, **kwargs: hub.upload_folder(repo_id=repo_id, folder_path=folder)  # noqa: E731
    monkeypatch.setattr(MultiStageUNet2DModel, "_upload_folder", upload)
    (tmp_path / "secret").write_text("hf_token")
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(tmp_path / "secret", folder / "notes.txt")
    with pytest.raises(ValueError, match="'notes.txt'.*outside"):
        tiny_multistage.save_pretrained(folder, push_to_hub=True, repo_id="me/model")
    assert not (tmp_path / "hub" / "me" / "model" / "notes.txt").exists()
    os.remove(folder / "notes.txt")
    assert MultiStageUNet2DModel.from_pretrained(folder) is not None  # the saved folder is complete


@pytest.mark.parametrize("repo_id", ["../x", "/abs/x", "a b"])
@pytest.mark.parametrize("kind", ["model", "experts", "pipeline"])
def test_an_invalid_repository_id_is_refused_before_anything_is_saved(
    tiny_multistage, tmp_path, offline, repo_id, kind
):
    # was an `OSError` after the save, as if the push had failed, whose advice (`hf upload ../x ...`) fails the same way
    saved = {
        "model": tiny_multistage,
        "experts": ExpertRoutingModel([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=[500]),
        "pipeline": MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler()),
    }[kind]
    with pytest.raises(ValueError, match=f"`repo_id` must be a Hub repository id .*got {repo_id!r}"):
        saved.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=repo_id)
    assert not (tmp_path / "out").exists()
    with pytest.raises(
        ValueError, match="`repo_id` .*got 'my model'.*pass `repo_id`"
    ):  # the default: the folder's name
        saved.save_pretrained(tmp_path / "my model", push_to_hub=True)
    assert not (tmp_path / "my model").exists()


def test_a_second_push_lists_the_cards_tag_once(tiny_multistage, tmp_path, offline, monkeypatch):
    # the card is the Hub repository's README when it has one (as in diffusers), and the package's tag was appended to
    # its tags again: every push after the first wrote `- diffusers-stages` twice into the card's metadata
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    hub, load = LocalHubApi(str(tmp_path / "hub")), ModelCard.load
    card = tmp_path / "hub" / "me" / "model" / "README.md"

    def hub_card(repo_id, **kwargs):  # the Hub's README, once a push has written one
        if not card.exists():
            raise EntryNotFoundError("README.md")
        return load(card)

    monkeypatch.setattr(ModelCard, "load", hub_card)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    upload = lambda self, folder, repo_id, **kwargs: hub.upload_folder(repo_id=repo_id, folder_path=folder)  # noqa: E731
    monkeypatch.setattr(MultiStageUNet2DModel, "_upload_folder", upload)
    for _ in range(2):
        tiny_multistage.save_pretrained(tmp_path / "model", push_to_hub=True, repo_id="me/model")
    assert card.read_text().count("- diffusers-stages") == 1 and "library_name: diffusers" in card.read_text()


@pytest.mark.parametrize("kind", ["model", "experts", "pipeline"])
def test_push_to_hub_uploads_the_card_a_save_and_push_uploads(tiny_multistage, tmp_path, offline, monkeypatch, kind):
    # `push_to_hub` (diffusers' PushToHubMixin) uploaded diffusers' plain card, without the package's tag that
    # `save_pretrained(..., push_to_hub=True)` gives it; diffusers' semantics are kept (a temporary folder, `variant`,
    # `safe_serialization`, `subfolder`: no card; `private`, `token`, `create_pr`, `commit_message` passed on)
    import diffusers.utils.hub_utils

    from diffusers_stages.models.expert_routing import ExpertRoutingModel as Experts

    saved = {
        "model": tiny_multistage,
        "experts": Experts([UNet2DModel(**TINY_UNET), UNet2DModel(**TINY_UNET)], stage_boundaries=[500]),
        "pipeline": MultiStagePipeline(unet=tiny_multistage, scheduler=DDIMScheduler()),
    }[kind]
    creates, uploads = [], []

    def create_repo(repo_id, **kwargs):
        creates.append(kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def upload(self, folder, repo_id, token=None, commit_message=None, create_pr=False, subfolder=None):
        uploads.append((repo_id, token, commit_message, create_pr, subfolder, _files(folder), folder))
        target = tmp_path / "hub" / repo_id / (subfolder or "")
        for name in _files(folder):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes((open(os.path.join(folder, name), "rb")).read())

    for module in (huggingface_hub, diffusers.utils.hub_utils):
        monkeypatch.setattr(module, "create_repo", create_repo)
    monkeypatch.setattr(type(saved), "_upload_folder", upload)
    saved.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/saved")
    saved_card = huggingface_hub.ModelCard.load(tmp_path / "hub" / "me" / "saved" / "README.md")
    uploads.clear()
    saved.push_to_hub("me/pushed", commit_message="first", private=True, token="t", create_pr=True, variant="fp16")
    ((repo_id, token, message, create_pr, subfolder, files, folder),) = uploads
    assert (repo_id, token, message, create_pr, subfolder) == ("me/pushed", "t", "first", True, None)
    assert creates[-1]["private"] is True and creates[-1]["token"] == "t"
    assert not os.path.exists(folder)  # a temporary folder, as in diffusers
    assert any(name.endswith("diffusion_pytorch_model.fp16.safetensors") for name in files)
    card = huggingface_hub.ModelCard.load(tmp_path / "hub" / "me" / "pushed" / "README.md")
    assert card.data.tags == saved_card.data.tags == ["diffusers-stages"]
    assert card.data.library_name == saved_card.data.library_name == "diffusers"
    assert card.text == saved_card.text
    uploads.clear()
    saved.push_to_hub("me/pushed", subfolder="sub", safe_serialization=False)
    ((*_, subfolder, files, _),) = uploads
    assert subfolder == "sub" and "README.md" not in files and any(name.endswith(".bin") for name in files)
