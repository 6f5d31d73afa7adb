"""The bytes each token of a text stands for, from the token strings a tokenizer (or a server's `/tokenize`) gives.

Why from token strings: aligning two tokenizations needs each token's span in the text (`core.token_chunks`), and
a served teacher's only view of its tokenizer is `/tokenize` (ids and token strings, no offsets). Token strings
come in three conventions, and the text they must add up to tells which one a tokenizer uses:

* literal: the string is the text (WordLevel and character tokenizers, most added tokens);
* byte-level (GPT-2, Llama 3, Qwen, SmolLM2): each character stands for one byte (`_BYTE_OF`);
* metaspace (SentencePiece: Llama 2, Mistral, Gemma): `▁` is a space and `<0xNN>` a byte (byte fallback); the
  first token may carry a space the text does not have (the "dummy prefix"), which is dropped.

`token_bytes` tries each and keeps the one whose bytes join to exactly the text's; none fitting is None (the
row is then left unaligned, and counted), never a guess.
"""

from __future__ import annotations

import re


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map of bytes to printable characters, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()
_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _literal(token: str) -> bytes:
    return token.encode()


def _byte_level(token: str) -> bytes:
    return bytes(_BYTE_OF[c] for c in token)  # KeyError: not this convention


def _metaspace(token: str) -> bytes:
    if m := _FALLBACK.fullmatch(token):
        return bytes([int(m.group(1), 16)])
    return token.replace("▁", " ").encode()


CONVENTIONS = (_literal, _byte_level, _metaspace)


def token_bytes(tokens: list[str], text: str) -> list[bytes] | None:
    """Each token's bytes, in the convention whose bytes join to `text` (UTF-8); None if none does."""
    target = text.encode()
    for convention in CONVENTIONS:
        try:
            parts = [convention(t) for t in tokens]
        except KeyError:
            continue
        joined = b"".join(parts)
        if joined == target:
            return parts
        if convention is _metaspace and parts and parts[0][:1] == b" " and joined[1:] == target:
            return [parts[0][1:], *parts[1:]]  # the dummy prefix
    return None
