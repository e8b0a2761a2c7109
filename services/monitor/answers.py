"""Reading a model's answer to a yes/no question as a boolean."""

from __future__ import annotations

import re
import unicodedata

_YES = frozenset({"yes", "yeah", "yep", "yup", "true", "correct", "affirmative"})
_NO = frozenset({"no", "nope", "false", "negative", "incorrect"})
# Chinese answers start with one of these, then punctuation, whitespace or the end.
_ZH = (
    ("不是的", False),
    ("不是", False),
    ("没有", False),
    ("不对", False),
    ("是的", True),
    ("有的", True),
    ("对的", True),
    ("否", False),
    ("没", False),
    ("不", False),
    ("是", True),
    ("有", True),
    ("对", True),
)
_ZH_END = re.compile(r"$|[\s\W]")
# "There is no alarm." answers "Is there an alarm?" clearly; "There is an alarm" is left ambiguous.
_THERE_IS_NO = re.compile(r"^there(?: is|'s| are) no\b|^there (?:is|are)(?:n't| not)\b")
_BOTH = re.compile(r"^(?:yes (?:and|or) no|no (?:and|or) yes)\b")
_WORD = re.compile(r"[a-z]+")
_LEAD = re.compile(r"^[\s\W_]+")


def yes_no(text: str) -> bool | None:
    """True for a yes, False for a no, None when the answer does not clearly say which.

    The first word decides ("Yes, a baby is crying." -> True, "No." -> False, "Nobody" -> None),
    as do "There is no ..."/"There isn't ..." (False) and a leading Chinese 是/有/对 (True) or
    否/不是/没有/不 (False). Case, width, whitespace and surrounding punctuation are ignored.
    """
    s = _LEAD.sub("", unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'"))
    if not s or _BOTH.match(s):
        return None
    if _THERE_IS_NO.match(s):
        return False
    word = _WORD.match(s)
    if word:
        if word.group() in _YES:
            return True
        if word.group() in _NO:
            return False
        return None
    for prefix, value in _ZH:
        if s.startswith(prefix) and _ZH_END.match(s, len(prefix)):
            return value
    return None
