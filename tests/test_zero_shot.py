"""Zero-shot evaluation: one ppl_eval run scores a checkpoint on a list of corpora (MDLM's
zero-shot table), each tokenized with the model's own tokenizer (the shared tiny model)."""

import json

import pytest

from diffusion.config import ConfigError
from tests.test_dataloader import FIX


def test_zero_shot_table_over_corpora(tiny_lm, tmp_path):
    validation = tiny_lm.folder / "validation.txt"
    over = [
        f"++eval.dataset_overrides.local.source.data_files.validation={validation}",
        "++eval.dataset_overrides.local.source.load_kwargs.sample_by=line",
        f"++eval.dataset_overrides.local.cache_dir={tmp_path / 'cache'}",
        "++eval.dataset_overrides.ptb.source.path=json",
        f"++eval.dataset_overrides.ptb.source.data_files.validation={FIX / 'ptb.jsonl'}",
        "++eval.dataset_overrides.wikitext2.source.path=json",
        "++eval.dataset_overrides.wikitext2.source.name=null",
        f"++eval.dataset_overrides.wikitext2.source.data_files.validation={FIX / 'wikitext.jsonl'}",
        f"++eval.dataset_overrides.lambada.source.data_files.test={FIX / 'lambada.jsonl'}",
    ]
    tiny_lm.evaluate(
        tmp_path / "zs", "ppl_eval", "eval.datasets=[local,ptb,wikitext2,lambada]", *over
    )
    report = json.loads((tmp_path / "zs" / "ppl_eval.json").read_text())
    rows = report["zero_shot"]
    assert report["length"] == report["trained_length"]  # the evaluated length is recorded
    assert [r["dataset"] for r in rows] == ["local", "ptb", "wikitext2", "lambada"]
    assert all(r["tokens"] > 0 and r["bound"] for r in rows)
    # the model learned one sentence: every other corpus scores far worse than its own
    assert all(r["nelbo"] > rows[0]["nelbo"] + 1.0 for r in rows[1:]), rows
    table = (tmp_path / "zs" / "zero_shot.md").read_text()
    assert "| ptb |" in table and "upper bound" in table
    # the training corpus through the zero-shot path scores exactly as a plain ppl_eval does
    tiny_lm.evaluate(tmp_path / "plain", "ppl_eval")
    plain = json.loads((tmp_path / "plain" / "ppl_eval.json").read_text())
    assert rows[0]["nelbo"] == pytest.approx(plain["nelbo"], rel=1e-9)
    assert rows[0]["tokens"] == plain["tokens"]


def test_zero_shot_unknown_dataset_is_a_clear_error(tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="eval.datasets: 'no_such_corpus' is not a data option"):
        tiny_lm.evaluate(tmp_path, "ppl_eval", "eval.datasets=[no_such_corpus]")


def test_zero_shot_overrides_of_a_corpus_not_scored_are_refused(tiny_lm, tmp_path):
    """A misspelt corpus in eval.dataset_overrides was ignored: the table scored without it."""
    with pytest.raises(ConfigError, match=r"eval.dataset_overrides names \['ptbb'\]"):
        tiny_lm.evaluate(
            tmp_path, "ppl_eval", "eval.datasets=ptb", "++eval.dataset_overrides.ptbb.name=x"
        )


@pytest.mark.parametrize(
    ("key", "named"),
    [
        (
            "sourse.path=json",
            "TextDataModule.__init__() got an unexpected keyword argument 'sourse'",
        ),
        ("source.data_fils.validation=x", "unexpected keyword argument 'data_fils'"),
        ("layout.doc_eoss=false", "unexpected keyword argument 'doc_eoss'"),
    ],
)
def test_zero_shot_misspelt_override_key_is_a_config_error_naming_it(tiny_lm, tmp_path, key, named):
    """A misspelt key under eval.dataset_overrides.<corpus> reached the corpus's constructor
    and came back as Hydra's InstantiationException; now a ConfigError naming the subtree."""
    ptb = [
        "++eval.dataset_overrides.ptb.source.path=json",
        f"++eval.dataset_overrides.ptb.source.data_files.validation={FIX / 'ptb.jsonl'}",
    ]
    with pytest.raises(ConfigError, match=r"eval.dataset_overrides.ptb: ") as err:
        tiny_lm.evaluate(
            tmp_path, "ppl_eval", "eval.datasets=ptb", *ptb, f"++eval.dataset_overrides.ptb.{key}"
        )
    assert named in str(err.value)


def test_the_mdlm_lines_zero_shot_scripts_score_the_corpus_zero_shot(tiny_lm, tmp_path):
    """BD3-LM's and DUO's zero_shot scripts say `mode=ppl_eval data=ptb
    data.insert_valid_eos=False eval.checkpoint_path=...`: translated to eval.datasets=[ptb]
    with the switch on that corpus's rows, they score what our own command scores."""
    from diffusion.compat import translate
    from tests.tiny_lm import main_in_process

    ptb = [
        "++eval.dataset_overrides.ptb.source.path=json",
        f"++eval.dataset_overrides.ptb.source.data_files.validation={FIX / 'ptb.jsonl'}",
    ]
    theirs = ["mode=ppl_eval", "data=ptb", "data.insert_valid_eos=False",
              f"eval.checkpoint_path={tiny_lm.ckpt}", "sampling.num_sample_batches=0"]  # fmt: skip
    ours, lines = translate(theirs)
    assert "eval.datasets=[ptb]" in ours and not any(o.startswith("data=") for o in ours)
    main_in_process(tmp_path / "theirs", *tiny_lm.overrides, *ours, *ptb)
    tiny_lm.evaluate(tmp_path / "ours", "ppl_eval", "eval.datasets=[ptb]", *ptb,
                     "++eval.dataset_overrides.ptb.layout.doc_eos=false")  # fmt: skip
    tiny_lm.evaluate(tmp_path / "eos", "ppl_eval", "eval.datasets=[ptb]", *ptb)
    row = {
        run: json.loads((tmp_path / run / "ppl_eval.json").read_text())["zero_shot"][0]
        for run in ("theirs", "ours", "eos")
    }
    assert row["theirs"]["nelbo"] == pytest.approx(row["ours"]["nelbo"], rel=1e-9)
    assert row["theirs"]["tokens"] == row["ours"]["tokens"]
    assert row["eos"]["nelbo"] != pytest.approx(row["ours"]["nelbo"], rel=1e-6)  # the switch
