"""DiffuGPT (diffugpt-s / -m) and DiffuLLaMA's DiscreteDiffusionModel safetensors load with parity.

Tiny synthetic releases laid out as HKUNLP/DiffuLLaMA saves them (`embed_tokens`,
`denoise_model.*` = the base model's body without its embedding, a tied GPT-2 head kept under
one name by safetensors' save_model, the base model's own config.json) are converted and
rebuilt like our own .ckpt; logits are compared with a bidirectional GPT-2 forward written here
(Conv1D weights, LayerNorm with bias, gelu_new, no causal mask, tied head) under DiffuGPT's
shift (position i reads i - 1's output; position 0 keeps its input token). Negative twins (two
blocks swapped; q and k exchanged inside c_attn) must fail.
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

C, N, H, P = 16, 2, 2, 32
D = C // H


def gpt2_params(V: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    p = {"embed_tokens.weight": r(V, C), "denoise_model.wpe.weight": r(P, C)}
    for i in range(N):
        b = f"denoise_model.h.{i}."
        p |= {b + "ln_1.weight": 1 + r(C), b + "ln_1.bias": r(C)}
        p |= {b + "attn.c_attn.weight": r(C, 3 * C), b + "attn.c_attn.bias": r(3 * C)}
        p |= {b + "attn.c_proj.weight": r(C, C), b + "attn.c_proj.bias": r(C)}
        p |= {b + "ln_2.weight": 1 + r(C), b + "ln_2.bias": r(C)}
        p |= {b + "mlp.c_fc.weight": r(C, 4 * C), b + "mlp.c_fc.bias": r(4 * C)}
        p |= {b + "mlp.c_proj.weight": r(4 * C, C), b + "mlp.c_proj.bias": r(C)}
    p |= {"denoise_model.ln_f.weight": 1 + r(C), "denoise_model.ln_f.bias": r(C)}
    return p


def reference_logits(p, x):
    """Bidirectional GPT-2 + DiffuGPT's shift, float64: (B, L) -> (B, L, V)."""
    p = {k: v.double() for k, v in p.items()}
    B, L = x.shape

    def ln(h, name):
        return F.layer_norm(h, (C,), p[name + ".weight"], p[name + ".bias"], 1e-5)

    def conv1d(h, name):  # GPT-2's Conv1D: x @ W + b with W (in, out)
        return h @ p[name + ".weight"] + p[name + ".bias"]

    def gelu_new(t):
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))

    h = p["embed_tokens.weight"][x] + p["denoise_model.wpe.weight"][:L][None]
    for i in range(N):
        b = f"denoise_model.h.{i}."
        q, k, v = conv1d(ln(h, b + "ln_1"), b + "attn.c_attn").split(C, dim=-1)
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v  # no causal mask
        h = h + conv1d(att.transpose(1, 2).reshape(B, L, C), b + "attn.c_proj")
        h = h + conv1d(gelu_new(conv1d(ln(h, b + "ln_2"), b + "mlp.c_fc")), b + "mlp.c_proj")
    logits = ln(h, "denoise_model.ln_f") @ p["embed_tokens.weight"].T  # tied head
    first = torch.full_like(logits[:, :1], 0.0).scatter_(-1, x[:, :1, None], 1e4)
    return torch.cat([first, logits[:, :-1]], dim=1)


def write(folder: Path, V: int, params, with_head: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_embd": C,
        "n_layer": N,
        "n_head": H,
        "n_positions": P,
        "n_ctx": P,
        "vocab_size": V,
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": P}},
    }
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in params.items()}
    if with_head:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def converted_logits(ckpt, x, V, mask):
    from diffusion.build import build_module

    class Vocab:
        vocab_size, mask_id = V, mask

    module = build_module(OmegaConf.create(ckpt["unmask_config"]), Vocab())
    module.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        return module.eval_backbone.eval()(x, None, None).double()


