"""MDLM's command lines (its README and scripts/*.sh, verbatim) compose through the translation.

Each command below is copied from kuleshov-group/mdlm (README.md and scripts/*.sh, `srun python
-u -m main` dropped); it goes through `diffusion.compat.translate`, is composed with our
configs, and the composed sampler, steps, number of samples, backbone and data are checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from diffusion.compat import ConfigError, is_mdlm_command, translate

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")

README_SAMPLE_HF = """mode=sample_eval eval.checkpoint_path=kuleshov-group/mdlm-owt data=openwebtext-split
model.length=1024 sampling.predictor=ddpm_cache sampling.steps=1000 loader.eval_batch_size=1
sampling.num_sample_batches=10 backbone=hf_dit"""
README_SAMPLE_CKPT = """mode=sample_eval eval.checkpoint_path=/path/to/checkpoint/mdlm.ckpt
data=openwebtext-split model.length=1024 sampling.predictor=ddpm_cache sampling.steps=10000
loader.eval_batch_size=1 sampling.num_sample_batches=1 backbone=dit"""
README_SEMI_AR = """mode=sample_eval eval.checkpoint_path=kuleshov-group/mdlm-owt data=openwebtext-split
parameterization=subs model.length=1024 sampling.predictor=ddpm_cache sampling.steps=1000
loader.eval_batch_size=1 sampling.num_sample_batches=2 sampling.semi_ar=True
sampling.stride_length=512 sampling.num_strides=2 backbone=hf_dit"""
README_TRAIN = """model=small data=openwebtext-split wandb.name=mdlm-owt parameterization=subs
model.length=1024 eval.compute_generative_perplexity=True sampling.steps=1000"""
README_PPL_MDLM = """mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16 data=openwebtext-split
model=small parameterization=subs backbone=dit model.length=1024
eval.checkpoint_path=/path/to/checkpoint/mdlm.ckpt +wandb.offline=true"""
README_PPL_AR = """mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16 data=openwebtext-split
model=small-ar parameterization=ar backbone=ar model.length=1024
eval.checkpoint_path=/path/to/checkpoint/ar.ckpt +wandb.offline=true"""
README_PPL_SEDD = """mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16 data=openwebtext-split
model=small parameterization=sedd backbone=dit model.length=1024
eval.checkpoint_path=/path/to/checkpoint/sedd.ckpt time_conditioning=True
sampling.predictor=analytic +wandb.offline=true"""
SCRIPT_T_MDLM = """mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16 data=openwebtext-split
model=small parameterization=subs backbone=dit model.length=1024 T={T}
eval.checkpoint_path=/ckpts/60-1000000.ckpt +wandb.offline=true"""
SCRIPT_EVAL_AR = README_PPL_AR.replace("/path/to/checkpoint/ar.ckpt", "/ckpts/last.ckpt")
SCRIPT_EVAL_SEDD = """mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16
data=openwebtext-split model=small parameterization=sedd backbone=dit model.length=1024
eval.checkpoint_path=/ckpts/last.ckpt time_conditioning=True +wandb.offline=true"""
SCRIPT_TRAIN_LM1B_AR = """loader.batch_size=16 loader.eval_batch_size=16 model=small-ar backbone=ar
data=lm1b wandb.name=ar-lm1b parameterization=ar model.length=128
eval.compute_generative_perplexity=True sampling.steps=1000 time_conditioning=True"""
SCRIPT_TRAIN_LM1B_D3PM = """loader.batch_size=16 loader.eval_batch_size=16 model=small data=lm1b
wandb.name=d3pm-lm1b parameterization=d3pm model.length=128 eval.compute_generative_perplexity=True
sampling.steps=1000 sampling.predictor=ddpm time_conditioning=True T=1000"""
SCRIPT_TRAIN_OWT_MDLM = """loader.batch_size=16 loader.eval_batch_size=16 model=small
data=openwebtext-split wandb.name=mdlm-owt parameterization=subs model.length=1024
eval.compute_generative_perplexity=True sampling.steps=1000"""
SCRIPT_TRAIN_OWT_SEDD = """loader.batch_size=16 loader.eval_batch_size=16 model=small
data=openwebtext-split wandb.name=sedd-owt parameterization=sedd model.length=1024
eval.compute_generative_perplexity=True sampling.steps=1000 sampling.predictor=analytic
time_conditioning=True"""

# readme_train gives no eval batch size: MDLM's eval_global_batch_size = global 512, so 2 x 512
# command, sampler class, steps, num_samples, causal backbone, data name, parameterization, T
CASES = [
    ("readme_sample_hf", README_SAMPLE_HF, "DDPMCacheSampler", 1000, 10, False, "openwebtext", "SUBS", 0),
    ("readme_sample_ckpt", README_SAMPLE_CKPT, "DDPMCacheSampler", 10000, 1, False, "openwebtext", "SUBS", 0),
    ("readme_semi_ar", README_SEMI_AR, "SemiARSampler", 1000, 2, False, "openwebtext", "SUBS", 0),
    ("readme_train", README_TRAIN, "DDPMCacheSampler", 1000, 1024, False, "openwebtext", "SUBS", 0),
    ("readme_ppl_mdlm", README_PPL_MDLM, "DDPMCacheSampler", 128, 32, False, "openwebtext", "SUBS", 0),
    ("readme_ppl_ar", README_PPL_AR, "DDPMCacheSampler", 128, 32, True, "openwebtext", "AR", 0),
    ("readme_ppl_sedd", README_PPL_SEDD, "AnalyticSampler", 128, 32, False, "openwebtext", "SEDD", 0),
    ("script_T0", SCRIPT_T_MDLM.format(T=0), "DDPMCacheSampler", 128, 32, False, "openwebtext", "SUBS", 0),
    ("script_T1000", SCRIPT_T_MDLM.format(T=1000), "DDPMCacheSampler", 128, 32, False, "openwebtext", "SUBS", 1000),
    ("script_eval_ar", SCRIPT_EVAL_AR, "DDPMCacheSampler", 128, 32, True, "openwebtext", "AR", 0),
    ("script_eval_sedd", SCRIPT_EVAL_SEDD, "DDPMCacheSampler", 128, 32, False, "openwebtext", "SEDD", 0),
    ("script_train_lm1b_ar", SCRIPT_TRAIN_LM1B_AR, "DDPMCacheSampler", 1000, 32, True, "lm1b", "AR", 0),
    ("script_train_lm1b_d3pm", SCRIPT_TRAIN_LM1B_D3PM, "DDPMSampler", 1000, 32, False, "lm1b", "D3PM", 1000),
    ("script_train_owt_mdlm", SCRIPT_TRAIN_OWT_MDLM, "DDPMCacheSampler", 1000, 32, False, "openwebtext", "SUBS", 0),
    ("script_train_owt_sedd", SCRIPT_TRAIN_OWT_SEDD, "AnalyticSampler", 1000, 32, False, "openwebtext", "SEDD", 0),
]  # fmt: skip


def composed(overrides: list[str]):
    try:
        from diffusion.config import register_resolvers
    except ImportError:
        from diffusion.config import register_resolvers
    register_resolvers()
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose("config", overrides=overrides)
    return cfg


@pytest.mark.parametrize(
    "name,command,sampler,steps,num_samples,causal,data,param,T", CASES, ids=[c[0] for c in CASES]
)
def test_mdlm_command_composes(name, command, sampler, steps, num_samples, causal, data, param, T):
    mdlm = command.split()
    ours, lines = translate(mdlm)
    assert lines and all(line.startswith("MDLM ") for line in lines)
    cfg = composed(ours)
    assert cfg.sampler._target_.rsplit(".", 1)[-1] == sampler
    assert int(cfg.sampler.steps) == steps
    assert int(cfg.sampler.num_samples) == num_samples
    assert int(cfg.sampler.batch_size) == int(cfg.loader.eval_batch_size)
    assert cfg.backbone._target_ == "models.mdlm_dit.MDLMDiT"
    assert bool(cfg.backbone.causal) is causal
    assert cfg.data.name == data
    assert cfg.parameterization._target_.rsplit(".", 1)[-1] == param
    assert int(cfg.T) == T
    if "eval.checkpoint_path" not in command:  # else the checkpoint decides its conditioning
        assert cfg.parameterization.get("mask_conditioning", False) is False
    if "wandb." in command:
        assert cfg.logger._target_.endswith("WandbLogger")
    if "+wandb.offline=true" in command:
        assert cfg.logger.offline is True
    if "mode=" in command:
        assert cfg.mode == dict(o.split("=", 1) for o in mdlm)["mode"]
    if "model.length=1024" in command:
        assert int(cfg.model.length) == 1024
    if "semi_ar" in command:
        assert (cfg.sampler.stride_length, cfg.sampler.num_strides, cfg.sampler.cache) == (
            512,
            2,
            True,
        )


def test_printed_lines_name_both_sides():
    _, lines = translate(README_SAMPLE_HF.split())
    assert "MDLM name sampling.steps -> sampler.steps" in lines
    assert any(
        line.startswith("MDLM name sampling.num_sample_batches=10 -> sampler.num_samples=10")
        for line in lines
    )
    assert any(
        line.startswith("MDLM name data=openwebtext-split -> data=openwebtext") for line in lines
    )


def test_num_samples_is_batches_x_eval_batch_x_devices():
    ours, _ = translate(
        [
            "sampling.num_sample_batches=3",
            "loader.eval_batch_size=4",
            "trainer.devices=2",
            "trainer.num_nodes=1",
        ]
    )
    assert "sampler.num_samples=24" in ours
    # eval batch size left to the config: the product is an interpolation of it
    ours, _ = translate(["sampling.num_sample_batches=3", "loader.eval_global_batch_size=8"])
    cfg = composed(ours)
    assert int(cfg.sampler.num_samples) == 3 * int(cfg.loader.eval_batch_size) == 24


def test_our_own_commands_pass_through():
    ours = [
        "mode=sample_eval",
        "sampler=ddpm",
        "sampler.steps=64",
        "backbone=dit",
        "model=small",
        "data=wikitext2",
    ]
    assert not is_mdlm_command(ours)
    assert translate(ours) == (ours, [])


@pytest.mark.parametrize(
    "override,hint",
    [
        ("sampling.predictor=euler", "ddpm_cache"),
        ("backbone=dimamba", "backbone=dit"),
        ("model=tiny-dimamba", "small"),
        ("noise=polynomial", "noise=loglinear"),
        ("training.importance_sampling=True", "training.antithetic"),
        ("optim.beta1=0.9", "optim.betas"),
        ("sampling.num_strides=2", "sampling.semi_ar=True"),
    ],
)
def test_unhonoured_names_say_what_to_use(override, hint):
    with pytest.raises(ConfigError, match=hint.replace(".", r"\.").replace("=", "=")):
        translate(["sampling.steps=10", override])


def test_mdlm_model_and_data_names():
    for mdlm, want in [("model=tiny", ("mdlm_tiny", 512)), ("model=medium", ("medium", 1024))]:
        cfg = composed(translate(["sampling.steps=10", mdlm])[0])
        assert (cfg.model.n_blocks, cfg.model.hidden_size) == (
            {"mdlm_tiny": 8, "medium": 24}[want[0]],
            want[1],
        )
    for mdlm, name, tok in [
        ("data=lm1b-gpt2", "lm1b_wrap", "gpt2"),
        ("data=wikitext2", "wikitext2", "gpt2"),
        ("data=text8", "text8", None),  # its own character vocabulary
    ]:
        cfg = composed(translate(["sampling.steps=10", mdlm])[0])
        assert cfg.data.name == name
        assert tok is None or cfg.data.tokenizer == tok
    for length in (256, 512):  # MDLM cuts text8 into pieces of its model.length
        cfg = composed(translate(["sampling.steps=10", "data=text8", f"model.length={length}"])[0])
        assert cfg.data.source.chunk_chars == length == cfg.model.length
    for length in (256, 100):  # text8-crop: train pieces of 4 x model.length, eval of 1 x
        cfg = composed(
            translate(["sampling.steps=10", "data=text8-crop", f"model.length={length}"])[0]
        )
        chunks = OmegaConf.to_container(cfg.data.source.chunk_chars, resolve=True)
        assert chunks == {"train": 4 * length, "validation": length, "test": length}
        assert cfg.data.crop_train and cfg.data.name == "text8_crop"
    cfg = composed(
        translate(
            [
                "sampling.steps=10",
                "eval.disable_ema=true",
                "subs_masking=True",
                "parameterization=d3pm",
                "T=1000",
            ]
        )[0]
    )
    assert cfg.parameterization.subs_masking is True


def test_evaluating_a_checkpoint_adds_no_architecture_defaults():
    """With eval.checkpoint_path the model comes from the checkpoint: only the names given are
    translated (no MDLM backbone/model/data/conditioning defaults that could contradict it)."""
    ours, _ = translate(
        ["mode=sample_eval", "eval.checkpoint_path=x.ckpt", "sampling.predictor=ddpm_cache",
         "sampling.num_sample_batches=2", "loader.eval_batch_size=1"]
    )  # fmt: skip
    keys = {o.split("=", 1)[0] for o in ours}
    assert not keys & {"backbone", "model", "data", "parameterization.mask_conditioning"}
    assert "sampler.num_samples=2" in ours and "sampler=ddpm_cache" in ours


@pytest.mark.slow
def test_mdlm_sample_eval_command_writes_exactly_the_samples_asked(tmp_path):
    """A real tiny run: MDLM's sample_eval names (ddpm_cache, 2 batches of eval batch size 1)
    on a checkpoint of ours write exactly 2 samples."""
    import json

    from tests.test_main_e2e import run_main

    run_main(tmp_path / "train")  # the embedded default, debug=tiny_cpu: a few steps
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    mdlm = [
        "mode=sample_eval",
        f"eval.checkpoint_path={ckpt}",
        "sampling.predictor=ddpm_cache",
        "sampling.steps=8",
        "sampling.num_sample_batches=2",
        "loader.eval_batch_size=1",
    ]
    proc = run_main(tmp_path / "sample", *mdlm)  # main.py translates MDLM's names itself
    assert "MDLM name sampling.num_sample_batches=2 -> sampler.num_samples=2" in proc.stdout
    rows = (tmp_path / "sample" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 2, proc.stdout[-2000:]
    assert all("text" in json.loads(r) for r in rows)


def test_hydra_flags_pass_through_after_the_overrides():
    ours, _ = translate(["mode=sample_eval", "--cfg", "job", "sampling.steps=3", "-m"])
    assert ours[-3:] == ["--cfg", "job", "-m"]
    assert "sampler.steps=3" in ours and "job" not in ours[:-3]
    assert translate(["--cfg", "job", "seed=2"]) == (["seed=2", "--cfg", "job"], [])


@pytest.mark.parametrize("cls_name", ["DDPMSampler", "DDPMCacheSampler"])
def test_noise_removal_fills_the_last_masks_greedily(cls_name):
    """sampling.noise_removal -> sampler.noise_removal: with one step (t = 1 -> 0) every token
    is still masked at the last step, so noise_removal=true returns the argmax of p(x0 | x_t)
    at every position (whatever the seed), and false draws from it (seeds differ)."""
    import samplers.ddpm
    import samplers.ddpm_cache
    from tests.test_samplers import random_denoiser

    cls = getattr(samplers.ddpm, cls_name, None) or getattr(samplers.ddpm_cache, cls_name)
    model = random_denoiser(12, vocab=6, seed=3)
    greedy = model.probs[0].argmax(-1)  # (L,)
    draws = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        out = cls(steps=1, noise_removal=True, num_samples=2, batch_size=2).sample(
            model, 2, 12, generator=g
        )
        assert torch.equal(out.tokens, greedy.expand(2, -1))
        g = torch.Generator().manual_seed(seed)
        draws.append(
            cls(steps=1, num_samples=2, batch_size=2).sample(model, 2, 12, generator=g).tokens
        )
    assert any(not torch.equal(d, greedy.expand(2, -1)) for d in draws)
    ours, lines = translate(["sampling.predictor=ddpm", "sampling.noise_removal=True"])
    assert "sampler.noise_removal=true" in ours and "sampler.t_min=1e-05" in ours
    assert (
        "MDLM name sampling.noise_removal -> sampler.noise_removal=true sampler.t_min=1e-05"
        in lines
    )
    # MDLM's default is True: the same, said as a default; False: our grid
    ours, lines = translate(["sampling.predictor=ddpm", "sampling.steps=8"])
    assert "sampler.t_min=1e-05" in ours and any(
        "default sampling.noise_removal" in x for x in lines
    )
    ours, _ = translate(["sampling.predictor=ddpm", "sampling.noise_removal=False"])
    assert "sampler.noise_removal=false" in ours and "sampler.t_min=1e-05" not in ours


@pytest.mark.parametrize("cls_name", ["DDPMSampler", "DDPMCacheSampler"])
def test_mdlms_grid_and_noise_removal_are_its_loop(cls_name):
    """sampler.t_min (MDLM's `_sample`): `steps` steps on linspace(1, t_min, steps + 1), then
    the argmax of p(x0 | x_t) at t_min fills what is still masked; MDLM's loop is written out
    here with the same uniforms (t_min = 0.3 so that many masks are left for the argmax)."""
    import samplers.ddpm
    import samplers.ddpm_cache
    from samplers.base import sample_categorical, uniform
    from tests.test_samplers import random_denoiser

    cls = getattr(samplers.ddpm, cls_name, None) or getattr(samplers.ddpm_cache, cls_name)
    steps, t_min, B, L = 2, 0.3, 3, 12
    model = random_denoiser(L, vocab=6, seed=4)
    out = cls(steps=steps, noise_removal=True, t_min=t_min, num_samples=B, batch_size=B).sample(
        model, B, L, generator=torch.Generator().manual_seed(7)
    )
    g = torch.Generator().manual_seed(7)
    log_p = model.probs.log().expand(B, -1, -1)  # (B, L, V - 1) at masked positions
    x = torch.full((B, L), model.mask_id)
    ts = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64)
    for i in range(steps):  # alpha = 1 - t: unmask with (a_s - a_t) / (1 - a_t) = (t - s) / t
        u = uniform((2, B, L), g, x.device)
        moves = (x == model.mask_id) & (u[0] < (ts[i] - ts[i + 1]) / ts[i])
        x[moves] = sample_categorical(log_p[moves], u[1][moves])
    left = x == model.mask_id
    assert int(left.sum()) > 0  # t_min = 0.3 leaves masks for the final argmax
    x[left] = log_p.argmax(-1)[left]
    assert torch.equal(out.tokens, x)
    if cls_name == "DDPMSampler":  # every step calls, the removal step too
        assert out.nfe == steps + 1
    else:  # the cache skips a call when no row changed (this model ignores t)
        assert 1 <= out.nfe <= steps + 1


# ---- BD3-LM's command lines (kuleshov-group/bd3lms README.md and scripts/, `srun python -u
# main.py` dropped, its shell variables filled in) -------------------------------------------
BD3LM_README_SAMPLE = """loader.eval_batch_size=1 model=small algo=bd3lm algo.T=5000
algo.backbone=hf_dit data=openwebtext-split model.length=1024 block_size=4 wandb=null
mode=sample_eval eval.checkpoint_path=kuleshov-group/bd3lm-owt-block_size4
model.attn_backend=sdpa sampling.nucleus_p=0.9 sampling.kv_cache=true
sampling.logdir=/tmp/sample_logs/samples_genlen_bd3lm_blocksize4"""
BD3LM_GENPPL = BD3LM_README_SAMPLE.replace(
    "sampling.logdir", "seed=3 sampling.num_sample_batches=25 sampling.logdir"
)
BD3LM_VARLEN = BD3LM_README_SAMPLE + " sampling.var_length=true"
BD3LM_PPL_OWT = """loader.eval_batch_size=16 model=small algo=bd3lm algo.backbone=hf_dit
data=openwebtext-split data.insert_valid_special=False model.length=1024 model.attn_backend=flex
block_size=4 eval.checkpoint_path=kuleshov-group/bd3lm-owt-block_size4 wandb=null mode=ppl_eval"""
BD3LM_PPL_LM1B = """loader.eval_batch_size=128 model=small algo=bd3lm data=lm1b-wrap
model.length=128 block_size=4 eval.checkpoint_path=/ckpts/last-v1.ckpt wandb=null
mode=ppl_eval model.attn_backend=flex"""
BD3LM_GENPPL_MDLM = """mode=sample_eval loader.eval_batch_size=1 data=openwebtext-split
algo=mdlm algo.T=5000 block_size=1024 model.length=1024
eval.checkpoint_path=/ckpts/mdlm_owt_noeos.ckpt wandb=null seed=1
sampling.num_sample_batches=25 sampling.nucleus_p=0.9 sampling.logdir=/tmp/samples_mdlm"""
BD3LM_TRAIN = """loader.global_batch_size=512 loader.eval_global_batch_size=512
loader.batch_size=16 loader.eval_batch_size=16 model=small algo=bd3lm
algo.clip_search_widths=[0.5,0.6,0.7,0.8,0.9] data=openwebtext-split
data.insert_train_special=False data.insert_valid_special=False data.insert_valid_eos=False
model.length=1024 block_size=16 wandb.name=bd3lm-owt-block_size16 mode=train
model.attn_backend=flex training.resample=True
training.from_pretrained=kuleshov-group/bd3lm-owt-block_size1024-pretrain"""

# command, sampler, steps, num_samples, top_p, stop_at_eos, parameterization, block size
BD3LM_CASES = [
    ("readme_sample", BD3LM_README_SAMPLE, "BlockSampler", 5000, 1, 0.9, False, "BD3LM", 4),
    ("genppl", BD3LM_GENPPL, "BlockSampler", 5000, 25, 0.9, False, "BD3LM", 4),
    ("varlen", BD3LM_VARLEN, "BlockSampler", 5000, 1, 0.9, True, "BD3LM", 4),
    ("ppl_owt", BD3LM_PPL_OWT, "BlockSampler", 128, 16, None, False, "BD3LM", 4),
    ("ppl_lm1b", BD3LM_PPL_LM1B, "BlockSampler", 128, 128, None, False, "BD3LM", 4),
    ("genppl_mdlm", BD3LM_GENPPL_MDLM, "DDPMCacheSampler", 5000, 25, 0.9, None, "SUBS", None),
]  # fmt: skip


@pytest.mark.parametrize(
    "command,sampler,steps,num_samples,top_p,stop,param,block",
    [c[1:] for c in BD3LM_CASES],
    ids=[c[0] for c in BD3LM_CASES],
)
def test_bd3lm_command_composes(command, sampler, steps, num_samples, top_p, stop, param, block):
    theirs = command.split()
    assert is_mdlm_command(theirs)
    ours, lines = translate(theirs)
    cfg = composed(ours)
    assert cfg.sampler._target_.rsplit(".", 1)[-1] == sampler
    assert int(cfg.sampler.steps) == steps and int(cfg.sampler.num_samples) == num_samples
    assert cfg.sampler.get("top_p") == top_p
    if stop is not None:
        assert cfg.sampler.stop_at_eos is stop
    if sampler == "BlockSampler":  # BD3-LM's default sampling.first_hitting=True
        assert cfg.sampler.first_hitting is True
    assert cfg.parameterization._target_.rsplit(".", 1)[-1] == param
    if block is not None:
        assert cfg.parameterization.block_size == block
    if "algo.backbone" in command:
        assert cfg.backbone._target_ == "models.mdlm_dit.MDLMDiT"
    assert "logger=none" in ours and int(cfg.T) == 0
    if "insert_valid_special=False" in command:
        assert cfg.data.layout.special_tokens is False  # evaluated: the validation switch
    if "attn_backend" in command and param == "BD3LM":
        assert cfg.parameterization.attn_backend in ("sdpa", "flex")
    assert any("sampling.logdir" in line for line in lines) == ("logdir" in command)
    # BD3-LM's sampling loop redraws samples whose last 256 tokens have entropy < 4
    sampling = "mode=sample_eval" in command and "var_length" not in command
    assert cfg.eval.redraw_entropy_below == (4.0 if sampling else None)


def test_bd3lm_sample_length_is_the_generated_length():
    """genppl_bd3lm.sh LENGTH=2048: BD3-LM generates 2048 tokens past its 1024 context (a
    sliding window); ours: sampler.max_length, the checkpoint's model.length untouched."""
    ours, lines = translate(BD3LM_GENPPL.replace("model.length=1024", "model.length=2048").split())
    cfg = composed(ours)
    assert cfg.sampler.max_length == 2048 and not any(o.startswith("model.length") for o in ours)
    ppl, _ = translate(BD3LM_PPL_OWT.split())
    assert "model.length=1024" in ppl and composed(ppl).sampler.get("max_length") is None


def test_bd3lm_training_switches_and_unported_names():
    theirs = BD3LM_TRAIN.split()
    ours, lines = translate(theirs)
    cfg = composed(ours)
    assert cfg.parameterization.resample is True  # training.resample=True
    with pytest.raises(ConfigError, match=r"training.resample=True needs algo=bd3lm"):
        translate(["algo=mdlm", "training.resample=True"])
    assert cfg.data.layout.special_tokens is False  # the training split's switch
    assert "doc_eos" not in cfg.data.layout  # insert_train_eos: BD3-LM's default True
    assert any("insert_valid_eos" in line and "training one" in line for line in lines)
    assert list(cfg.parameterization.clip_search_widths) == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert cfg.training.init_from_ckpt == "kuleshov-group/bd3lm-owt-block_size1024-pretrain"
    assert cfg.parameterization.block_size == 16 and cfg.logger._target_.endswith("WandbLogger")
    for bad, hint in [
        ("algo=ot-finetune", r"algo=ot-finetune: ours ports"),
        ("algo.fix_clipping=True", r"algo.fix_clipping is not ported"),
        ("data.insert_test_eos=False", r"data.insert_<train\|valid>"),
    ]:
        with pytest.raises(ConfigError, match=hint):
            translate(["algo=bd3lm", bad])


# ---- DUO's command lines (s-sahoo/duo README.md and scripts/, `srun python -u -m main` dropped,
# its shell variables filled in) ---------------------------------------------------------------
DUO_README_SAMPLE = """mode=sample_eval loader.batch_size=2 loader.eval_batch_size=8
data=openwebtext-split algo=duo_base algo.backbone=hf_dit eval.checkpoint_path=s-sahoo/duo-distilled
sampling.steps=8 sampling.num_sample_batches=1 sampling.noise_removal=greedy +wandb.offline=true"""
DUO_EVAL_OWT = """mode=ppl_eval loader.batch_size=8 loader.eval_batch_size=8 data=openwebtext-split
model=small algo=duo_base eval.checkpoint_path=/ckpts/last.ckpt sampling.num_sample_batches=0
+wandb.offline=true"""
DUO_GENPPL = """mode=sample_eval seed=1 loader.batch_size=2 loader.eval_batch_size=8
data=openwebtext-split algo=duo_base model=small eval.checkpoint_path=/ckpts/0-50000.ckpt
sampling.num_sample_batches=100 sampling.steps=32 +wandb.offline=true
eval.generated_samples_path=/ckpts/samples_ancestral/1-32-ckpt-0-50000.json"""
DUO_GENPPL_LM1B = """mode=sample_eval loader.batch_size=2 loader.eval_batch_size=64 data=lm1b-wrap
algo=duo_base model=small model.length=128 eval.checkpoint_path=/ckpts/last.ckpt
sampling.num_sample_batches=15 sampling.steps=32 +wandb.offline=true sampling.noise_removal=greedy"""
DUO_ZERO_SHOT = """mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16
loader.eval_global_batch_size=128 data=ag_news data.insert_valid_eos=False model=small
algo=duo_base model.length=1024 eval.checkpoint_path=/ckpts/last.ckpt
sampling.num_sample_batches=0 +wandb.offline=true"""
DUO_TRAIN_OWT = """loader.batch_size=32 loader.eval_batch_size=32 data=openwebtext-split
wandb.name=duo-owt model=small algo=duo model.length=1024 algo.curriculum.mode=simple
algo.curriculum.gumbel_tau_log10_start=-3.0 algo.curriculum.gumbel_tau_log10_end=-3.0
algo.curriculum.gamma_min=-3.55 algo.curriculum.gamma_max=-1.85 algo.curriculum.start=0
algo.curriculum.end=500000"""
DUO_DISTILL = """mode=train loader.batch_size=2 loader.eval_batch_size=2 data=openwebtext-split
model=small algo=distillation training.finetune_path=/ckpts/duo.ckpt sampling.num_sample_batches=10
sampling.steps=32 eval.compute_generative_perplexity=True algo.T=512
lr_scheduler.num_warmup_steps=500 trainer.val_check_interval=1000 trainer.max_steps=50000
loader.global_batch_size=128 training.ema=0.999 algo.update_teacher_every=10000 optim.lr=6e-5
trainer.limit_val_batches=8 algo.teacher_ema=False algo.linear_growth_dt=false
+wandb.offline=true"""

# command, steps, num_samples, greedy_tail, parameterization
DUO_CASES = [
    ("readme_sample", DUO_README_SAMPLE, 8, 8, True, "DUO"),
    ("eval_owt", DUO_EVAL_OWT, 1000, None, False, "DUO"),
    ("genppl_owt", DUO_GENPPL, 32, 800, False, "DUO"),
    ("genppl_lm1b", DUO_GENPPL_LM1B, 32, 960, True, "DUO"),
    ("zero_shot", DUO_ZERO_SHOT, 1000, None, False, "DUO"),
    ("train_owt", DUO_TRAIN_OWT, 1000, 64, False, "DUO"),
    ("distill_owt", DUO_DISTILL, 32, 20, False, "DUODistill"),
]  # fmt: skip


@pytest.mark.parametrize(
    "command,steps,num_samples,greedy,param",
    [c[1:] for c in DUO_CASES],
    ids=[c[0] for c in DUO_CASES],
)
def test_duo_command_composes(command, steps, num_samples, greedy, param):
    theirs = command.split()
    assert is_mdlm_command(theirs)
    ours, lines = translate(theirs)
    cfg = composed(ours)
    assert cfg.sampler._target_.rsplit(".", 1)[-1] == "UniformSampler"
    assert int(cfg.sampler.steps) == steps
    if num_samples is None:  # sampling.num_sample_batches=0 (ppl_eval): ours draws none either
        assert not any(o.startswith("sampler.num_samples") for o in ours)
    else:
        assert int(cfg.sampler.num_samples) == num_samples
    assert cfg.sampler.greedy_tail is greedy and cfg.sampler.t_min == 1e-5  # DUO's grid
    assert cfg.parameterization._target_.rsplit(".", 1)[-1] == param
    assert cfg.time_conditioning is True and int(cfg.T) == 0
    assert cfg.logger._target_.endswith("WandbLogger")
    if "algo.backbone" in command or "mode=train" in command or "mode" not in command:
        assert cfg.backbone._target_ == "models.mdlm_dit.MDLMDiT"


def test_duo_training_names_and_defaults():
    cfg = composed(translate(DUO_TRAIN_OWT.split())[0])
    p = cfg.parameterization
    assert p.curriculum is True and (p.curriculum_start, p.curriculum_end) == (0, 500000)
    assert (p.gumbel_tau_log10_start, p.gumbel_tau_log10_end) == (-3.0, -3.0)
    assert (p.gamma_min, p.gamma_max) == (-3.55, -1.85) and cfg.model.length == 1024
    # algo=duo alone: DUO's own curriculum defaults (configs/algo/duo.yaml), not ours
    ours, lines = translate(["algo=duo", "model=small"])
    p = composed(ours).parameterization
    assert (p.curriculum_start, p.curriculum_end) == (100000, 200000)
    assert (p.gumbel_tau_log10_start, p.gumbel_tau_log10_end) == (-1.0, -2.0)
    assert "DUO default parameterization.curriculum_end=200000 (ours differs)" in lines
    assert (
        "DUO name algo=duo -> parameterization=duo parameterization.states=vocab "
        "parameterization.curriculum=true" in lines
    )  # each line names whose name it is
    _, bd3lm = translate(["algo=bd3lm", "block_size=4"])
    assert "BD3-LM name block_size -> parameterization.block_size" in bd3lm
    distill = composed(translate(DUO_DISTILL.split())[0])
    d = distill.parameterization
    assert (d.distill_T, d.update_teacher_every, d.loss_type) == (512, 10000, "kl-bwd")
    assert distill.training.init_from_ckpt == "/ckpts/duo.ckpt" and distill.training.ema == 0.999
    assert composed(translate(["algo=distillation"])[0]).parameterization.distill_T == 64


@pytest.mark.parametrize(
    "bad,hint",
    [
        ("sampling.predictor=analytic", r"analytic .* ours has the ancestral one"),
        ("sampling.noise_removal=none", r"noise_removal=none .* ours always ends at t = 0"),
        ("sampling.psi.high_mode=pure-pc", r"needs sampling.predictor=psi"),
        ("sampling.guid_weight=2.0", r"classifier-free guidance"),
        ("algo.teacher_ema=True", r"teacher_ema=True is not implemented"),
        ("algo.loss_type=posterior", r"loss_type=posterior is not ported"),
        ("algo.posterior_loss_weight=0.5", r"posterior loss is not ported"),
    ],
)
def test_duo_names_we_cannot_honour_say_so(bad, hint):
    with pytest.raises(ConfigError, match=hint):
        translate(["algo=duo_base", "mode=sample_eval", bad])


def test_duo_mdlm_baseline_noise_removal_maps_to_ours():
    """DUO's algo=mdlm with its string noise_removal: greedy -> MDLM's final argmax step."""
    ours, _ = translate(["algo=mdlm", "mode=sample_eval", "sampling.predictor=ancestral_cache",
                         "sampling.noise_removal=greedy"])  # fmt: skip
    cfg = composed(ours)
    assert cfg.sampler._target_.endswith("DDPMCacheSampler") and cfg.sampler.noise_removal is True
    assert cfg.sampler.t_min == 1e-5  # MDLM's grid, then its removal step


BD3LM_ZERO_SHOT = """loader.eval_batch_size=16 model=small algo=bd3lm algo.backbone=hf_dit
data=lm1b-gpt2 +data.insert_valid_eos=False model.length=1024 block_size=4
eval.checkpoint_path=kuleshov-group/bd3lm-owt-block_size4 wandb=null mode=ppl_eval
model.attn_backend=flex"""


@pytest.mark.parametrize(
    "command,corpus",
    [(DUO_ZERO_SHOT, "ag_news"), (BD3LM_ZERO_SHOT, "lm1b_wrap")],
    ids=["duo", "bd3lm"],
)
def test_zero_shot_scripts_score_the_corpus_with_the_checkpoints_model(command, corpus):
    """BD3-LM's ppl_zs_owt_*.sh and DUO's zero_shot_*.sh: `data=<corpus>` in a ppl_eval of a
    checkpoint is the zero-shot table's corpus (the model and its own data stay the
    checkpoint's), the EOS switch goes onto that corpus's rows."""
    ours, lines = translate(command.split())
    cfg = composed(ours)
    assert list(cfg.eval.datasets) == [corpus] and not any(o.startswith("data=") for o in ours)
    assert cfg.eval.dataset_overrides[corpus].layout.doc_eos is False
    # the same corpus in training, or sampled, is the run's data
    train, _ = translate(["algo=bd3lm", "data=lm1b-gpt2", "mode=train"])
    assert "data=lm1b_wrap" in train and not any(o.startswith("eval.datasets") for o in train)


DUO_PSI_LOOP = """mode=sample_eval data=openwebtext-split data.cache_dir=/data model=small algo=duo_base
noise=log-linear sampling.predictor=psi sampling.steps=256 sampling.p_nucleus=0.95
sampling.num_sample_batches=32 eval.checkpoint_path=/ckpts/duo.ckpt loader.eval_batch_size=16
sampling.psi.time_profile=linear-constant-linear-0.9-inv sampling.psi.high_mode=pure-posterior
sampling.psi.middle_mode=constant-remdm-0.01 sampling.psi.low_mode=pure-posterior
sampling.psi.high_frac=0.45 sampling.psi.middle_frac=0.5"""
DUO_PSI_CAPPED = """mode=sample_eval data=openwebtext-split model=small algo=duo_base noise=log-linear
sampling.predictor=psi sampling.steps=256 sampling.p_nucleus=0.9 sampling.num_sample_batches=32
eval.checkpoint_path=/ckpts/duo.ckpt loader.eval_batch_size=16 sampling.psi.time_profile=linear
sampling.psi.high_mode=max-capped-0.01 sampling.psi.middle_mode=max-capped-0.01
sampling.psi.low_mode=max-capped-0.01 sampling.psi.high_frac=0.0 sampling.psi.middle_frac=0.0"""


@pytest.mark.parametrize("command", [DUO_PSI_LOOP, DUO_PSI_CAPPED], ids=["loop", "capped"])
def test_duo_psi_sampler_scripts_compose(command):
    """DUO's scripts/psi_samplers/owt/duo_*.sh: sampler=psi with its phases, modes, profile."""
    cfg = composed(translate(command.split())[0])
    s = cfg.sampler
    assert s._target_ == "samplers.psi.PsiSampler" and s.steps == 256 and s.t_min == 1e-5
    assert s.num_samples == 32 * 16 and s.top_p in (0.95, 0.9)
    if "constant-remdm" in command:
        assert (s.time_profile, s.middle_mode, s.high_frac) == (
            "linear-constant-linear-0.9-inv", "constant-remdm-0.01", 0.45,
        )  # fmt: skip
    else:
        assert s.high_mode == s.low_mode == "max-capped-0.01" and s.middle_frac == 0.0
    ours, _ = translate([*command.split(), "sampling.noise_removal=greedy"])
    assert composed(ours).sampler.greedy_tail is True
    with pytest.raises(ConfigError, match=r"predictor=psi with algo=mdlm: .* sampler=remdm"):
        translate(command.replace("algo=duo_base", "algo=mdlm").split())
    with pytest.raises(ConfigError, match=r"sampling.psi.kappa needs sampling.predictor=psi"):
        translate(["algo=duo_base", "sampling.psi.kappa=0.5"])


def test_bd3lm_first_hitting_false_keeps_the_ancestral_steps():
    ours, lines = translate((BD3LM_README_SAMPLE + " sampling.first_hitting=False").split())
    assert composed(ours).sampler.first_hitting is False
    assert any("sampling.first_hitting -> sampler.first_hitting" in line for line in lines)
