"""BD3-LM's Hugging Face releases (kuleshov-group/bd3lm-owt-block_size4/8/16) load with parity.

A tiny synthetic release laid out as BD3-LM's `push_to_hf.py` writes it (config.json of its
`BD3LMConfig`, `backbone.*` in MDLM's DiT layout, the rotary table, the learned clipping
`sampling_eps_min` / `sampling_eps_max`) is converted with `models.formats`, the module is
rebuilt from the converted dict, and its training-pass logits (x_t + x_0 under the block-causal
mask) and its cached block-by-block decoding logits are compared with a forward written here
from BD3-LM's description (the mask built pair by pair from its three parts), not with
unmask's modules. Negative twins (two blocks swapped, q and k exchanged, another block size)
must fail the same comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from models.formats import FormatError, detect_format, load_checkpoint
from tests.test_formats_mdlm import (
    COND,
    LEN,
    MASK,
    TOL,
    C,
    H,
    N,
    V,
    converted_module,
    inv_freq,
    mdlm_params,
    reference_logits,
    swap_blocks,
    swap_qk,
)

BLOCK = 4  # LEN = 12: three blocks


def bd3lm_allowed(length: int, block: int) -> torch.Tensor:
    """(2L, 2L) which keys each query of x_t + x_0 sees, from BD3-LM's description: a noisy
    block sees itself (block diagonal) and the clean blocks before it (offset block-causal);
    a clean block sees the clean blocks up to itself (block-causal)."""
    allowed = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_clean, k_clean = q >= length, k >= length
            bq, bk = (q % length) // block, (k % length) // block
            if q_clean:
                allowed[q, k] = k_clean and bk <= bq
            else:
                allowed[q, k] = (not k_clean and bq == bk) or (k_clean and bk < bq)
    return allowed


def reference_bd3lm(p, x_t: torch.Tensor, x0: torch.Tensor, block: int) -> torch.Tensor:
    """BD3-LM's training pass: logits (B, L, V) of x_t given x_0, both halves at positions
    0 .. L - 1."""
    L = x_t.shape[1]
    pos = torch.cat([torch.arange(L), torch.arange(L)])
    both = torch.cat([x_t, x0], 1)
    return reference_logits(p, both, allowed=bd3lm_allowed(L, block), positions=pos)[:, :L]


def write_release(
    folder: Path,
    params: dict[str, torch.Tensor],
    block: int = BLOCK,
    clip: tuple[float, float] | None = (0.3, 0.8),
    **config_changes,
) -> Path:
    """A release folder as BD3-LM's push_to_hf.py leaves it (clip=None: no var_min scalars)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"kuleshov-group/bd3lm-owt-block_size{block}"
    config = {
        "_name_or_path": name,
        "architectures": ["BD3LM"],
        "auto_map": {
            "AutoConfig": f"{name}--configuration_bd3lm.BD3LMConfig",
            "AutoModelForMaskedLM": f"{name}--modeling_bd3lm.BD3LM",
        },
        "model_type": "bd3lm",
        "block_size": block,
        "vocab_size": V,
        "model_length": LEN,
        "cross_attn": True,
        "adaln": True,
        "attn_backend": "flex",
        "causal": False,
        "hidden_dim": C,
        "cond_dim": COND,
        "n_blocks": N,
        "n_heads": H,
        "dropout": 0.1,
        "time_conditioning": False,
        "var_min": clip is not None,
        "sampling_eps_min": 1e-3,
        "sampling_eps_max": 0.999,
        "return_dict": False,
        "torch_dtype": "float32",
        "transformers_version": "4.49.0",
    } | config_changes
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {f"backbone.{k}": v.contiguous() for k, v in params.items()}
    tensors["backbone.rotary_emb.inv_freq"] = inv_freq()
    if clip is not None:  # registered buffers of the HF module: 0-dim float32
        tensors["sampling_eps_min"] = torch.tensor(clip[0])
        tensors["sampling_eps_max"] = torch.tensor(clip[1])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def training_logits(ckpt, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    module = converted_module(ckpt)
    with torch.no_grad():
        ones = torch.ones_like(x_t)
        return module.objective.backbone_logits(module.eval_backbone, x_t, x0, ones).double()


def draws(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V - 1, (2, LEN), generator=g)
    x_t = torch.where(torch.rand(2, LEN, generator=g) < 0.5, MASK, x0)
    return x_t, x0


def test_bd3lm_hf_logit_parity_and_negative_twins(tmp_path):
    p = mdlm_params()
    folder = write_release(tmp_path / "bd3lm-owt-block_size4", p)
    assert detect_format(folder) == "bd3lm_hf"
    ckpt = load_checkpoint(str(folder))
    cfg = ckpt["unmask_config"]
    assert cfg["backbone"]["_target_"] == "models.mdlm_dit.MDLMDiT"
    assert cfg["parameterization"]["_target_"] == "diffusion.objectives.bd3lm.BD3LM"
    assert cfg["parameterization"]["block_size"] == BLOCK and cfg["model"]["length"] == LEN
    assert cfg["data"]["tokenizer"] == "gpt2" and ckpt["unmask_format"]["mask_id"] == MASK
    layout = cfg["data"]["layout"]  # BD3-LM's OWT rows: no bookends, EOS after each document
    assert layout["_target_"].endswith("MDLMWrap") and layout["special_tokens"] is False
    x_t, x0 = draws()
    want = reference_bd3lm(p, x_t, x0, BLOCK)
    torch.testing.assert_close(training_logits(ckpt, x_t, x0), want, **TOL)
    # block size 2 is read from the config: it equals the block-2 reference, not the block-4 one
    two = load_checkpoint(str(write_release(tmp_path / "two", p, block=2)))
    got_two = training_logits(two, x_t, x0)
    torch.testing.assert_close(got_two, reference_bd3lm(p, x_t, x0, 2), **TOL)
    assert not torch.allclose(got_two, want, **TOL)
    for i, twin in enumerate((swap_blocks(p), swap_qk(p))):
        bad = load_checkpoint(str(write_release(tmp_path / f"twin{i}", twin)))
        assert not torch.allclose(training_logits(bad, x_t, x0), want, **TOL)


def test_cached_block_decoding_equals_the_training_pass(tmp_path):
    """BD3-LM decodes a block against the keys/values of the clean blocks before it: our span
    KV cache on the converted MDLM-layout DiT gives the training pass's logits of that block."""
    p = mdlm_params(seed=3)
    module = converted_module(load_checkpoint(str(write_release(tmp_path / "rel", p))))
    backbone = module.eval_backbone
    x_t, x0 = draws(1)
    want = reference_bd3lm(p, x_t, x0, BLOCK)
    cache = backbone.init_cache(2)
    with torch.no_grad():
        for start in range(0, LEN, BLOCK):
            end = start + BLOCK
            noisy = backbone.forward_span(x_t[:, start:end], start, cache, write=False)
            torch.testing.assert_close(noisy.double(), want[:, start:end], **TOL)
            backbone.forward_span(x0[:, start:end], start, cache, write=True)  # commit it clean
    assert cache.length == LEN


def test_block_sampler_draws_from_the_converted_release(tmp_path):
    """sampler=block on the converted release: every position decoded, and each cached call
    equals the model's full recomputation of that canvas (the sampler's exactness)."""
    from samplers.block import BlockSampler
    from tests.test_bd3lm import recording

    module = converted_module(
        load_checkpoint(str(write_release(tmp_path / "rel", mdlm_params(seed=4))))
    )
    denoiser = module.denoiser()
    calls = recording(denoiser)
    g = torch.Generator().manual_seed(0)
    out = BlockSampler(steps=3).sample(denoiser, 2, LEN, generator=g)
    assert out.tokens.shape == (2, LEN) and bool((out.tokens != MASK).all())
    assert len(calls) >= LEN // BLOCK
    for canvas, start, end, cached in calls:
        full_canvas = canvas.clone()
        full_canvas[:, end:] = MASK
        full = type(denoiser).log_p_x0(denoiser, full_canvas, torch.ones(2))[:, start:end]
        real = cached > -1e5
        assert torch.equal(real, full > -1e5)
        assert float((cached[real] - full[real]).abs().max()) <= 1e-4


def test_the_learned_clipping_is_kept_and_the_full_interval_is_unclipped(tmp_path):
    p = mdlm_params()
    ckpt = load_checkpoint(str(write_release(tmp_path / "clipped", p, clip=(0.45, 0.95))))
    noise = ckpt["unmask_config"]["noise"]
    assert noise["_target_"] == "diffusion.noise.Clipped"
    assert (noise["beta"], noise["omega"]) == pytest.approx((0.45, 0.95))
    torch.testing.assert_close(
        converted_module(ckpt).objective.clip, torch.tensor([0.45, 0.95], dtype=torch.float64)
    )
    full = load_checkpoint(str(write_release(tmp_path / "full", p, clip=(1e-3, 1.0))))
    assert full["unmask_config"]["noise"]["_target_"] == "diffusion.noise.LogLinear"
    assert converted_module(full).objective.clip.tolist() == [0.0, 0.0]
    plain = load_checkpoint(str(write_release(tmp_path / "plain", p, clip=None)))
    assert plain["unmask_config"]["parameterization"]["var_min"] is False
    assert plain["unmask_config"]["noise"]["_target_"] == "diffusion.noise.LogLinear"


def _expect(folder: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        load_checkpoint(str(folder), fmt="bd3lm_hf")


def test_bd3lm_hf_strict_errors(tmp_path):
    p = mdlm_params()
    for key, value in (("adaln", False), ("cross_attn", False), ("time_conditioning", True)):
        _expect(write_release(tmp_path / key, p, **{key: value}), rf"config\.json: {key}=")
    _expect(write_release(tmp_path / "b5", p, block=5), r"block_size=5 must .* divide")
    without_min = write_release(tmp_path / "nomin", p)
    from safetensors.torch import load_file

    tensors = load_file(str(without_min / "model.safetensors"))
    del tensors["sampling_eps_min"]
    save_file(tensors, str(without_min / "model.safetensors"))
    _expect(without_min, r"'sampling_eps_min' is missing")
    # scalars where the config says var_min=false: not this format's layout
    extra = write_release(tmp_path / "extra", p)
    cfg = json.loads((extra / "config.json").read_text()) | {"var_min": False}
    (extra / "config.json").write_text(json.dumps(cfg))
    _expect(extra, r"unexpected tensor 'sampling_eps_m")
    _expect(write_release(tmp_path / "bad_clip", p, clip=(0.9, 0.2)), r"not an interval")
    no_block = write_release(tmp_path / "noblock", p)
    cfg = json.loads((no_block / "config.json").read_text())
    del cfg["block_size"]
    (no_block / "config.json").write_text(json.dumps(cfg))
    _expect(no_block, r"\['block_size'\] missing")
    short = dict(p)
    short["blocks.0.attn_qkv.weight"] = p["blocks.0.attn_qkv.weight"][:-1]
    _expect(write_release(tmp_path / "shape", short), r"attn_qkv\.weight.*has shape")


def test_convert_script_and_format_name(tmp_path):
    from diffusion.checkpoint import read_checkpoint
    from tests.tiny_lm import load_script

    convert = load_script("convert")
    folder = write_release(tmp_path / "rel", mdlm_params())
    out = tmp_path / "bd3lm.ckpt"
    assert convert.main(["--from", "bd3lm_hf", str(folder), "--out", str(out)]) == 0
    saved = read_checkpoint(out)
    assert detect_format(out) == "unmask" and saved["unmask_format"]["block_size"] == BLOCK
    x_t, x0 = draws(2)
    want = reference_bd3lm(mdlm_params(), x_t, x0, BLOCK)
    torch.testing.assert_close(training_logits(saved, x_t, x0), want, **TOL)
    mdlm = tmp_path / "mdlm"
    from tests.test_formats_mdlm import write_hf

    write_hf(mdlm, mdlm_params())
    assert detect_format(mdlm) == "mdlm_hf"  # the two releases are told apart by model_type
    _expect(mdlm, r"model_type='mdlm', expected 'bd3lm'")


def test_eval_config_takes_a_release_folder(tmp_path, monkeypatch):
    """eval.checkpoint_path=<BD3-LM release folder>: the evaluation is the release's block model
    on hf_dit with BD3-LM's rows, and sampler=block validates against it (ddpm is refused)."""
    from hydra import compose, initialize_config_dir

    from diffusion.build import eval_config
    from diffusion.config import ConfigError, register_resolvers, validate_config

    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "cache"))
    folder = write_release(tmp_path / "bd3lm-owt-block_size4", mdlm_params())
    register_resolvers()
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    fixed = ["checkpointing.save_dir=x", "trainer.default_root_dir=x", "logger=none"]
    with initialize_config_dir(config_dir=configs, version_base=None):
        base = compose("config", overrides=fixed)
        run = [*fixed, "mode=sample_eval", f"eval.checkpoint_path={folder}"]
        block = compose("config", overrides=[*run, "sampler=block"])
        ddpm = compose("config", overrides=[*run, "sampler=ddpm"])
    out = eval_config(block, base)
    assert out.parameterization._target_.endswith("BD3LM") and out.parameterization.block_size == 4
    assert out.backbone._target_ == "models.mdlm_dit.MDLMDiT" and out.model.length == LEN
    assert out.data.layout.special_tokens is False
    validate_config(out)
    with pytest.raises(ConfigError, match=r"whole_canvas|sampler=block"):
        validate_config(eval_config(ddpm, base))


