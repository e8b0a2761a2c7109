from __future__ import annotations

import pytest

from services.monitor.answers import yes_no

CASES = [
    ("Yes.", True),
    ("yes", True),
    ("  YES!  ", True),
    ("Yes, a baby is crying.", True),
    ('"Yes"', True),
    ("Yeah, there is.", True),
    ("No", False),
    ("no.", False),
    ("No, there is no alarm.", False),
    ("Nope", False),
    ("There is no alarm.", False),
    ("There's no one speaking.", False),
    ("There isn't any music.", False),
    ("There are no birds.", False),
    ("是", True),
    ("是的。", True),
    ("是，有婴儿在哭", True),
    ("有。", True),
    ("否", False),
    ("不是", False),
    ("没有，没有警报声。", False),
    ("ＹＥＳ", True),
    ("", None),
    ("   ...  ", None),
    ("Maybe.", None),
    ("I don't know.", None),
    ("Yesterday it rained.", None),
    ("Nobody is there.", None),
    ("Notably, a dog barks.", None),
    ("Yes and no.", None),
    ("There is a dog barking.", None),
    ("A baby is crying.", None),
    ("有没有", None),
    ("是否", None),
    ("没有人在说话", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_yes_no(text: str, expected: bool | None) -> None:
    assert yes_no(text) is expected
