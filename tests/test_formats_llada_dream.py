"""LLaDA-8B and Dream-7B layouts load onto transformers' Llama / Qwen2 made bidirectional.

Tiny synthetic releases laid out as the originals (LLaDA: OLMo-style `model.transformer.*`
names, its config.json fields, sharded safetensors with an index; Dream: Qwen2 names with q/k/v
biases, `model_type: Dream`) are converted and rebuilt like our own .ckpt; their logits are
compared with forwards written here from the published descriptions (LLaDA: pre-norm Llama
blocks without causal mask, SwiGLU with ff_proj as the gate; Dream: the same on Qwen2 with
biases, logits shifted right by one). Negative twins (q and k exchanged; two layers swapped)
must fail. No trust_remote_code anywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from models.formats import FormatError, detect_format, load_checkpoint

C, N, H, KV, HID = 16, 2, 4, 2, 24
D = C // H


def rand(g):
    return lambda *s: torch.randn(*s, generator=g) * 0.3


def reference(
    p: dict, x, names: dict, theta: float, eps: float, bias: bool, shift: bool, pad=None, pos=None
):
    """A bidirectional Llama forward from its description, float64, with per-format names.
    `pad` (B, L) bool: keys no query may attend to; `pos` (B, L): rotary positions."""
    p = {k: v.double() for k, v in p.items()}
    B, L = x.shape
    pos = torch.arange(L).expand(B, L) if pos is None else pos
    blocked = torch.zeros(B, 1, 1, L, dtype=torch.bool) if pad is None else pad[:, None, None]

    def rms(h, w):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * w

    def lin(h, name, with_bias=False):
        out = h @ p[name + ".weight"].T
        return out + p[name + ".bias"] if with_bias else out

    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos.double()[:, None, :, None] * inv  # (B, 1, L, D/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):  # (B, heads, L, D)
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return t * cos + torch.cat([-b, a], -1) * sin

    h = p[names["embed"]][x]
    for i in range(N):
        n = lambda key, i=i: names[key].format(i=i)  # noqa: E731
        a = rms(h, p[n("attn_norm")])
        q = lin(a, n("q"), bias).view(B, L, H, D).transpose(1, 2)
        k = lin(a, n("k"), bias).view(B, L, KV, D).transpose(1, 2)
        v = lin(a, n("v"), bias).view(B, L, KV, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(blocked, -math.inf)
        att = scores.softmax(-1) @ v
        h = h + lin(att.transpose(1, 2).reshape(B, L, C), n("o"))
        m = rms(h, p[n("ff_norm")])
        h = h + lin(F.silu(lin(m, n("gate"))) * lin(m, n("up")), n("down"))
    logits = rms(h, p[names["norm"]]) @ p[names["head"]].T
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    return logits


def converted_logits(ckpt, x, V, mask):
    from diffusion.build import build_module

    class Vocab:
        vocab_size, mask_id = V, mask

    module = build_module(OmegaConf.create(ckpt["unmask_config"]), Vocab())
    module.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        return module.eval_backbone.eval()(x, None, None).double()


def write_sharded(folder: Path, config: dict, tensors: dict) -> Path:
    """config.json + two safetensors shards + model.safetensors.index.json (as the hub has)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = list(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, ks in shards.items():
        save_file(
            {k: tensors[k].contiguous() for k in ks}, str(folder / name), metadata={"format": "pt"}
        )
        weight_map.update({k: name for k in ks})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


# ---- LLaDA ------------------------------------------------------------------------------------
LV, LMASK = 126464, 126336
LLADA_NAMES = {
    "embed": "model.transformer.wte.weight",
    "attn_norm": "model.transformer.blocks.{i}.attn_norm.weight",
    "q": "model.transformer.blocks.{i}.q_proj",
    "k": "model.transformer.blocks.{i}.k_proj",
    "v": "model.transformer.blocks.{i}.v_proj",
    "o": "model.transformer.blocks.{i}.attn_out",
    "ff_norm": "model.transformer.blocks.{i}.ff_norm.weight",
    "gate": "model.transformer.blocks.{i}.ff_proj",
    "up": "model.transformer.blocks.{i}.up_proj",
    "down": "model.transformer.blocks.{i}.ff_out",
    "norm": "model.transformer.ln_f.weight",
    "head": "model.transformer.ff_out.weight",
}


def llada_config() -> dict:
    return {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": C,
        "embedding_size": LV,
        "eos_token_id": 126081,
        "pad_token_id": 126081,
        "mask_token_id": LMASK,
        "include_bias": False,
        "include_qkv_bias": False,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "max_sequence_length": 64,
        "mlp_hidden_size": HID,
        "n_heads": H,
        "n_kv_heads": KV,
        "n_layers": N,
        "rms_norm_eps": 1e-5,
        "rope": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "vocab_size": LV,
        "weight_tying": False,
        "torch_dtype": "bfloat16",
    }


def llada_params(seed=0):
    r = rand(torch.Generator().manual_seed(seed))
    p = {LLADA_NAMES["embed"]: r(LV, C)}
    for i in range(N):
        b = f"model.transformer.blocks.{i}."
        p |= {b + "attn_norm.weight": 1 + r(C), b + "ff_norm.weight": 1 + r(C)}
        p |= {
            b + "q_proj.weight": r(C, C),
            b + "k_proj.weight": r(KV * D, C),
            b + "v_proj.weight": r(KV * D, C),
        }
        p |= {
            b + "attn_out.weight": r(C, C),
            b + "ff_proj.weight": r(HID, C),
            b + "up_proj.weight": r(HID, C),
        }
        p |= {b + "ff_out.weight": r(C, HID)}
    p |= {LLADA_NAMES["norm"]: 1 + r(C), LLADA_NAMES["head"]: r(LV, C)}
    return p


def swap_layers(p, fmt):
    q = dict(p)
    a, b = ("blocks.0.", "blocks.1.") if fmt == "llada" else ("layers.0.", "layers.1.")
    for k in p:
        if a in k:
            q[k], q[k.replace(a, b)] = p[k.replace(a, b)], p[k]
    return q


X = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 0, 11, 12, 13]])


