"""HyperDreamBooth: LiDB's count and bases, per-sample weights, the hypernetwork's shapes, rank relaxation, files."""

import copy

import pytest
import torch
from torch import nn

from course_lib import dreambooth as db
from course_lib import judges
from course_lib import hyperdreambooth as hd
from course_lib import lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def personal(tiny_pipe):
    return hd.personal_pipeline(tiny_pipe)


def _inputs(pipe, B=2):
    C, H, W = pipe.latent_shape
    g = torch.Generator().manual_seed(1)
    c, m = pipe.encode(["sks person"] * B)
    return torch.randn(B, C, H, W, generator=g), torch.tensor([10, 700][:B] + [5] * max(0, B - 2)), c, m


def test_parameter_count_formula(personal):
    unet = copy.deepcopy(personal.unet)
    cfg = hd.LiDBConfig()                                      # rank 1, a = 100, b = 50 as in the paper
    n_layers = len(lora.matching_layers(unet))
    counts = hd.lidb_numbers(unet, cfg)
    assert counts["lidb"] == n_layers * 1 * (100 + 50) == n_layers * cfg.numbers_per_layer
    lidb = hd.LiDB(unet, cfg)
    assert lidb.numbers == counts["lidb"] and lidb.shape == (n_layers, 150)
    assert hd.LiDBConfig(rank=2, a=10, b=5).numbers_per_layer == 2 * (10 + 5)
    assert counts["lora_rank1"] == sum(lora.lora_numbers_formula(personal.unet.get_submodule(n), 1)
                                       for n in lora.matching_layers(personal.unet))
    assert counts["full"] == sum(p.numel() for p in personal.unet.parameters())


@pytest.mark.parametrize("rows,cols", [(100, 32), (32, 50), (64, 64)])
def test_random_bases_are_orthogonal(rows, cols):
    q = hd.semi_orthogonal(rows, cols, torch.Generator().manual_seed(0))
    assert q.shape == (rows, cols)
    gram = q.T @ q if rows >= cols else q @ q.T
    torch.testing.assert_close(gram, torch.eye(min(rows, cols)), rtol=0, atol=1e-5)


def test_bases_are_frozen_buffers_and_only_weights_get_gradients(personal):
    unet = copy.deepcopy(personal.unet)
    lidb = hd.LiDB(unet)
    assert not any(p.requires_grad for p in unet.parameters())
    layer = next(iter(lidb.layers.values()))
    names = dict(layer.named_buffers())
    assert "A_aux" in names and "B_aux" in names and not any("aux" in n for n, _ in unet.named_parameters())
    w = nn.Parameter(lidb.init_weights(2) + 0.01 * torch.randn(2, *lidb.shape))
    lidb.set(w)
    x, t, c, m = _inputs(personal)
    unet(x, t, c, m).pow(2).mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


def test_zero_update_is_the_base_and_each_sample_uses_its_own_weights(personal):
    unet = copy.deepcopy(personal.unet)
    x, t, c, m = _inputs(personal)
    base = unet(x, t, c, m)
    lidb = hd.LiDB(unet)
    lidb.set(lidb.init_weights(1))                       # B_train = 0: exactly the base model
    assert torch.equal(unet(x, t, c, m), base)
    g = torch.Generator().manual_seed(0)
    w = lidb.init_weights(2)
    w[:, :, 100:] = 0.5 * torch.randn(2, lidb.shape[0], 50, generator=g)
    lidb.set(w)
    both = unet(x, t, c, m)
    for k in range(2):                                   # a batch of two = two separate runs
        lidb.set(w[k:k + 1])
        torch.testing.assert_close(both[k:k + 1], unet(x[k:k + 1], t[k:k + 1], c[k:k + 1], m[k:k + 1]),
                                   rtol=1e-5, atol=1e-5)
    assert (both - base).abs().max() > 1e-4
    lidb.set(w[:1])                                      # one row is shared by the batch
    shared = unet(x, t, c, m)
    lidb.set(w[[0, 0]])
    torch.testing.assert_close(shared, unet(x, t, c, m))
    with pytest.raises(ValueError, match=r"\(N, \d+, 150\)"):
        lidb.set(torch.zeros(1, 3, 150))
    lidb.set(None)
    assert torch.equal(unet(x, t, c, m), base)


