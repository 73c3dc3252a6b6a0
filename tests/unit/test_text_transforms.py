"""HTML stripping, PII masking, the cleaning order, clean_batch's reasons, augmentation."""

import random

import numpy as np
import pandas as pd
import pytest

from lepton_ray.data.augment import augment_batch, augment_text
from lepton_ray.data.clean import MASK_COLUMNS, clean_batch, keep_rows
from lepton_ray.text import (
    DEFAULT_CLEANING,
    clean_texts,
    mask_pii,
    normalize_text,
    normalize_text_counted,
    pii_kinds,
    strip_html,
)

ALL_PII = ("email", "url", "phone")

# --------------------------------------------------------------------------------------------
# strip_html
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<p>Hello</p><p>world</p>", "Hello world"),
        ("line<br>break<br/>and<BR />more", "line break and more"),
        ("<ul><li>one</li><li>two</li></ul>", "one two"),
        ("<div class='x'>a</div><div>b</div>", "a b"),
        ('hel<b>lo</b> <a href="https://x.org/?a=1&b=2">link</a>', "hello link"),
        ('<span data-id="1 > 0">quoted > in attribute</span>', "quoted > in attribute"),
        (
            "Tom &amp; Jerry &lt;3 &quot;cats&quot; &#39;n&#x27; &eacute;",
            "Tom & Jerry <3 \"cats\" 'n' é",
        ),
        ("a<script type='text/javascript'>var x = '<b>' < 1;</script>b", "a b"),
        ("<STYLE>p { color: red }</style>text", "text"),
        ("before<!-- a <b>comment</b> -->after", "before after"),
        ("<!DOCTYPE html><html><head><title>T</title></head><body>x</body></html>", "T x"),
        ("<input disabled> checked", "checked"),
        ("<o:p>office</o:p> <my-widget>custom</my-widget>", "office custom"),
        ("&lt;b&gt;escaped tags are text&lt;/b&gt;", "<b>escaped tags are text</b>"),
    ],
)
def test_strip_html_removes_markup(raw, expected):
    assert normalize_text(strip_html(raw)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "a < b and c > d",
        "x<3 and y>2",
        "a<b and c>d",  # looks like <b ...> but "and" is not an HTML attribute
        "List<String> and Map<K, V>",
        "<name> is a placeholder",
        "i <3 you",
        "mail <john@example.com>",
        "1 <2 >0",
        "<<not a tag>>",
        "plain text without markup",
    ],
)
def test_strip_html_leaves_non_html_alone(text):
    assert strip_html(text) == text


def test_strip_html_keeps_the_text_of_an_unclosed_script_and_of_cdata():
    assert normalize_text(strip_html("<script>alert(1)")) == "alert(1)"
    assert strip_html("<![CDATA[a < b]]>") == "a < b"


# --------------------------------------------------------------------------------------------
# mask_pii
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected", "counts"),
    [
        ("write to john.doe+tag@example.co.uk now", "write to [EMAIL] now", {"email": 1}),
        ("A@B.IO, c_d@mail-x.org.", "[EMAIL], [EMAIL].", {"email": 2}),
        ("see https://example.com/a?b=1&c=2.", "see [URL].", {"url": 1}),
        ("(www.example.org/path) and HTTP://X.COM", "([URL]) and [URL]", {"url": 1 + 1}),
        ("wiki https://en.wikipedia.org/wiki/Foo_(bar), ok", "wiki [URL], ok", {"url": 1}),
        # A URL holding an @ is one URL; www.x@y.com is an address.
        ("post https://medium.com/@ann/post", "post [URL]", {"url": 1, "email": 0}),
        ("mail www.smith@gmail.com", "mail [EMAIL]", {"url": 0, "email": 1}),
        ("call +44 20 7946 0958 today", "call [PHONE] today", {"phone": 1}),
        ("(555) 123-4567, 555-123-4567, 555.123.4567", "[PHONE], [PHONE], [PHONE]", {"phone": 3}),
        ("1-800-555-1234 or 555-1234", "[PHONE] or [PHONE]", {"phone": 2}),
        ("06 12 34 56 78 / +33 6 12 34 56 78", "[PHONE] / [PHONE]", {"phone": 2}),
        ("+14155552671 and +1 (415) 555-2671", "[PHONE] and [PHONE]", {"phone": 2}),
        ("Tel:+49 30 1234567; tel:030 1234567", "Tel:[PHONE]; tel:[PHONE]", {"phone": 2}),
    ],
)
def test_mask_pii_masks_and_counts(raw, expected, counts):
    text, got = mask_pii(raw, ALL_PII)
    assert text == expected
    assert {k: got[k] for k in counts} == counts
    assert set(got) == set(ALL_PII)


