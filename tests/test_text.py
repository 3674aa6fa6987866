"""The transformer text encoder (course_lib.text): padding never leaks into real tokens, the masked mean,
causal attention, the blocks it is built of, and clear errors for bad inputs and configs."""

import pytest
import torch

from course_lib.data import load_emoji
from course_lib.text import EncoderBlock, TextEncoder, TextEncoderConfig
from course_lib.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(load_emoji(size=8, split="train").captions, vocab_size=512)


def test_padding_never_changes_real_tokens(tokenizer):
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, width=32, layers=2, heads=4)).eval()
    ids, mask = tokenizer(["grinning face", "man in tuxedo: medium-light skin tone"])
    scrambled = torch.where(mask, ids, torch.randint(4, tokenizer.vocab_size, ids.shape))
    with torch.no_grad():
        out, out2 = encoder(ids, mask), encoder(scrambled, mask)
        n = int(mask[0].sum())
        alone = encoder(ids[:1, :n], mask[:1, :n])        # the first prompt without any padding at all
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(out[:1, :n], alone)
    assert (out[~mask] == 0).all() and out.shape == (2, 32, 32)
    pooled = TextEncoder.pool(out, mask)
    torch.testing.assert_close(pooled[0], out[0, :n].mean(0))


def test_bad_inputs_and_configs_are_rejected():
    encoder = TextEncoder(TextEncoderConfig(vocab_size=10, max_length=4, width=8, heads=2, layers=1))
    ids = torch.tensor([[1, 5, 2, 0]])
    with pytest.raises(ValueError, match="token ids must be in 0..9"):
        encoder(torch.tensor([[1, 12, 2, 0]]), ids != 0)
    with pytest.raises(ValueError, match="at least one True"):
        encoder(ids, torch.zeros_like(ids, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        encoder(ids, (ids != 0).long())
    with pytest.raises(ValueError, match=r"width \(30\) must be divisible by heads \(4\)"):
        TextEncoderConfig(vocab_size=10, width=30, heads=4)
    with pytest.raises(ValueError, match=r"unknown activation 'relu'; choose from \['gelu', 'quick_gelu'\]"):
        TextEncoderConfig(vocab_size=10, activation="relu")
    with pytest.raises(ValueError, match="exceed the 4 special tokens"):
        TextEncoderConfig(vocab_size=3)


def test_causal_encoder_blocks_later_tokens_and_is_built_of_encoder_blocks():
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(vocab_size=20, max_length=6, width=16, heads=2, layers=2,
                                            causal=True, activation="quick_gelu")).eval()
    assert len(encoder.blocks) == 2 and all(isinstance(b, EncoderBlock) for b in encoder.blocks)
    ids = torch.tensor([[1, 5, 6, 7, 2, 0]])
    changed = ids.clone()
    changed[0, 3] = 9                                     # a later token changes: earlier states must not
    with torch.no_grad():
        a, b = encoder(ids, None), encoder(changed, None)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])

