"""DUO's own Lightning checkpoints (s-sahoo/duo: duo_base / duo / distillation, and its MDLM,
AR and SEDD baselines) load with parity.

A tiny synthetic checkpoint laid out as DUO's main.py saves it (MDLM's Lightning layout, the
model under `algo.*`, `noise.type: log-linear`, the EMA shadow list) is converted with
`models.formats`, the module is rebuilt from the converted dict, and its loss on fixed draws
(t, x_t) is compared with DUO's uniform-state NELBO written here from its description (the
CTMC integrand summed over every id, DUO's vocabulary being `len(tokenizer)`: GPT-2 plus the
[PAD] it adds, 50 258 ids) on a forward of MDLM's DiT (test_formats_mdlm.reference_logits),
not with unmask's modules. Negative twins: two blocks swapped; the mask id dropped from the
states (K = V - 1, what a converter that treated DUO like MDLM would build).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models.formats import FormatError, detect_format, load_checkpoint
from tests.test_formats_mdlm import (
    LEN,
    MASK,
    TOL,
    V,
    converted_module,
    mdlm_config,
    mdlm_params,
    reference_logits,
    swap_blocks,
    write_lightning,
)

EPS = 1e-3  # DUO's noise.eps (log-linear: alpha_t = 1 - (1 - eps) t)


def duo_config(name: str = "duo_base", **algo):
    """DUO's composed config as its main.py pickles it: the model under `algo`, DUO's
    log-linear noise, its data and sampling sections."""
    cfg = OmegaConf.to_container(mdlm_config("subs", "dit", False))
    for key in ("backbone", "parameterization", "time_conditioning", "T", "subs_masking"):
        del cfg[key]
    base = {
        "name": name, "backbone": "dit", "parameterization": "mean", "time_conditioning": True,
        "T": 0, "subs_masking": False, "causal_attention": False, "ignore_bos": False,
        "loss_type": "elbo",
    }  # fmt: skip
    if name == "duo":
        base["curriculum"] = {"mode": "simple", "start": 0, "end": 500_000, "gamma_min": -3.55,
                              "gamma_max": -1.85}  # fmt: skip
    if name == "distillation":
        base |= {"T": 64, "loss_type": "kl-bwd", "update_teacher_every": 10_000}
    if name == "mdlm":
        base |= {"parameterization": "subs", "time_conditioning": False}
    if name == "ar":
        base |= {"parameterization": "ar", "time_conditioning": False, "causal_attention": True}
    cfg["algo"] = base | algo
    cfg["noise"] = {"type": "log-linear", "eps": EPS}
    cfg["data"] |= {"insert_train_eos": True, "insert_valid_eos": True, "streaming": False}
    cfg["sampling"] = {"predictor": "ancestral", "steps": 1000, "noise_removal": "ancestral"}
    return OmegaConf.create(cfg)


def duo_nelbo(log_x: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """(B, L) DUO's per-token NELBO integrand, summed over every id z' != x_t (float64):
    (beta / K) sum [m(z') / m(x_t) - q(z') / q(x_t) + q(z') / q(x_t) log(q(z') m(x_t) /
    (q(x_t) m(z')))], q = K alpha x + 1 - alpha, m the same with x_theta, beta = -alpha' / alpha,
    K = every id of the vocabulary."""
    K = log_x.shape[-1]
    a = (1 - (1 - EPS) * t.double())[:, None, None]
    beta = (1 - EPS) / a
    x = log_x.double().exp()
    q = K * a * torch.nn.functional.one_hot(x0, K).double() + 1 - a
    m = K * a * x + 1 - a
    qz, mz = q.gather(-1, x_t[..., None]), m.gather(-1, x_t[..., None])
    terms = m / mz - q / qz + q / qz * torch.log(q * mz / (qz * m))
    terms = terms.masked_fill(torch.nn.functional.one_hot(x_t, K).bool(), 0.0)
    return (beta / K * terms.sum(-1, keepdim=True)).squeeze(-1)


def prior_kl(K: int) -> float:
    """KL(q_1(. | x) || uniform over K ids) at alpha_1 = eps, by hand."""
    a = EPS
    hi, lo = a + (1 - a) / K, (1 - a) / K
    return hi * math.log(hi * K) + (K - 1) * lo * math.log(lo * K)


T_FIXED = torch.tensor([0.35, 0.8])
X = torch.tensor([[5, 11, 17, 50256, 3, 3, 9, 9, 100, 7], [1, 2, 50000, 8, 4, 5, 6, 7, 8, 0]])


def fixed_draws() -> torch.Tensor:
    """x_t for X: some tokens changed, one of them to id 50 257 (DUO's [PAD], a state there)."""
    x_t = X.clone()
    x_t[0, 3], x_t[1, 5], x_t[1, 7], x_t[1, 1] = MASK, 17, 4242, MASK
    return x_t


def module_nelbo(ckpt, x_t: torch.Tensor) -> torch.Tensor:
    """The rebuilt module's per-token DUO loss on X with t and x_t fixed (EMA copy, as
    evaluation runs it)."""
    module = converted_module(ckpt)
    obj = module.objective
    obj.sample_t = lambda n, device, generator=None, rows=None: T_FIXED
    obj.q_xt = lambda x0, alpha, generator=None, rows=None: x_t
    with torch.no_grad():
        out = obj.loss(module.eval_backbone, X, torch.ones_like(X))
    return out.nll.double()


def test_duo_lightning_checkpoint_nelbo_parity_ema_raw_and_twins(tmp_path):
    raw, shadow = mdlm_params(seed=11), mdlm_params(seed=12)
    for p in (raw, shadow):  # DUO's [PAD] row takes most mass: dropping it must show
        p["output_layer.linear.bias"][MASK] = 12.0
    path = write_lightning(tmp_path / "duo.ckpt", raw, shadow, duo_config())
    assert detect_format(path) == "mdlm_ckpt"
    ckpt = load_checkpoint(str(path))
    conf = ckpt["unmask_config"]
    assert conf["parameterization"]["_target_"].endswith("duo.DUO")
    assert conf["parameterization"]["states"] == "vocab" and conf["time_conditioning"] is True
    assert conf["sampler"]["_target_"].endswith("UniformSampler")
    x_t = fixed_draws()
    sigma = -torch.log(1 - (1 - EPS) * T_FIXED)  # DUO conditions its DiT on -log alpha_t
    for params, converted in ((shadow, ckpt), (raw, load_checkpoint(str(path), use_ema=False))):
        log_x = reference_logits(params, x_t, sigma, time_conditioning=True).log_softmax(-1)
        want = duo_nelbo(log_x, X, x_t, T_FIXED) + prior_kl(V)
        torch.testing.assert_close(module_nelbo(converted, x_t), want, **TOL)
    log_x = reference_logits(shadow, x_t, sigma, time_conditioning=True).log_softmax(-1)
    want = duo_nelbo(log_x, X, x_t, T_FIXED) + prior_kl(V)
    twin = write_lightning(tmp_path / "twin.ckpt", raw, swap_blocks(shadow), duo_config())
    assert not torch.allclose(module_nelbo(load_checkpoint(str(twin)), x_t), want, **TOL)
    # a converter that drops the [PAD] id from the states (K = V - 1, as ours for MDLM) is off
    naive = load_checkpoint(str(path), overrides=("parameterization.states=real",))
    x_t_real = x_t.clone()
    x_t_real[0, 3], x_t_real[1, 1] = 9, 2  # the real-states process never draws the mask id
    log_x = reference_logits(shadow, x_t_real, sigma, time_conditioning=True).log_softmax(-1)
    want_real = duo_nelbo(log_x, X, x_t_real, T_FIXED) + prior_kl(V)
    assert not torch.allclose(module_nelbo(naive, x_t_real), want_real, **TOL)


def test_distilled_and_curriculum_checkpoints_load_as_duo(tmp_path):
    raw, shadow = mdlm_params(seed=13), mdlm_params(seed=14)
    for name in ("duo", "distillation"):
        path = write_lightning(tmp_path / f"{name}.ckpt", raw, shadow, duo_config(name))
        conf = load_checkpoint(str(path))["unmask_config"]
        assert conf["parameterization"]["_target_"].endswith("duo.DUO") and conf["T"] == 0
        assert conf["parameterization"]["curriculum"] is False  # 1M steps: past it


def test_the_converted_duo_samples_over_every_id(tmp_path):
    """sampler=uniform on the converted checkpoint: its states are all V ids (the mask id,
    DUO's [PAD], included; tests/test_duo.py checks the sampler draws them), one network call
    per step."""
    from samplers.base import GuidedDenoiser
    from samplers.uniform import UniformSampler, states

    raw, shadow = mdlm_params(seed=15), mdlm_params(seed=16)
    path = write_lightning(tmp_path / "duo.ckpt", raw, shadow, duo_config())
    module = converted_module(load_checkpoint(str(path)))
    denoiser = module.objective.denoiser(module.eval_backbone)
    assert denoiser.mask_is_state
    everything = states(GuidedDenoiser(denoiser, torch.zeros(1, LEN, dtype=torch.bool)), "cpu")
    assert bool(everything.all())
    out = UniformSampler(steps=3).sample(
        denoiser, 4, LEN, generator=torch.Generator().manual_seed(0)
    )
    assert out.nfe == 3 and out.tokens.shape == (4, LEN) and bool((out.tokens < V).all())


@pytest.mark.parametrize("name,target", [("mdlm", "SUBS"), ("sedd", "SEDD"), ("ar", "AR")])
def test_duos_baselines_load(tmp_path, name, target):
    """DUO's MDLM / SEDD / AR baselines (its Google Drive ar.ckpt, mdlm.ckpt, sedd.ckpt): the
    AR one with DUO's causal DiT, checked against MDLM's AR forward."""
    causal = name == "ar"
    raw, shadow = mdlm_params(causal, seed=17), mdlm_params(causal, seed=18)
    path = write_lightning(tmp_path / f"{name}.ckpt", raw, shadow, duo_config(name))
    ckpt = load_checkpoint(str(path))
    assert ckpt["unmask_config"]["parameterization"]["_target_"].endswith(target)
    if causal:
        from tests.test_formats_mdlm import X as X_MASKED
        from tests.test_formats_mdlm import converted_logits

        want = reference_logits(shadow, X_MASKED, causal=True)
        torch.testing.assert_close(converted_logits(ckpt, X_MASKED), want, **TOL)


def _expect(path: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        load_checkpoint(str(path))


def test_duo_lightning_strict_errors(tmp_path):
    raw, shadow = mdlm_params(seed=19), mdlm_params(seed=20)

    def write(name: str, cfg) -> Path:
        return write_lightning(tmp_path / f"{name}.ckpt", raw, shadow, cfg)

    _expect(write("d3pm", duo_config("d3pm")), r"d3pm\.ckpt: algo\.name='d3pm'")
    _expect(
        write("untimed", duo_config(time_conditioning=False)),
        r"untimed\.ckpt: algo\.time_conditioning=False; duo_base models are time-conditioned",
    )
    cosine = duo_config()
    cosine.noise.type = "cosine"
    _expect(write("cosine", cosine), r"cosine\.ckpt: noise\.type='cosine'")
    _expect(
        write("causal", duo_config(causal_attention=True)),
        r"causal\.ckpt: algo\.causal_attention=True with algo\.name='duo_base'",
    )
    _expect(write("discrete", duo_config(T=1000)), r"discrete\.ckpt: algo\.T=1000")
    other_eps = duo_config()
    other_eps.noise.eps = 1e-4
    _expect(write("eps", other_eps), r"eps\.ckpt: noise\.eps=0\.0001")


def test_duos_commands_run_on_a_duo_trained_with_its_states(tmp_path):
    """parameterization.states=vocab trains through main.py, and DUO's own commands
    (gen_ppl_owt_duo.sh with the README's greedy tail, eval_owt_duo.sh) run on its checkpoint:
    the sampler takes DUO's steps, the bound is DUO's NELBO over every id."""
    import json

    from tests.tiny_lm import run_main

    duo = ["parameterization=duo", "parameterization.states=vocab", "sampler=uniform"]
    run_main(tmp_path / "train", *duo)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    run_main(tmp_path / "ppl", "mode=ppl_eval", "algo=duo_base", f"eval.checkpoint_path={ckpt}",
             "sampling.num_sample_batches=0")  # fmt: skip
    stats = json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())
    assert stats["bound"] is True and stats["parameterization"] == "DUO" and stats["ppl"] > 1
    run_main(tmp_path / "sample", "mode=sample_eval", "algo=duo_base", "seed=1",
             f"eval.checkpoint_path={ckpt}", "loader.eval_batch_size=2",
             "sampling.num_sample_batches=1", "sampling.steps=8",
             "sampling.noise_removal=greedy")  # fmt: skip
    report = json.loads((tmp_path / "sample" / "sample_eval.json").read_text())
    assert report["sampler"] == "UniformSampler" and report["steps"] == 8
    # DUO's schedule: 8 steps to t = 1e-5, then its greedy noise-removal step
    assert report["num_samples"] == 2 and report["nfe"] == 9 and report["entropy"] > 0
    # its Psi-sampler scripts (scripts/psi_samplers/owt/duo_max_capped_remdm.sh's names)
    run_main(tmp_path / "psi", "mode=sample_eval", "algo=duo_base", "noise=log-linear",
             f"eval.checkpoint_path={ckpt}", "loader.eval_batch_size=2",
             "sampling.num_sample_batches=1", "sampling.predictor=psi", "sampling.steps=4",
             "sampling.psi.high_mode=max-capped-0.01", "sampling.psi.middle_mode=pure-pc",
             "sampling.psi.low_mode=max-capped-0.01")  # fmt: skip
    psi = json.loads((tmp_path / "psi" / "sample_eval.json").read_text())
    assert psi["sampler"] == "PsiSampler" and psi["nfe"] == 5 and psi["entropy"] > 0


def test_duos_hugging_face_release_is_named_not_guessed(tmp_path):
    """A folder laid out as DUO's HF release (config.json model_type duo) is refused with what
    to load instead, not as an unknown format."""
    import json

    from models.formats import detect_format

    folder = tmp_path / "duo-distilled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "duo", "vocab_size": 50258}))
    with pytest.raises(FormatError, match=r"model_type='duo': DUO's Hugging Face releases .* "
                       r"Lightning \.ckpt"):  # fmt: skip
        detect_format(folder)


def test_an_lm1b_duo_checkpoint_keeps_berts_mask_id_as_a_state(tmp_path):
    """DUO's LM1B runs (bert-base-uncased, 30,522 ids, [MASK] = 103 among them, lm1b-wrap):
    rebuilt on lm1b_wrap with the mask id 103 a state; the NELBO over all 30,522 ids matches
    DUO's written out, a token drawn as 103 included."""
    from diffusion.build import build_module

    Vb, mask = 30522, 103
    raw, shadow = ({k: v[:Vb] if v.shape[0] == V else v for k, v in mdlm_params(seed=s).items()}
                   for s in (21, 22))  # fmt: skip
    cfg = duo_config()
    cfg.data = {"train": "lm1b", "valid": "lm1b", "tokenizer_name_or_path": "bert-base-uncased",
                "wrap": True, "insert_train_eos": True, "insert_valid_eos": True}  # fmt: skip
    ckpt = load_checkpoint(str(write_lightning(tmp_path / "lm1b.ckpt", raw, shadow, cfg)))
    conf = ckpt["unmask_config"]
    assert conf["data"]["name"] == "lm1b_wrap" and ckpt["unmask_format"]["mask_id"] == mask

    class Vocab:  # bert-base-uncased as the data module reports it
        vocab_size, mask_id = Vb, mask

    module = build_module(OmegaConf.create(conf), Vocab())
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.eval()
    obj = module.objective
    assert obj.K == Vb and obj.mask_id == mask
    x0 = torch.tensor(
        [[101, 7, 2000, 3, 102, 55, 9, 8, 30000, 4], [101, 1, 2, 3, 4, 5, 6, 7, 8, 102]]
    )
    x_t = x0.clone()
    x_t[0, 2], x_t[1, 4], x_t[1, 6] = mask, 29999, mask
    obj.sample_t = lambda n, device, generator=None, rows=None: T_FIXED
    obj.q_xt = lambda x0, alpha, generator=None, rows=None: x_t
    with torch.no_grad():
        got = obj.loss(module.eval_backbone, x0, torch.ones_like(x0)).nll.double()
    sigma = -torch.log(1 - (1 - EPS) * T_FIXED)
    log_x = reference_logits(shadow, x_t, sigma, time_conditioning=True).log_softmax(-1)
    torch.testing.assert_close(got, duo_nelbo(log_x, x0, x_t, T_FIXED) + prior_kl(Vb), **TOL)
