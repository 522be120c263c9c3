"""Cheap checks on generated text: degenerate outputs (empty, refusals, repetition loops) are retried with a new
seed; texts about protected attributes can be dropped (MTCIR's privacy filter: skin, hair, gender, age, race)."""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

REFUSALS = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, i|i cannot|i can'?t|i am unable|i'm unable|as an ai|i apologi[sz]e)",
    re.IGNORECASE,
)

# MTCIR dropped modification texts about these; the lists are config (filter.privacy.words) — these are defaults.
PRIVACY_WORDS: dict[str, list[str]] = {
    "skin": ["skin", "complexion", "skin tone", "tan", "pale", "freckles"],
    "hair": ["hair", "haired", "hairstyle", "bald", "blonde", "blond", "brunette", "redhead", "beard", "moustache",
             "mustache"],
    "gender": ["man", "men", "woman", "women", "male", "female", "boy", "girl", "gentleman", "lady", "ladies",
               "he", "she", "his", "her", "him"],
    "age": ["young", "old", "elderly", "aged", "teenager", "teen", "child", "kid", "baby", "toddler", "senior",
            "middle-aged", "adult"],
    "race": ["race", "ethnicity", "ethnic", "asian", "african", "caucasian", "hispanic", "latino", "latina",
             "black person", "white person"],
}


def degenerate_reason(text: str, min_chars: int = 1) -> str | None:
    """A reason code when ``text`` is not worth keeping, else None."""
    stripped = text.strip()
    if len(stripped) < max(min_chars, 1):
        return "empty"
    if REFUSALS.match(stripped):
        return "refusal"
    if len(stripped) >= 80:
        raw = stripped.encode()
        # A repetition loop compresses far better than language does (~0.4-0.6 for English prose).
        if len(zlib.compress(raw, 9)) / len(raw) < 0.2:
            return "repetition"
    words = stripped.split()
    if len(words) >= 12:
        top = max(words.count(w) for w in set(words))
        if top / len(words) > 0.5:
            return "repetition"
    return None


@lru_cache(maxsize=32)
def _privacy_pattern(words: tuple[tuple[str, tuple[str, ...]], ...]) -> re.Pattern:
    alternatives = []
    for category, terms in words:
        for term in terms:
            alternatives.append(f"(?P<{category}_{len(alternatives)}>{re.escape(term)})")
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE)


def privacy_hit(text: str, words: dict[str, list[str]]) -> tuple[str, str] | None:
    """(category, word) of the first protected-attribute word in ``text`` (whole words, any case), else None."""
    if not words:
        return None
    key = tuple((c, tuple(t)) for c, t in sorted(words.items()) if t)
    if not key:
        return None
    m = _privacy_pattern(key).search(text)
    if not m:
        return None
    group = next(name for name, value in m.groupdict().items() if value is not None)
    return group.rsplit("_", 1)[0], m.group(0)
