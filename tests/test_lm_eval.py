"""The lm-evaluation-harness adapter (diffusion/evaluation/lm_eval.py) on a tiny trained MDLM:
the Monte-Carlo continuation likelihood, greedy checks, rolling windows, generation, CFG,
an AR checkpoint's exact scores, and lm-eval's own `simple_evaluate` on offline tasks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from diffusion.evaluation.lm_eval import ContextGuidedBackbone, UnmaskLM, cut_text  # noqa: E402
from tests.tiny_lm import ENV, ROOT, SENTENCE  # noqa: E402

CONTEXT, RIGHT, WRONG = "the cat sat on the", " mat.", " the."


@pytest.fixture(scope="module")
def checkpoint(tiny_lm) -> Path:
    return tiny_lm.ckpt


@pytest.fixture(scope="module")
def lm(checkpoint) -> UnmaskLM:
    return UnmaskLM(checkpoint=str(checkpoint), mc_num=32, batch_size=32)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def draws(lm: UnmaskLM, continuation: str, mc_num: int, seed: int) -> torch.Tensor:
    lm.mc_num, lm.seed = mc_num, seed
    try:
        context, cont = lm.encode_pair(CONTEXT, continuation)
        return lm.nelbo_draws(lm.with_bos(context), cont)
    finally:
        lm.mc_num, lm.seed = 32, 0


def test_right_continuation_outranks_wrong(lm):
    (right, _), (wrong, wrong_greedy), (_, tail_greedy) = lm.loglikelihood(
        [
            request("loglikelihood", CONTEXT, RIGHT),
            request("loglikelihood", CONTEXT, WRONG),
            request("loglikelihood", CONTEXT + " m", "at."),
        ]
    )
    assert right > wrong + 3.0, (right, wrong)
    assert tail_greedy and not wrong_greedy


def test_mc_estimate_converges(lm):
    """The spread of the estimate over seeds shrinks with mc_num (about 1/sqrt(mc_num)); on the
    wrong continuation, which the trained model finds unlikely, so the draws vary."""
    spread = {}
    lm.batch_size = 128
    try:
        for mc_num in (8, 128):
            estimates = torch.stack([-draws(lm, WRONG, mc_num, s).mean() for s in range(6)])
            spread[mc_num] = (float(estimates.mean()), float(estimates.std()))
    finally:
        lm.batch_size = 32
    (mean8, se8), (mean128, se128) = spread[8], spread[128]
    assert se128 < se8 / 2, spread
    assert abs(mean8 - mean128) < 3 * se8, spread


def test_draws_are_the_same_for_any_batch_size(lm):
    whole = draws(lm, RIGHT, 32, 0)
    lm.batch_size = 5
    try:
        chunked = draws(lm, RIGHT, 32, 0)
    finally:
        lm.batch_size = 32
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-5)  # float noise only


def test_only_the_continuation_is_masked_with_stratified_ratios(lm, monkeypatch):
    seen: list[torch.Tensor] = []
    inner = lm._backbone

    def spy(n_context: int, cfg_scale: float):
        backbone = inner(n_context, cfg_scale)

        def forward(x_t, sigma=None, attention_mask=None):
            seen.append(x_t.clone())
            return backbone(x_t, sigma, attention_mask)

        return forward

    monkeypatch.setattr(lm, "_backbone", spy)
    context, cont = lm.encode_pair(CONTEXT, RIGHT)
    row, n_context = lm.fit_row(lm.with_bos(context), cont)
    lm.nelbo_draws(lm.with_bos(context), cont)
    x_t = torch.cat(seen)  # (mc_num, n)
    assert x_t.shape == (32, row.numel())
    assert (x_t[:, :n_context] == row[:n_context]).all()  # the context stays clean
    masked = (x_t[:, n_context:] == lm.denoiser.mask_id).float().mean(1)  # (mc_num,)
    # stratified times: draw i has t in [i/k, (i+1)/k), so later draws mask more
    assert masked[:8].mean() < 0.3 < 0.7 < masked[-8:].mean()


@pytest.mark.parametrize("time_conditioned", [False, True])
def test_guided_backbone_masks_the_context_in_the_unconditional_pass(time_conditioned):
    calls = []

    def backbone(x, sigma=None, attention_mask=None):
        calls.append((x.clone(), sigma))
        return x.float()[..., None].expand(*x.shape, 3) * torch.tensor([1.0, 2.0, 3.0])

    def backbone_sigma(t, x_t):  # mask conditioning: a statistic of x_t alone
        return (x_t == 9).float().mean(-1)

    objective = SimpleNamespace(
        mask_id=9, time_conditioned=time_conditioned, backbone_sigma=backbone_sigma
    )
    guided = ContextGuidedBackbone(backbone, objective, n_context=2, cfg_scale=0.5)
    x, sigma = torch.tensor([[1, 2, 3, 9]]), torch.tensor([0.25])
    out = guided(x, sigma)
    (x_c, sigma_c), (x_u, sigma_u) = calls
    assert x_c.tolist() == [[1, 2, 3, 9]] and x_u.tolist() == [[9, 9, 3, 9]]
    assert sigma_c is sigma
    assert sigma_u.tolist() == ([0.25] if time_conditioned else [0.75])
    cond, uncond = backbone(x), backbone(x_u)
    torch.testing.assert_close(out, uncond + 1.5 * (cond - uncond))


def test_cfg_changes_the_score_and_zero_is_unguided(lm):
    context, cont = lm.encode_pair(CONTEXT, RIGHT)
    context = lm.with_bos(context)
    plain = lm.score(context, cont)[0]
    assert lm.score(context, cont, guided=False)[0] == plain  # cfg_scale 0: no guidance
    lm.cfg_scale = 1.0
    try:
        guided = lm.score(context, cont)[0]
    finally:
        lm.cfg_scale = 0.0
    assert guided != plain and torch.isfinite(torch.tensor(guided))


def test_rolling_scores_every_token_once_in_windows(lm, monkeypatch):
    text = " ".join([SENTENCE] * 3)  # 71 characters: three windows of model.length 32
    windows = []
    score = lm.score

    def spy(context, continuation, guided=True):
        windows.append((list(context), list(continuation)))
        return score(context, continuation, guided)

    monkeypatch.setattr(lm, "score", spy)
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    tokens = lm.tok_encode(text)
    assert len(windows) == 3
    assert [t for _, cont in windows for t in cont] == tokens  # each token scored once
    assert all(len(c) + len(t) <= lm.max_length for c, t in windows)
    assert windows[0][0] == [lm.bos_id]
    monkeypatch.setattr(lm, "score", score)
    (scrambled,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text[::-1])])
    assert total > scrambled


def test_generate_until_cuts_at_eos_and_stop_strings(lm):
    outs = lm.generate_until(
        [
            request("generate_until", CONTEXT, {"until": ["\n"], "max_gen_toks": 12}),
            request("generate_until", CONTEXT, {"until": ["."], "max_gen_toks": 12}),
            request("generate_until", CONTEXT, {"until": ["a", "."], "max_gen_toks": 12}),
            request("generate_until", "the cat", {"max_gen_toks": 5}),  # another batch
        ]
    )
    assert outs[:3] == [" mat.", " mat", " m"]  # EOS ends the first: " mat.[EOS][BOS]..."
    assert len(lm.tok_encode(outs[3])) <= 5


def test_generation_settings_follow_gen_kwargs(lm):
    job = lm._generation_job(0, CONTEXT, {"until": "\n", "max_gen_toks": 4})
    assert job["until"] == ["\n"] and job["gen"] == 4 and job["temperature"] == 0.0  # greedy
    assert job["prompt"] == lm.with_bos(lm.tok_encode(CONTEXT))
    sampled = lm._generation_job(0, CONTEXT, {"do_sample": True, "temperature": 0.7})
    assert sampled["temperature"] == 0.7
    default = lm._generation_job(0, CONTEXT, {"do_sample": True})
    assert default["temperature"] == lm.sampler.temperature == 1.0  # configs/sampler/confidence
    long = lm._generation_job(0, CONTEXT * 3, {"max_gen_toks": 100})  # 57 chars, length 32
    assert long["gen"] == 16 and long["prompt"] == lm.tok_encode(CONTEXT * 3)[-16:]
    short = lm._generation_job(0, CONTEXT, {"max_gen_toks": 100})  # 19 prompt tokens fit
    assert short["gen"] == 16 and len(short["prompt"]) == 16
    fits = lm._generation_job(0, "the cat", {"max_gen_toks": 100})
    assert fits["gen"] == 24 and fits["prompt"] == lm.with_bos(lm.tok_encode("the cat"))


def test_cut_text_takes_the_earliest_stop():
    assert cut_text("a. b\nc", ["\n", "."]) == "a"
    assert cut_text("abc", ["", "x"]) == "abc"


def test_bad_arguments_are_clear_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no 'auto'"):
        UnmaskLM(checkpoint=str(checkpoint), batch_size="auto")
    with pytest.raises(ValueError, match=r"unknown model_args \['stepz'\]"):
        UnmaskLM(checkpoint=str(checkpoint), stepz=3)
    with pytest.raises(ValueError, match="sampler='nope'"):
        UnmaskLM(checkpoint=str(checkpoint), sampler="nope")
    with pytest.raises(RuntimeError, match="checkpoint not found"):
        UnmaskLM(checkpoint=str(tmp_path / "missing.ckpt"))


@pytest.fixture(scope="module")
def ar_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """The tiny model's config as an AR model (causal DiT, untrained): exactness needs no
    training."""
    from diffusion.build import build_datamodule, build_module

    saved = OmegaConf.create(torch.load(checkpoint, weights_only=True)["unmask_config"])
    saved.parameterization = OmegaConf.load(ROOT / "configs" / "parameterization" / "ar.yaml")
    saved.backbone.causal = True
    saved.backbone.time_conditioning = False  # the AR loss gives the backbone no sigma
    torch.manual_seed(0)
    module = build_module(saved, build_datamodule(saved))
    path = tmp_path_factory.mktemp("ar") / "ar.ckpt"
    config = OmegaConf.to_container(saved, resolve=True)
    torch.save({"state_dict": module.state_dict(), "unmask_config": config}, path)
    return path


def test_ar_checkpoint_scores_exactly(ar_checkpoint):
    lm = UnmaskLM(checkpoint=str(ar_checkpoint))
    assert lm.autoregressive and lm.sampler.name == "ar"
    context, cont = lm.encode_pair(CONTEXT, RIGHT)
    context = lm.with_bos(context)
    score, greedy = lm.score(context, cont)
    row = torch.tensor(context + cont)
    with torch.no_grad():  # independent: one causal pass, log-softmax, the continuation's terms
        log_p = lm.module.eval_backbone(row[None], None, None)[0].log_softmax(-1)
    steps = range(len(context) - 1, row.numel() - 1)  # position i predicts token i + 1
    expected = sum(float(log_p[i, row[i + 1]]) for i in steps)
    assert score == pytest.approx(expected, abs=1e-4)
    assert greedy == all(int(log_p[i].argmax()) == int(row[i + 1]) for i in steps)
    (rolled,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", SENTENCE)])
    tokens = [lm.bos_id, *lm.tok_encode(SENTENCE)]
    with torch.no_grad():
        log_p = lm.module.eval_backbone(torch.tensor([tokens]), None, None)[0].log_softmax(-1)
    exact = sum(float(log_p[i, tokens[i + 1]]) for i in range(len(tokens) - 1))
    assert rolled == pytest.approx(exact, abs=1e-4)
    (text,) = lm.generate_until([request("generate_until", CONTEXT, {"max_gen_toks": 4})])
    assert isinstance(text, str) and len(lm.tok_encode(text)) <= 4


MC_DOCS = [
    {"context": "the cat sat on the", "choices": ["mat.", "the."], "label": 0},
    {"context": "the cat sat on", "choices": ["mat.", "the"], "label": 1},
    {"context": "the cat", "choices": ["sat", "mat"], "label": 0},
]
GEN_DOCS = [{"context": "the cat sat on the", "answer": " mat"}]


def write_tasks(folder: Path) -> None:
    """Two offline lm-eval tasks: multiple choice (loglikelihood) and generate_until."""
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    (folder / "repeat_mc.yaml").write_text(
        textwrap.dedent(f"""\
        task: repeat_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / "mc.jsonl"}
        output_type: multiple_choice
        test_split: test
        doc_to_text: "{{{{context}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        """)
    )
    (folder / "repeat_gen.yaml").write_text(
        textwrap.dedent(f"""\
        task: repeat_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / "gen.jsonl"}
        output_type: generate_until
        test_split: test
        doc_to_text: "{{{{context}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["."]
          max_gen_toks: 10
        metric_list:
          - metric: exact_match
        """)
    )


def test_simple_evaluate_on_offline_tasks(checkpoint, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path)
    results = simple_evaluate(
        model="unmask",  # through lm-eval's registry, as the CLI does
        model_args=f"checkpoint={checkpoint},mc_num=16",
        tasks=["repeat_mc", "repeat_gen"],
        batch_size=16,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
    assert results["repeat_mc"]["acc,none"] == 1.0
    assert results["repeat_gen"]["exact_match,none"] == 1.0


def test_cli_script_runs_lm_eval_with_our_model(checkpoint, tmp_path):
    write_tasks(tmp_path)
    cmd = [
        sys.executable,
        "scripts/lm_eval.py",
        "--model",
        "unmask",
        "--model_args",
        f"checkpoint={checkpoint},mc_num=4",
        "--tasks",
        "repeat_mc",
        "--include_path",
        str(tmp_path),
        "--batch_size",
        "4",
        "--output_path",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "repeat_mc" in proc.stdout and "acc" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))
