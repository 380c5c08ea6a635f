"""Sampling parameters: the one definition of their defaults and bounds (UI sliders, API schema, CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Bound:
    """Default, range and slider step of one numeric sampling parameter."""

    default: float
    low: float
    high: float
    step: float
    description: str


# Each bound is written once here; pydantic fields (the API schema, the settings and so the CLI flags) and the
# Streamlit sliders are built from it.
BOUNDS: dict[str, Bound] = {
    "temperature": Bound(0.8, 0.0, 2.0, 0.05, "Sampling temperature; 0 means greedy decoding."),
    "top_p": Bound(0.8, 0.01, 1.0, 0.01, "Nucleus sampling: keep the smallest token set with this probability mass."),
    "top_k": Bound(50, 0, 200, 1, "Keep only the k most likely tokens; 0 disables the filter."),
    "repetition_penalty": Bound(1.0, 1.0, 2.0, 0.01, "Penalty for tokens already in the context; 1 disables it."),
    "max_new_tokens": Bound(1024, 1, 8192, 1, "Most tokens generated for one reply."),
}
INT_PARAMS = frozenset({"top_k", "max_new_tokens"})
GREEDY_BELOW = 1e-5  # a temperature under this samples greedily: 1e-45 made the probabilities inf/nan


def sampling_field(name: str, *, default: object = ..., show_range: bool = False) -> Any:
    """A pydantic Field carrying the bound of `name` (default taken from the bound unless given); `show_range` adds
    the range to the description (settings: their `--help` and the README table say it)."""
    bound = BOUNDS[name]
    cast = int if name in INT_PARAMS else float
    return Field(
        default=cast(bound.default) if default is ... else default,
        ge=cast(bound.low),
        le=cast(bound.high),
        description=f"{bound.description} [{bound.low:g}..{bound.high:g}]" if show_range else bound.description,
    )


class SamplingParams(BaseModel):
    """How one reply is sampled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = sampling_field("temperature")
    top_p: float = sampling_field("top_p")
    top_k: int = sampling_field("top_k")
    repetition_penalty: float = sampling_field("repetition_penalty")
    max_new_tokens: int = sampling_field("max_new_tokens")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that logits ÷ temperature would overflow (vLLM's _SAMPLING_EPS, 1e-5)."""
        return self.temperature < GREEDY_BELOW

    @classmethod
    def unbounded_length(cls, max_new_tokens: int, **values: float) -> SamplingParams:
        """Params whose max_new_tokens may exceed the slider's bound: the API caps a reply to the room the context
        window leaves instead (agent clients send 32k-64k). Every other field is validated as usual."""
        bounded = min(max_new_tokens, int(BOUNDS["max_new_tokens"].high))
        return cls(max_new_tokens=bounded, **values).model_copy(update={"max_new_tokens": max_new_tokens})

    @classmethod
    def greedy_params(cls, max_new_tokens: int) -> SamplingParams:
        return cls(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
