"""MDLM's published formats (HF release, Lightning .ckpt of MDLM / SEDD / AR) load with logit parity.

Each test writes a tiny synthetic checkpoint laid out exactly as the release (key names,
order, dtypes, config fields; tiny widths), converts it with `models.formats`, rebuilds the
module from the converted dict as from our own .ckpt, and compares its logits with a forward
of MDLM's architecture written here from its description (models/dit.py and
models/autoregressive.py of kuleshov-group/mdlm), not with unmask's modules. A negative twin
(two blocks swapped, or q and k exchanged) must fail the same comparison.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from models.formats import FormatError, detect_format, load_checkpoint

V, C, N, H, COND, LEN = 50258, 16, 2, 2, 8, 12  # GPT-2 + [MASK]; tiny widths
MASK = 50257


# ---- MDLM's DiT from its description -----------------------------------------------------------
def mdlm_params(causal: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """backbone.* in MDLM's state_dict order (module registration order), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    p = {"vocab_embed.embedding": r(V, C)}
    if not causal:
        p |= {"sigma_map.mlp.0.weight": r(COND, 256), "sigma_map.mlp.0.bias": r(COND)}
        p |= {"sigma_map.mlp.2.weight": r(COND, COND), "sigma_map.mlp.2.bias": r(COND)}
    for i in range(N):
        b = f"blocks.{i}."
        p |= {b + "norm1.weight": 1 + r(C), b + "attn_qkv.weight": r(3 * C, C)}
        p |= {b + "attn_out.weight": r(C, C), b + "norm2.weight": 1 + r(C)}
        p |= {b + "mlp.0.weight": r(4 * C, C), b + "mlp.0.bias": r(4 * C)}
        p |= {b + "mlp.2.weight": r(C, 4 * C), b + "mlp.2.bias": r(C)}
        if not causal:
            p |= {
                b + "adaLN_modulation.weight": r(6 * C, COND),
                b + "adaLN_modulation.bias": r(6 * C),
            }
    p |= {"output_layer.norm_final.weight": 1 + r(C)}
    p |= {"output_layer.linear.weight": r(V, C), "output_layer.linear.bias": r(V)}
    if not causal:
        p |= {"output_layer.adaLN_modulation.weight": r(2 * C, COND)}
        p |= {"output_layer.adaLN_modulation.bias": r(2 * C)}
    return p


def inv_freq() -> torch.Tensor:
    D = C // H
    return 1.0 / (10_000 ** (torch.arange(0, D, 2).float() / D))