@pytest.mark.parametrize(
    "text",
    [
        "In 1999 and 2021 it rained",
        "It cost $1,234,567.89 or 1 234 567 € or 12.99 EUR or $5 555 555",
        "born 2021-03-04, due 04.03.2021, paid 03/04/2021, 2020-2021, 1999 2000 2001",
        "room 12, 555 people, 2 kids, code 1234, 42",
        "order 12345678 and account 9876543210",  # a bare digit run is an id, not a phone
        "pi is 3.14159265 and 12345.67 units",
        "version 10.0.19041 on 192.168.100.200",
        "ISBN 978-3-16-148410-0, ZIP 94103-1234",
        "1.000.000 people and 1 234 567 more; scores 10 20 30 40",
        "10.00-12.00 and 2021-03-04T10:00",
        "id-555-123-4567 and x5551234567 and #555-1234",
    ],
)
def test_mask_pii_leaves_numbers_that_are_not_phones(text):
    masked, counts = mask_pii(text, ALL_PII)
    assert masked == text
    assert counts == {"url": 0, "email": 0, "phone": 0}


def test_mask_pii_masks_only_the_requested_kinds_in_a_fixed_order():
    raw = "x@y.com https://a.org/x@y.com 555-123-4567"
    assert mask_pii(raw, ["email"]) == (
        "[EMAIL] https://a.org/[EMAIL] 555-123-4567",
        {"email": 2},
    )
    # Asked in any order, URLs go first: the address inside the URL is part of the URL.
    assert mask_pii(raw, ["phone", "email", "url"]) == (
        "[EMAIL] [URL] [PHONE]",
        {"url": 1, "email": 1, "phone": 1},
    )
    assert mask_pii(raw, ()) == (raw, {})
    assert mask_pii(raw, "url")[1] == {"url": 1}
    with pytest.raises(ValueError, match="unknown PII kind"):
        mask_pii(raw, ["ssn"])
    assert pii_kinds(["Phone", "URL"]) == ("url", "phone")


# --------------------------------------------------------------------------------------------
# normalize_text and clean_texts
# --------------------------------------------------------------------------------------------


def test_normalize_text_order_html_unicode_lowercase_then_masks():
    raw = "  <p>Mail&nbsp;ＪＯＨＮ@EXAMPLE.COM</p>\u200b<br>or   HTTPS://X.ORG/A  "
    # HTML first (the entity becomes a no-break space), then NFKC and whitespace, then
    # lowercase, then masking: the placeholders keep their upper case.
    assert normalize_text(raw, lowercase=True, strip_html=True, mask_pii=ALL_PII) == (
        "mail [EMAIL] or [URL]"
    )
    text, counts = normalize_text_counted(raw, strip_html=True, mask_pii=["email"])
    assert text == "Mail [EMAIL] or HTTPS://X.ORG/A"
    assert counts == {"email": 1}
    # Without the new options nothing changes from before.
    assert normalize_text(raw) == "<p>Mail&nbsp;JOHN@EXAMPLE.COM</p><br>or HTTPS://X.ORG/A"
    assert normalize_text_counted("a  b") == ("a b", {})


def test_clean_texts_fills_in_defaults_for_old_cleaning_dicts():
    raw = ["<b>Hi</b>  x@y.com"]
    old = {"unicode_form": "NFKC", "lowercase": False}  # written before strip_html/mask_pii
    assert clean_texts(raw, old) == ["<b>Hi</b> x@y.com"]
    assert clean_texts(raw, None) == ["<b>Hi</b> x@y.com"]
    assert clean_texts(raw, {**old, "strip_html": True, "mask_pii": ["email"]}) == ["Hi [EMAIL]"]
    assert DEFAULT_CLEANING["strip_html"] is False and DEFAULT_CLEANING["mask_pii"] == []


