"""Checks that every text a request brings can be tokenized, before it joins a shared pass.

JSON may carry a lone UTF-16 surrogate (`"\\ud800"` without its pair): Python parses it into a
string that is not valid Unicode, and the Rust tokenizer then fails the whole forward pass
(every request batched with it). Such a text is refused here with a 400 naming its place, for
the HTTP server and the Python API alike. (The batcher still isolates any failure a text
might cause; this check just makes the answer a clear 400 instead of a 500.)
"""

from __future__ import annotations

from retrieval_lora.serving.errors import InvalidRequest


def check_texts(texts: list, what: str) -> None:
    """Raise InvalidRequest if an item of `texts` is not a string or not valid Unicode.

    `what` names the field in the message (`input`, `documents`, `query`; indexed unless `query`).
    """
    for index, text in enumerate(texts):
        where = what if what == "query" else f"{what}[{index}]"
        if not isinstance(text, str):
            raise InvalidRequest(f"'{where}' is a {type(text).__name__}, not a string", code="invalid_text")
        if text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(
                f"'{where}' is not valid Unicode text: it holds a lone surrogate U+{ord(text[exc.start]):04X} at "
                f"character {exc.start} (a JSON \\u escape of half a UTF-16 pair); send UTF-8 text",
                code="invalid_text") from None
