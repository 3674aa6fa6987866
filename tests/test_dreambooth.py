"""DreamBooth: the identifier is a new token, the prior-preservation loss is the sum it claims, subjects, fine-tuning."""

import pytest
import torch

from course_lib import dreambooth as db
from course_lib import judges
from course_lib import lora

pytestmark = pytest.mark.usefixtures("one_thread")


def test_identifier_is_new_to_the_tokenizer(tiny_pipe):
    tok, clip = tiny_pipe.tokenizer, tiny_pipe.clip
    assert "▁sks" not in tok.ids and len(tok.tokens("sks")) > 1          # the base splits it into pieces
    new_tok, new_clip, token = db.add_identifier(tok, clip, "sks", seed=0)
    assert token == tok.vocab_size == new_tok.vocab_size - 1             # one new id, at the end
    assert new_tok.tokens("sks person: dark skin tone")[0] == "▁sks"
    assert new_tok.encode("sks person")[1] == token
    assert new_tok.decode(new_tok.encode("sks person: dark")) == "sks person: dark"
    # everything else tokenizes as before, and the originals are untouched
    assert new_tok.encode("red heart") == tok.encode("red heart")
    assert tok.vocab_size == clip.config.text.vocab_size == clip.text.token_embedding.num_embeddings
    assert new_clip.text.token_embedding.num_embeddings == new_tok.vocab_size
    assert torch.equal(new_clip.text.token_embedding.weight[:-1], clip.text.token_embedding.weight)
    # the text states of prompts without the identifier do not change
    ids, mask = tok(["red heart"])
    assert torch.allclose(new_clip.text_states(ids, mask), clip.text_states(ids, mask))
    # and the tokenizer round-trips through JSON with its added word
    again = type(tok).from_json(new_tok.to_json())
    assert again.encode("sks dog") == new_tok.encode("sks dog")


def test_identifier_errors(tiny_pipe):
    tok, _, _ = db.add_identifier(tiny_pipe.tokenizer, tiny_pipe.clip, "sks")
    with pytest.raises(ValueError, match="already one token"):
        tok.add_word("sks")
    with pytest.raises(ValueError, match="only"):
        tok.add_word("Sks!")


def test_prior_preservation_loss_is_the_sum_it_claims(tiny_pipe):
    pipe = tiny_pipe
    C, H, W = pipe.latent_shape
    g = torch.Generator().manual_seed(0)
    z, zp = torch.randn(3, C, H, W, generator=g), torch.randn(3, C, H, W, generator=g)
    c, m = pipe.encode(["red heart"] * 3)
    cp, mp = pipe.encode(["grinning face"] * 3)
    total, parts = db.dreambooth_loss(pipe.unet, pipe, (z, c, m), (zp, cp, mp), 0.7, torch.Generator().manual_seed(5))
    # recompute from the definition, not from the library: the same draws (t first, then noise) on the
    # concatenated batch, the forward process, and the squared error of the predicted noise per sample
    assert pipe.prediction == "epsilon"
    g = torch.Generator().manual_seed(5)
    z_all = torch.cat([z, zp])
    t = torch.randint(0, pipe.schedule.T, (6,), generator=g)
    noise = torch.randn(z_all.shape, generator=g)
    abar = pipe.schedule.alphas_cumprod[t].float().view(6, 1, 1, 1)
    with torch.no_grad():
        eps_hat = pipe.unet(abar.sqrt() * z_all + (1 - abar).sqrt() * noise, t, torch.cat([c, cp]), torch.cat([m, mp]))
    per = (eps_hat - noise).pow(2).flatten(1).mean(1)
    assert parts["subject"] == pytest.approx(per[:3].mean().item(), rel=1e-6)
    assert parts["prior"] == pytest.approx(per[3:].mean().item(), rel=1e-6)
    assert total.item() == pytest.approx(parts["subject"] + 0.7 * parts["prior"], rel=1e-6)
    assert parts["prior"] != pytest.approx(parts["subject"])
    # without a prior it is the plain denoising loss
    plain, parts0 = db.dreambooth_loss(pipe.unet, pipe, (z, c, m), None, 1.0, torch.Generator().manual_seed(5))
    assert parts0["prior"] == 0.0 and plain.item() == pytest.approx(parts0["subject"])


