"""Read the chosen option letter (A-E) out of a free-form completion, or None.

Why not one regex: the nanochatAquaRat fork's `[A-E]` search reads the article "a" as option A,
finds letters inside words ("Area", "DE"), and returns the first letter mentioned instead of the final
answer. Here every candidate comes from an explicit answer statement ("Answer: C", "the answer is
(C)", "\\boxed{C}", "C is correct", "Correct option: C", a last line that is just "C" or "C) 12"),
each candidate is checked (not inside a word, not an article, not negated) and the LAST one in the text
wins, since models (and AQuA rationales) often mention options on the way before concluding.

Lower-case letters count only right after an explicit answer cue and only when nothing word-like
follows ("the answer is b." -> B; "the answer is a multiple of 3" -> None).
"""

from __future__ import annotations

import re

# Words that may sit between an answer cue and its letter: "answer will be option (C)".
_FILLER = r"\s*(?i:(?:(?:is|was|will|would|should|must|be|then|therefore|hence|clearly|option|choice|the)\b|[:=\-–—>]|\*\*)\s*)*"
# The letter itself, optionally in parentheses/bold/quotes; never glued to letters or digits.
_LETTER = r"[\"'*]*\(?(?P<l>[A-Ea-e])(?![A-Za-z0-9])"
_CUE_ANSWER = r"(?i:\b(?:answers?|ans)\b\.?)"
_CUE_CORRECT = r"(?i:\b(?:correct|right|best|final|required)\s+(?:answer|option|choice)s?\b)"

# (pattern, lower case allowed). Every pattern puts the letter in group "l".
_PATTERNS = [
    # Answer: C / answer is (C) / ANS - D / Answer: Option B / answer will be A
    (re.compile(_CUE_ANSWER + _FILLER + _LETTER), True),
    # correct option is C / CORRECT OPTION:OPTION E / the right choice is (B)
    (re.compile(_CUE_CORRECT + _FILLER + _LETTER), True),
    # \boxed{C}, \boxed{(C)}, \boxed{\text{C}}
    (re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{)?\s*\(?(?P<l>[A-Ea-e])\)?\s*\}"), True),
    # C is the correct answer / E is the answer / A is correct / D would be the right option
    (
        re.compile(
            r"(?<![A-Za-z0-9])\(?(?P<l>[A-E])\)?\s+(?i:(?:is|would\s+be|will\s+be|seems\s+to\s+be)\s+"
            r"(?:the\s+)?(?:(?:correct|right|best|final)\b(?:\s+(?:answer|option|choice))?|answer\b))"
        ),
        False,
    ),
    # "Option C." / "hence choice (B)" / "I pick option D" closing its line
    (re.compile(r"(?i:\b(?:option|choice)\s*[:\-]?\s*)\(?(?P<l>[A-E])\)?\s*[.!]?[ \t]*$", re.MULTILINE), False),
]

# A final line that ends in a bare capital letter: "x = 7 C", "=250=D", "D", "(B)", "B." ...
_FINAL_BARE = re.compile(r"(?:^|[^A-Za-z\s]\s*|[0-9]\s+)\(?(?P<l>[A-E])\)?[.!]?\s*$")
# ... or is an option line "C) 12" (only used when no other option line appears in the text).
_OPTION_LINE = re.compile(r"(?m)^\s*\(?(?P<l>[A-E])\)\s*\S")

# After the letter: words that make it a negated or rejected option, not the answer.
_NEGATED = re.compile(
    r"\)?\s*(?i:(?:is|was|are)\s+(?:not|wrong|incorrect|false|too|eliminated|ruled)|isn't|can't|cannot|"
    r"wrong|incorrect|(?:is\s+)?ruled\s+out)\b"
)
# Before the letter: "the answer is not C", "not option D", "except B".
_NEGATED_BEFORE = re.compile(
    r"(?i:\b(?:not|except|exclud(?:e|ing)|eliminat(?:e|ing)|rule\s+out|ruled\s+out|than)\s*(?:option|choice)?\s*[(\"'*]*)$"
)
# Words that may follow a real answer letter "A" without making it the article.
_AFTER_LETTER_OK = {"is", "because", "since", "as", "and", "so", "which", "would", "should", "will", "was"}


def _is_article(text: str, match: re.Match) -> bool:
    """True when the matched letter reads as the article "a"/"A" (or lower-case word) in running text."""
    letter = match.group("l")
    rest = text[match.end("l") :]
    word = re.match(r"\s+([A-Za-z]+)", rest)
    if letter.islower():
        # lower case only as "(b)" or when nothing but punctuation or the end of the line follows
        if text[match.start("l") - 1 : match.start("l")] == "(" and rest.startswith(")"):
            return False
        return not re.match(r"\s*[).:,;!]*\s*(?:$|\n)", rest)
    if letter == "A" and word and word.group(1).islower() and len(word.group(1)) > 1:
        return word.group(1) not in _AFTER_LETTER_OK
    return False


def _candidates(text: str) -> list[tuple[int, str]]:
    """(position, letter) for every accepted answer statement in the text."""
    found = []
    for pattern, lower_ok in _PATTERNS:
        for m in pattern.finditer(text):
            letter = m.group("l")
            if letter.islower() and not lower_ok:
                continue
            if _is_article(text, m):
                continue
            if _NEGATED.match(text, m.end("l")) or _NEGATED_BEFORE.search(text[: m.start("l")]):
                continue
            found.append((m.start("l"), letter.upper()))
    lines = text.rstrip().splitlines()
    if lines:
        last = lines[-1]
        offset = len(text.rstrip()) - len(last)
        m = _FINAL_BARE.search(last)
        if m:
            found.append((offset + m.start("l"), m.group("l")))
        option_lines = {m.group("l") for m in _OPTION_LINE.finditer(text)}
        m = _OPTION_LINE.match(last)
        if m and len(option_lines) == 1:
            found.append((offset + m.start("l"), m.group("l")))
    return found


def extract_letter(completion: str) -> str | None:
    """The last explicitly stated answer letter "A".."E" in `completion`, or None when none is stated."""
    if not isinstance(completion, str):
        raise TypeError(f"extract_letter: completion must be str, got {type(completion).__name__}")
    found = _candidates(completion)
    if not found:
        return None
    return max(found)[1]