@pytest.mark.parametrize(
    "V,mask,variant", [(50257, 10541, "diffugpt-s"), (50258, 50257, "diffugpt-m")]
)
def test_diffugpt_parity_shift_and_twins(tmp_path, V, mask, variant):
    p = gpt2_params(V)
    folder = write(tmp_path / variant, V, p, with_head=variant.endswith("m"))
    assert detect_format(folder) == "diffugpt"
    ckpt = load_checkpoint(str(folder))
    info = ckpt["unmask_format"]
    assert (info["variant"], info["mask_id"], info["shift"]) == (variant, mask, True)
    assert ckpt["unmask_config"]["data"]["tokenizer"]["mask_token_id"] == mask
    x = torch.tensor([[50256, 5, mask, 9, mask, 2], [7, mask, mask, 3, 4, 50256]])
    want = reference_logits(p, x)
    got = converted_logits(ckpt, x, V, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    swapped = dict(p)
    for k in p:
        if k.startswith("denoise_model.h.0."):
            o = k.replace("h.0.", "h.1.")
            swapped[k], swapped[o] = p[o], p[k]
    qk = dict(p)
    for i in range(N):
        w, b = (
            p[f"denoise_model.h.{i}.attn.c_attn.weight"],
            p[f"denoise_model.h.{i}.attn.c_attn.bias"],
        )
        qk[f"denoise_model.h.{i}.attn.c_attn.weight"] = torch.cat(
            [w[:, C : 2 * C], w[:, :C], w[:, 2 * C :]], 1
        )
        qk[f"denoise_model.h.{i}.attn.c_attn.bias"] = torch.cat([b[C : 2 * C], b[:C], b[2 * C :]])
    for j, twin in enumerate((swapped, qk)):
        bad = load_checkpoint(str(write(tmp_path / f"twin{j}", V, twin)))
        assert not torch.allclose(converted_logits(bad, x, V, mask), want, atol=1e-5, rtol=1e-5)


def test_diffugpt_strict_errors(tmp_path):
    V = 50257
    p = gpt2_params(V)
    missing = dict(p)
    del missing["denoise_model.h.1.ln_2.bias"]
    with pytest.raises(FormatError, match=r"model\.transformer\.h\.1\.ln_2\.bias.*missing"):
        load_checkpoint(str(write(tmp_path / "m", V, missing)))
    extra = dict(p, **{"denoise_model.h.0.attn.q_norm.weight": torch.ones(C)})
    with pytest.raises(FormatError, match=r"model\.safetensors.*unexpected.*q_norm"):
        load_checkpoint(str(write(tmp_path / "e", V, extra)), "diffugpt")
    wrong = dict(p, **{"denoise_model.wpe.weight": torch.zeros(P + 1, C)})
    with pytest.raises(FormatError, match=r"model\.safetensors.*wpe\.weight.*shape"):
        load_checkpoint(str(write(tmp_path / "s", V, wrong)), "diffugpt")
    folder = write(tmp_path / "cut", V, p)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(FormatError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(str(folder), "diffugpt")
    untied = dict(p, **{"lm_head.weight": torch.zeros(V, C)})
    with pytest.raises(FormatError, match="tied"):
        load_checkpoint(str(write(tmp_path / "u", V, untied)), "diffugpt")


def test_release_tokenizer_names_the_checkpoint_ids(tiny_judge):
    """DiffuGPT-s style: an existing token becomes [MASK], so dm.mask_id is the checkpoint's."""
    from diffusion.data.release_tokenizer import ReleaseTokenizer

    tok = ReleaseTokenizer(tiny_judge, mask_token_id=7, pad_token_id=8).build(None, "", "x")
    assert (tok.mask_token_id, tok.pad_token_id) == (7, 8)
    tok = ReleaseTokenizer(tiny_judge, mask_token_id=10**6).build
    with pytest.raises(Exception, match="outside"):
        tok(None, "", "x")


def test_a_release_folder_as_judge_is_converted_and_refused_when_not_ar(
    tmp_path, tiny_judge, monkeypatch
):
    """eval.gen_ppl_eval_model_name_or_path=<DiffuGPT folder>: transformers would load it as a
    GPT-2 with every weight missing (randomly initialised, no error); the judge builder
    converts it instead and refuses it for not giving exact likelihoods. A plain Hugging Face
    folder still goes to transformers."""
    import shutil

    from transformers import AutoTokenizer

    from diffusion.config import ConfigError
    from diffusion.evaluation.judges import GenPPLJudge, build_judge, is_release_folder

    n = len(AutoTokenizer.from_pretrained(tiny_judge))  # DiffuGPT-m style: [MASK] = n
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "cache"))
    folder = write(tmp_path / "diffugpt-m", n + 1, gpt2_params(n + 1), with_head=True)
    for f in Path(tiny_judge).glob("*token*"):
        shutil.copy(f, folder / f.name)
    assert is_release_folder(str(folder)) and not is_release_folder(tiny_judge)
    cfg = OmegaConf.create({"eval": {"gen_ppl_eval_model_name_or_path": str(folder)}})
    cfg.eval.gen_ppl_batch_size = 2
    with pytest.raises(ConfigError, match=r"diffugpt-m is not an AR checkpoint"):
        build_judge(cfg, torch.device("cpu"))
    cfg.eval.gen_ppl_eval_model_name_or_path = tiny_judge
    assert isinstance(build_judge(cfg, torch.device("cpu")), GenPPLJudge)