def test_update_equals_the_factored_product(personal):
    unet = copy.deepcopy(personal.unet)
    lidb = hd.LiDB(unet)
    name, layer = next(iter(lidb.layers.items()))
    w = torch.randn(1, 150)
    A_train, B_train = w[:, :100].reshape(1, 1, 100), w[:, 100:].reshape(1, 50, 1)
    expected = layer.B_aux @ B_train[0] @ A_train[0] @ layer.A_aux
    torch.testing.assert_close(layer.delta_weight(w)[0], expected)
    assert expected.shape == layer.base.weight.shape


def test_hypernetwork_predicts_weights_of_the_shapes_the_model_expects(personal):
    unet = copy.deepcopy(personal.unet)
    lidb = hd.LiDB(unet)
    hyper = hd.HyperNetwork(hd.hyper_config_for(lidb, width=32, depth=1, iterations=3))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    start = lidb.init_weights(1)[0]
    outs = hyper(images, start, return_all=True)
    assert len(outs) == 3 and all(o.shape == (2, *lidb.shape) for o in outs)
    torch.testing.assert_close(outs[0], start.expand(2, *lidb.shape))   # zero head: starts at the base model
    # every predicted layer slice reshapes into that layer's factors and a full-size update
    for i, layer in enumerate(lidb.layers.values()):
        A, B = layer.factors(outs[-1][:, i])
        assert A.shape == (2, 1, layer.base.in_features) and B.shape == (2, layer.base.out_features, 1)
    lidb.set(outs[-1])
    x, t, c, m = _inputs(personal)
    assert unet(x, t, c, m).shape == x.shape


def test_rank_relaxation_keeps_the_output_and_adds_trainable_rank(personal):
    unet = copy.deepcopy(personal.unet)
    lidb = hd.LiDB(unet)
    w = lidb.init_weights(1)
    w[..., 100:] = 0.3 * torch.randn(1, lidb.shape[0], 50, generator=torch.Generator().manual_seed(0))
    lidb.set(w)
    x, t, c, m = _inputs(personal)
    before = unet(x, t, c, m)
    lidb.to_lora(w, rank=4)
    layers = lora.lora_layers(unet)
    assert len(layers) == lidb.shape[0] and all(layer.rank == 4 for layer in layers.values())
    torch.testing.assert_close(unet(x, t, c, m), before, rtol=1e-4, atol=1e-5)


def test_fit_lidb_optimises_many_subjects_at_once(tiny_pipe):
    pipe = hd.personal_pipeline(tiny_pipe)
    lidb = hd.LiDB(pipe.unet, hd.LiDBConfig(a=16, b=8))
    subjects = db.emoji_subjects("train", size=pipe.vae.config.image_size)[:3]
    data = hd.subject_data(pipe, subjects, tones=("", "dark"))
    assert data.latents.shape[0] == 6 and data.subject.tolist() == [0, 0, 1, 1, 2, 2]
    res = hd.fit_lidb(pipe, lidb, data, steps=30, batch_size=6, lr=5e-2)
    assert res.weights.shape == (3, *lidb.shape)
    assert not torch.equal(res.weights[0], res.weights[1])        # each subject has its own numbers
    assert sum(res.losses[-10:]) < sum(res.losses[:10])
    assert all(layer.weights is None for layer in lidb.layers.values())   # left clean


def test_hypernetwork_trains_and_round_trips(tiny_pipe, tmp_path):
    pipe = hd.personal_pipeline(tiny_pipe)
    cfg = hd.LiDBConfig(a=16, b=8)
    lidb = hd.LiDB(pipe.unet, cfg, seed=3)
    subjects = db.emoji_subjects("train", size=pipe.vae.config.image_size)[:2]
    data = hd.subject_data(pipe, subjects, tones=("", "light"))
    targets = 0.1 * torch.randn(2, *lidb.shape)
    hyper = hd.HyperNetwork(hd.hyper_config_for(lidb, width=32, depth=1, iterations=2))
    res = hd.train_hypernetwork(hyper, pipe, lidb, data, targets, steps=20, batch_size=4, lr=3e-3)
    assert res.steps == 20 and sum(res.weight[-5:]) < sum(res.weight[:5])
    path = hd.save_hypernetwork(tmp_path / "h.safetensors", hyper, cfg, 3, info={"x": 1})
    again, cfg2, seed, info = hd.load_hypernetwork(path)
    assert cfg2 == cfg and seed == 3 and info == {"x": 1}
    img = data.images[:1]
    torch.testing.assert_close(again(img, lidb.init_weights(1)[0]), hyper(img, lidb.init_weights(1)[0]),
                               rtol=1e-2, atol=1e-3)                   # float16 file
    # the same seed rebuilds the same frozen bases
    other = hd.LiDB(copy.deepcopy(tiny_pipe.unet), cfg2, seed=seed)
    for a, b in zip(other.layers.values(), lidb.layers.values()):
        assert torch.equal(a.A_aux, b.A_aux) and torch.equal(a.B_aux, b.B_aux)


