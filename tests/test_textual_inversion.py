"""Textual inversion: only the new token's embedding row trains; every other weight stays bit-identical."""

import pytest
import torch

from course_lib import dreambooth as db
from course_lib import textual_inversion as ti

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(pipe):
    return {f"{part}.{k}": v.detach().clone() for part in ("unet", "vae", "clip")
            for k, v in getattr(pipe, part).state_dict().items()}


def test_only_the_new_embedding_trains_and_the_loss_falls(tiny_pipe):
    s = db.get_subject("merman", size=tiny_pipe.vae.config.image_size)
    before = _state(tiny_pipe)
    prompts = [s.prompt(t) for t in db.TONES[:3]]
    res = ti.textual_inversion(tiny_pipe, s.images[:3], prompts, init_word="face", steps=40, lr=5e-2, batch_size=3)
    # the base pipeline is untouched, bit for bit, and holds no gradients
    assert all(torch.equal(v, _state(tiny_pipe)[k]) for k, v in before.items())
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())
    # the personalised pipeline shares the frozen U-Net and VAE; its text encoder differs only in the new row
    assert res.pipe.unet is tiny_pipe.unet and res.pipe.vae is tiny_pipe.vae
    after = res.pipe.clip.state_dict()
    for k, v in tiny_pipe.clip.state_dict().items():
        if k == "text.token_embedding.weight":
            assert torch.equal(after[k][:-1], v)                          # the old rows
            assert after[k].shape[0] == v.shape[0] + 1 and torch.equal(after[k][-1], res.embedding)
        else:
            assert torch.equal(after[k], v), k
    start = tiny_pipe.clip.text.token_embedding.weight[tiny_pipe.tokenizer.encode("face")[1]]
    assert not torch.equal(res.embedding, start)                          # the row moved from its start
    assert res.trainable == tiny_pipe.clip.config.text.width == res.embedding.numel()
    assert res.steps == 40 and sum(res.losses[-10:]) < sum(res.losses[:10])
    assert res.token == tiny_pipe.tokenizer.vocab_size
    images = res.pipe(prompts[0], seed=0, steps=2)
    assert images.shape == (1, 3, *s.images.shape[-2:]) and torch.isfinite(images).all()


def test_new_token_embedding_gives_gradient_to_the_new_row_only():
    table = torch.nn.Embedding(5, 3)
    emb = ti.NewTokenEmbedding(table)
    assert [n for n, _ in emb.named_parameters()] == ["new"] and emb.num_embeddings == 5
    out = emb(torch.tensor([[0, 4, 2]]))
    torch.testing.assert_close(out, table(torch.tensor([[0, 4, 2]])))
    out.sum().backward()
    assert emb.new.grad is not None and emb.frozen.grad is None
    assert torch.equal(emb.to_embedding().weight, table.weight.detach())


def test_textual_inversion_refuses_bad_input(tiny_pipe):
    s = db.get_subject("merman", size=tiny_pipe.vae.config.image_size)
    with pytest.raises(ValueError, match="every prompt must contain the word 'sks'"):
        ti.textual_inversion(tiny_pipe, s.images[:1], ["person"], steps=1)
    with pytest.raises(ValueError, match="one prompt per image"):
        ti.textual_inversion(tiny_pipe, s.images[:2], ["sks person"], steps=1)


def test_an_init_word_the_tokenizer_splits_is_refused_naming_its_pieces(tiny_pipe):
    s = db.get_subject("merman", size=tiny_pipe.vae.config.image_size)
    for word in ("person", "x", "\u2603"):          # split in pieces, a bare letter, an unknown character
        with pytest.raises(ValueError, match=r"init_word .* pieces \[.*not one word the tokenizer knows whole"):
            ti.textual_inversion(tiny_pipe, s.images[:1], [s.prompt("")], init_word=word, steps=1)


def test_textual_inversion_checkpoints_and_resumes_exactly(tiny_pipe, tmp_path):
    s = db.get_subject("merman", size=tiny_pipe.vae.config.image_size)
    prompts = [s.prompt(t) for t in db.TONES[:2]]
    kw = dict(init_word="face", lr=5e-2, batch_size=2)
    whole = ti.textual_inversion(tiny_pipe, s.images[:2], prompts, steps=6, **kw)
    path = tmp_path / "ti.safetensors"
    ti.textual_inversion(tiny_pipe, s.images[:2], prompts, steps=3, checkpoint_path=path, checkpoint_every=1, **kw)
    resumed = ti.textual_inversion(tiny_pipe, s.images[:2], prompts, steps=6, checkpoint_path=path, **kw)
    assert resumed.steps == 6 and resumed.losses == whole.losses
    assert torch.equal(resumed.embedding, whole.embedding)