def test_bd3lm_on_mdlms_dit_trains_evaluates_and_samples(tmp_path):
    """parameterization=bd3lm on backbone=hf_dit (the releases' layout) through main.py: the
    training pass, ppl_eval's bound and the block sampler's span cache on MDLM's DiT."""
    from tests.tiny_lm import run_main

    overrides = ["parameterization=bd3lm", "parameterization.block_size=4", "backbone=hf_dit"]
    run_main(tmp_path / "train", *overrides, "sampler=block")
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    # the checkpoint's sampler (block) is restored under debug=tiny_cpu's sampler keys
    run_main(tmp_path / "ppl", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}")
    stats = json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())
    assert stats["bound"] is True and stats["parameterization"] == "BD3LM"
    assert 1 < stats["ppl"] < 1e4  # 4 steps from a uniform start (ours: ~2.1e3 either DiT)
    run_main(tmp_path / "sample", "mode=sample_eval", f"eval.checkpoint_path={ckpt}",
             "sampler.steps=4", "+sampler.max_length=40")  # fmt: skip
    report = json.loads((tmp_path / "sample" / "sample_eval.json").read_text())
    assert report["num_samples"] == 2 and report["entropy"] > 0 and 4 <= report["length"] <= 40
    assert report["sampler"] == "BlockSampler"  # the checkpoint's, with the steps named
    # naming the default sampler is a choice too: refused for this block model, not replaced
    from diffusion.config import ConfigError
    from tests.tiny_lm import main_in_process

    with pytest.raises(ConfigError, match="sampler=block"):
        main_in_process(tmp_path / "named", "debug=tiny_cpu", "mode=sample_eval",
                        f"eval.checkpoint_path={ckpt}", "sampler=ddpm_cache")  # fmt: skip
    # BD3-LM's own sampling command (README / genppl_bd3lm.sh names) on the same checkpoint
    run_main(tmp_path / "theirs", "mode=sample_eval", f"eval.checkpoint_path={ckpt}",
             "algo=bd3lm", "algo.T=50", "algo.backbone=hf_dit", "block_size=4", "wandb=null",
             "model.attn_backend=sdpa", "sampling.nucleus_p=0.9", "sampling.kv_cache=true",
             "loader.eval_batch_size=2", "sampling.logdir=unused")  # fmt: skip
    theirs = json.loads((tmp_path / "theirs" / "sample_eval.json").read_text())
    assert theirs["sampler"] == "BlockSampler" and theirs["steps"] == 50
    blocks = theirs["length"] // 4  # 8 blocks: at most 2 rows x 4 changes + 1 write each
    assert theirs["length"] == 32 and theirs["nfe"] <= blocks * (2 * 4 + 1) < blocks * 50