def reference_logits(
    p, x, sigma=None, causal=False, time_conditioning=False, allowed=None, positions=None
):
    """MDLM's forward, written out: (B, L) ids -> (B, L, V) logits (float64 throughout).
    `allowed` (L, L) bool: which keys each query sees (BD3-LM's mask; default all, or the
    causal triangle); `positions` (L,): rotary positions (default 0 .. L - 1)."""
    p = {k: v.double() for k, v in p.items()}
    B, L = x.shape
    D = C // H

    def lin(h, name, bias=True):
        out = h @ p[name + ".weight"].T
        return out + p[name + ".bias"] if bias else out

    def norm(h, name):  # LayerNorm without bias, then the weight
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * p[name + ".weight"]

    h = p["vocab_embed.embedding"][x]
    c = None
    if not causal:
        s = sigma.double() if time_conditioning else torch.zeros(B, dtype=torch.float64)
        freqs = torch.exp(-math.log(10_000) * torch.arange(128, dtype=torch.float64) / 128)
        args = s[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        c = F.silu(lin(F.silu(lin(emb, "sigma_map.mlp.0")), "sigma_map.mlp.2"))
    pos = torch.arange(L) if positions is None else positions
    ang = pos.double()[:, None] * inv_freq().double()[None]  # (L, D/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(t):  # (B, L, H, D), flash-attn's non-interleaved rotary: halves
        t1, t2 = t[..., : D // 2], t[..., D // 2 :]
        cs, sn = cos[None, :, None], sin[None, :, None]
        return torch.cat([t1 * cs - t2 * sn, t2 * cs + t1 * sn], -1)

    for i in range(N):
        b = f"blocks.{i}."
        if c is not None:
            mods = lin(c, b + "adaLN_modulation")[:, None].chunk(6, dim=2)
            sh1, sc1, g1, sh2, sc2, g2 = mods
        a = norm(h, b + "norm1")
        if c is not None:
            a = a * (1 + sc1) + sh1
        qkv = lin(a, b + "attn_qkv", bias=False).view(B, L, 3, H, D)
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        if causal and allowed is None:
            allowed = torch.ones(L, L, dtype=torch.bool).tril()
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, C)
        out = lin(att, b + "attn_out", bias=False)
        h = h + (g1 * out if c is not None else out)
        m = norm(h, b + "norm2")
        if c is not None:
            m = m * (1 + sc2) + sh2
        m = lin(F.gelu(lin(m, b + "mlp.0"), approximate="tanh"), b + "mlp.2")
        h = h + (g2 * m if c is not None else m)
    f = norm(h, "output_layer.norm_final")
    if c is not None:
        shift, scale = lin(c, "output_layer.adaLN_modulation")[:, None].chunk(2, dim=2)
        f = f * (1 + scale) + shift
    logits = lin(f, "output_layer.linear")
    if causal:
        logits[..., MASK] = -1000.0
    return logits


def converted_module(ckpt):
    """Backbone + objective rebuilt from the converted dict (its saved config, like our own
    .ckpt) with a strict load of the whole module, in eval mode."""
    from diffusion.build import build_module

    cfg = OmegaConf.create(ckpt["unmask_config"])

    class Vocab:  # what the data module would report for GPT-2 + [MASK]
        vocab_size, mask_id = V, MASK

    module = build_module(cfg, Vocab())
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.eval()


def converted_logits(ckpt, x, sigma=None):
    """The rebuilt module's EMA-copy logits, as evaluation uses them."""
    backbone = converted_module(ckpt).eval_backbone
    with torch.no_grad():
        return backbone(x, sigma, None).double()


def swap_blocks(p):
    q = dict(p)
    for k in p:
        if k.startswith("blocks.0."):
            other = k.replace("blocks.0.", "blocks.1.")
            q[k], q[other] = p[other], p[k]
    return q


def swap_qk(p):
    q = dict(p)
    for i in range(N):
        w = p[f"blocks.{i}.attn_qkv.weight"]
        q[f"blocks.{i}.attn_qkv.weight"] = torch.cat([w[C : 2 * C], w[:C], w[2 * C :]])
    return q


# ---- the HF release ---------------------------------------------------------------------------
def write_hf(folder: Path, params: dict[str, torch.Tensor], with_inv_freq: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["MDLM"],
        "auto_map": {
            "AutoConfig": "configuration_mdlm.MDLMConfig",
            "AutoModelForMaskedLM": "modeling_mdlm.MDLM",
        },
        "model_type": "mdlm",
        "vocab_size": V,
        "model_length": LEN,
        "hidden_dim": C,
        "cond_dim": COND,
        "n_blocks": N,
        "n_heads": H,
        "dropout": 0.1,
        "time_conditioning": False,
        "return_dict": False,
        "torch_dtype": "float32",
        "transformers_version": "4.38.2",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {f"backbone.{k}": v.contiguous() for k, v in params.items()}
    if with_inv_freq:
        tensors["backbone.rotary_emb.inv_freq"] = inv_freq()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


X = torch.tensor(
    [[5, MASK, 17, 50256, MASK, 3, 9, 9, 100, MASK], [1, 2, MASK, MASK, 4, 5, 6, 7, 8, 0]]
)
# float32 logits computed in another order than the reference forward: the last bits depend on
# the CPU's kernels (1.1e-5 at one of 1M logits on an AMD EPYC); a wrong mapping moves them by O(1)
TOL = dict(atol=5e-5, rtol=1e-4)


def test_mdlm_hf_logit_parity_and_negative_twins(tmp_path):
    p = mdlm_params()
    folder = write_hf(tmp_path / "mdlm-owt", p)
    assert detect_format(folder) == "mdlm_hf"
    ckpt = load_checkpoint(str(folder))
    cfg = ckpt["unmask_config"]
    assert cfg["backbone"]["_target_"] == "models.mdlm_dit.MDLMDiT"
    assert cfg["model"]["length"] == LEN and cfg["data"]["tokenizer"] == "gpt2"
    assert ckpt["unmask_format"]["mask_id"] == MASK
    want = reference_logits(p, X)
    got = converted_logits(ckpt, X)
    torch.testing.assert_close(got, want, **TOL)
    for twin in (swap_blocks(p), swap_qk(p)):
        bad = load_checkpoint(
            str(write_hf(tmp_path / f"twin{len(list(tmp_path.iterdir()))}", twin))
        )
        assert not torch.allclose(converted_logits(bad, X), want, **TOL)


def _expect(folder: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        load_checkpoint(str(folder), fmt="mdlm_hf")


def test_mdlm_hf_strict_errors(tmp_path):
    p = mdlm_params()
    # one key missing
    missing = dict(p)
    del missing["blocks.1.norm2.weight"]
    _expect(write_hf(tmp_path / "missing", missing), r"blocks\.1\.norm2\.weight.*missing")
    # one extra key
    extra = dict(p, **{"blocks.0.attn_qkv.bias": torch.zeros(3 * C)})
    _expect(write_hf(tmp_path / "extra", extra), r"model\.safetensors.*unexpected.*attn_qkv\.bias")
    # one wrong shape
    wrong = dict(p, **{"blocks.0.mlp.0.weight": torch.zeros(3 * C, C)})
    _expect(
        write_hf(tmp_path / "shape", wrong), r"model\.safetensors.*blocks\.0\.mlp\.0\.weight.*shape"
    )
    # a truncated file
    folder = write_hf(tmp_path / "cut", p)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect(folder, r"model\.safetensors.*truncated")
    # a config field missing
    folder = write_hf(tmp_path / "nocfg", p)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["n_heads"]
    (folder / "config.json").write_text(json.dumps(cfg))
    _expect(folder, r"config\.json.*n_heads")


# ---- MDLM's Lightning checkpoints -------------------------------------------------------------
def mdlm_config(parameterization: str, backbone: str, time_conditioning: bool, T: int = 0):
    """MDLM's composed config as its main.py pickles it (interpolations left in)."""
    causal = backbone == "ar"
    return OmegaConf.create(
        {
            "mode": "train",
            "diffusion": "absorbing_state",
            "backbone": backbone,
            "parameterization": parameterization,
            "time_conditioning": time_conditioning,
            "T": T,
            "subs_masking": False,
            "seed": 1,
            "loader": {
                "global_batch_size": 512,
                "eval_global_batch_size": "${.global_batch_size}",
                "batch_size": "${div_up:${.global_batch_size}, ${eval:${trainer.devices} * ${trainer.num_nodes}}}",
            },
            "sampling": {"predictor": "ddpm_cache", "steps": 128, "noise_removal": True},
            "training": {"ema": 0.9999, "antithetic_sampling": True, "sampling_eps": 1e-3},
            "model": {
                "name": "small-ar" if causal else "small",
                "type": "ddit",
                "hidden_size": C,
                "cond_dim": COND,
                "length": LEN,
                "n_blocks": N,
                "n_heads": H,
                "scale_by_sigma": True,
                "dropout": 0.1,
                "tie_word_embeddings": False,
                **({"causal": True} if causal else {}),
            },
            "data": {
                "train": "openwebtext-train",
                "valid": "openwebtext-valid",
                "tokenizer_name_or_path": "gpt2",
                "wrap": True,
            },
            "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
            "trainer": {"devices": 4, "num_nodes": 1},
        }
    )


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["a tiny corpus"] * 5, trainers.BpeTrainer(vocab_size=80))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def write_lightning(path: Path, raw, shadow, config, extra_hp=None, extra_state=None) -> Path:
    state = {f"backbone.{k}": v for k, v in raw.items()}
    items = list(state.items())
    # MDLM's Rotary registers inv_freq after the embedding (module order): a buffer in between
    state = dict(items[:1] + [("backbone.rotary_emb.inv_freq", inv_freq())] + items[1:])
    state |= extra_state or {}  # buffers registered after the backbone (BD3-LM's clipping)
    ckpt = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "ema": {"decay": 0.9999, "num_updates": 1000, "shadow_params": list(shadow.values())},
        "hyper_parameters": {"config": config, "tokenizer": tiny_tokenizer(), **(extra_hp or {})},
        "sampler": {"random_state": None},
    }
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "parameterization,backbone,tc",
    [("subs", "dit", False), ("sedd", "dit", True), ("ar", "ar", False)],
)
def test_mdlm_lightning_parity_ema_and_raw(tmp_path, parameterization, backbone, tc):
    causal = backbone == "ar"
    raw, shadow = mdlm_params(causal, seed=1), mdlm_params(causal, seed=2)
    path = write_lightning(
        tmp_path / f"{parameterization}.ckpt",
        raw,
        shadow,
        mdlm_config(parameterization, backbone, tc),
    )
    assert detect_format(path) == "mdlm_ckpt"
    sigma = torch.tensor([0.7, 2.5])
    ema = load_checkpoint(str(path))
    assert ema["unmask_config"]["parameterization"]["_target_"].endswith(
        {"subs": "SUBS", "sedd": "SEDD", "ar": "AR"}[parameterization]
    )
    assert ema["unmask_config"]["data"]["name"] == "openwebtext"
    want = reference_logits(shadow, X, sigma, causal, tc)
    torch.testing.assert_close(converted_logits(ema, X, sigma), want, **TOL)
    plain = load_checkpoint(str(path), use_ema=False)
    want_raw = reference_logits(raw, X, sigma, causal, tc)
    torch.testing.assert_close(converted_logits(plain, X, sigma), want_raw, **TOL)
    # negative twin: the shadow list's two blocks swapped must not reproduce MDLM's logits
    twin = write_lightning(
        tmp_path / "twin.ckpt",
        raw,
        swap_blocks(shadow),
        mdlm_config(parameterization, backbone, tc),
    )
    assert not torch.allclose(converted_logits(load_checkpoint(str(twin)), X, sigma), want, **TOL)


