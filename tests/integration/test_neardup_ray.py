"""near_duplicate_drops on a Ray Dataset with planted near-duplicates across splits."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from lepton_ray.data.neardup import near_duplicate_drops
from lepton_ray.data.split import KEY, text_key

pytestmark = pytest.mark.usefixtures("ray_session")

ADJECTIVES = [
    "quiet",
    "bright",
    "old",
    "young",
    "tired",
    "clever",
    "gentle",
    "rapid",
    "silent",
    "golden",
    "rough",
    "calm",
]
NOUNS = [
    "river",
    "forest",
    "engine",
    "teacher",
    "garden",
    "window",
    "market",
    "letter",
    "mountain",
    "doctor",
    "song",
    "city",
]
VERBS = [
    "watches",
    "builds",
    "follows",
    "carries",
    "paints",
    "opens",
    "finds",
    "breaks",
    "sells",
    "writes",
    "meets",
    "hides",
]
OTHER = [
    "the",
    "a",
    "near",
    "under",
    "beside",
    "with",
    "without",
    "into",
    "across",
    "behind",
    "over",
    "and",
    "but",
    "slowly",
]
WORDS = ADJECTIVES + NOUNS + VERBS + OTHER

THRESHOLD = 0.6  # one word changed in a 20-28 word text: Jaccard of 3-grams >= 15/21
# (base split, copy split) of the planted pairs.
PLANTS = (
    [("train", "validation"), ("train", "test")] * 4
    + [("train", "train")] * 4
    + [("validation", "test"), ("test", "test")] * 2
    + [("test", "train")] * 4
)


def _order(row: tuple[int, str]) -> tuple:
    """Which member of a pair is kept: train first, then the smaller key."""
    return (row[1] != "train", row[0], row[1])


@pytest.fixture(scope="module")
def planted():
    rng = random.Random(11)
    texts: list[str] = []
    while len(texts) < 300:
        text = " ".join(rng.choices(WORDS, k=rng.randint(20, 28)))
        if text not in texts:
            texts.append(text)
    rows = [(text, rng.choice(["train", "train", "validation", "test"])) for text in texts]
    pairs = []  # (row to drop, row it duplicates)
    for i, (base_split, copy_split) in enumerate(PLANTS):
        words = texts[i].split()
        pos = rng.randrange(3, len(words) - 3)
        words[pos] = rng.choice([w for w in WORDS if w != words[pos]])
        rows[i] = (texts[i], base_split)
        rows.append((" ".join(words), copy_split))
        a = (text_key(texts[i], 0), base_split)
        b = (text_key(rows[-1][0], 0), copy_split)
        pairs.append((max(a, b, key=_order), min(a, b, key=_order)))
    exact = texts[len(PLANTS)]  # the same text (and _key) in two splits
    rows[len(PLANTS)] = (exact, "train")
    rows.append((exact, "test"))
    df = pd.DataFrame(rows, columns=["text", "split"])
    df["label"] = "x"
    df[KEY] = [text_key(t, 0) for t in df["text"]]
    assert not df.duplicated([KEY, "split"]).any()
    return df, pairs, text_key(exact, 0)


def _drops(ds) -> tuple[pd.DataFrame, dict[str, str]]:
    out = near_duplicate_drops(ds, threshold=THRESHOLD, num_perm=128, num_shards=4)
    schema = dict(zip(out.schema().names, map(str, out.schema().types)))
    return out.to_pandas().sort_values([KEY, "split"]).reset_index(drop=True), schema


@pytest.fixture(scope="module")
def result(planted):
    import ray

    df = planted[0]
    ds = ray.data.from_pandas(df)
    (one_block, schema), (seven_blocks, _) = _drops(ds), _drops(ds.repartition(7))
    return one_block, seven_blocks, schema


def test_planted_near_duplicates_are_found(planted, result):
    _, pairs, _ = planted
    drops, _, schema = result
    assert schema == {KEY: "int64", "split": "string", "dup_split": "string", "dup_key": "int64"}
    assert not drops.duplicated([KEY, "split"]).any()
    found = {((r[0], r[1]), (r[3], r[2])) for r in drops.itertuples(index=False)}
    assert found <= set(pairs), f"unrelated pairs flagged: {found - set(pairs)}"
    assert len(found) >= 0.9 * len(pairs)


def test_eval_copy_of_train_text_is_the_one_dropped(planted, result):
    _, pairs, _ = planted
    drops = result[0]
    train_eval = [p for p in pairs if p[1][1] == "train" and p[0][1] != "train"]
    assert len(train_eval) == 12
    hits = drops[drops["split"] != "train"].set_index([KEY, "split"])
    dropped = [p for p in train_eval if p[0] in hits.index]
    assert len(dropped) >= 0.9 * len(train_eval)
    for row, dup in dropped:
        assert tuple(hits.loc[row, ["dup_key", "dup_split"]]) == (dup[0], "train")
    # A train row is never dropped in favour of an eval row.
    assert (drops.loc[drops["split"] == "train", "dup_split"] == "train").all()


def test_exact_copy_across_splits_is_not_a_near_duplicate(planted, result):
    _, _, exact_key = planted
    drops = result[0]
    assert exact_key not in set(drops[KEY]) | set(drops["dup_key"])
    assert (drops[KEY] != drops["dup_key"]).all()


def test_same_output_for_any_block_count(result):
    pd.testing.assert_frame_equal(result[0], result[1])
