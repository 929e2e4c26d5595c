"""Zero-shot evaluation: one ppl_eval run scores a checkpoint on a list of corpora (MDLM's
zero-shot table), each tokenized with the model's own tokenizer."""

import json

import pytest

from tests.test_dataloader import FIX
from tests.test_main_e2e import run_main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("train")
    run_main(run, "eval.samples_after_train=0")
    return run / "checkpoints" / "last.ckpt"


def test_zero_shot_table_over_corpora(ckpt, tmp_path):
    over = [
        "++eval.dataset_overrides.ptb.source.path=json",
        f"++eval.dataset_overrides.ptb.source.data_files.validation={FIX / 'ptb.jsonl'}",
        "++eval.dataset_overrides.wikitext2.source.path=json",
        "++eval.dataset_overrides.wikitext2.source.name=null",
        f"++eval.dataset_overrides.wikitext2.source.data_files.validation={FIX / 'wikitext.jsonl'}",
        f"++eval.dataset_overrides.lambada.source.data_files.test={FIX / 'lambada.jsonl'}",
    ]
    run_main(
        tmp_path / "zs",
        "mode=ppl_eval",
        f"eval.checkpoint_path={ckpt}",
        "eval.datasets=[shakespeare_char,ptb,wikitext2,lambada]",
        "eval.max_batches=6",
        *over,
    )
    report = json.loads((tmp_path / "zs" / "ppl_eval.json").read_text())
    rows = report["zero_shot"]
    assert report["length"] == report["trained_length"]  # the evaluated length is recorded
    assert [r["dataset"] for r in rows] == ["shakespeare_char", "ptb", "wikitext2", "lambada"]
    assert all(r["ppl"] > 1 and r["tokens"] > 0 and r["bound"] for r in rows)
    table = (tmp_path / "zs" / "zero_shot.md").read_text()
    assert "| ptb |" in table and "upper bound" in table
    # the training corpus through the zero-shot path scores exactly as a plain ppl_eval does
    run_main(
        tmp_path / "plain", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}", "eval.max_batches=6"
    )
    plain = json.loads((tmp_path / "plain" / "ppl_eval.json").read_text())
    assert rows[0]["nelbo"] == pytest.approx(plain["nelbo"], rel=1e-9)
    assert rows[0]["tokens"] == plain["tokens"]


def test_zero_shot_unknown_dataset_is_a_clear_error(ckpt, tmp_path):
    proc = run_main(
        tmp_path,
        "mode=ppl_eval",
        f"eval.checkpoint_path={ckpt}",
        "eval.datasets=[no_such_corpus]",
        check=False,
    )
    assert proc.returncode != 0
    assert "eval.datasets: 'no_such_corpus' is not a data option" in proc.stderr + proc.stdout