def test_mdlm_lightning_strict_errors(tmp_path):
    raw, shadow = mdlm_params(), mdlm_params(seed=2)
    cfg = mdlm_config("subs", "dit", False)
    good = write_lightning(tmp_path / "good.ckpt", raw, shadow, cfg)
    data = good.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut\.ckpt"):
        load_checkpoint(str(cut), fmt="mdlm_ckpt")
    missing = dict(raw)
    del missing["blocks.0.attn_out.weight"]
    p = write_lightning(tmp_path / "missing.ckpt", missing, shadow, cfg)
    with pytest.raises(FormatError, match=r"missing\.ckpt.*blocks\.0\.attn_out\.weight.*missing"):
        load_checkpoint(str(p), fmt="mdlm_ckpt")
    extra = dict(raw, **{"blocks.0.attn_out.bias": torch.zeros(C)})
    p = write_lightning(tmp_path / "extra.ckpt", extra, shadow, cfg)
    with pytest.raises(FormatError, match=r"extra\.ckpt.*unexpected.*attn_out\.bias"):
        load_checkpoint(str(p), fmt="mdlm_ckpt")
    wrong = dict(raw, **{"output_layer.linear.bias": torch.zeros(V - 1)})
    p = write_lightning(tmp_path / "shape.ckpt", wrong, shadow, cfg)
    with pytest.raises(FormatError, match=r"shape\.ckpt.*output_layer\.linear\.bias.*shape"):
        load_checkpoint(str(p), fmt="mdlm_ckpt")
    short = dict(list(shadow.items())[:-1])
    p = write_lightning(tmp_path / "ema.ckpt", raw, short, cfg)
    with pytest.raises(FormatError, match=r"ema\.ckpt.*shadow_params"):
        load_checkpoint(str(p), fmt="mdlm_ckpt")


