"""Text normalisation shared by every place that feeds raw text to a model.

Training text is cleaned by the data stage; the same settings travel in the model artifact
(``ModelMeta.cleaning``) so serving, prediction, compression and benchmarks see the text
exactly as training did. This module imports nothing heavy and nothing from the stages.

One text is cleaned in this order (:func:`normalize_text`):

1. ``strip_html``: tags, comments and ``<script>``/``<style>`` bodies out, entities decoded;
2. unicode normalisation, control/format characters out, whitespace collapsed and trimmed;
3. ``lowercase``;
4. ``mask_pii``: URLs, then e-mail addresses, then phone numbers become ``[URL]``,
   ``[EMAIL]``, ``[PHONE]``. Masking comes after lowercasing so the placeholders keep
   their upper-case form (and every cleaned text spells them the same way).
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

_CONTROL = {"Cc", "Cf"}  # control and format characters (zero-width, BOM, ...)
_SPACES = "\t\n\r\v\f"
# ASCII control characters that are not whitespace (whitespace is collapsed, not dropped).
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")

PII_KINDS: tuple[str, ...] = ("url", "email", "phone")
"""What :func:`mask_pii` can mask, in the order it masks them."""

PII_TOKENS: dict[str, str] = {"url": "[URL]", "email": "[EMAIL]", "phone": "[PHONE]"}

DEFAULT_CLEANING: dict[str, Any] = {
    "unicode_form": "NFKC",
    "lowercase": False,
    "strip_html": False,
    "mask_pii": [],
}
"""The cleaning keys that change what a model sees (``data.clean`` minus row filters).