def test_llada_parity_and_twins(tmp_path):
    p = llada_params()
    folder = write_sharded(tmp_path / "LLaDA-8B-Base", llada_config(), p)
    assert detect_format(folder) == "llada"
    ckpt = load_checkpoint(str(folder))
    assert ckpt["unmask_format"]["mask_id"] == LMASK
    x = X.clone()
    x[0, 1] = LMASK
    want = reference(p, x, LLADA_NAMES, 500000.0, 1e-5, bias=False, shift=False)
    torch.testing.assert_close(converted_logits(ckpt, x, LV, LMASK), want, atol=1e-5, rtol=1e-5)
    qk = dict(p)
    for i in range(N):  # q and k exchanged (only the shared KV width rows of q fit k's shape)
        b = f"model.transformer.blocks.{i}."
        qk[b + "k_proj.weight"] = p[b + "q_proj.weight"][: KV * D].clone()
    for j, twin in enumerate((swap_layers(p, "llada"), qk)):
        bad = load_checkpoint(str(write_sharded(tmp_path / f"twin{j}", llada_config(), twin)))
        assert not torch.allclose(converted_logits(bad, x, LV, LMASK), want, atol=1e-5, rtol=1e-5)


def test_llada_strict_errors(tmp_path):
    p = llada_params()
    missing = dict(p)
    del missing["model.transformer.blocks.1.up_proj.weight"]
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_checkpoint(str(write_sharded(tmp_path / "m", llada_config(), missing)))
    extra = dict(p, **{"model.transformer.blocks.0.q_proj.bias": torch.zeros(C)})
    with pytest.raises(FormatError, match=r"safetensors.*unexpected.*"):
        load_checkpoint(str(write_sharded(tmp_path / "e", llada_config(), extra)))
    wrong = dict(p, **{"model.transformer.blocks.0.k_proj.weight": torch.zeros(C, C)})
    with pytest.raises(FormatError, match=r"safetensors.*k_proj\.weight.*shape"):
        load_checkpoint(str(write_sharded(tmp_path / "s", llada_config(), wrong)))
    folder = write_sharded(tmp_path / "cut", llada_config(), p)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(FormatError, match=r"model-00002-of-00002\.safetensors.*truncated"):
        load_checkpoint(str(folder))
    cfg = dict(llada_config(), weight_tying=True)
    with pytest.raises(FormatError, match="weight_tying"):
        load_checkpoint(str(write_sharded(tmp_path / "tied", cfg, p)))