class WritesAFile:
    """Unpickling this with a plain pickle.load would create `path` (builtins.open runs)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_restricted_unpickler_runs_no_code(tmp_path):
    target = tmp_path / "pwned.txt"
    path = write_lightning(
        tmp_path / "evil.ckpt",
        mdlm_params(),
        mdlm_params(seed=2),
        mdlm_config("subs", "dit", False),
        extra_hp={"payload": WritesAFile(str(target))},
    )
    assert not target.exists()
    ckpt = load_checkpoint(str(path))  # loads: the payload is a stand-in, never called
    assert not target.exists()
    assert "state_dict" in ckpt
    from models.formats.safe_pickle import StandIn, load_restricted

    raw = load_restricted(path)
    payload = raw["hyper_parameters"]["payload"]
    assert isinstance(payload, StandIn) and payload.qualname in ("builtins.open", "io.open")
    assert not target.exists()


def _write_pickle(path: Path, pkl: bytes, tensors: dict[str, bytes] | None = None) -> Path:
    """A torch zip checkpoint with a hand-written data.pkl (and raw storages)."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        for key, raw in (tensors or {}).items():
            z.writestr(f"archive/data/{key}", raw)
    return path


@pytest.mark.parametrize(
    "glob", [b"ctorch\nFloatStorage\n", b"ctorch._utils\n_rebuild_tensor_v2\n"]
)
def test_a_crafted_pickle_cannot_change_how_later_files_read(tmp_path, glob):
    """BUILD on an allowed global (a storage type's dtype, a rebuild function's attributes) is
    refused with a FormatError naming the file, and a file read afterwards reads as before."""
    from models.formats.safe_pickle import load_restricted

    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, good)
    # PROTO 2; GLOBAL; {"dtype": torch.float16}; BUILD; POP; {}; STOP
    pkl = b"\x80\x02" + glob + b"}X\x05\x00\x00\x00dtypectorch\nfloat16\nsb0}."
    evil = _write_pickle(tmp_path / "evil.ckpt", pkl)
    with pytest.raises(FormatError, match="evil.ckpt.*allowed global"):
        load_restricted(evil)
    w = load_restricted(good)["w"]
    assert w.dtype == torch.float32 and w.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_tensor_record_past_its_storage_is_a_format_error(tmp_path):
    """A corrupt header (size (400, 2) over an 8-element storage) names the file; it never
    reaches torch's resize error or reads past the storage."""
    from models.formats.safe_pickle import load_restricted

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"backbone.vocab_embed.embedding": torch.zeros(4, 2)}}, good)
    with zipfile_open(good) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl_name = next(n for n in entries if n.endswith("data.pkl"))
    assert b"K\x04K\x02\x86" in entries[pkl_name]  # the size record (4, 2) to corrupt
    entries[pkl_name] = entries[pkl_name].replace(b"K\x04K\x02\x86", b"M\x90\x01K\x02\x86", 1)
    bad = tmp_path / "bad.ckpt"
    with zipfile_open(bad, "w") as z:
        for n, raw in entries.items():
            z.writestr(n, raw)
    with pytest.raises(FormatError, match=r"bad\.ckpt.*\(400, 2\).*exceeds its storage of 8"):
        load_restricted(bad)
    for fmt in ("mdlm_ckpt", None):  # named, and found by detection (an MDLM-looking key)
        with pytest.raises(FormatError, match=r"bad\.ckpt.*exceeds its storage"):
            load_checkpoint(str(bad), fmt=fmt)
    assert load_restricted(good)["state_dict"]["backbone.vocab_embed.embedding"].shape == (4, 2)


