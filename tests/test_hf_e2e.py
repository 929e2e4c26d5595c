"""Each Hugging Face backbone end to end through main.py: train -> ppl_eval -> sample_eval.

Tiny models built from configs are saved to temp folders and loaded by path, the same
`from_pretrained` path a hub name takes; the data uses the model's own tokenizer.
"""

import json

import pytest

from tests.test_hf_backbones import gpt2_dir, mlm_dir  # noqa: F401  (fixtures)
from tests.test_main_e2e import run_main


@pytest.mark.slow  # heavy end to end (CI's second tier): keeps the default tier under 10 min
@pytest.mark.parametrize(
    ("fixture", "backbone", "extra"),
    [
        ("mlm_dir", "hf_mlm", []),
        ("gpt2_dir", "hf_causal_bidirectional", ["backbone.anneal_steps=2"]),
    ],
)
def test_hf_backbone_end_to_end(fixture, backbone, extra, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    common = [
        f"backbone={backbone}",
        f"backbone.pretrained={folder}",
        f"data.tokenizer={folder}",
        "model.length=16",
        *extra,
    ]
    run_main(tmp_path / "train", *common)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    run_main(tmp_path / "ppl", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}", *common)
    assert json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())["ppl"] > 1
    run_main(tmp_path / "sample", "mode=sample_eval", f"eval.checkpoint_path={ckpt}", *common)
    report = json.loads((tmp_path / "sample" / "sample_eval.json").read_text())
    assert report["num_samples"] == 2 and report["entropy"] > 0