# ---- Dream ------------------------------------------------------------------------------------
DV, DMASK = 152064, 151666
DREAM_NAMES = {
    "embed": "model.embed_tokens.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj",
    "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj",
    "o": "model.layers.{i}.self_attn.o_proj",
    "ff_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj",
    "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
    "norm": "model.norm.weight",
    "head": "lm_head.weight",
}


def dream_config() -> dict:
    return {
        "architectures": ["DreamModel"],
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "model_type": "Dream",
        "hidden_act": "silu",
        "hidden_size": C,
        "intermediate_size": HID,
        "num_hidden_layers": N,
        "num_attention_heads": H,
        "num_key_value_heads": KV,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": DV,
        "mask_token_id": DMASK,
        "pad_token_id": 151643,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    }


def dream_params(seed=0):
    r = rand(torch.Generator().manual_seed(seed))
    p = {"model.embed_tokens.weight": r(DV, C)}
    for i in range(N):
        b = f"model.layers.{i}."
        p |= {
            b + "input_layernorm.weight": 1 + r(C),
            b + "post_attention_layernorm.weight": 1 + r(C),
        }
        for name, rows in (("q", C), ("k", KV * D), ("v", KV * D)):
            p |= {
                b + f"self_attn.{name}_proj.weight": r(rows, C),
                b + f"self_attn.{name}_proj.bias": r(rows),
            }
        p |= {b + "self_attn.o_proj.weight": r(C, C)}
        p |= {
            b + "mlp.gate_proj.weight": r(HID, C),
            b + "mlp.up_proj.weight": r(HID, C),
            b + "mlp.down_proj.weight": r(C, HID),
        }
    p |= {"model.norm.weight": 1 + r(C), "lm_head.weight": r(DV, C)}
    return p