def zipfile_open(path: Path, mode: str = "r"):
    import zipfile

    return zipfile.ZipFile(path, mode)


def test_our_checkpoint_format_and_disable_ema(tmp_path):
    """Our own .ckpt is detected as such; use_ema=False makes the EMA copy the raw weights."""
    folder = write_hf(tmp_path / "hf", mdlm_params())
    ckpt = load_checkpoint(str(folder))
    ckpt["state_dict"]["ema.module.output_layer.linear.bias"] = torch.ones(V)
    ours = tmp_path / "ours.ckpt"
    torch.save(ckpt, ours)
    assert detect_format(ours) == "unmask"
    back = load_checkpoint(str(ours))
    assert torch.equal(back["state_dict"]["ema.module.output_layer.linear.bias"], torch.ones(V))
    raw = load_checkpoint(str(ours), use_ema=False)["state_dict"]
    assert torch.equal(
        raw["ema.module.output_layer.linear.bias"], raw["backbone.output_layer.linear.bias"]
    )
    # the backbone rebuilt from the saved config alone
    backbone = instantiate(OmegaConf.create(ckpt["unmask_config"]).backbone, vocab_size=V)
    assert backbone.max_length == LEN


def test_convert_script_writes_our_ckpt(tmp_path):
    """scripts/convert.py: a published folder -> our .ckpt (weights_only-loadable), same tensors."""
    from diffusion.checkpoint import read_checkpoint
    from tests.tiny_lm import load_script

    convert = load_script("convert")
    p = mdlm_params()
    folder = write_hf(tmp_path / "hf", p)
    out = tmp_path / "out" / "mdlm.ckpt"
    assert convert.main(["--from", "auto", str(folder), "--out", str(out)]) == 0
    saved = read_checkpoint(out)  # torch.load(weights_only=True)
    assert detect_format(out) == "unmask"
    assert saved["unmask_format"]["format"] == "mdlm_hf"
    torch.testing.assert_close(converted_logits(saved, X), reference_logits(p, X), **TOL)
    assert not list(out.parent.glob(".*tmp*"))  # the atomic write left no temporary file
    bad = tmp_path / "bad"
    bad.mkdir()
    assert convert.main(["--from", "mdlm_hf", str(bad), "--out", str(tmp_path / "x.ckpt")]) == 1
    assert not (tmp_path / "x.ckpt").exists()