Artifacts written before a key existed lack it; :func:`clean_texts` fills in these defaults,
which reproduce what the older code did.
"""


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

# fmt: off
_HTML_ELEMENTS = frozenset((
    "a", "abbr", "acronym", "address", "applet", "area", "article", "aside", "audio", "b",
    "base", "basefont", "bdi", "bdo", "big", "blink", "blockquote", "body", "br", "button",
    "canvas", "caption", "center", "cite", "code", "col", "colgroup", "data", "datalist", "dd",
    "del", "details", "dfn", "dialog", "dir", "div", "dl", "dt", "em", "embed", "fieldset",
    "figcaption", "figure", "font", "footer", "form", "frame", "frameset", "h1", "h2", "h3",
    "h4", "h5", "h6", "head", "header", "hgroup", "hr", "html", "i", "iframe", "img", "input",
    "ins", "kbd", "label", "legend", "li", "link", "main", "map", "mark", "marquee", "menu",
    "meta", "meter", "nav", "nobr", "noframes", "noscript", "object", "ol", "optgroup",
    "option", "output", "p", "param", "picture", "pre", "progress", "q", "rp", "rt", "ruby",
    "s", "samp", "script", "search", "section", "select", "slot", "small", "source", "span",
    "strike", "strong", "style", "sub", "summary", "sup", "svg", "table", "tbody", "td",
    "template", "textarea", "tfoot", "th", "thead", "time", "title", "tr", "track", "tt", "u",
    "ul", "var", "video", "wbr",
))
# fmt: on
"""Tag names that are stripped; ``<String>`` or ``<name>`` in plain text are left alone."""

# fmt: off
_INLINE_ELEMENTS = frozenset((
    "a", "abbr", "acronym", "b", "bdi", "bdo", "big", "cite", "code", "data", "del", "dfn",
    "em", "font", "i", "ins", "kbd", "mark", "nobr", "q", "rp", "rt", "ruby", "s", "samp",
    "small", "span", "strike", "strong", "sub", "sup", "time", "tt", "u", "var", "wbr",
))
# fmt: on
"""Tags that sit inside a word or sentence: removed without a space (``hel<b>lo</b>``)."""

# fmt: off
_BOOLEAN_ATTRIBUTES = frozenset((
    "allowfullscreen", "async", "autofocus", "autoplay", "checked", "compact", "controls",
    "default", "defer", "disabled", "formnovalidate", "hidden", "inert", "ismap", "itemscope",
    "loop", "multiple", "muted", "nohref", "noresize", "noshade", "novalidate", "nowrap",
    "open", "playsinline", "readonly", "required", "reversed", "selected",
))
# fmt: on
"""Attributes written without a value; any other bare word means the "tag" is prose, as in
``a<b and c>d``."""

# Comments, CDATA and script/style elements span up to their closing marker; they are cut
# by _drop_blocks, a left-to-right scan that stays linear even when closings are missing.
_BLOCK_OPEN = re.compile(r"<!--|<!\[CDATA\[|<(script|style)\b[^<>]*>", re.IGNORECASE)
_BLOCK_CLOSE = {
    "comment": re.compile(r"-->"),
    "cdata": re.compile(r"\]\]>"),
    "script": re.compile(r"</script\s*>", re.IGNORECASE),
    "style": re.compile(r"</style\s*>", re.IGNORECASE),
}
_HTML = re.compile(
    r"""
      <![A-Za-z][^<>]*>                                             # <!DOCTYPE html>
    | <\?[A-Za-z][^<>]*\?>                                          # <?xml ...?>
    | </?(?P<name>[A-Za-z][A-Za-z0-9:-]*)
      (?P<attrs>(?:\s+[^\s"'<>/=]+(?:\s*=\s*(?:"[^"<]*"|'[^'<]*'|[^\s"'<>`]+))?)*)
      \s*/?>                                                        # a tag
    """,
    re.VERBOSE,
)
_ATTRIBUTE = re.compile(r"""([^\s"'<>/=]+)(\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>`]+))?""")


def _drop_blocks(text: str) -> str:
    """Cut comments and script/style elements (a space each); CDATA keeps its text.

    An opening without its closing marker is left in place (the tag pass then removes a
    lone ``<script>`` tag, leaving what follows it).
    """
    pieces: list[str] = []
    done = 0  # text[:done] is in pieces
    at = 0
    unclosed: set[str] = set()  # kinds with no closing marker after ``at``: skip at once
    while (opening := _BLOCK_OPEN.search(text, at)) is not None:
        head = opening.group(0)
        kind = (opening.group(1) or "").lower() or ("comment" if head == "<!--" else "cdata")
        at = opening.end()
        if kind in unclosed:
            continue
        closing = _BLOCK_CLOSE[kind].search(text, at)
        if closing is None:
            unclosed.add(kind)
            continue
        pieces.append(text[done : opening.start()])
        pieces.append(text[at : closing.start()] if kind == "cdata" else " ")
        done = at = closing.end()
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def _html_piece(match: re.Match[str]) -> str:
    name = match.group("name")
    if name is None:
        return " "  # <!DOCTYPE ...>, <?xml ...?>
    name = name.lower()
    if name not in _HTML_ELEMENTS and ":" not in name and "-" not in name:
        return match.group(0)  # <String>, <name>: not HTML
    attrs = match.group("attrs")
    if attrs:
        for attr, value in _ATTRIBUTE.findall(attrs):
            attr = attr.lower()
            if not value and attr not in _BOOLEAN_ATTRIBUTES and not attr.startswith("data-"):
                return match.group(0)  # "a<b and c>d" is a comparison, not a tag
    return "" if name in _INLINE_ELEMENTS else " "


def strip_html(text: str) -> str:
    """Turn HTML into its text.

    Removes tags, comments, ``<!DOCTYPE>`` and ``<script>``/``<style>`` elements with their
    contents, then decodes entities (``&amp;`` -> ``&``). Block-level tags (``<br>``,
    ``</p>``, ``<li>``, ``<td>`` ...) become a space so words on either side stay apart;
    inline tags (``<b>``, ``<a>``, ``<span>`` ...) vanish. Only known HTML element names
    (or namespaced/custom ones containing ``:`` or ``-``) count as tags, so
    ``a < b and c > d``, ``x<3``, ``List<String>`` and ``a<b and c>d`` are left alone.
    Whitespace is not collapsed here (``normalize_text`` does that). A ``<script>`` without
    its closing tag loses only the opening tag.
    """
    if "<" in text:
        text = _HTML.sub(_html_piece, _drop_blocks(text))
    if "&" in text:
        text = html.unescape(text)
    return text


# --------------------------------------------------------------------------------------------
# PII
# --------------------------------------------------------------------------------------------

_URL = re.compile(
    r"(?<![\w@.-])(?:https?://[^\s<>\"'`]+|www\.[A-Za-z0-9-][^\s<>\"'`]*)", re.IGNORECASE
)
_WWW_EMAIL = re.compile(r"www\.[A-Za-z0-9._%+-]*@", re.IGNORECASE)
_URL_TRAILING = ".,;:!?*'\""
_CLOSERS = {")": "(", "]": "[", "}": "{"}

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")

_PHONE = re.compile(
    r"""
    (?<![\w$€£¥₹#@/.,;=+&%*-])                 # not inside a word, number, price or path
    (?P<plus>\+[ \t]?)?                         # +country
    (?P<body>
        (?:\([0-9]{1,5}\)|[0-9]+)               # a digit group, maybe an (area code)
        (?:(?:[ \t]?[-.][ \t]?|[ \t]|(?<=\))|(?=\())   # separator; none needed by ( )
           (?:\([0-9]{1,5}\)|[0-9]+))*
    )
    (?![\w@$€£¥₹%]|[.,:/-][0-9])                # not followed by more of a word or number
    """,
    re.VERBOSE,
)
_DIGIT_GROUP = re.compile(r"[0-9]+")
_CURRENCY_AFTER = re.compile(
    r"\s?(?:[$€£¥₹]|(?:eur|euros?|usd|dollars?|gbp|pounds?|chf|yen|inr|rupees?|kr|sek|nok|dkk"
    r"|pln|zł)\b)",
    re.IGNORECASE,
)
_YEAR = re.compile(r"(?:1[5-9]|20)[0-9]{2}")


def _trim_url(url: str) -> str:
    """Leave sentence punctuation and unbalanced closing brackets after a URL outside it."""
    end = len(url)
    while end:
        ch = url[end - 1]
        if (
            ch in _URL_TRAILING
            or ch in _CLOSERS
            and url.count(_CLOSERS[ch], 0, end) < url.count(ch, 0, end)
        ):
            end -= 1
        else:
            break
    return url[:end]


def _mask_urls(text: str, counts: dict[str, int]) -> str:
    def one(match: re.Match[str]) -> str:
        url = match.group(0)
        if _WWW_EMAIL.match(url):
            return url  # www.smith@example.com is an e-mail address
        kept = _trim_url(url)
        if kept.rstrip("/").lower() in ("http:", "https:", "www"):
            return url
        counts["url"] += 1
        return PII_TOKENS["url"] + url[len(kept) :]

    return _URL.sub(one, text)


def _mask_emails(text: str, counts: dict[str, int]) -> str:
    def one(match: re.Match[str]) -> str:
        counts["email"] += 1
        return PII_TOKENS["email"]

    return _EMAIL.sub(one, text)


def _price_context(text: str, start: int, end: int) -> bool:
    before = text[max(0, start - 2) : start].rstrip()
    return bool(before and before[-1] in "$€£¥₹") or bool(_CURRENCY_AFTER.match(text, end))


def _is_phone(match: re.Match[str]) -> bool:
    """Whether a run of digit groups is a phone number rather than a date, price, ..."""
    body = match.group("body")
    groups = _DIGIT_GROUP.findall(body)
    digits = "".join(groups)
    if not 7 <= len(digits) <= 15:  # E.164 allows at most 15 digits
        return False
    if match.group("plus") or "(" in body:
        return True  # +44 ..., (555) ...: written as a phone number
    if len(groups) == 1:
        return False  # a bare digit run: an id, an order or account number
    seps = _DIGIT_GROUP.split(body)[1:-1]
    marks = {sep.strip() for sep in seps} - {""}
    lengths = [len(g) for g in groups]
    if len(marks) > 1:
        return False  # 10.00-12.00: phone numbers do not mix dots and dashes
    if all(len(g) == 4 and _YEAR.fullmatch(g) for g in groups):
        return False  # 1999 2000, 2020-2021
    if len(groups) == 3 and (
        (_YEAR.fullmatch(groups[0]) and lengths[0] == 4 and max(lengths[1:]) <= 2)
        or (_YEAR.fullmatch(groups[2]) and lengths[2] == 4 and max(lengths[:2]) <= 2)
    ):
        return False  # 2021-03-04, 04.03.2021
    if marks == {"."}:
        if len(groups) == 2 or min(lengths) < 2:
            return False  # 3.14159265, 12345.67, version 10.0.19041
        if len(groups) == 4 and max(lengths) <= 3 and all(int(g) <= 255 for g in groups):
            return False  # an IPv4 address
    if len(digits) == 13 and digits.startswith(("978", "979")):
        return False  # an ISBN-13
    if lengths == [5, 4] and marks == {"-"} and groups[0][0] != "0":
        return False  # a US ZIP+4 code
    if (
        len(set(seps)) == 1
        and seps[0] in (" ", ".")
        and lengths[0] <= 3
        and groups[0][0] != "0"
        and all(n == 3 for n in lengths[1:])
        and (
            lengths[0] == 1
            or "000" in groups[1:]
            or _price_context(match.string, match.start(), match.end())
        )
    ):
        return False  # 1 234 567, 1.000.000, 12 345 678 €: thousands separators
    # 10 20 30 40 is a list of small numbers; 06 12 34 56 78 a (French) phone number.
    return bool(marks) or max(lengths) > 2 or digits[0] == "0"


def _mask_phones(text: str, counts: dict[str, int]) -> str:
    def one(match: re.Match[str]) -> str:
        if not _is_phone(match):
            return match.group(0)
        counts["phone"] += 1
        return PII_TOKENS["phone"]

    return _PHONE.sub(one, text)


_MASKERS = {"url": _mask_urls, "email": _mask_emails, "phone": _mask_phones}
_MAY_HOLD = {  # cheap tests that skip the regular expressions for most texts
    "url": lambda t: "://" in t or "ww." in t or "wW." in t or "Ww." in t or "WW." in t,
    "email": lambda t: "@" in t,
    "phone": lambda t: any(d in t for d in "0123456789"),
}


def pii_kinds(kinds: Iterable[str] | str | None) -> tuple[str, ...]:
    """The requested PII kinds, checked, in masking order (a single string is one kind).

    Raises ``ValueError`` naming any kind that is not one of :data:`PII_KINDS`.
    """
    if not kinds:
        return ()
    wanted = {str(k).lower() for k in ([kinds] if isinstance(kinds, str) else kinds)}
    unknown = sorted(wanted - set(PII_KINDS))
    if unknown:
        raise ValueError(f"unknown PII kind(s) {unknown}; expected some of {list(PII_KINDS)}")
    return tuple(kind for kind in PII_KINDS if kind in wanted)


def mask_pii(text: str, kinds: Iterable[str] | str) -> tuple[str, dict[str, int]]:
    """Replace URLs, e-mail addresses and phone numbers by ``[URL]``, ``[EMAIL]``, ``[PHONE]``.

    ``kinds`` is a subset of ``("email", "url", "phone")``. They are masked in the order url,
    email, phone whatever order ``kinds`` lists them in: a URL may contain ``@`` or digits
    (``https://x.org/@ann``), so it goes as a whole first; ``www.ann@example.com`` is left to
    the e-mail pass. Returns the text and, for each requested kind, how many were masked.

    - URLs: ``http://`` / ``https://`` or ``www.`` up to whitespace, without trailing
      sentence punctuation or an unbalanced closing bracket.
    - E-mail: ``local@domain.tld`` (ASCII).
    - Phones: 7 to 15 digits in groups separated by a space, ``-`` or ``.``, with optional
      ``+country`` and ``(area code)``: ``+44 20 7946 0958``, ``(555) 123-4567``,
      ``555.123.4567``, ``06 12 34 56 78``. Not masked: years, short numbers, prices and
      numbers glued to a currency sign or a word, a bare digit run without ``+`` (an id),
      dates (``2021-03-04``, ``04.03.2021``), decimals, version numbers, IPv4 addresses,
      ISBN-13s, ZIP+4 codes, numbers with thousands separators (``1 234 567``,
      ``1.000.000``) and lists of small numbers (``10 20 30 40``).
    """
    return _mask(text, pii_kinds(kinds))


def _mask(text: str, kinds: tuple[str, ...]) -> tuple[str, dict[str, int]]:
    counts = dict.fromkeys(kinds, 0)
    for kind in kinds:
        if _MAY_HOLD[kind](text):
            text = _MASKERS[kind](text, counts)
    return text, counts


# --------------------------------------------------------------------------------------------
# The whole cleaning
# --------------------------------------------------------------------------------------------


def _drop_controls(text: str) -> str:
    """Remove control and format characters; whitespace ones stay (collapsed later)."""
    if text.isprintable():  # the common case: no Cc/Cf (nor odd spaces) at all
        return text
    if text.isascii():
        return _ASCII_CONTROL.sub("", text)
    drop = {
        ord(ch): None
        for ch in set(text)
        if ch not in _SPACES and unicodedata.category(ch) in _CONTROL
    }
    return text.translate(drop) if drop else text


def normalize_text_counted(
    text: str,
    unicode_form: str = "NFKC",
    lowercase: bool = False,
    strip_html: bool = False,
    mask_pii: Iterable[str] | str = (),
) -> tuple[str, dict[str, int]]:
    """:func:`normalize_text` that also returns how many of each PII kind it masked."""
    return _normalize(text, unicode_form, lowercase, strip_html, pii_kinds(mask_pii))


def normalize_text(
    text: str,
    unicode_form: str = "NFKC",
    lowercase: bool = False,
    strip_html: bool = False,
    mask_pii: Iterable[str] | str = (),
) -> str:
    """Clean one text: HTML out, unicode normalised, controls out, whitespace collapsed,
    lowercased, PII masked (in that order; see the module docstring)."""
    return normalize_text_counted(text, unicode_form, lowercase, strip_html, mask_pii)[0]


def _normalize(
    text: str, unicode_form: str, lowercase: bool, html_: bool, kinds: tuple[str, ...]
) -> tuple[str, dict[str, int]]:
    """normalize_text_counted with ``kinds`` already checked (see :func:`pii_kinds`)."""
    if html_:
        text = strip_html(text)
    if unicode_form != "none" and not text.isascii():
        text = unicodedata.normalize(unicode_form, text)
    text = " ".join(_drop_controls(text).split())  # str.split's whitespace is re's \s
    if lowercase:
        text = text.lower()
    if not kinds:
        return text, {}
    return _mask(text, kinds)


def normalize_layout_counted(
    text: str, unicode_form: str, lowercase: bool, html_: bool, kinds: tuple[str, ...]
) -> tuple[str, dict[str, int]]:
    """The cleaning of a conversation turn: as :func:`_normalize`, except that line breaks
    and indentation stay (code, lists and poems keep their shape). Lines lose trailing
    spaces, carriage returns become line breaks, and blank lines at either end go."""
    if html_:
        text = strip_html(text)
    if unicode_form != "none" and not text.isascii():
        text = unicodedata.normalize(unicode_form, text)
    text = _drop_controls(text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    text = text if text.strip() else ""
    if lowercase:
        text = text.lower()
    if not kinds:
        return text, {}
    return _mask(text, kinds)


def clean_turns(texts: Iterable[str], cleaning: Mapping[str, Any] | None) -> list[str]:
    """Apply an artifact's cleaning settings to conversation turns (layout kept)."""
    s = cleaning_settings(cleaning)
    kinds = pii_kinds(s["mask_pii"])
    return [
        normalize_layout_counted(t, s["unicode_form"], s["lowercase"], s["strip_html"], kinds)[0]
        for t in texts
    ]


def cleaning_settings(cleaning: Mapping[str, Any] | None) -> dict[str, Any]:
    """An artifact's cleaning dict with defaults for the keys it lacks (older artifacts)."""
    settings = {**DEFAULT_CLEANING, **(cleaning or {})}
    return {
        "unicode_form": settings["unicode_form"],
        "lowercase": bool(settings["lowercase"]),
        "strip_html": bool(settings["strip_html"]),
        "mask_pii": list(pii_kinds(settings["mask_pii"])),
    }


def clean_texts(texts: Iterable[str], cleaning: Mapping[str, Any] | None) -> list[str]:
    """Apply an artifact's cleaning settings to raw texts (``None``: the defaults)."""
    s = cleaning_settings(cleaning)
    form, lower, html_, pii = s["unicode_form"], s["lowercase"], s["strip_html"], s["mask_pii"]
    return [normalize_text(t, form, lower, html_, pii) for t in texts]


def json_to_str(value: Any) -> str | None:
    # Matches pyarrow's cast to string, which read_json's columns go through.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def as_strings(batch, column: str):
    """A column of a pyarrow batch as strings (all null where the batch lacks it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in batch.column_names:  # a JSONL block where no line has the key
        return pa.nulls(batch.num_rows, pa.string())
    values = batch.column(column)
    if pa.types.is_string(values.type):
        return values
    if pa.types.is_nested(values.type):
        return pa.array([json_to_str(v) for v in values.to_pylist()], pa.string())
    return pc.cast(values, pa.string())