def test_clean_texts_matches_clean_batch():
    """Serving sees the text exactly as training did."""
    raw = ["<p>Call 555-123-4567</p>", "Ｗｗｗ.example.com\tIS ok", "a@b.co &amp; c"]
    cleaning = {"unicode_form": "NFKC", "lowercase": True, "strip_html": True,
                "mask_pii": ["phone", "url", "email"]}  # fmt: skip
    batch = pd.DataFrame({"text": raw, "label": ["a"] * 3})
    out = clean_batch(batch, "NFKC", True, 1, None, True, ["phone", "url", "email"])
    assert clean_texts(raw, cleaning) == list(out["text"])
    assert list(out["text"]) == ["call [PHONE]", "[URL] is ok", "[EMAIL] & c"]


# --------------------------------------------------------------------------------------------
# clean_batch
# --------------------------------------------------------------------------------------------


def test_clean_batch_reasons_too_long_and_mask_counts():
    batch = pd.DataFrame(
        {
            "text": [
                "ok text",
                "<p></p>",
                None,
                "x" * 21,
                "   " + "y" * 20 + "   ",  # 20 after cleaning: not too long
                "mail a@b.com or c@d.org, call 555-123-4567",
                "no label",
                "<b>bold</b> www.x.com",
            ],
            "label": ["a", "b", "a", "b", "a", 1.0, None, "b"],
        }
    )
    out = clean_batch(batch, "NFKC", False, 1, max_chars=40, strip_html=True, mask_pii=ALL_PII)
    assert list(out.columns) == ["text", "label", "drop_reason", *MASK_COLUMNS.values()]
    assert list(out["drop_reason"]) == [
        "",
        "empty_text",
        "missing_text",
        "",
        "",
        "",
        "missing_label",
        "",
    ]
    assert out.loc[5, "text"] == "mail [EMAIL] or [EMAIL], call [PHONE]"
    assert out.loc[5, "label"] == "1"
    assert list(out["masked_email"]) == [0, 0, 0, 0, 0, 2, 0, 0]
    assert list(out["masked_phone"]) == [0, 0, 0, 0, 0, 1, 0, 0]
    assert list(out["masked_url"]) == [0, 0, 0, 0, 0, 0, 0, 1]
    assert out.loc[7, "text"] == "bold [URL]"
    for column in MASK_COLUMNS.values():
        assert out[column].dtype == np.int64

    short = clean_batch(batch, "NFKC", False, 1, max_chars=20)
    assert list(short["drop_reason"])[3:6] == ["too_long", "", "too_long"]
    assert short.loc[1, "text"] == "<p></p>"  # no HTML stripping asked for
    assert short[list(MASK_COLUMNS.values())].to_numpy().sum() == 0

    kept = keep_rows(out)
    assert "drop_reason" not in kept.columns and len(kept) == 5


def test_clean_batch_keeps_the_old_positional_signature():
    batch = pd.DataFrame({"text": ["Hello  World", "x"], "label": ["a", "b"]})
    out = clean_batch(batch, "NFKC", True, 2)
    assert list(out["text"]) == ["hello world", "x"]
    assert list(out["drop_reason"]) == ["", "empty_text"]


def test_clean_batch_handles_an_empty_batch():
    out = clean_batch(pd.DataFrame({"text": [], "label": []}), "NFKC", False, 1, 10, True, ALL_PII)
    assert len(out) == 0 and "masked_phone" in out.columns


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def _train_rows(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(50)]
    texts = [" ".join(rng.choice(vocab, size=int(rng.integers(1, 15)))) for _ in range(n)]
    return pd.DataFrame(
        {
            "text": texts,
            "label": [str(i % 3) for i in range(n)],
            "_key": rng.integers(0, 2**63 - 1, size=n, dtype=np.int64),
            "split": ["train"] * n,
            "source": [f"file{i % 2}" for i in range(n)],
        }
    )


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("_key").reset_index(drop=True)


