"""Judge price table (USD per million tokens) and the thread-safe cost meter behind ``--max-cost``.

Built-in prices are list prices at the time of writing and will drift; pass ``--price-table FILE`` (JSON or YAML:
``{model: {input: USD/1M, output: USD/1M}}``) or ``--price-in/--price-out`` to use your own. The summary names the
entry that was used.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .io import shown

BUILTIN_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4": (30.0, 60.0),
    "gpt-4-0314": (30.0, 60.0),
    "gpt-4-0613": (30.0, 60.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-4-0125-preview": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-2024-05-13": (5.0, 15.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1-nano": (0.1, 0.4),
    "gpt-3.5-turbo": (0.5, 1.5),
}


@dataclass(frozen=True)
class Price:
    """Price of one model in USD per million tokens, and where it came from (for the report)."""

    input_per_mtok: float
    output_per_mtok: float
    source: str

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


def parse_price_table(data: Any, origin: str) -> dict[str, tuple[float, float]]:
    """Validate a user price table ``{model: {input: x, output: y}}``."""
    if not isinstance(data, dict):
        raise UserError(f"{origin}: price table must map model names to {{input: ..., output: ...}}")
    table: dict[str, tuple[float, float]] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"input", "output"}:
            raise UserError(f"{origin}: entry {shown(model)} must have exactly the keys 'input' and 'output' "
                            "(USD per 1M tokens)")
        try:
            pin, pout = float(entry["input"]), float(entry["output"])
        except (TypeError, ValueError):
            raise UserError(f"{origin}: entry {shown(model)} has a non-numeric price") from None
        if not (math.isfinite(pin) and math.isfinite(pout)) or pin < 0 or pout < 0:
            raise UserError(f"{origin}: entry {shown(model)} must have non-negative prices")
        table[str(model)] = (pin, pout)
    return table


def lookup_price(model: str, user_table: dict[str, tuple[float, float]] | None = None) -> Price | None:
    """Price of ``model``: exact name first, then the longest table key K with ``model`` starting ``K-`` (dated names).

    A user table is searched before the built-in one. Returns None when nothing matches.
    """
    for table, label in ((user_table or {}, "price table"), (BUILTIN_PRICES, "built-in")):
        if model in table:
            return Price(*table[model], source=f"{model} ({label})")
        prefixes = [k for k in table if model.startswith(k + "-")]
        if prefixes:
            key = max(prefixes, key=len)
            return Price(*table[key], source=f"{key} ({label})")
    return None


class CostCapReached(Exception):
    """Raised by :meth:`CostMeter.reserve` when the next request could push spending past ``max_cost``."""


CHAT_OVERHEAD_TOKENS = 16  # role markers and message framing the server adds to the prompt


class CostMeter:
    """Counts tokens and dollars of this invocation and keeps it under ``max_cost``.

    Each request reserves an *upper bound* of its cost before it is sent, so concurrent workers never overshoot:
    one prompt token per UTF-8 byte (byte-level BPE tokenizers never produce more) plus framing, and the full
    ``max_tokens`` of completion. Should a server bill more tokens per byte than that, the highest ratio seen is used
    from then on. A reservation that does not fit beside the requests in flight waits for them to settle (they
    usually cost far less than their bound) and the cap is only declared reached when it does not fit with nothing
    in flight, so a run stops within one request's bound below the cap whatever the concurrency.
    """

    def __init__(self, price: Price | None, max_cost: float | None = None) -> None:
        if max_cost is not None and price is None:
            raise UserError("--max-cost needs a price for the judge model: pass --price-table or "
                            "--price-in/--price-out")
        self.price = price
        self.max_cost = max_cost
        self._lock = threading.Condition()
        self.spent = 0.0
        self._reserved = 0.0
        self._in_flight = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests = 0
        self.estimated_usage = 0
        self._tokens_per_byte = 1.0

    def upper_bound(self, prompt_bytes: int, max_tokens: int) -> float:
        """Most one request can cost (see the class docstring)."""
        if self.price is None:
            return 0.0
        return self.price.cost(self._bound_tokens(prompt_bytes), max_tokens)

    def _bound_tokens(self, prompt_bytes: int) -> int:
        return math.ceil(self._tokens_per_byte * prompt_bytes) + CHAT_OVERHEAD_TOKENS

    def reserve(self, prompt_bytes: int, max_tokens: int) -> float:
        """Book the upper bound of one request, waiting while requests in flight may still free room; raise
        CostCapReached when it does not fit under ``max_cost`` with nothing in flight."""
        with self._lock:
            while True:
                est = self.upper_bound(prompt_bytes, max_tokens)
                if self.max_cost is None or self.spent + self._reserved + est <= self.max_cost:
                    self._reserved += est
                    self._in_flight += 1
                    return est
                if self._in_flight == 0:
                    raise CostCapReached(
                        f"cost cap reached: spent ${self.spent:.6f} of --max-cost ${self.max_cost:.6f}; the next "
                        f"request would reserve its upper bound ${est:.6f} ({self._bound_tokens(prompt_bytes)} "
                        f"prompt + {max_tokens} completion tokens), which does not fit (nothing else in flight)")
                self._lock.wait(timeout=1.0)

    def release(self, reservation: float) -> None:
        with self._lock:
            self._reserved -= reservation
            self._in_flight -= 1
            self._lock.notify_all()

    def settle(self, reservation: float, prompt_tokens: int, completion_tokens: int, estimated: bool,
               prompt_bytes: int = 0) -> float:
        """Replace a reservation by the real usage; returns this request's cost (0.0 without a price)."""
        cost = self.price.cost(prompt_tokens, completion_tokens) if self.price else 0.0
        with self._lock:
            if prompt_bytes > 0:
                self._tokens_per_byte = max(self._tokens_per_byte,
                                            (prompt_tokens - CHAT_OVERHEAD_TOKENS) / prompt_bytes)
            self._reserved -= reservation
            self._in_flight -= 1
            self.spent += cost
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.requests += 1
            self.estimated_usage += int(estimated)
            self._lock.notify_all()
        return cost