def test_as_ckpt_file_converts_once_and_reuses(tmp_path):
    """A published folder becomes a cached .ckpt of ours (same file on the second call);
    our own .ckpt passes through; disable_ema gives a converted copy with raw weights."""
    from diffusion.checkpoint import read_checkpoint
    from models.formats import as_ckpt_file

    folder = write_hf(tmp_path / "hf", mdlm_params())
    first = as_ckpt_file(str(folder), cache_dir=tmp_path / "cache")
    assert first.parent == tmp_path / "cache" / "converted" and first.suffix == ".ckpt"
    mtime = first.stat().st_mtime_ns
    assert as_ckpt_file(str(folder), cache_dir=tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert read_checkpoint(first)["unmask_format"]["format"] == "mdlm_hf"
    assert as_ckpt_file(str(first)) == first  # ours: as it is
    raw = as_ckpt_file(str(first), use_ema=False, cache_dir=tmp_path / "cache")
    assert raw != first and read_checkpoint(raw)["state_dict"]


def test_eval_config_takes_a_published_folder(tmp_path, monkeypatch):
    """eval.checkpoint_path=<MDLM HF folder>: the evaluation config is the release's, and its
    checkpoint path becomes the converted .ckpt of ours the modes load weights from."""
    from hydra import compose, initialize_config_dir

    from diffusion.build import eval_config
    from diffusion.checkpoint import read_checkpoint
    from diffusion.config import register_resolvers

    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "cache"))
    folder = write_hf(tmp_path / "mdlm-owt", mdlm_params())
    register_resolvers()
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base=None):
        fixed = ["checkpointing.save_dir=x", "trainer.default_root_dir=x", "logger=none"]
        base = compose("config", overrides=fixed)
        cfg = compose(
            "config",
            overrides=[*fixed,
                       "mode=sample_eval", f"eval.checkpoint_path={folder}"],
        )  # fmt: skip
    out = eval_config(cfg, base)
    assert out.backbone._target_ == "models.mdlm_dit.MDLMDiT" and out.model.length == LEN
    path = Path(out.eval.checkpoint_path)
    assert path.suffix == ".ckpt" and path.parent == tmp_path / "cache" / "converted"
    assert read_checkpoint(path)["unmask_format"]["format"] == "mdlm_hf"


