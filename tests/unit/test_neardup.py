"""MinHash pieces of near-duplicate detection, without Ray."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lepton_ray.data.neardup import (
    estimated_jaccard,
    lsh_params,
    minhash_batch,
    shingles,
    signatures,
)
from tests.conftest import ROOT

WORDS = [f"w{i}" for i in range(40)]
TEXTS = ["The quick brown fox jumps over the lazy dog", "hello", "", "a b c d"]


def test_shingles():
    assert shingles("The Cat sat  on", 3) == {"the cat sat", "cat sat on"}
    assert shingles("Hello World", 3) == {"hello world"}
    assert shingles("one", 1) == {"one"}
    assert shingles("", 3) == set()
    assert shingles("   ", 2) == set()
    assert shingles("a b a b a", 2) == {"a b", "b a"}


def test_minhash_batch_adds_signatures():
    batch = pd.DataFrame({"text": TEXTS, "label": ["x"] * len(TEXTS)})
    out = minhash_batch(batch, num_perm=32, ngram=3, seed=0)
    assert list(out.columns) == ["text", "label", "_minhash"]
    assert list(batch.columns) == ["text", "label"]  # input untouched
    assert all(len(sig) == 32 for sig in out["_minhash"])
    again = minhash_batch(batch.iloc[::-1], num_perm=32, ngram=3, seed=0)["_minhash"]
    for text, sig in zip(batch["text"], out["_minhash"]):
        assert np.array_equal(sig, again[batch["text"] == text].iloc[0])
    # Same shingle set, same signature; empty text is all-max (never a candidate).
    first = out["_minhash"].iloc[0]
    assert np.array_equal(first, signatures([TEXTS[0].upper()], num_perm=32, ngram=3, seed=0)[0])
    assert (out["_minhash"].iloc[2] == 2**32 - 1).all()
    other_seed = signatures([TEXTS[0]], num_perm=32, ngram=3, seed=1)[0]
    assert not np.array_equal(first, other_seed)


def test_signatures_are_stable_across_processes():
    code = (
        "import json; from lepton_ray.data.neardup import signatures; "
        f"print(json.dumps(signatures({TEXTS!r}, num_perm=16, ngram=2, seed=7).tolist()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    here = signatures(TEXTS, num_perm=16, ngram=2, seed=7)
    assert np.array_equal(np.array(json.loads(out.stdout)), here)


def test_long_batches_are_chunked_like_short_ones():
    rng = random.Random(3)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(0, 3000))) for _ in range(60)]
    whole = signatures(texts, num_perm=8, ngram=3, seed=0)
    one_by_one = np.vstack([signatures([t], num_perm=8, ngram=3, seed=0) for t in texts])
    assert np.array_equal(whole, one_by_one)


def test_estimated_jaccard_is_close_to_true_jaccard():
    rng = random.Random(0)
    errors = []
    for _ in range(12):
        base = rng.choices(WORDS, k=40)
        rate = rng.uniform(0.0, 0.5)
        other = [rng.choice(WORDS) if rng.random() < rate else w for w in base]
        a, b = " ".join(base), " ".join(other)
        sa, sb = shingles(a, 2), shingles(b, 2)
        true = len(sa & sb) / len(sa | sb)
        sig = signatures([a, b], num_perm=128, ngram=2, seed=0)
        errors.append(abs(estimated_jaccard(sig[0], sig[1]) - true))
    assert max(errors) < 0.15
    assert np.mean(errors) < 0.06
    same = signatures(["x y z"], num_perm=128, ngram=2, seed=0)[0]
    assert estimated_jaccard(same, same) == 1.0


@pytest.mark.parametrize("num_perm", [16, 64, 128])
def test_lsh_params(num_perm):
    rows_by_threshold = []
    for threshold in (0.5, 0.7, 0.9):
        bands, rows = lsh_params(threshold, num_perm)
        assert bands >= 1 and rows >= 1 and bands * rows <= num_perm
        at_threshold = 1 - (1 - threshold**rows) ** bands
        assert 0.2 < at_threshold < 0.8  # the S-curve's steep part is near the threshold
        rows_by_threshold.append(rows)
    assert rows_by_threshold[0] < rows_by_threshold[-1]
    assert rows_by_threshold == sorted(rows_by_threshold)
    # Weighting misses more moves the curve left: more candidates at the threshold.
    b, r = lsh_params(0.8, num_perm, fp_weight=0.2, fn_weight=0.8)
    b0, r0 = lsh_params(0.8, num_perm)
    assert 1 - (1 - 0.8**r) ** b >= 1 - (1 - 0.8**r0) ** b0