def test_subjects_are_held_out_emoji_in_six_tones():
    subjects = db.emoji_subjects("heldout", size=8)
    assert len(subjects) == 29
    s = db.get_subject("woman mage", size=8)
    assert s.images.shape == (6, 3, 8, 8) and s.class_noun == "person"
    assert s.prompt("dark") == "sks person: dark skin tone"
    assert s.prompt("", None) == "person"
    assert s.caption("light") == "woman mage: light skin tone"
    train = db.emoji_subjects("train", size=8)
    assert len(train) == 271 and not {x.name for x in train} & {x.name for x in subjects}
    with pytest.raises(ValueError, match="valid are"):
        db.get_subject("nobody")
    with pytest.raises(ValueError, match="unknown tone"):
        s.prompt("green")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dreambooth_trains_a_copy_and_learns_the_subject(tiny_pipe, method):
    pipe = tiny_pipe
    s = db.get_subject("woman mage", size=pipe.vae.config.image_size)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = db.DreamBoothConfig(method=method, steps=25, prior_images=4, prior_steps=2, batch_size=3,
                              lr=1e-3 if method == "full" else 1e-2)
    result = db.dreambooth(pipe, s.images[:3], [s.prompt(t) for t in db.TONES[:3]],
                           [s.prompt(t, None) for t in db.TONES[:3]], cfg)
    # the base pipeline is untouched
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())
    assert result.steps == 25 and len(result.losses) == 25
    assert sum(result.losses[-8:]) < sum(result.losses[:8])
    if method == "lora":
        assert result.trainable == lora.adapter_numbers(result.pipe.unet)
        assert result.trainable < 0.2 * sum(p.numel() for p in pipe.unet.parameters())
    else:
        assert result.trainable == sum(p.numel() for p in pipe.unet.parameters())
    images = result.pipe("sks person: dark skin tone", seed=0, steps=2)
    assert images.shape[0] == 1 and torch.isfinite(images).all()


def test_dreambooth_errors(tiny_pipe):
    s = db.get_subject("woman mage", size=tiny_pipe.vae.config.image_size)
    with pytest.raises(ValueError, match="identifier"):
        db.dreambooth(tiny_pipe, s.images[:1], ["person"], ["person"])
    with pytest.raises(ValueError, match="class_prompts"):
        db.dreambooth(tiny_pipe, s.images[:1], ["sks person"], None)
    with pytest.raises(ValueError, match="method"):
        db.DreamBoothConfig(method="half")


def test_tone_accuracy_is_the_tone_judges_agreement_with_the_asked_tones():
    s = db.get_subject("merman")
    judged = judges.predict("tone", s.images)
    assert judges.tone_accuracy(s.images, judged) == 1.0                     # asked = what the judge sees
    wrong = [db.TONES[(db.TONES.index(t) + 1) % 6] for t in judged]
    assert judges.tone_accuracy(s.images, wrong) == 0.0
    assert judges.tone_accuracy(s.images, db.TONES) >= 5 / 6                  # the real tones: the judge gets them
    with pytest.raises(ValueError, match="one asked tone per image"):
        judges.tone_accuracy(s.images, judged[:2])


def test_dreambooth_checkpoints_and_resumes_exactly(tiny_pipe, tmp_path):
    s = db.get_subject("woman mage", size=tiny_pipe.vae.config.image_size)
    args = (tiny_pipe, s.images[:2], [s.prompt(t) for t in db.TONES[:2]], [s.prompt(t, None) for t in db.TONES[:2]])
    cfg = db.DreamBoothConfig(method="lora", steps=5, prior_images=2, prior_steps=2, batch_size=2, lr=1e-2)
    whole = db.dreambooth(*args, cfg)
    path = tmp_path / "db.safetensors"

    def stop(run):
        if run.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        db.dreambooth(*args, cfg, checkpoint_path=path, checkpoint_every=2, callback=stop)
    resumed = db.dreambooth(*args, cfg, checkpoint_path=path, checkpoint_every=2)
    assert resumed.losses == whole.losses and resumed.history == whole.history and resumed.steps == 5
    for a, b in zip(lora.lora_parameters(resumed.pipe.unet), lora.lora_parameters(whole.pipe.unet)):
        assert torch.equal(a, b)
    assert not resumed.pipe.unet.training
    other = db.DreamBoothConfig(method="lora", steps=5, prior_images=2, prior_steps=2, batch_size=2, lr=1e-2,
                                prior_weight=0.5)
    with pytest.raises(ValueError, match="prior_weight: checkpoint 1.0, now 0.5"):
        db.dreambooth(*args, other, checkpoint_path=path)
