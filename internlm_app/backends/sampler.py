"""The engine's own sampler for replies that ask for more than temperature / top-p / top-k: a seed, logprobs, presence
or frequency penalties, or a grammar (JSON, a JSON Schema, a tool call).

It runs as the last logits processor of `generate` on the worker, with `do_sample=False`: it picks the token itself
and returns scores where only that token is finite, so generate's greedy step takes it. Per step, on one row
([1, vocab] logits):
1. the log-probabilities of the model's distribution are kept when asked for (before any penalty or temperature, as
   vLLM reports them by default);
2. the repetition penalty (HF/CTRL's: a seen token's logit divided by it if positive, multiplied if negative), then
   OpenAI's presence / frequency penalties over the tokens generated so far
   (logit[j] -= presence * (count[j] > 0) + frequency * count[j], from OpenAI's API reference);
3. the grammar's mask: tokens that cannot continue valid output are -inf;
4. greedy (argmax), or temperature, top-k, top-p (the smallest set whose mass reaches top_p) and a draw from a
   `torch.Generator`, seeded per reply when a seed is given, so other replies' draws never change this one's.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import torch
from transformers import LogitsProcessor

from internlm_app.chat_types import TokenLogprob
from internlm_app.runtime import grammar
from internlm_app.sampling import SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class TokenSampler(LogitsProcessor):
    """Chooses each token of one reply (see the module docstring); `records` gets a TokenLogprob per token when
    logprobs were asked for, appended before generate emits that token. One instance per reply."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        seed: int | None = None,
        logprobs: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        compiled_grammar=None,
        describe: Callable[[int], tuple[str, bytes]] | None = None,
    ):
        self.params = params
        self.seed = seed
        self.logprobs = None if logprobs is None else min(max(logprobs, 0), MAX_TOP_LOGPROBS)
        self.presence, self.frequency = presence_penalty, frequency_penalty
        self._grammar = compiled_grammar
        self._matcher = None
        self._bitmask = None
        self._describe = describe or (lambda token_id: (str(token_id), b""))
        self._generator: torch.Generator | None = None
        self._counts: torch.Tensor | None = None  # per vocab id: times generated in this reply
        self._last: int | None = None  # the token chosen at the previous step
        self.records: deque[TokenLogprob] = deque()
        self.lock = threading.Lock()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        row = scores[:1].float()  # one reply: [1, vocab]
        vocab = row.shape[-1]
        if self._counts is None:
            self._counts = torch.zeros(vocab, device=row.device)
            if self.seed is not None:
                self._generator = torch.Generator(device=row.device).manual_seed(self.seed)
            if self._grammar is not None:
                self._matcher = grammar.matcher(self._grammar)
                self._bitmask = grammar.token_bitmask(vocab)
        elif self._last is not None:
            self._counts[self._last] += 1
            if self._matcher is not None and not self._matcher.is_terminated():
                self._matcher.accept_token(self._last)
        log_probs = torch.log_softmax(row, dim=-1) if self.logprobs is not None else None
        row = self._penalize(row, input_ids[:1])
        if self._matcher is not None:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            grammar.apply_mask(row, self._bitmask)
        token = self._choose(row)
        if log_probs is not None:
            self._record(log_probs[0], token)
        self._last = token
        out = torch.full_like(scores, float("-inf"))
        out[:, token] = 0.0
        return out

    def _penalize(self, row: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        penalty = self.params.repetition_penalty
        if penalty != 1.0:
            seen = row.gather(1, input_ids)
            row = row.scatter(1, input_ids, torch.where(seen > 0, seen / penalty, seen * penalty))
        if self.presence or self.frequency:
            row = row - (self.presence * (self._counts > 0).float() + self.frequency * self._counts)
        return row

    def _choose(self, row: torch.Tensor) -> int:
        params = self.params
        if params.greedy:
            return int(row.argmax(dim=-1))
        row = row / params.temperature
        if 0 < params.top_k < row.shape[-1]:
            kth = torch.topk(row, params.top_k, dim=-1).values[..., -1:]
            row = row.masked_fill(row < kth, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(row, descending=True, dim=-1)
            probs = torch.softmax(ordered, dim=-1)
            drop = probs.cumsum(dim=-1) - probs > params.top_p  # the mass before a token already reaches top_p
            row = row.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
        probs = torch.softmax(row, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def _record(self, log_probs: torch.Tensor, token: int) -> None:
        text, data = self._describe(token)
        top: list[tuple[str, bytes, float]] = []
        if self.logprobs:
            values, ids = torch.topk(log_probs, self.logprobs)
            for value, token_id in zip(values.tolist(), ids.tolist(), strict=True):
                top.append((*self._describe(token_id), value))
        with self.lock:
            self.records.append(TokenLogprob(token, text, data, float(log_probs[token]), top))

    def pop_record(self) -> TokenLogprob | None:
        """The record of the next token the reply emitted, in order (None if logprobs were not asked for)."""
        with self.lock:
            return self.records.popleft() if self.records else None
