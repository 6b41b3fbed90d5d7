"""``--remove_words`` of the GIT captioner: drop the phrases that transcribe text seen in the image.

Captioners trained on TextCaps describe the writing in a picture ("a sign that says 'stop' on a
pole"); as training captions those words mostly teach the model to draw garbled text. Removed:

* ``with / that has / which has / having / showing [the|a|an] word(s) / text / phrase / letter(s) /
  name / title / number(s) / logo [that says|reads]`` followed by the transcribed text;
* ``that / which says / reads / said / read`` followed by the text;
* ``saying / reading`` followed by a quoted text (unquoted, "a man reading a book" is no transcription).

The transcribed text ends at its closing quote when quoted, else before the next ``on / in / at /
above / below / under / over / near / next to`` or ``, . ;``. Spacing and stray commas are tidied
afterwards ("a sign that says stop on a pole" -> "a sign on a pole").
"""

from __future__ import annotations

import re

_STOP = r"(?:on|in|at|above|below|under|over|near|next\s+to)"
_TEXT = rf"""(?:(?P<q>['"]).*?(?P=q)|(?:(?!\s{_STOP}\b)[^,.;])+)"""
_WITH = (r"\b(?:with|that\s+has|which\s+has|having|showing)\s+(?:(?:the|a|an)\s+)?"
         r"(?:words?|text|phrase|letters?|name|title|numbers?|logo)\b(?:\s+(?:that\s+)?(?:says?|reads?))?")
_THAT_SAYS = r"\b(?:that|which)\s+(?:says?|reads?|said)\b"
_QUOTED_VERB = r"""\b(?:saying|reading)(?=\s*:?\s*['"])"""

_PHRASE = re.compile(rf"\s*(?:{_WITH}|{_THAT_SAYS}|{_QUOTED_VERB})\s*:?\s*{_TEXT}", re.IGNORECASE)


def remove_words(caption: str) -> str:
    """``caption`` without the phrases that transcribe text (see the module docstring)."""
    text = _PHRASE.sub("", caption)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;])", r"\1", text)
    text = re.sub(r"([,;])(?:\s*[,;])+", r"\1", text)
    return text.strip().strip(",;").strip()
