"""DiffuLLaMA (HKUNLP/DiffuLLaMA) loads with logit parity, in both of its layouts.

- the release, diffusionfamily/diffullama: DiffuLLaMA-training's `save_pretrained` of its
  LlamaForCausalLM (`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`), bf16,
  sharded with an index, Llama-2's config.json; inf_diffullama.py reads it with
  `LlamaForCausalLM.from_pretrained`;
- LLaMA-Factory's `DiscreteDiffusionModel` around a Llama (`embed_tokens`, `denoise_model.*`
  = the Llama body without its embedding, `lm_head`), one model.safetensors.

Their logits are compared with a forward written here from the description: RMSNorm,
rotate-half rotary on Llama's q/k layout, SwiGLU, attention without the causal mask, untied
head, and DiffuLLaMA's shift (position i reads i - 1's output; position 0 keeps its input
token, as its sampler copies x[:, 0]). Mask 811 and pad 30399 (LLaMA-Factory's loader) are
recorded. Negative twins (two layers swapped; q and k exchanged) must fail.
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

C, N, H, HID, V = 16, 2, 4, 40, 32000  # Llama-2's vocabulary: 811 and 30399 are real ids
D = C // H
MASK, PAD = 811, 30399
X = torch.tensor([[1, 5, MASK, 9, MASK, 2], [1, MASK, MASK, 3, 31999, 2]])


def llama_params(seed: int = 0) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's names (the release's), bf16 as released."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    p = {"model.embed_tokens.weight": r(V, C)}
    for i in range(N):
        b = f"model.layers.{i}."
        p |= {b + f"self_attn.{n}_proj.weight": r(C, C) for n in "qkvo"}
        p |= {b + "mlp.gate_proj.weight": r(HID, C), b + "mlp.up_proj.weight": r(HID, C)}
        p |= {b + "mlp.down_proj.weight": r(C, HID)}
        p |= {
            b + "input_layernorm.weight": 1 + r(C),
            b + "post_attention_layernorm.weight": 1 + r(C),
        }
    p |= {"model.norm.weight": 1 + r(C), "lm_head.weight": r(V, C)}
    return {k: v.to(torch.bfloat16) for k, v in p.items()}


def wrapped(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under DiscreteDiffusionModel's names."""
    out = {}
    for k, v in p.items():
        if k == "model.embed_tokens.weight":
            out["embed_tokens.weight"] = v
        elif k.startswith("model."):
            out["denoise_model." + k.removeprefix("model.")] = v
        else:
            out[k] = v
    return out


def reference_logits(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Bidirectional Llama + DiffuLLaMA's shift, float64: (B, L) -> (B, L, V)."""
    p = {k: v.double() for k, v in p.items()}
    B, L = x.shape
    eps, theta = 1e-5, 10000.0

    def rms(h, w):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * p[w]

    def lin(h, name):
        return h @ p[name + ".weight"].T

    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]  # (L, D/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):  # (B, H, L, D): the first half rotates with the second
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return t * cos + torch.cat([-b, a], -1) * sin

    h = p["model.embed_tokens.weight"][x]
    for i in range(N):
        b = f"model.layers.{i}."
        a = rms(h, b + "input_layernorm.weight")
        q, k, v = (
            lin(a, b + f"self_attn.{n}_proj").view(B, L, H, D).transpose(1, 2) for n in "qkv"
        )
        att = (rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v  # no mask
        h = h + lin(att.transpose(1, 2).reshape(B, L, C), b + "self_attn.o_proj")
        m = rms(h, b + "post_attention_layernorm.weight")
        swiglu = F.silu(lin(m, b + "mlp.gate_proj")) * lin(m, b + "mlp.up_proj")
        h = h + lin(swiglu, b + "mlp.down_proj")
    logits = rms(h, "model.norm.weight") @ p["lm_head.weight"].T
    first = torch.zeros_like(logits[:, :1]).scatter_(-1, x[:, :1, None], 1e4)
    return torch.cat([first, logits[:, :-1]], dim=1)


def llama2_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": C,
        "intermediate_size": HID,
        "num_hidden_layers": N,
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "vocab_size": V,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def write(folder: Path, tensors: dict[str, torch.Tensor], sharded: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama2_config()))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if not sharded:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def converted_logits(ckpt: dict, x: torch.Tensor) -> torch.Tensor:
    from diffusion.build import build_module

    class Vocab:  # what the data module reports for the release's tokenizer
        vocab_size, mask_id = V, MASK

    module = build_module(OmegaConf.create(ckpt["unmask_config"]), Vocab())
    module.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        return module.eval_backbone.eval()(x, None, None).double()