def test_fast_finetune_relaxes_then_trains(tiny_pipe):
    pipe = hd.personal_pipeline(tiny_pipe)
    lidb = hd.LiDB(pipe.unet, hd.LiDBConfig(a=16, b=8))
    s = db.get_subject("woman mage", size=pipe.vae.config.image_size)
    res = hd.fast_finetune(pipe, lidb, lidb.init_weights(1), s.images[:1], [s.prompt()], rank=2, steps=10, lr=1e-2)
    assert res.steps == 10 and len(res.losses) == 10
    assert all(layer.rank == 2 for layer in lora.lora_layers(pipe.unet).values())
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora.lora_layers(pipe.unet).values())


def test_compare_personalisation_runs_every_method(tiny_pipe):
    from course_lib.benchmark import PERSONALISATION_METHODS, compare_personalisation, paper_claim, summarise
    from course_lib.metrics import self_similarity, subject_similarity
    cfg = hd.LiDBConfig(a=16, b=8)
    probe = hd.LiDB(copy.deepcopy(tiny_pipe.unet), cfg, seed=1)
    hyper = hd.HyperNetwork(hd.hyper_config_for(probe, width=32, depth=1, iterations=1))
    subjects = db.emoji_subjects("heldout", size=tiny_pipe.vae.config.image_size)[:1]
    records, numbers, examples = compare_personalisation(tiny_pipe, hyper, cfg, 1, subjects, db_steps=2, fast_steps=2,
                                                         seeds=1, steps=2, prior_images=2, report=lambda m: None)
    summary = summarise(records)
    assert set(PERSONALISATION_METHODS) <= set(summary)
    assert numbers["LiDB"] == probe.numbers and numbers["hypernetwork only"] == 0
    assert numbers["DreamBooth"] == sum(p.numel() for p in tiny_pipe.unet.parameters())
    s = subjects[0]
    for m in PERSONALISATION_METHODS:
        row = summary[m]
        assert examples[s.name][m].shape[0] == 5                     # the five asked tones
        assert row["tone"] * 5 == pytest.approx(round(row["tone"] * 5))   # a share of 5 images (one seed)
        # the scores are the ones named: recomputed from the method's own images
        assert row["subject"] == pytest.approx(subject_similarity(examples[s.name][m], s.images[1:]), abs=1e-6)
        assert row["tone"] == judges.tone_accuracy(examples[s.name][m], db.TONES[1:])
    assert summary["hypernetwork only"]["seconds"] < summary["DreamBooth"]["seconds"]   # one pass against a fine-tuning
    real = summary["real images"]
    assert real["subject"] == pytest.approx(self_similarity(s.images[1:]), abs=1e-6)
    assert real["tone"] == judges.tone_accuracy(s.images[1:], db.TONES[1:])
    claim = paper_claim(summary)
    assert claim["speedup"] == pytest.approx(summary["DreamBooth"]["seconds"] /
                                             summary["hypernetwork + fast fine-tuning"]["seconds"])
    # textual inversion trains the one embedding row; every file holds 2 bytes (float16) per stored number
    assert numbers["textual inversion"] == tiny_pipe.clip.config.text.width
    for m, stored in (("DreamBooth", numbers["DreamBooth"]), ("LoRA-DreamBooth", numbers["LoRA-DreamBooth"]),
                      ("LiDB", probe.numbers), ("hypernetwork only", probe.numbers),
                      ("textual inversion", numbers["textual inversion"])):
        header = summary[m]["bytes"] - 2 * stored
        assert 0 < header < 32 * 1024, (m, header)          # names and shapes of the tensors
    sizes = [summary[m]["bytes"] for m in ("textual inversion", "LiDB", "LoRA-DreamBooth", "DreamBooth")]
    assert sizes == sorted(sizes)
    assert claim["matches"] == (claim["gap"] >= -0.25 * abs(claim["span"]))


