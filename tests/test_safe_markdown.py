"""safe_markdown / plain / code_span: what the browser would render holds no image and no unsafe link, and nothing
else changes. Checked with a CommonMark parser here; tests/test_browser_safety.py checks Streamlit's own renderer."""

from __future__ import annotations

import html
import random
import re

import pytest
from markdown_it import MarkdownIt

from internlm_app.web.safe_markdown import code_span, plain, safe_link, safe_markdown

MD = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
MD.validateLink = lambda url: True  # see every link


def _tokens(text: str):
    for token in MD.parse(text):
        yield token
        yield from token.children or ()


def _images(text: str) -> list[str]:
    return [t.attrGet("src") for t in _tokens(text) if t.type == "image"]


def _links(text: str) -> list[str]:
    return [t.attrGet("href") for t in _tokens(text) if t.type == "link_open"]


def _code(text: str) -> list[str]:
    return [t.content for t in _tokens(text) if t.type in ("code_inline", "fence", "code_block")]


UNCHANGED = [
    "plain text, 中文，没有链接。",
    "# Title\n\n- a **bold** item\n- `vec![1, 2]` in code\n\n| a | b |\n|---|---|\n| 1 | 2 |",
    "```rust\nlet v = vec![1];\nlet w = ![x](http://not-an-image-in-code);\n```",
    "    ![indented](http://code.block/x.png)",
    "See [the docs](https://example.com/docs), <https://example.com>, [relative](/a/b#c), [mail](mailto:a@b.c)",
    "Math: $\\frac{a}{b}$ and $$\\sum_i x_i$$ and a \\! bang",
    "\\![escaped](http://e.example/x.png) is a link, not an image",
]


@pytest.mark.parametrize("text", UNCHANGED)
def test_text_without_images_or_unsafe_links_is_unchanged(text):
    assert safe_markdown(text) == text


IMAGES = {
    "inline": "look ![cat](http://img.example/cat.png) here",
    "empty alt": "![](http://img.example/empty.png)",
    "reference": "![cat][r]\n\n[r]: http://img.example/ref.png",
    "inside a link": "[![badge](http://img.example/b.svg)](https://site.example)",
    "table": "| a |\n|---|\n| ![c](http://img.example/cell.png) |",
    "quote and list": "> - ![q](http://img.example/q.png)",
    "escaped backslash": "\\\\![dbl](http://img.example/dbl.png)",
    "unmatched backticks": "a ``` b ![x](http://img.example/leak.png)",
    "beside code": "`vec![1]` then ![y](http://img.example/y.png)",
    "title": '![t](http://img.example/t.png "a title")',
}


@pytest.mark.parametrize("text", IMAGES.values(), ids=IMAGES.keys())
def test_every_image_becomes_a_link_to_it_and_code_stays(text):
    (src,) = _images(text)  # the case really is an image
    out = safe_markdown(text)
    assert _images(out) == []
    assert src in _links(out)  # shown as a link: one click away, never loaded by itself
    assert _code(out) == _code(text)


UNSAFE = {
    "data": "[click](data:text/html,<script>alert(1)</script>)",
    "data base64": "[click](data:text/html;base64,PHNjcmlwdD4=)",
    "javascript": "[js](javascript:alert(1))",
    "entity-encoded": "[js](&#106;avascript:alert(1))",
    "percent-encoded": "[js](%6Aavascript:alert(1))",
    "spaced": "[js](<java\tscript:alert(1)>)",
    "autolink": "<data:text/html,hi>",
    "autolink js": "<javascript:alert(1)>",
    "file": "[f](file:///etc/passwd)",
    "vbscript": "[vb](VBScript:x)",
    "reference": "[x][r] and [r]\n\n[r]: data:text/html,hi",
    "data image": "![i](data:image/svg+xml,<svg onload=alert(1)>)",
    "in a heading": "## [h](data:x)",
    "beside code": "`[x](data:code)` [y](data:y)",
}


@pytest.mark.parametrize("text", UNSAFE.values(), ids=UNSAFE.keys())
def test_links_to_other_schemes_than_http_and_mailto_are_dropped(text):
    out = safe_markdown(text)
    assert all(safe_link(href) for href in _links(out)) and _images(out) == []
    assert _code(out) == _code(text)


def test_a_safe_link_in_another_paragraph_survives_an_unsafe_one():
    out = safe_markdown("[bad](data:x)\n\n[good](https://ok.example)")
    assert _links(out) == ["https://ok.example"]


FRAGMENTS = [
    "![a](http://i.example/a.png)",
    "![](http://i.example/b.png)",
    "[l](https://ok.example)",
    "[d](data:text/html,x)",
    "<javascript:alert(1)>",
    "`vec![1]`",
    "``",
    "`",
    "\\",
    "\\\\",
    "!",
    "[",
    "]",
    "(",
    ")",
    "<",
    ">",
    "\n",
    "\n\n",
    "    ",
    "> ",
    "- ",
    "| ",
    "```\n",
    "[r]: data:x\n",
    "[r]",
    "text",
    "中文",
]


def test_random_markdown_never_keeps_an_image_or_an_unsafe_link_and_keeps_its_code():
    rng = random.Random(14)
    for _ in range(600):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))
        out = safe_markdown(text)
        assert _images(out) == [] and all(safe_link(h) for h in _links(out)), (text, out)
        assert _code(out) == _code(text), (text, out)


NASTY = [
    "[Session expired – log in again](https://evil.example/login)",
    "![t](http://img.example/t.png) **bold** _it_ `code` <b>x</b> &amp; # h",
    ":material/home: :smile: :red[x] $x^2$ \\ end:",
    "www.evil.example and someone@evil.example and http://evil.example",
    "1. not a list\n- nor this\n> nor a quote",
]


@pytest.mark.parametrize("text", NASTY)
def test_plain_shows_exactly_the_text(text):
    rendered = MD.render(plain(text))
    assert re.findall(r"<(\w+)", rendered) == ["p"] * rendered.count("<p>")  # no link, image, emphasis, code
    shown = html.unescape(re.sub(r"<[^>]+>", "", rendered)).replace("\u2060", "").strip()
    assert shown == " ".join(text.split("\n")) or shown == text


def test_code_span_holds_any_text_exactly():
    for text in ("/root/.cache/conversations.db", "a`b``c", "`x`", " spaced "):
        assert _code(code_span(text)) == [text]


@pytest.mark.parametrize(
    "href,safe",
    [
        ("https://a.example", True),
        ("HTTP://a.example", True),
        ("mailto:a@b.c", True),
        ("/relative/path", True),
        ("#anchor", True),
        ("data:text/html,x", False),
        ("JavaScript:alert(1)", False),
        (" javascript:alert(1)", False),
        ("java%0Ascript:alert(1)", False),
        ("file:///etc/passwd", False),
    ],
)
def test_safe_link(href, safe):
    assert safe_link(href) is safe