def twins(p: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    swapped, qk = dict(p), dict(p)
    for k in p:
        if k.startswith("model.layers.0."):
            other = k.replace("layers.0.", "layers.1.")
            swapped[k], swapped[other] = p[other], p[k]
    for i in range(N):
        q, k = (
            f"model.layers.{i}.self_attn.q_proj.weight",
            f"model.layers.{i}.self_attn.k_proj.weight",
        )
        qk[q], qk[k] = p[k], p[q]
    return [swapped, qk]


@pytest.mark.parametrize("layout", ["release", "DiscreteDiffusionModel"])
def test_diffullama_parity_shift_ids_and_twins(tmp_path, layout):
    p = llama_params()
    release = layout == "release"
    tensors = p if release else wrapped(p)
    folder = write(tmp_path / "diffullama", tensors, sharded=release)
    assert detect_format(folder) == "diffugpt"
    ckpt = load_checkpoint(str(folder))
    info = ckpt["unmask_format"]
    assert (info["variant"], info["mask_id"], info["pad_id"], info["shift"]) == (
        "diffullama",
        MASK,
        PAD,
        True,
    )
    assert info["layout"] == ("plain causal LM" if release else "DiscreteDiffusionModel")
    tok = ckpt["unmask_config"]["data"]["tokenizer"]
    assert (tok["mask_token_id"], tok["pad_token_id"]) == (MASK, PAD)
    assert ckpt["unmask_config"]["backbone"]["shift_first"] == "copy"
    want = reference_logits(p, X)
    torch.testing.assert_close(converted_logits(ckpt, X), want, atol=1e-5, rtol=1e-5)
    for j, twin in enumerate(twins(p)):
        bad = write(
            tmp_path / f"twin{j}" / "diffullama", twin if release else wrapped(twin), release
        )
        got = converted_logits(load_checkpoint(str(bad)), X)
        assert not torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_plain_llama_is_diffullama_only_by_name_or_format(tmp_path):
    """An AR Llama's files look like DiffuLLaMA's release: not claimed unless named."""
    folder = write(tmp_path / "llama-2-7b", llama_params(), sharded=False)
    with pytest.raises(FormatError, match="no known checkpoint format"):
        detect_format(folder)
    ckpt = load_checkpoint(str(folder), "diffugpt")
    assert ckpt["unmask_format"]["variant"] == "diffullama"


def test_diffullama_strict_errors(tmp_path):
    p = llama_params()
    missing = dict(p)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(FormatError, match=r"layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_checkpoint(str(write(tmp_path / "m" / "diffullama", missing, True)))
    extra = dict(p, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(C)})
    with pytest.raises(
        FormatError, match=r"model-0000\d-of-00002\.safetensors.*unexpected.*q_norm"
    ):
        load_checkpoint(str(write(tmp_path / "e" / "diffullama", extra, True)))
    wrong = dict(p, **{"model.norm.weight": torch.ones(C + 1)})
    with pytest.raises(FormatError, match=r"model\.norm\.weight.*shape"):
        load_checkpoint(str(write(tmp_path / "s" / "diffullama", wrong, True)))
    both = dict(wrapped(p), **{"model.norm.weight": p["model.norm.weight"].clone()})
    with pytest.raises(FormatError, match=r"model\.norm\.weight.*duplicates"):
        load_checkpoint(str(write(tmp_path / "d" / "diffullama", both, False)))
    folder = write(tmp_path / "cut" / "diffullama", p, True)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(FormatError, match=r"model-00002-of-00002\.safetensors.*truncated"):
        load_checkpoint(str(folder))


def word_tokenizer(folder: Path, size: int) -> None:
    """A word-level tokenizer with `size` ids saved into `folder` (LLaMA's 32000 ids, fast)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


def test_module_from_checkpoint_and_lm_eval_take_a_release_folder(tmp_path, monkeypatch):
    """The judge/lm-eval builder (diffusion.build.module_from_checkpoint) and lm-eval's
    loader take a published folder: converted once, rebuilt with the release's tokenizer
    and ids, the same logits."""
    from diffusion.build import module_from_checkpoint
    from diffusion.evaluation.lm_eval import load_checkpoint as lm_eval_load

    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "cache"))
    p = llama_params()
    folder = write(tmp_path / "diffullama", p, sharded=True)
    word_tokenizer(folder, V)
    want = reference_logits(p, X)
    for load in (lambda f: module_from_checkpoint(f, "checkpoint"), lm_eval_load):
        saved, dm, module = load(str(folder))
        assert (dm.mask_id, dm.tokenizer.pad_token_id, dm.vocab_size) == (MASK, PAD, V)
        assert saved.backbone.shift and saved.model.length == 2048
        with torch.no_grad():
            got = module.eval_backbone.eval()(X, None, None).double()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "cache" / "converted").glob("diffugpt-*.ckpt"))) == 1
    with pytest.raises(FormatError, match=r"checkpoint=.*nowhere.*not found"):
        module_from_checkpoint(str(tmp_path / "nowhere"), "checkpoint")