def _stop_at(step):
    def callback(run):
        if run.step == step:
            raise KeyboardInterrupt
    return callback


def test_fit_lidb_resumes_exactly(tiny_pipe, tmp_path):
    def setup():
        pipe = hd.personal_pipeline(tiny_pipe)
        lidb = hd.LiDB(pipe.unet, hd.LiDBConfig(a=16, b=8))
        subjects = db.emoji_subjects("train", size=pipe.vae.config.image_size)[:2]
        return pipe, lidb, hd.subject_data(pipe, subjects, tones=("", "dark"))

    whole = hd.fit_lidb(*setup(), steps=6, batch_size=4, lr=5e-2)
    path = tmp_path / "lidb.safetensors"
    pipe, lidb, data = setup()
    with pytest.raises(KeyboardInterrupt):
        hd.fit_lidb(pipe, lidb, data, steps=6, batch_size=4, lr=5e-2, checkpoint_path=path, checkpoint_every=2,
                    callback=_stop_at(3))
    assert all(layer.weights is None for layer in lidb.layers.values())           # left clean after the stop
    again = hd.fit_lidb(*setup(), steps=6, batch_size=4, lr=5e-2, checkpoint_path=path, checkpoint_every=2)
    assert again.losses == whole.losses and torch.equal(again.weights, whole.weights)   # SparseAdam's step too
    with pytest.raises(ValueError, match="batch_size: checkpoint 4, now 2"):
        hd.fit_lidb(*setup(), steps=6, batch_size=2, lr=5e-2, checkpoint_path=path)


def test_train_hypernetwork_and_fast_finetune_resume_exactly(tiny_pipe, tmp_path):
    cfg = hd.LiDBConfig(a=16, b=8)

    def setup():
        pipe = hd.personal_pipeline(tiny_pipe)
        lidb = hd.LiDB(pipe.unet, cfg, seed=3)
        subjects = db.emoji_subjects("train", size=pipe.vae.config.image_size)[:2]
        torch.manual_seed(0)
        hyper = hd.HyperNetwork(hd.hyper_config_for(lidb, width=32, depth=1, iterations=2))
        return hyper, pipe, lidb, hd.subject_data(pipe, subjects, tones=("", "light"))

    targets = 0.1 * torch.randn(2, *setup()[2].shape, generator=torch.Generator().manual_seed(0))
    hyper, *rest = setup()
    whole = hd.train_hypernetwork(hyper, *rest, targets, steps=5, batch_size=4, lr=3e-3)
    path = tmp_path / "hyper.safetensors"
    stopped, *rest = setup()
    with pytest.raises(KeyboardInterrupt):
        hd.train_hypernetwork(stopped, *rest, targets, steps=5, batch_size=4, lr=3e-3, checkpoint_path=path,
                              checkpoint_every=2, callback=_stop_at(3))
    assert not stopped.training and all(layer.weights is None for layer in rest[1].layers.values())
    resumed, *rest = setup()
    again = hd.train_hypernetwork(resumed, *rest, targets, steps=5, batch_size=4, lr=3e-3, checkpoint_path=path)
    assert (again.losses, again.diffusion, again.weight) == (whole.losses, whole.diffusion, whole.weight)
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), hyper.parameters()))

    s = db.get_subject("woman mage", size=tiny_pipe.vae.config.image_size)

    def fast(**options):
        pipe = hd.personal_pipeline(tiny_pipe)
        lidb = hd.LiDB(pipe.unet, cfg)
        res = hd.fast_finetune(pipe, lidb, lidb.init_weights(1), s.images[:1], [s.prompt()], rank=2, steps=5,
                               lr=1e-2, **options)
        return res, lora.lora_parameters(pipe.unet)

    (res, params) = fast()
    with pytest.raises(KeyboardInterrupt):
        fast(checkpoint_path=tmp_path / "fast.safetensors", checkpoint_every=2, callback=_stop_at(3))
    res2, params2 = fast(checkpoint_path=tmp_path / "fast.safetensors")
    assert res2.losses == res.losses and all(torch.equal(a, b) for a, b in zip(params, params2))