def test_augmentation_does_not_depend_on_batching():
    frame = _train_rows()
    kw = dict(copies=3, deletion_rate=0.2, swap_rate=0.2, seed=7)
    whole = augment_batch(frame, **kw)
    halves = pd.concat([augment_batch(frame.iloc[:77], **kw), augment_batch(frame.iloc[77:], **kw)])
    shuffled = augment_batch(frame.sample(frac=1, random_state=1), **kw)
    pd.testing.assert_frame_equal(_sorted(whole), _sorted(halves))
    pd.testing.assert_frame_equal(_sorted(whole), _sorted(shuffled))
    assert len(whole) > len(frame)  # most rows got copies
    assert not _sorted(whole).equals(_sorted(augment_batch(frame, **{**kw, "seed": 8})))


def test_augmented_rows_have_new_keys_and_carry_the_other_columns():
    frame = _train_rows()
    frame["row"] = np.arange(len(frame))  # an extra column: carried along unchanged
    out = augment_batch(frame, copies=2, deletion_rate=0.15, swap_rate=0.1, seed=1)
    assert list(out.columns) == [*frame.columns, "augmented"]
    assert out["_key"].dtype == np.int64 and (out["_key"] >= 0).all()
    assert out["_key"].is_unique and not set(out["_key"]) & set(frame["_key"])
    assert out["augmented"].dtype == bool and out["augmented"].all()
    source = frame.set_index("row")
    for row in out.itertuples():
        orig = source.loc[row.row]
        assert (row.label, row.split, row.source) == (orig["label"], "train", orig["source"])
        assert row.text != orig["text"] and len(orig["text"].split()) >= 2
        assert set(row.text.split()) <= set(orig["text"].split())
    assert out.groupby("row").size().max() <= 2


def test_augmentation_keeps_labels_per_row_and_never_empties_a_text():
    frame = pd.DataFrame(
        {
            "text": ["alpha beta gamma delta", "one two", "single", ""],
            "label": ["x", "y", "z", "w"],
            "_key": np.array([10, 20, 30, 40], dtype=np.int64),
            "split": "train",
        }
    )
    out = augment_batch(frame, copies=20, deletion_rate=0.9, swap_rate=1.0, seed=3)
    assert set(out["label"]) <= {"x", "y"}  # one-word and empty texts get no copies
    for text, label in zip(out["text"], out["label"], strict=True):
        source = {"x": "alpha beta gamma delta", "y": "one two"}[label]
        assert text and text != source and set(text.split()) <= set(source.split())
    assert not out.duplicated(["text"]).any()  # identical copies of a row are kept once


def test_zero_rates_or_copies_give_no_rows():
    frame = _train_rows(50)
    for kw in (
        dict(copies=3, deletion_rate=0.0, swap_rate=0.0, seed=0),
        dict(copies=0, deletion_rate=0.3, swap_rate=0.3, seed=0),
    ):
        out = augment_batch(frame, **kw)
        assert len(out) == 0
        assert list(out.columns) == [*frame.columns, "augmented"]
        assert out["_key"].dtype == np.int64
    with pytest.raises(ValueError):
        augment_batch(frame, copies=1, deletion_rate=1.5, swap_rate=0.0, seed=0)


def test_augment_text_deletes_and_swaps_as_documented():
    words = [f"w{i}" for i in range(20)]
    text = " ".join(words)
    swapped = augment_text(text, deletion_rate=0.0, swap_rate=0.1, rng=random.Random(0))
    assert sorted(swapped.split()) == sorted(words) and swapped != text
    # round(0.1 * 20) = 2 adjacent swaps move at most 4 words.
    assert sum(a != b for a, b in zip(swapped.split(), words, strict=True)) <= 4
    deleted = augment_text(text, deletion_rate=0.5, swap_rate=0.0, rng=random.Random(1))
    kept = deleted.split()
    assert 0 < len(kept) < 20 and kept == [w for w in words if w in kept]  # order kept
    only = augment_text(text, deletion_rate=1.0, swap_rate=0.0, rng=random.Random(2))
    assert len(only.split()) == 1  # never every word
    assert augment_text("one", deletion_rate=0.9, swap_rate=1.0, rng=random.Random(0)) == "one"
    # The same generator state gives the same copy; numpy generators work too.
    a = augment_text(text, deletion_rate=0.3, swap_rate=0.3, rng=np.random.default_rng(5))
    b = augment_text(text, deletion_rate=0.3, swap_rate=0.3, rng=np.random.default_rng(5))
    assert a == b