def test_dream_parity_shift_and_twins(tmp_path):
    p = dream_params()
    folder = write_sharded(tmp_path / "Dream-v0-Base-7B", dream_config(), p)
    assert detect_format(folder) == "dream"
    ckpt = load_checkpoint(str(folder))
    assert ckpt["unmask_format"]["shift"] is True
    x = X.clone()
    x[1, 2] = DMASK
    want = reference(p, x, DREAM_NAMES, 1e6, 1e-6, bias=True, shift=True)
    got = converted_logits(ckpt, x, DV, DMASK)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unshifted = reference(p, x, DREAM_NAMES, 1e6, 1e-6, bias=True, shift=False)
    assert not torch.allclose(got, unshifted, atol=1e-5)  # the shift is real
    qk = dict(p)
    for i in range(N):
        b = f"model.layers.{i}.self_attn."
        qk[b + "k_proj.weight"] = p[b + "q_proj.weight"][: KV * D].clone()
        qk[b + "k_proj.bias"] = p[b + "q_proj.bias"][: KV * D].clone()
    for j, twin in enumerate((swap_layers(p, "dream"), qk)):
        bad = load_checkpoint(str(write_sharded(tmp_path / f"twin{j}", dream_config(), twin)))
        assert not torch.allclose(converted_logits(bad, x, DV, DMASK), want, atol=1e-5, rtol=1e-5)
    missing = dict(p)
    del missing["model.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(FormatError, match=r"v_proj\.bias.*missing"):
        load_checkpoint(str(write_sharded(tmp_path / "m", dream_config(), missing)))


def test_dream_left_padding_gives_the_unpadded_logits(tmp_path):
    """Dream's diffusion_generate with an attention mask masks the padded keys and numbers the
    rotary positions from each row's first real token (cumsum - 1). Rotary attention depends
    only on position offsets, so masking the padded keys (as our backbone does) is enough: a
    left-padded row gives the logits of the same row unpadded, and Dream's renumbered
    reference equals ours. Without the mask the padding leaks in."""
    p = dream_params()
    ckpt = load_checkpoint(str(write_sharded(tmp_path / "Dream-v0-Base-7B", dream_config(), p)))
    from diffusion.build import build_module

    class Vocab:
        vocab_size, mask_id = DV, DMASK

    module = build_module(OmegaConf.create(ckpt["unmask_config"]), Vocab())
    module.load_state_dict(ckpt["state_dict"], strict=True)
    backbone = module.eval_backbone.eval()
    pad_id = 151643
    x = torch.tensor([[pad_id, pad_id, 5, 9, DMASK, DMASK], [7, 8, 5, 9, DMASK, DMASK]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)  # Dream's tok_idx
    dream = reference(p, x, DREAM_NAMES, 1e6, 1e-6, bias=True, shift=True, pad=attn == 0, pos=pos)
    with torch.no_grad():
        got = backbone(x, None, attn).double()
        leaky = backbone(x, None, None).double()
    torch.testing.assert_close(got[:, 3:], dream[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], dream[1], atol=1e-5, rtol=1e-5)
    alone = reference(p, x[:1, 2:], DREAM_NAMES, 1e6, 1e-6, bias=True, shift=True)
    torch.testing.assert_close(got[0, 3:], alone[0, 1:], atol=1e-5, rtol=1e-5)  # as unpadded
    assert not torch.allclose(leaky[0, 3:], alone[0, 1:], atol=1e-5)


def test_special_ids_and_config_defaults(tmp_path):
    """The ids the releases use (LLaDA generate.py / config.json: mask 126336, EOS = pad
    126081; Dream's DreamConfig: mask 151666, pad = EOS 151643) are recorded and named to the
    tokenizer; where Dream's config.json is silent, DreamConfig's defaults apply (rope_theta
    10000, pad 151643); a pad id equal to the mask id is refused, as LLaDA's generate.py does."""
    ckpt = load_checkpoint(str(write_sharded(tmp_path / "llada", llada_config(), llada_params())))
    info, tok = ckpt["unmask_format"], ckpt["unmask_config"]["data"]["tokenizer"]
    assert (info["mask_id"], info["eos_id"], info["pad_id"]) == (126336, 126081, 126081)
    assert (tok["mask_token_id"], tok["pad_token_id"]) == (126336, 126081)
    assert info["shift"] is False and ckpt["unmask_config"]["backbone"]["shift"] is False
    silent = {k: v for k, v in dream_config().items() if k not in ("rope_theta", "pad_token_id")}
    ckpt = load_checkpoint(str(write_sharded(tmp_path / "dream", silent, dream_params())))
    info, cfg = ckpt["unmask_format"], ckpt["unmask_config"]
    assert (info["mask_id"], info["pad_id"], info["eos_id"]) == (151666, 151643, 151643)
    assert cfg["data"]["tokenizer"]["pad_token_id"] == 151643
    assert cfg["backbone"]["hf_config"]["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["backbone"]["shift"] is True and cfg["backbone"]["shift_first"] == "own"
    clash = dict(llada_config(), pad_token_id=126336)
    with pytest.raises(FormatError, match="pad_token_id equals mask_token_id"):
        load_checkpoint(str(write_sharded(tmp_path / "clash", clash, llada_params())))
