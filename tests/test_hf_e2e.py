"""Each Hugging Face backbone end to end through main() in process: train -> ppl_eval ->
sample_eval.

Tiny models built from configs are saved to temp folders and loaded by path, the same
`from_pretrained` path a hub name takes; the data uses the model's own tokenizer.
"""

import json
import math

import pytest

from tests.test_hf_backbones import gpt2_dir, mlm_dir  # noqa: F401  (fixtures)
from tests.tiny_lm import main_in_process


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
        "debug=tiny_cpu",
        f"backbone={backbone}",
        f"backbone.pretrained={folder}",
        f"data.tokenizer={folder}",
        "model.length=16",
        *extra,
    ]
    main_in_process(tmp_path / "train", *common)
    trained = json.loads((tmp_path / "train" / "ppl_eval.json").read_text())
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    main_in_process(tmp_path / "ppl", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}", *common)
    stats = json.loads((tmp_path / "ppl" / "ppl_eval.json").read_text())
    # the saved weights score exactly what the trained module scored (same seed and draws)
    assert stats["nelbo"] == pytest.approx(trained["nelbo"], rel=1e-6) and math.isfinite(
        stats["nelbo"]
    )
    assert stats["tokens"] == trained["tokens"] == 2 * 4 * 16  # eval.max_batches=2, full rows
    main_in_process(
        tmp_path / "sample", "mode=sample_eval", f"eval.checkpoint_path={ckpt}", *common
    )
    report = json.loads((tmp_path / "sample" / "sample_eval.json").read_text())
    rows = [
        json.loads(r)["tokens"]
        for r in (tmp_path / "sample" / "samples.jsonl").read_text().splitlines()
    ]
    assert report["num_samples"] == 2 and [len(r) for r in rows] == [16, 16]
