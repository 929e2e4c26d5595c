"""The DiT backbone: shapes, bidirectionality, the causal flag, padding, conditioning."""

import pytest
import torch

from models.dit import DiT


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=11, hidden_size=32, n_blocks=2, n_heads=4, max_length=16, cond_dim=8)
    args.update(kw)
    model = DiT(**args)
    for p in model.parameters():  # break the zero init so outputs depend on inputs
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def test_shapes_and_bidirectional():
    model = tiny()
    x = torch.randint(0, 11, (2, 9))
    out = model(x)
    assert out.shape == (2, 9, 11)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 11
    assert not torch.allclose(model(x2)[:, 0], out[:, 0])  # the last token reaches position 0


def test_causal_flag_hides_the_future():
    model = tiny(causal=True)
    x = torch.randint(0, 11, (2, 9))
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 11
    torch.testing.assert_close(model(x2)[:, :-1], model(x)[:, :-1])


def test_padding_mask_isolates_padded_keys():
    model = tiny()
    x = torch.randint(0, 11, (1, 8))
    attn = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    x2 = x.clone()
    x2[:, 6] = (x2[:, 6] + 3) % 11  # change a padded token
    torch.testing.assert_close(
        model(x, attention_mask=attn)[:, :5], model(x2, attention_mask=attn)[:, :5]
    )


def test_time_conditioning_uses_sigma():
    model = tiny(time_conditioning=True)
    x = torch.randint(0, 11, (2, 6))
    a = model(x, sigma=torch.tensor([0.1, 0.1]))
    b = model(x, sigma=torch.tensor([2.0, 2.0]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="needs sigma"):
        model(x)


def test_too_long_sequence_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="max_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