def test_restating_the_model_option_of_a_release_is_no_contradiction(tmp_path):
    """MDLM's (and DUO's) eval commands say model=small; a release converted at small's sizes
    is labelled mdlm-768x12: the label is not the model, the sizes are compared."""
    from hydra import compose, initialize_config_dir

    from diffusion.build import eval_config
    from diffusion.config import ConfigError, register_resolvers

    register_resolvers()
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    fixed = ["checkpointing.save_dir=x", "trainer.default_root_dir=x", "logger=none"]
    arch = ["backbone=hf_dit", "data=openwebtext"]
    path = tmp_path / "release.ckpt"
    with initialize_config_dir(config_dir=configs, version_base=None):
        base = compose("config", overrides=fixed)
        saved = compose(
            "config", overrides=[*fixed, *arch, "model=small", "model.name=mdlm-768x12"]
        )
        run = [*fixed, *arch, "mode=ppl_eval", f"eval.checkpoint_path={path}"]
        small = compose("config", overrides=[*run, "model=small"])
        medium = compose("config", overrides=[*run, "model=medium"])
    saved = OmegaConf.to_container(saved, resolve=True)
    torch.save({"state_dict": {}, "unmask_config": saved}, path)
    assert eval_config(small, base).model.name == "mdlm-768x12"
    with pytest.raises(ConfigError, match=r"model\.hidden_size=1024 \(the checkpoint has"):
        eval_config(medium, base)


def test_an_evaluation_keeps_the_checkpoints_sampler_under_sampler_keys(tmp_path):
    """A run trained with sampler=semi_ar, evaluated with `sampler.steps=5`: the semi_ar
    sampler with 5 steps (before, naming any sampler key dropped the checkpoint's sampler for
    the default one); `sampler=ddpm` chooses another."""
    from hydra import compose, initialize_config_dir

    from diffusion.build import eval_config, names_group
    from diffusion.config import register_resolvers

    register_resolvers()
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    fixed = ["checkpointing.save_dir=x", "trainer.default_root_dir=x", "logger=none"]
    path = tmp_path / "run.ckpt"
    with initialize_config_dir(config_dir=configs, version_base=None):
        base = compose("config", overrides=fixed)
        saved = compose("config", overrides=[*fixed, "sampler=semi_ar", "sampler.steps=64"])
        run = [*fixed, "mode=sample_eval", f"eval.checkpoint_path={path}"]
        plain = compose("config", overrides=run)
        steps = compose("config", overrides=[*run, "sampler.steps=5"])
        chosen = compose("config", overrides=[*run, "sampler=ddpm", "sampler.steps=5"])
        restated = compose("config", overrides=[*run, "sampler=ddpm_cache"])
    torch.save({"state_dict": {}, "unmask_config": OmegaConf.to_container(saved)}, path)
    semi_ar = "samplers.semi_ar.SemiARSampler"
    out = eval_config(plain, base).sampler
    assert (out._target_, out.steps) == (semi_ar, 64)
    out = eval_config(steps, base).sampler
    assert (out._target_, out.steps, out.stride_length) == (semi_ar, 5, 64)
    out = eval_config(chosen, base).sampler
    assert (out._target_, out.steps) == ("samplers.ddpm.DDPMSampler", 5)
    # sampler=ddpm_cache restates the default: only the command line's names show the choice
    assert names_group(["x=1", "sampler=ddpm_cache"], "sampler")
    assert not names_group(["sampler.steps=5", "samplers=1"], "sampler")
    out = eval_config(restated, base, sampler_named=True).sampler
    assert out._target_ == "samplers.ddpm_cache.DDPMCacheSampler"


