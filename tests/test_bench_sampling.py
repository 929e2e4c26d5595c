"""scripts/bench_sampling.py end to end on the shared tiny model and a tiny AR judge."""

from __future__ import annotations

import json
import sys

import pytest

from tests.tiny_lm import load_script, main_in_process


@pytest.fixture(scope="module")
def tiny_ar(tiny_lm, tmp_path_factory):
    """An AR model on the tiny model's data (a few steps: the judge and the reference row)."""
    run = tmp_path_factory.mktemp("tiny_ar")
    main_in_process(
        run,
        *tiny_lm.overrides,
        "parameterization=ar",
        "backbone.causal=true",
        "sampler=ar",
        "trainer.max_steps=20",
        "checkpointing.every_n_train_steps=20",
        "trainer.val_check_interval=20",
        "eval.samples_after_train=0",
        "logger=none",
    )
    return run / "checkpoints" / "last.ckpt"


def test_bench_with_a_prompt_keeps_it_and_times_only_the_generated_tokens(
    tiny_lm, tiny_ar, tmp_path, monkeypatch
):
    bench = load_script("bench_sampling")
    out = tmp_path / "bench"
    argv = [
        "bench_sampling.py",
        "--ckpt",
        str(tiny_lm.ckpt),
        "--ar",
        str(tiny_ar),
        "--out",
        str(out),
        "--length",
        "32",
        "--prompt-length",
        "8",
        "--steps",
        "8",
        "--batch-sizes",
        "4",
        "--num-samples",
        "4",
        "--only",
        "confidence,ar",
        "--threads",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    rows = {r["sampler"]: r for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    assert {"ar_kv_cache", "confidence", "confidence_prefix", "confidence_dual"} <= set(rows)
    # one token per step over the 24 generated positions, the whole batch every call
    assert rows["confidence"]["nfe"] == 24
    assert rows["confidence"]["rows_per_sample"] == 24
    assert rows["confidence_prefix"]["nfe"] == 24
    assert all(r["prompt_length"] == 8 for r in rows.values())
    summary = (out / "summary.txt").read_text()
    assert "continues a 8-token validation prompt" in summary
    assert "confidence_prefix vs no cache at L=32" in summary
    prof = rows["confidence"]["confidence_profile"]  # 24 steps x 4 rows, the last of each block
    assert prof["probe_row_steps"] == 4 * (24 - 1)  # one mask left in a block: not counted
    assert 0 < prof["top1_median"] <= 1 and prof["top2_ge_threshold"] <= prof["top1_ge_threshold"]
    assert "row-steps with >= 2 masked in the block" in summary
    assert (out / "bench.png").stat().st_size > 0


def test_prompts_are_validation_rows_and_a_bad_length_is_refused(tiny_lm):
    bench = load_script("bench_sampling")
    _, dm, _ = tiny_lm.load()
    prompts = bench.validation_prompts(dm, 3, 5, 32)
    assert prompts.shape == (3, 5)
    assert tiny_lm.tokenizer.decode(prompts[0, 1:]) == "the "  # [BOS], then the sentence
    with pytest.raises(SystemExit, match="--prompt-length 32"):
        bench.validation_prompts(dm, 3, 32, 32)


def test_block_top2_by_hand():
    """The two highest p(argmax) among the masked positions of the block holding each row's
    first mask; rows with fewer than two masked there are left out."""
    import torch

    bench = load_script("bench_sampling")
    M = 3  # mask id; vocabulary 4, blocks of 2 after a prompt of 1
    x = torch.tensor([[0, M, M, M, M], [0, 1, M, 2, M], [0, 1, 2, M, M]])
    p = torch.full((3, 5, 4), 0.1)
    p[..., 0] = torch.tensor([[0, 0.6, 0.9, 0.95, 0.99], [0, 0, 0.5, 0, 0.8], [0, 0, 0, 0.4, 0.7]])
    p[..., 1] = 0.2
    top = bench.block_top2(p.log(), x, M, block=2, start=1)
    # row 0: block [1, 3) -> 0.9, 0.6 (not the later 0.95, 0.99); row 1: block [1, 3) holds one
    # mask (left out); row 2: block [3, 5) -> 0.7, 0.4
    assert torch.allclose(top, torch.tensor([[0.9, 0.6], [0.7, 0.4]]))


def test_the_length_defaults_to_the_checkpoints_and_must_fit_the_ar_cache(
    tiny_lm, tiny_ar, tmp_path, monkeypatch
):
    """--length was 128 whatever the checkpoints' length: at L = 32 the AR row ended in
    "KV cache full"; now it defaults to --ckpt's model.length and a longer one is refused."""
    bench = load_script("bench_sampling")
    base = ["bench_sampling.py", "--ckpt", str(tiny_lm.ckpt), "--ar", str(tiny_ar)]
    base += ["--out", str(tmp_path / "b"), "--steps", "4", "--batch-sizes", "2"]
    base += ["--num-samples", "2", "--only", "ar", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", [*base, "--length", "64"])
    with pytest.raises(
        SystemExit, match=r"--length 64 exceeds the AR checkpoint's model.length=32"
    ):
        bench.main()
    monkeypatch.setattr(sys, "argv", base)
    bench.main()
    rows = [json.loads(line) for line in (tmp_path / "b" / "rows.jsonl").read_text().splitlines()]
    assert rows and all(r["length"] == 32 for r in rows)
