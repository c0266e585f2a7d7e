"""Token NLL of a causal LM over sliding windows: the number every perplexity here is made of.

``sliding_windows`` cuts the text as the transformers perplexity guide does, so
every position after the first is scored exactly once; ``token_nll`` sums the
scored tokens' negative log-likelihood (log-softmax in float32). Nothing here
loads a model or a text, or knows about quantization.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[n]`` of ``text`` (the tokenizer's own special tokens included), at most ``max_tokens``."""
    if not text.strip():
        raise ValueError("the text is empty: there is nothing to score")
    # The text is scored in windows below; the model's length limit does not apply to the whole text.
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


# --------------------------------------------------------------------------- windows and NLL


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go into the model; the tokens at positions ``[scored_begin, end)`` are scored.

    Position ``p`` is predicted from tokens ``begin..p-1``, so ``scored_begin > begin``.
    """

    begin: int
    end: int
    scored_begin: int

    @property
    def n_scored(self) -> int:
        return self.end - self.scored_begin


def sliding_windows(n_tokens: int, context_length: int, stride: int) -> list[Window]:
    """Windows of ``context_length`` tokens every ``stride`` tokens; each scores only tokens no earlier one scored.

    Exactly the transformers perplexity guide's loop: with ``stride <
    context_length`` every scored token after the first window sees at least
    ``context_length - stride`` tokens of context, and the windows score every
    position ``1..n_tokens-1`` exactly once (position 0 has no context). With
    ``stride == context_length`` the windows do not overlap and, as in the
    guide, the first token of each window has no context inside it and is not
    scored.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    if not 0 < stride <= context_length:
        raise ValueError(
            f"stride must be in 1..context_length ({context_length}), got {stride}: a larger stride "
            "would leave tokens unscored"
        )
    if n_tokens < 2:
        raise ValueError(f"{n_tokens} token(s) is too short to score: perplexity needs at least 2 tokens")
    windows = []
    scored_until = 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        windows.append(Window(begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def scored_positions(windows: Sequence[Window]) -> torch.Tensor:
    """Every scored token position, in order (the set every method must share)."""
    return torch.cat([torch.arange(w.scored_begin, w.end) for w in windows])


@dataclass
class PerplexityResult:
    nll_sum: float  # sum of -log p(token) over the scored tokens, natural log
    tokens_scored: int
    positions: torch.Tensor  # the scored token positions
    wall_time_s: float

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens_scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(model.forward).parameters


@torch.inference_mode()
def token_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    windows: Sequence[Window],
    *,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Sum of the causal LM's token NLL over the windows' scored positions (log-softmax in float32)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    keep_logits = _accepts(model, "logits_to_keep")
    nll_sum = 0.0
    n_scored = 0
    start = time.perf_counter()
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        ids = input_ids[window.begin : window.end].to(device)[None]
        # Logits at index i predict token i+1: the scored tokens need the n_scored logits before the last.
        needed = window.n_scored + 1
        if keep_logits:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=needed).logits[0, :-1]
        else:
            logits = model(input_ids=ids, use_cache=False).logits[0, -needed:-1]
        targets = ids[0, window.scored_begin - window.begin :]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        nll = -log_probs.gather(-1, targets[:, None]).squeeze(-1)
        nll_sum += float(nll.double().sum())
        n_scored += window.n_scored
    return PerplexityResult(nll_sum, n_scored, scored_positions(windows), time.perf_counter() - start)