def test_an_evaluation_uses_this_machines_cache_not_the_checkpoints(tmp_path, monkeypatch):
    """A checkpoint trained elsewhere names that machine's cache folder and worker count: the
    evaluation runs with this machine's (UNMASK_CACHE, its num_proc), unless the command line
    names another."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from diffusion.build import eval_config
    from diffusion.config import register_resolvers

    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "here"))
    register_resolvers()
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base=None):
        fixed = ["checkpointing.save_dir=x", "trainer.default_root_dir=x", "logger=none"]
        base = compose("config", overrides=fixed)
        trained = OmegaConf.to_container(base, resolve=True)
        trained["data"] |= {"cache_dir": "/home/alice/.cache/unmask", "num_proc": 8}
        ckpt = tmp_path / "elsewhere.ckpt"
        torch.save({"state_dict": {}, "unmask_config": trained}, ckpt)
        over = [*fixed, "mode=ppl_eval", f"eval.checkpoint_path={ckpt}"]
        cfg = compose("config", overrides=over)
        named = compose("config", overrides=[*over, f"data.cache_dir={tmp_path / 'named'}"])
    out = eval_config(cfg, base)
    assert out.data.cache_dir == str(tmp_path / "here") and out.data.num_proc is None
    assert out.data.name == trained["data"]["name"]  # the rest of data is the checkpoint's
    assert eval_config(named, base).data.cache_dir == str(tmp_path / "named")


def test_a_text8_checkpoint_gets_mdlms_own_character_ids(tmp_path, monkeypatch):
    """MDLM's Text8Tokenizer has 35 ids: 8 specials ([MASK] = 4), then a-z and space. The
    converted checkpoint must tokenize with exactly those ids (our data=text8 vocabulary has
    another layout, and V - 1 = 34 is MDLM's space, not its mask)."""
    from diffusion.data.tokenizers import encode_text, from_spec

    monkeypatch.setitem(globals(), "V", 35)
    monkeypatch.setitem(globals(), "MASK", 4)
    raw, shadow = mdlm_params(seed=1), mdlm_params(seed=2)
    cfg = mdlm_config("subs", "dit", False)
    cfg.data = {"train": "text8", "valid": "text8", "tokenizer_name_or_path": "text8", "wrap": True}
    ckpt = load_checkpoint(str(write_lightning(tmp_path / "text8.ckpt", raw, shadow, cfg)))
    assert ckpt["unmask_format"]["mask_id"] == 4
    assert ckpt["unmask_config"]["data"]["name"] == "text8"
    data = ckpt["unmask_config"]["data"]
    assert data["source"]["chunk_chars"] == LEN  # its model.length, resolved
    tok = from_spec(ckpt["unmask_config"]["data"]["tokenizer"]).build(None, str(tmp_path), "t8")
    specials = ["[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]"]
    mdlm_ids = {t: i for i, t in enumerate([*specials, *"abcdefghijklmnopqrstuvwxyz "])}
    assert len(tok) == 35 and tok.mask_token_id == 4
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 3, 5)
    text = "Hi you [MASK]"  # lowercased; corpus text "[MASK]" is characters (brackets: [UNK])
    ids = encode_text(tok, [text])[0]
    assert ids == [mdlm_ids.get(c, 7) for c in text.lower()]
    x = torch.randint(0, 35, (2, LEN), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(converted_logits(ckpt, x), reference_logits(shadow, x), **TOL)
    # a text8-crop checkpoint: train pieces of 4 x its model.length, train rows cropped
    cfg.data = {**cfg.data, "train": "text8-crop"}
    crop = load_checkpoint(str(write_lightning(tmp_path / "crop.ckpt", raw, shadow, cfg)))
    data = crop["unmask_config"]["data"]
    assert data["name"] == "text8_crop" and data["crop_train"] is True
    assert data["source"]["chunk_chars"] == {"train": 4 * LEN, "validation": LEN, "test": LEN}
    # a text8 checkpoint whose embedding is not MDLM's 35 rows is refused, naming the file
    monkeypatch.setitem(globals(), "V", 36)
    bad = write_lightning(tmp_path / "bad.ckpt", mdlm_params(seed=1), mdlm_params(seed=2), cfg)
    with pytest.raises(FormatError, match=r"bad\.ckpt.*36 embedding rows"):
        load_checkpoint(str(bad))
