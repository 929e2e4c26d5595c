"""Each mode end to end through main.py's `main()` on the shared tiny model (in process, the
session fixture `tiny_lm`), and bad input; the command line itself in a subprocess."""

import json
import math

import pytest
import torch

from diffusion.build import build_datamodule
from diffusion.checkpoint import CheckpointError
from diffusion.config import ConfigError
from diffusion.evaluation import GenPPLJudge, judge_texts, sample_entropy
from tests.test_hf_backbones import gpt2_dir, mlm_dir  # noqa: F401  (fixtures)
from tests.tiny_lm import ENV, ROOT, STEPS, main_in_process, run_main, unigram_entropy

__all__ = ["ENV", "ROOT", "run_main"]  # other test files start main.py through these


def read(path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tokens(tiny_lm) -> dict[str, torch.Tensor]:
    """The tiny model's train and validation rows as its data module builds them, (R, 32)."""
    saved, _, _ = tiny_lm.load()
    dm = build_datamodule(saved, ["train", "validation"])
    return {split: dm.dataset(split).input_ids for split in ("train", "validation")}


def corpus_entropy(tokens: dict[str, torch.Tensor]) -> float:
    """Cross-entropy (nats/token) of the validation rows under the train rows' unigram
    frequencies, counted here: the best a model that ignores context can score."""
    return unigram_entropy(
        tokens["train"].flatten().tolist(), tokens["validation"].flatten().tolist()
    )


def test_train_writes_checkpoints_ppl_and_samples(tiny_lm, tokens):
    run = tiny_lm.run_dir
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file()
    stats = read(run / "ppl_eval.json")
    assert stats["split"] == "validation" and stats["bound"] is True
    assert stats["steps"] == STEPS
    # the model learned the sentence: its bound is far below what token frequencies give
    entropy = corpus_entropy(tokens)
    assert entropy > 2.0, entropy  # 12 distinct characters + BOS/EOS: about 2.3 nats
    assert stats["nelbo"] < 0.5 * entropy, (stats["nelbo"], entropy)
    assert stats["ppl"] == pytest.approx(math.exp(stats["nelbo"]), rel=1e-9)
    assert stats["unigram_ppl"] == pytest.approx(math.exp(entropy), rel=0.01)  # add-one smoothed
    # every token of every validation row is scored (the meter's count)
    rows, bos = tokens["validation"], tiny_lm.tokenizer.bos_token_id
    assert stats["tokens"] == rows.numel() > 400
    # ppl_excl_bos drops BOS tokens and each row's first position (the tokens AR never scores)
    scored_by_ar = rows != bos
    scored_by_ar[:, 0] = False
    assert stats["tokens_excl_bos"] == int(scored_by_ar.sum())
    samples = [json.loads(r) for r in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(len(s["tokens"]) == 32 for s in samples)


def test_ppl_eval_from_checkpoint_reproduces_the_training_score(tiny_lm, tmp_path):
    """The saved weights score exactly what the trained module scored (same seed, same
    draws); more Monte-Carlo draws move the estimate a little, never the token count."""
    trained = read(tiny_lm.run_dir / "ppl_eval.json")
    tiny_lm.evaluate(tmp_path / "one", "ppl_eval")
    one = read(tmp_path / "one" / "ppl_eval.json")
    assert one["nelbo"] == pytest.approx(trained["nelbo"], rel=1e-6)
    assert one["tokens"] == trained["tokens"]
    tiny_lm.evaluate(tmp_path / "two", "ppl_eval", "eval.mc_samples=2")
    two = read(tmp_path / "two" / "ppl_eval.json")
    assert two["mc_samples"] == 2 and two["tokens"] == trained["tokens"]
    assert two["nelbo"] != one["nelbo"] and abs(two["nelbo"] - one["nelbo"]) < 0.2
    assert abs(two["nelbo"] - math.log(two["ppl"])) < 1e-9


def test_ppl_eval_of_the_train_split_scores_every_row(tiny_lm, tokens, tmp_path):
    """eval.split=train scores the last partial batch too: the training loader's drop_last
    (full batches only) silently left it out of the count and the bound."""
    rows = tokens["train"]
    batch = 7
    assert len(rows) % batch, "the split must end in a partial batch"
    tiny_lm.evaluate(
        tmp_path,
        "ppl_eval",
        "eval.split=train",
        "eval.max_batches=null",
        f"loader.eval_batch_size={batch}",
    )
    stats = read(tmp_path / "ppl_eval.json")
    assert stats["split"] == "train" and stats["tokens"] == rows.numel()


def test_sample_eval_with_a_local_judge(tiny_lm, tmp_path, tiny_judge):
    """sample_eval's report is the judge's score and the entropy of exactly the written
    samples (specials stripped, cut at the first EOS)."""
    tiny_lm.evaluate(
        tmp_path,
        "sample_eval",
        "sampler=ddpm",
        "sampler.steps=16",
        "sampler.num_samples=3",
        "sampler.batch_size=2",
        "eval.compute_generative_perplexity=true",
        f"eval.gen_ppl_eval_model_name_or_path={tiny_judge}",
    )
    report = read(tmp_path / "sample_eval.json")
    assert report["num_samples"] == 3 and report["sampler"] == "DDPMSampler"
    assert 1 <= report["nfe"] <= 16
    rows = [json.loads(r) for r in (tmp_path / "samples.jsonl").read_text().splitlines()]
    tokens = torch.tensor([r["tokens"] for r in rows])  # (3, 32)
    assert tokens.shape == (3, 32) and (tokens != tiny_lm.module.objective.mask_id).all()
    assert report["entropy"] == pytest.approx(sample_entropy(tokens), rel=1e-6)
    texts, ended = judge_texts(tokens, tiny_lm.tokenizer)
    expected = GenPPLJudge(tiny_judge, batch_size=2).score(texts, ended)
    assert report["gen_ppl"] == pytest.approx(expected["gen_ppl"], rel=1e-4)
    assert report["gen_ppl_tokens"] == expected["gen_ppl_tokens"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope\.ckpt"):
        main_in_process(
            tmp_path,
            "debug=tiny_cpu",
            "mode=ppl_eval",
            f"eval.checkpoint_path={tmp_path / 'nope.ckpt'}",
        )


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"cannot read .*bad\.ckpt"):
        main_in_process(
            tmp_path, "debug=tiny_cpu", "mode=sample_eval", f"eval.checkpoint_path={bad}"
        )


def test_a_model_key_contradicting_the_checkpoint_is_a_clear_error(tiny_lm, tmp_path):
    contradiction = r"model\.n_blocks=3 \(the checkpoint has model\.n_blocks=2\)"
    keys = [o for o in tiny_lm.overrides if not o.startswith("model.n_blocks=")]
    with pytest.raises(ConfigError, match=contradiction):
        main_in_process(
            tmp_path,
            *keys,
            "mode=ppl_eval",
            f"eval.checkpoint_path={tiny_lm.ckpt}",
            "model.n_blocks=3",
        )


EVAL_KEYS = ["eval.max_batches=2", "loader.eval_batch_size=4"]  # evaluation keys, not the model's


def test_evaluation_rebuilds_the_model_from_the_checkpoint(tiny_lm, tokens, tmp_path):
    """ppl_eval with only the checkpoint (no preset, no model or data key) gives the NELBO of
    the run with the training overrides repeated; model=small contradicts it, by name."""
    ckpt = f"eval.checkpoint_path={tiny_lm.ckpt}"
    evaluate = ["mode=ppl_eval", ckpt, *EVAL_KEYS]
    main_in_process(tmp_path / "bare", *evaluate)
    main_in_process(tmp_path / "repeated", *evaluate, *tiny_lm.overrides)
    bare, repeated = (read(tmp_path / d / "ppl_eval.json") for d in ("bare", "repeated"))
    assert bare["nelbo"] == repeated["nelbo"] and bare["tokens"] == repeated["tokens"] == 2 * 4 * 32
    assert bare["nelbo"] < 0.5 * corpus_entropy(tokens)  # the trained weights, not fresh ones
    with pytest.raises(ConfigError, match=r"model\.hidden_size=768 \(the checkpoint has model"):
        main_in_process(tmp_path / "small", *evaluate, "model=small")
    main_in_process(
        tmp_path / "sample",
        "mode=sample_eval",
        ckpt,
        "sampler.num_samples=2",
        "sampler.steps=4",
        "eval.compute_generative_perplexity=false",
    )
    assert len((tmp_path / "sample" / "samples.jsonl").read_text().splitlines()) == 2


ONE_SHOT = '''
import torch
from samplers.base import Sampler


class OneShotSampler(Sampler):
    """Unmask everything at once: the argmax of log p(x0 | x_t) at t = 1 (one network call)."""

    name = "one_shot"
    requires = frozenset({"absorbing"})

    def _generate(self, model, x, generator, record):
        log_p = model.log_p_x0(x, torch.ones(x.shape[0], device=x.device))
        return torch.where(x == model.mask_id, log_p.argmax(-1), x)
'''


def test_a_new_sampler_is_one_class_and_one_yaml(tiny_lm, tmp_path, monkeypatch):
    """A sampler class and its yaml in a folder of their own, on Hydra's search path: main()
    validates it by its declared capabilities and samples with it; no file of ours changes."""
    plugin = tmp_path / "plugin"
    (plugin / "sampler").mkdir(parents=True)
    (plugin / "one_shot_sampler.py").write_text(ONE_SHOT)
    (plugin / "sampler" / "one_shot.yaml").write_text(
        "_target_: one_shot_sampler.OneShotSampler\nnum_samples: 3\nbatch_size: 2\n"
    )
    monkeypatch.syspath_prepend(str(plugin))
    main_in_process(
        tmp_path / "run",
        "mode=sample_eval",
        f"eval.checkpoint_path={tiny_lm.ckpt}",
        f"hydra.searchpath=[file://{plugin}]",
        "sampler=one_shot",
        "eval.compute_generative_perplexity=false",
    )
    report = read(tmp_path / "run" / "sample_eval.json")
    assert report["sampler"] == "OneShotSampler" and report["num_samples"] == 3
    assert report["nfe"] == 1  # one call per batch
    rows = [
        json.loads(r)["tokens"]
        for r in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    ]
    # every masked position filled at once by the argmax of the model's p(x0 | x_1)
    mask = tiny_lm.module.objective.mask_id
    bos = tiny_lm.tokenizer.bos_token_id
    x = torch.tensor([[bos if i == 0 and rows[0][0] == bos else mask for i in range(32)]])
    with torch.no_grad():
        log_p = tiny_lm.module.denoiser().log_p_x0(x, torch.ones(1))
    assert rows == [torch.where(x == mask, log_p.argmax(-1), x)[0].tolist()] * 3


@pytest.mark.parametrize(
    ("backbone", "folder"), [("hf_mlm", "mlm_dir"), ("hf_causal_bidirectional", "gpt2_dir")]
)
def test_hf_backbones_train_with_the_root_defaults(backbone, folder, request, tmp_path):
    """No conditioning or tokenizer key to set: the objective's mask_conditioning is off for a
    backbone that ignores sigma, and the data takes the pretrained model's tokenizer."""
    path = request.getfixturevalue(folder)
    main_in_process(
        tmp_path,
        "debug=tiny_cpu",
        f"backbone={backbone}",
        f"backbone.pretrained={path}",
        "model.length=16",
    )
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    stats = read(tmp_path / "ppl_eval.json")
    assert stats["steps"] == 4 and stats["tokens"] == 2 * 4 * 16  # eval.max_batches=2, full rows
    assert math.isfinite(stats["nelbo"]) and stats["ppl"] == pytest.approx(math.exp(stats["nelbo"]))


def test_unknown_config_key_is_a_clear_error(tmp_path):
    """The command line as typed: Hydra refuses the key and main.py exits non-zero."""
    proc = run_main(tmp_path, "trainer.max_stepz=3", check=False)
    assert proc.returncode != 0 and "max_stepz" in proc.stderr
