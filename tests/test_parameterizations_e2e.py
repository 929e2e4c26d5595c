"""Each parameterization trains, evaluates and samples through main.py; the offline judge.

The offline pipeline of the README: train an AR judge and an MDLM on the same corpus,
sample from the MDLM, score the samples with the AR checkpoint (no download).
"""

import json

import pytest

from tests.test_main_e2e import run_main

PARAMETERIZATIONS = {
    "d3pm": ["parameterization=d3pm", "T=1000", "time_conditioning=true", "sampler=ddpm"],
    "sedd": ["parameterization=sedd", "time_conditioning=true", "sampler=analytic"],
    "ar": ["experiment=ar_shakespeare"],
}


@pytest.mark.slow  # heavy end to end (CI's second tier): keeps the default tier under 10 min
@pytest.mark.parametrize("name", sorted(PARAMETERIZATIONS))
def test_parameterization_end_to_end(name, tmp_path):
    overrides = PARAMETERIZATIONS[name]
    run_main(tmp_path / "train", *overrides)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    run_main(tmp_path / "ppl", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}", *overrides)
    stats = json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())
    assert stats["bound"] is (name != "ar") and stats["ppl"] > 1
    run_main(tmp_path / "sample", "mode=sample_eval", f"eval.checkpoint_path={ckpt}", *overrides)
    report = json.loads((tmp_path / "sample" / "sample_eval.json").read_text())
    assert report["num_samples"] == 2 and report["entropy"] > 0


def test_offline_judge_pipeline_and_trajectory_gif(trained_ar, tmp_path):
    mdlm = tmp_path / "mdlm"
    run_main(mdlm, "eval.samples_after_train=0")
    run_main(
        tmp_path / "sample",
        "mode=sample_eval",
        f"eval.checkpoint_path={mdlm / 'checkpoints' / 'last.ckpt'}",
        "eval.compute_generative_perplexity=true",
        f"eval.gen_ppl_eval_model_name_or_path={trained_ar}",
        "eval.trajectory_gif=true",
    )
    report = json.loads((tmp_path / "sample" / "sample_eval.json").read_text())
    assert report["judge"] == str(trained_ar)
    assert report["gen_ppl"] > 1 and report["gen_ppl_tokens"] > 0
    gif = tmp_path / "sample" / "trajectory.gif"
    assert gif.is_file() and gif.read_bytes()[:6] == b"GIF89a"


def test_a_diffusion_checkpoint_is_refused_as_judge(tmp_path):
    mdlm = tmp_path / "mdlm"
    run_main(mdlm, "eval.samples_after_train=0")
    ckpt = mdlm / "checkpoints" / "last.ckpt"
    proc = run_main(
        tmp_path / "sample",
        "mode=sample_eval",
        f"eval.checkpoint_path={ckpt}",
        "eval.compute_generative_perplexity=true",
        f"eval.gen_ppl_eval_model_name_or_path={ckpt}",
        check=False,
    )
    assert proc.returncode != 0 and "is not an AR checkpoint" in proc.stderr


@pytest.fixture(scope="module")
def trained_ar(tmp_path_factory):
    run = tmp_path_factory.mktemp("ar")
    run_main(run, "experiment=ar_shakespeare", "eval.samples_after_train=0")
    return run / "checkpoints" / "last.ckpt"