# ---- BD3-LM's own Lightning checkpoints (its repository's main.py, MDLM's layout + algo.*) ---
def bd3lm_lightning_config(block: int = BLOCK, name: str = "bd3lm", **data_flags):
    """BD3-LM's composed config as its main.py pickles it: the model under `algo`, block_size
    at the top, its rows' switches in `data`."""
    from tests.test_formats_mdlm import mdlm_config

    cfg = OmegaConf.to_container(mdlm_config("subs", "dit", False))
    for key in ("backbone", "parameterization", "time_conditioning", "T", "subs_masking"):
        del cfg[key]
    cfg["algo"] = {
        "name": name, "backbone": "dit", "parameterization": "subs", "time_conditioning": False,
        "T": 0, "causal_attention": False, "cross_attn": name == "bd3lm",
        "var_min": name == "bd3lm", "sampler": "semi_ar",
    }  # fmt: skip
    cfg["block_size"] = block
    cfg["data"] |= data_flags
    cfg["training"] |= {"sampling_eps_min": 1e-3, "sampling_eps_max": 1.0}
    return OmegaConf.create(cfg)


def test_bd3lm_lightning_checkpoint_parity_ema_raw_and_rows(tmp_path):
    from tests.test_formats_mdlm import write_lightning

    raw, shadow = mdlm_params(seed=5), mdlm_params(seed=6)
    clip = {"sampling_eps_min": torch.tensor(0.25), "sampling_eps_max": torch.tensor(0.75)}
    cfg = bd3lm_lightning_config(insert_train_special=False, insert_valid_special=False)
    path = write_lightning(tmp_path / "bd3lm.ckpt", raw, shadow, cfg, extra_state=clip)
    assert detect_format(path) == "mdlm_ckpt"
    ckpt = load_checkpoint(str(path))
    conf = ckpt["unmask_config"]
    assert conf["parameterization"]["_target_"].endswith("BD3LM")
    assert conf["parameterization"]["block_size"] == BLOCK and conf["sampler"]["_target_"]
    assert conf["data"]["layout"]["special_tokens"] is False
    assert "doc_eos" not in conf["data"]["layout"]  # insert_train_eos: BD3-LM's default True
    assert (conf["noise"]["beta"], conf["noise"]["omega"]) == pytest.approx((0.25, 0.75))
    x_t, x0 = draws(4)
    torch.testing.assert_close(
        training_logits(ckpt, x_t, x0), reference_bd3lm(shadow, x_t, x0, BLOCK), **TOL
    )
    plain = load_checkpoint(str(path), use_ema=False)
    torch.testing.assert_close(
        training_logits(plain, x_t, x0), reference_bd3lm(raw, x_t, x0, BLOCK), **TOL
    )
    twin = write_lightning(tmp_path / "twin.ckpt", raw, swap_blocks(shadow), cfg, extra_state=clip)
    bad = training_logits(load_checkpoint(str(twin)), x_t, x0)
    assert not torch.allclose(bad, reference_bd3lm(shadow, x_t, x0, BLOCK), **TOL)
    # its MDLM baseline (algo=mdlm) loads as SUBS; an algorithm we do not have is named
    mdlm = write_lightning(tmp_path / "mdlm.ckpt", raw, shadow, bd3lm_lightning_config(LEN, "mdlm"))
    assert load_checkpoint(str(mdlm))["unmask_config"]["parameterization"]["_target_"].endswith(
        "SUBS"
    )
    other = bd3lm_lightning_config(name="ot-finetune")
    ot = write_lightning(tmp_path / "ot.ckpt", raw, shadow, other)
    with pytest.raises(FormatError, match=r"ot\.ckpt: algo\.name='ot-finetune'"):
        load_checkpoint(str(ot))
