"""Which words of a fixed vocabulary each caption names, and the prompts of those words.

The caption-word loss (`segclip.losses.caption_word_loss`) asks a center of each image to
rank the prompt of every word its caption names first among the vocabulary's prompts, so
that single centers, not only their element-wise maximum, carry the words' meaning.
Words are matched on token ids: a word names itself when its BPE tokens appear in the
caption's tokens as a contiguous run (the tokenizer lower-cases and splits on spaces and
punctuation, so "a Blue triangle." names "triangle").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tokenize = Callable[[list[str]], torch.Tensor]  # texts -> (N, L) ids, start and end tokens


class CaptionWords:
    """A vocabulary tokenized once: its prompts, and each word's token run."""

    def __init__(self, words: Sequence[str], template: str, tokenize: Tokenize) -> None:
        if not words:
            raise ValueError("no caption words: list them in loss.caption_words")
        self.words = tuple(words)
        self.prompt_tokens = tokenize([template.format(word) for word in self.words])
        # Each word alone is [start, run..., end, padding...]: keep the run.
        self._runs = [ids[1 : int((ids != 0).sum()) - 1] for ids in tokenize(list(self.words))]
        if any(len(run) == 0 for run in self._runs):
            empty = [w for w, run in zip(self.words, self._runs, strict=True) if len(run) == 0]
            raise ValueError(f"caption words {empty} tokenize to nothing; use real words")

    def named(self, tokens: torch.Tensor) -> torch.Tensor:
        """Caption token ids (B, L) -> (B, K) bool, True where caption b names word k."""
        columns = []
        for run in self._runs:
            run = run.to(tokens.device)
            length = len(run)
            if length > tokens.shape[1]:
                columns.append(torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device))
                continue
            windows = tokens.unfold(1, length, 1)  # (B, L - length + 1, length)
            columns.append((windows == run).all(dim=-1).any(dim=-1))
        return torch.stack(columns, dim=1)
