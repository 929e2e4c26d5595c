"""SMDM's released safetensors (lit-gpt TransEncoder) load with logit parity.

A tiny synthetic file laid out as SMDM's release (unprefixed keys, float32, the [MASK] row
32000 in the embedding only, per-group fused qkv) is converted and rebuilt like our own .ckpt;
its logits are compared with SMDM's forward written here from its description
(lit_gpt/diffmodel.py of ML-GSAI/SMDM), not with unmask's module. Negative twins (q and k
exchanged inside the fused projection; two blocks swapped) must fail the comparison.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from models.formats import FormatError, detect_format, load_checkpoint
from models.formats.smdm import heads

V, C, N, H, HID, MASK = 32001, 16, 2, 2, 40, 32000
HS = C // H
X = torch.tensor([[1, 5, MASK, 31999, MASK, 7, 2, 100], [MASK, MASK, 3, 4, 5, 6, 7, 8]])


def smdm_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    p = {"lm_head.weight": r(V - 1, C), "transformer.wte.weight": r(V, C)}
    for i in range(N):
        b = f"transformer.h.{i}."
        p |= {b + "norm_1.weight": 1 + r(C), b + "attn.attn.weight": r(3 * C, C)}
        p |= {b + "attn.proj.weight": r(C, C), b + "norm_2.weight": 1 + r(C)}
        p |= {b + "mlp.swiglu.w1.weight": r(HID, C), b + "mlp.swiglu.w2.weight": r(HID, C)}
        p |= {b + "mlp.swiglu.w3.weight": r(C, HID)}
    p["transformer.ln_f.weight"] = 1 + r(C)
    return p


def reference_logits(p, x):
    """SMDM's TransEncoder forward written out, float64: (B, L) -> (B, L, 32000)."""
    p = {k: v.double() for k, v in p.items()}
    B, L = x.shape

    def rms(h, w):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-5) * w

    theta = 1.0 / (10_000 ** (torch.arange(0, HS, 2, dtype=torch.float64) / HS))
    ang = torch.arange(L, dtype=torch.float64)[:, None] * theta[None]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]  # (1, L, 1, hs/2)

    def rope(t):  # (B, L, H, hs), non-interleaved
        a, b = t[..., : HS // 2], t[..., HS // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    h = p["transformer.wte.weight"][x]
    for i in range(N):
        b = f"transformer.h.{i}."
        n1 = rms(h, p[b + "norm_1.weight"])
        qkv = (n1 @ p[b + "attn.attn.weight"].T).view(B, L, H, 3, HS)  # groups = heads
        q, k, v = rope(qkv[:, :, :, 0]), rope(qkv[:, :, :, 1]), qkv[:, :, :, 2]
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HS)
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, L, C)
        h = h + y @ p[b + "attn.proj.weight"].T
        n2 = rms(h, p[b + "norm_2.weight"])
        m = F.silu(n2 @ p[b + "mlp.swiglu.w1.weight"].T) * (n2 @ p[b + "mlp.swiglu.w2.weight"].T)
        h = h + m @ p[b + "mlp.swiglu.w3.weight"].T
    return rms(h, p["transformer.ln_f.weight"]) @ p["lm_head.weight"].T


def converted_logits(ckpt, x):
    from diffusion.build import build_module

    class Vocab:  # TinyLlama + [MASK]
        vocab_size, mask_id = V, MASK

    module = build_module(OmegaConf.create(ckpt["unmask_config"]), Vocab())
    module.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        return module.eval_backbone.eval()(x, None, None).double()


def write(path: Path, params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(path), metadata={"format": "pt"})
    return path


def swap_qk(p):
    q = dict(p)
    for i in range(N):
        w = p[f"transformer.h.{i}.attn.attn.weight"].view(H, 3, HS, C)
        q[f"transformer.h.{i}.attn.attn.weight"] = w[:, [1, 0, 2]].reshape(3 * C, C)
    return q


def swap_blocks(p):
    q = dict(p)
    for k in p:
        if k.startswith("transformer.h.0."):
            o = k.replace("h.0.", "h.1.")
            q[k], q[o] = p[o], p[k]
    return q


OV = ["model.n_heads=2"]  # a width that is not one of SMDM's named sizes: say the heads


def test_smdm_logit_parity_and_negative_twins(tmp_path):
    p = smdm_params()
    file = write(tmp_path / "mdm-tiny.safetensors", p)
    assert detect_format(file) == "smdm"
    ckpt = load_checkpoint(str(file), overrides=OV)
    assert ckpt["unmask_format"]["mask_id"] == MASK
    assert ckpt["unmask_config"]["data"]["tokenizer"] == "TinyLlama/TinyLlama_v1.1"
    got = converted_logits(ckpt, X)
    want = reference_logits(p, X)
    torch.testing.assert_close(got[..., :MASK], want, atol=1e-5, rtol=1e-5)
    assert bool((got[..., MASK] < got[..., :MASK].min(-1).values).all())  # [MASK] never predicted
    for i, twin in enumerate((swap_qk(p), swap_blocks(p))):
        bad = load_checkpoint(str(write(tmp_path / f"twin{i}.safetensors", twin)), overrides=OV)
        assert not torch.allclose(converted_logits(bad, X)[..., :MASK], want, atol=1e-5, rtol=1e-5)


def test_smdm_strict_errors(tmp_path):
    p = smdm_params()
    missing = dict(p)
    del missing["transformer.h.1.mlp.swiglu.w2.weight"]
    with pytest.raises(FormatError, match=r"transformer\.h\.1\.mlp\.swiglu\.w2\.weight.*missing"):
        load_checkpoint(str(write(tmp_path / "a/m.safetensors", missing)), "smdm", overrides=OV)
    extra = dict(p, **{"transformer.h.0.attn.attn.bias": torch.zeros(3 * C)})
    with pytest.raises(FormatError, match=r"e\.safetensors.*unexpected.*attn\.attn\.bias"):
        load_checkpoint(str(write(tmp_path / "b/e.safetensors", extra)), "smdm", overrides=OV)
    wrong = dict(p, **{"lm_head.weight": torch.zeros(V, C)})
    with pytest.raises(FormatError, match=r"s\.safetensors.*lm_head\.weight.*shape"):
        load_checkpoint(str(write(tmp_path / "c/s.safetensors", wrong)), "smdm", overrides=OV)
    file = write(tmp_path / "d/cut.safetensors", p)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut\.safetensors.*truncated"):
        load_checkpoint(str(file), "smdm", overrides=OV)
    with pytest.raises(FormatError, match="model.n_heads"):  # no name, no named size: say it
        load_checkpoint(str(write(tmp_path / "e/x.safetensors", p)), "smdm")


def test_smdm_head_count_from_its_named_sizes():
    assert heads(Path("mdm-170M-100e18.safetensors"), 18, 768, 3072, ()) == 12
    assert heads(Path("model.safetensors"), 20, 1792, 7168, ()) == 14  # 1028M, unique match
    with pytest.raises(FormatError, match="170M"):
        heads(Path("mdm-170M.safetensors"), 12, 768, 3072, ())
