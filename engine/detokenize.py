"""Streaming detokenization: token ids in, text deltas out, never a broken character.

GPT-2's byte-level BPE can split one UTF-8 character (an emoji, most CJK) across several tokens, so
decoding each token alone yields U+FFFD fragments. `StreamDetokenizer` keeps a small window of ids
(the offset scheme of HF's TextStreamer and vLLM's incremental detokenizer): the tokens already
emitted since the last complete character (`prefix`) and the pending ones after them. Each push
decodes only that window and emits the text past the prefix once it no longer ends in U+FFFD.
Decoding with the prefix, not the new ids alone, keeps decoders that look at neighbouring tokens
(e.g. a leading-space rule) consistent with a one-shot decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete or invalid UTF-8 sequence


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class StreamDetokenizer:
    """Turn one row's generated ids into text deltas.

    The deltas concatenate to `tokenizer.decode(all_ids)` whenever the ids end on a complete
    character; otherwise `flush()` returns the remainder with its replacement characters.
    """

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []  # window: the emitted prefix, then the pending ids
        self._prefix = 0           # ids[:prefix] are emitted and end on a character boundary

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is still split)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[:self._prefix])
        text = self._decode(self._ids)
        # A trailing U+FFFD is usually a character whose remaining bytes are still to come.
        if len(text) <= len(prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        # The emitted ids become the next prefix, so the window holds only the last emitted token(s).
        self._ids = self._ids[self._prefix:]
        self._prefix = len(self._ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """End of the row: return whatever is pending, replacement characters included."""
        text = self._decode(self._ids)[len(self._decode(self._ids[:self._prefix])):]
        self._ids, self._prefix = [], 0
        return text
