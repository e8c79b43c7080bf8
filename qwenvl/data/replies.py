"""Which tokens of a templated sample are trained: the assistant replies, read off the processor's own chat template
(``Replies``): the tokens that open a reply, the whitespace token after them, the token that ends a turn, and the
special strings a row's text may not contain (they would forge a turn).

    <|im_start|>assistant\n  The reply text ...  <|im_end|>
    '-- start marker --''-'   '--- trained ---------------'     (the end-of-turn token is trained too)
"""

from __future__ import annotations

import torch

from qwenvl.data.rows import BadSampleError, DataFileError, _Row
from qwenvl.packing import IGNORE_INDEX

__all__ = ["Replies"]


class Replies:
    """The reply markers of ``processor``'s chat template, and the labels and checks they give."""

    def __init__(self, processor) -> None:
        self.start_ids, self.start_space, self.end_id = _role_markers(processor)
        self.special = _special_strings(processor)

    def check_text(self, row: _Row) -> None:
        for message in row.messages:
            for part in message["content"]:
                if part["type"] == "text" and (hit := next((s for s in self.special if s in part["text"]), None)):
                    raise BadSampleError(row.ref, f"the text contains the special token {hit!r}")

    def labels(self, row: _Row, input_ids: torch.Tensor) -> torch.Tensor:
        """-100 but the assistant replies: from after each start marker through the turn's end token."""
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for begin, end in self.spans(row, input_ids.tolist()):
            labels[begin : end + 1] = input_ids[begin : end + 1]
        return labels

    def spans(self, row: _Row, ids: list[int]) -> list[tuple[int, int]]:
        """``(first, last)`` token index of each assistant reply (its end-of-turn token included)."""
        start, n = self.start_ids, len(self.start_ids)
        spans, i = [], 0
        while i + n <= len(ids):
            if ids[i : i + n] == start:
                begin = i + n
                # The marker's trailing whitespace ("\n") is its own token unless the reply starts with
                # whitespace too and BPE merged them ("\n\n"): then that merged token is trained on.
                if self.start_space is not None and begin < len(ids) and ids[begin] == self.start_space:
                    begin += 1
                try:
                    end = ids.index(self.end_id, begin)
                except ValueError:
                    raise BadSampleError(row.ref, "an assistant reply has no end-of-turn token") from None
                spans.append((begin, end))
                i = end + 1
            else:
                i += 1
        if len(spans) != row.n_replies:
            raise BadSampleError(row.ref, f"found {len(spans)} assistant replies in the templated text, expected {row.n_replies}")
        return spans


def _role_markers(processor) -> tuple[list[int], int | None, int]:
    """Read off the template: the tokens that open an assistant reply (without trailing whitespace), the
    token of that whitespace (or None), and the token that ends a turn."""
    tokenizer = getattr(processor, "tokenizer", processor)
    user = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    reply = [*user, {"role": "assistant", "content": [{"type": "text", "text": "y"}]}]
    bare = processor.apply_chat_template(user, tokenize=False, add_generation_prompt=False)
    prompt = processor.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(reply, tokenize=False, add_generation_prompt=False)
    if not prompt.startswith(bare) or not full.startswith(prompt + "y"):
        raise DataFileError("the processor's chat template does not render an assistant turn as generation prompt + reply")
    marker = prompt[len(bare) :]
    stripped = marker.rstrip()
    start_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    space_ids = tokenizer(marker[len(stripped) :], add_special_tokens=False)["input_ids"] if marker != stripped else []
    end_ids = tokenizer(full[len(prompt) + 1 :], add_special_tokens=False)["input_ids"]
    if not start_ids or not end_ids or len(space_ids) > 1:
        raise DataFileError("the processor's chat template has no assistant start marker or end-of-turn token")
    return list(start_ids), (int(space_ids[0]) if space_ids else None), int(end_ids[0])


def _special_strings(processor) -> tuple[str, ...]:
    tokenizer = getattr(processor, "tokenizer", processor)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = {t.content for t in added.values() if getattr(t, "special", False)}
    names |= set(getattr(tokenizer, "all_special_tokens", []))
    return tuple(sorted(n for n in names if n))
