"""Each parameterization trains, evaluates and samples through main() in process; the
offline judge.

The offline pipeline of the README: train an AR judge on the corpus of the shared tiny MDLM,
sample from the MDLM, score the samples with the AR checkpoint (no download).
"""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from diffusion.build import module_from_checkpoint
from diffusion.config import ConfigError
from diffusion.evaluation import judge_texts, sample_entropy
from diffusion.evaluation.judges import build_judge
from tests.tiny_lm import main_in_process

PARAMETERIZATIONS = {
    "d3pm": ["parameterization=d3pm", "T=1000", "time_conditioning=true", "sampler=ddpm"],
    "sedd": ["parameterization=sedd", "time_conditioning=true", "sampler=analytic"],
    "ar": ["experiment=ar_shakespeare"],
}


def read(path) -> dict:
    return json.loads(path.read_text())


def samples(run_dir) -> torch.Tensor:
    """samples.jsonl's token rows, (N, L)."""
    rows = (run_dir / "samples.jsonl").read_text().splitlines()
    return torch.tensor([json.loads(r)["tokens"] for r in rows])


@pytest.mark.parametrize("name", sorted(PARAMETERIZATIONS))
def test_parameterization_end_to_end(name, tmp_path):
    """Train 4 steps, then ppl_eval from the checkpoint scores exactly what the trained module
    scored (a save/load or EMA bug moves it), and sample_eval's entropy is its samples'."""
    overrides = ["debug=tiny_cpu", *PARAMETERIZATIONS[name]]
    main_in_process(tmp_path / "train", *overrides, "eval.samples_after_train=0")
    trained = read(tmp_path / "train" / "ppl_eval.json")
    evaluate = [*overrides, f"eval.checkpoint_path={tmp_path / 'train/checkpoints/last.ckpt'}"]
    main_in_process(tmp_path / "ppl", *evaluate, "mode=ppl_eval")
    stats = read(tmp_path / "ppl" / "ppl_eval.json")
    assert stats["bound"] is (name != "ar") and stats["parameterization"] == name.upper()
    assert stats["nelbo"] == pytest.approx(trained["nelbo"], rel=1e-6)
    assert stats["tokens"] == trained["tokens"] > 0
    # 4 steps from random weights cannot score near 0 (an input leaking x0 would), nor NaN
    vocab = module_from_checkpoint(tmp_path / "train/checkpoints/last.ckpt", "test")[1].vocab_size
    assert math.isfinite(stats["nelbo"]) and stats["nelbo"] > 0.5 * math.log(vocab), (stats, vocab)
    main_in_process(tmp_path / "sample", *evaluate, "mode=sample_eval")
    report = read(tmp_path / "sample" / "sample_eval.json")
    rows = samples(tmp_path / "sample")
    assert report["num_samples"] == 2 and rows.shape == (2, 32)
    assert report["entropy"] == pytest.approx(sample_entropy(rows), rel=1e-6)


@pytest.fixture(scope="module")
def trained_ar(tiny_lm, tmp_path_factory):
    """An AR judge trained on the tiny model's corpus (the default tiny size, 60 steps)."""
    run = tmp_path_factory.mktemp("ar")
    data = [o for o in tiny_lm.overrides if not o.startswith("model.")]
    main_in_process(
        run,
        *data,
        "experiment=ar_shakespeare",
        "trainer.max_steps=60",
        "trainer.val_check_interval=60",
        "checkpointing.every_n_train_steps=60",
        "optim.lr=3e-3",
        "loader.global_batch_size=16",
        "eval.samples_after_train=0",
        "logger=none",
    )
    return run


def test_offline_judge_pipeline_and_trajectory_gif(tiny_lm, trained_ar, tmp_path):
    judge = trained_ar / "checkpoints" / "last.ckpt"
    # the judge learned the sentence: its exact perplexity is far below the unigram's
    ar = read(trained_ar / "ppl_eval.json")
    assert ar["bound"] is False and ar["ppl"] < 0.5 * ar["unigram_ppl"], ar
    tiny_lm.evaluate(
        tmp_path,
        "sample_eval",
        "eval.compute_generative_perplexity=true",
        f"eval.gen_ppl_eval_model_name_or_path={judge}",
        "eval.trajectory_gif=true",
    )
    report = read(tmp_path / "sample_eval.json")
    assert report["judge"] == str(judge)
    # the report is the judge's score of exactly the written samples
    texts, ended = judge_texts(samples(tmp_path), tiny_lm.tokenizer)
    scorer = build_judge(
        OmegaConf.create(
            {"eval": {"gen_ppl_eval_model_name_or_path": str(judge), "gen_ppl_batch_size": 3}}
        ),
        torch.device("cpu"),
    )
    expected = scorer.score(texts, ended)
    assert report["gen_ppl"] == pytest.approx(expected["gen_ppl"], rel=1e-4)
    assert report["gen_ppl_tokens"] == expected["gen_ppl_tokens"] > 0
    # a text the judge was trained on scores far better than the samples or shuffled text
    right = scorer.score(["the cat sat on the mat."], [True])["gen_ppl"]
    wrong = scorer.score([".tam eht no tas tac eht"], [True])["gen_ppl"]
    assert right < 0.5 * wrong, (right, wrong)
    gif = tmp_path / "trajectory.gif"
    assert gif.is_file() and gif.read_bytes()[:6] == b"GIF89a"


def test_a_diffusion_checkpoint_is_refused_as_judge(tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="is not an AR checkpoint"):
        tiny_lm.evaluate(
            tmp_path,
            "sample_eval",
            "eval.compute_generative_perplexity=true",
            f"eval.gen_ppl_eval_model_name_or_path={tiny_lm.ckpt}",
        )
