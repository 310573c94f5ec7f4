import pytest
import torch

from diffusers_stages import ClassContextEmbedding


def test_labels_become_one_token_contexts_and_reload_identically(tmp_path):
    torch.manual_seed(0)
    embed = ClassContextEmbedding(num_class_embeds=5, cross_attention_dim=8)
    labels = torch.tensor([4, 0, 2])
    context = embed(labels)
    assert context.shape == (3, 1, 8) and torch.equal(context[:, 0], embed.embedding.weight[labels])
    assert embed.num_classes == 4  # the last embedding is the unconditional label
    embed.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert torch.equal(ClassContextEmbedding.from_pretrained(tmp_path)(labels), context)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_class_embeds": 1, "cross_attention_dim": 8}, "num_class_embeds"),
        ({"num_class_embeds": 5, "cross_attention_dim": 0}, "cross_attention_dim"),
        ({"num_class_embeds": 5.0, "cross_attention_dim": 8}, "num_class_embeds"),
    ],
)
def test_bad_sizes_and_labels_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ClassContextEmbedding(**kwargs)
    embed = ClassContextEmbedding(num_class_embeds=5, cross_attention_dim=8)
    with pytest.raises(ValueError, match="`class_labels`"):
        embed(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="`class_labels`"):
        embed(torch.tensor([1.0]))


@pytest.mark.parametrize("corruption", ["missing", "unexpected", "integers"])
def test_a_checkpoint_that_disagrees_with_its_config_is_refused_not_left_random(tmp_path, corruption):
    from safetensors.torch import save_file

    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    ClassContextEmbedding(num_class_embeds=5, cross_attention_dim=8).save_pretrained(tmp_path)
    state = {
        "missing": {},
        "unexpected": {"embedding.weight": torch.zeros(5, 8), "extra.weight": torch.zeros(1)},
        "integers": {"embedding.weight": torch.ones(5, 8, dtype=torch.int32)},
    }[corruption]
    save_file(state, weights)
    match = "I32" if corruption == "integers" else "does not match its config"
    with pytest.raises(ValueError, match=match):  # diffusers leaves a missing embedding on the `meta` device
        ClassContextEmbedding.from_pretrained(tmp_path)


def test_a_label_out_of_range_is_named(host_reads):
    # was torch's IndexError "index out of range in self" (a device-side assert on an accelerator)
    embed = ClassContextEmbedding(num_class_embeds=5, cross_attention_dim=8)
    for bad in ([0, 5], [-1, 2]):
        with pytest.raises(ValueError, match=rf"`class_labels` must be class indices in \[0, 5\), got \{bad}"):
            embed(torch.tensor(bad))
    # the pipelines, which check the labels once per run, read no tensor value on each step's call
    assert host_reads(lambda: embed(torch.tensor([4, 0]), check_values=False)) == 0


def test_labels_that_are_not_a_tensor_are_named():
    # was an AttributeError ('list' object has no attribute 'ndim')
    embed = ClassContextEmbedding(num_class_embeds=5, cross_attention_dim=8)
    for bad in ([1, 2], 3):
        with pytest.raises(
            ValueError, match=rf"`class_labels` must be a 1-D integer tensor, got {type(bad).__name__}"
        ):
            embed(bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.bool])
def test_labels_of_a_dtype_the_table_cannot_index_are_named(dtype):
    # was torch's RuntimeError "Expected tensor for argument #1 'indices' to have one of ... Long, Int"
    embed = ClassContextEmbedding(num_class_embeds=5, cross_attention_dim=8)
    with pytest.raises(ValueError, match=rf"`class_labels` must be a 1-D int64 \(or int32\) tensor.*{dtype}"):
        embed(torch.tensor([1, 0]).to(dtype))
    assert embed(torch.tensor([1, 0], dtype=torch.int32)).shape == (2, 1, 8)
