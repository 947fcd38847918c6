"""Greedy decoding with the whole decode step captured once as a CUDA graph and replayed: no Python, no dynamo
guard check and no HF generate loop per token, and no host sync per token. Serving engines (vLLM, SGLang) run
their decode steps this way; HF's generate with a static cache and `mode="reduce-overhead"` replays a graph too,
but pays per token for its loop, dynamo's guards, cudagraph trees' input checks and a host sync (its stopping
check), which on an H200 made a 0.5B model's decode step host-bound (BENCHMARKS.md: 3.4 ms of wall time per
step at batch 32 for 1.86 ms of kernels).

One step, for a batch of B rows over a static KV cache of L slots (`GraphDecoder._step`):

    mask[:, c] = 1                                   # the fed token's slot, c = cache_position
    logits = model(tokens [B, 1], mask [B, L], position [B, 1], cache_position [1], cache).logits[:, -1]
    next = where(done, pad, argmax(logits))          # [B]; a finished row emits padding, as HF's generate
    done |= next == eos; generated[:, step] = next; tokens = next; position += 1; cache_position += 1; step += 1

Every tensor it reads or writes is a buffer allocated once per (cache, batch, key) and refilled before each call,
so the graph captured on the first call replays on the next ones. What is not a buffer is read at its captured
address: the model's weights (and a MixtureModel's stacked expert weights) may change in place, not be replaced;
`key` must name whatever else the step depends on (the caller's routing state). On the CPU (or with
capture=False) the same step runs eagerly each token: the reference path the tests compare with HF's generate.
The host checks whether every row has finished only every `check_every` steps; the result is cut where HF's
generate would have stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


def prompt_positions(attention_mask: Tensor) -> Tensor:
    """[B, T] mask of a (left-)padded prompt -> position ids counted from each row's first real token,
    the way HF's generate derives them (padding positions get 0; attention never reads them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def keep_static_cache(model: nn.Module, last: tuple | None, kind: tuple, max_len: int) -> tuple[tuple, Any]:
    """The StaticCache for a call of `kind` = (batch, dtype, device) needing `max_len` positions -> (what to keep
    as `last` for the next call, cache): `last`'s cache, reset, while it is of that kind and long enough, else a new
    one. A new cache per call would give a compiled or captured decode step new tensor addresses (a re-capture),
    and one of another length new shapes (a recompile); HF's generate, which builds a cache per call, keeps the
    length for the same reason (`_previous_max_cache_length`, set here too, which keeps `max_len` from shrinking
    where the caller sizes it from that attribute)."""
    from transformers import StaticCache

    if last is not None:
        last_kind, last_len, cache = last
        if last_kind == kind and last_len >= max_len:
            cache.reset()
            return last, cache
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    model._previous_max_cache_length = max_len
    return (kind, max_len, cache), cache


@torch.no_grad()
def prefill(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, cache: Any, start: int = 0) -> Tensor:
    """Run prompt tokens [B, T - start] (positions start..T-1 of left-padded prompts [B, T], mask [B, T]) through
    a causal LM into `cache` -> the last position's logits [B, V]. start = 0: the whole prompt (an empty cache);
    start = T - 1: only the last token, after a cache that holds the first T - 1 positions."""
    T = attention_mask.shape[1]
    out = model(input_ids=input_ids[:, start:], attention_mask=attention_mask,
                position_ids=prompt_positions(attention_mask)[:, start:],
                cache_position=torch.arange(start, T, device=input_ids.device), past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


@dataclass
class _Buffers:
    """The step's inputs and outputs at fixed addresses (B rows, L cache slots)."""

    tokens: Tensor  # [B, 1] the token fed at this step
    position: Tensor  # [B, 1] its position id (counted from the row's first real token)
    cache_position: Tensor  # [1] its slot in the cache
    mask: Tensor  # [B, L] the slots each row attends to
    done: Tensor  # [B] bool: the row has emitted eos
    generated: Tensor  # [B, L + 1] the new tokens
    step: Tensor  # [1] where the next new token goes in `generated`
    eos: Tensor  # [1] (-1: none)
    pad: Tensor  # [1]
    statics: dict[str, Tensor] = field(default_factory=dict)  # the caller's own inputs (a MixtureModel's experts)
    graph: Any = None  # torch.cuda.CUDAGraph once captured

    @classmethod
    def allocate(cls, B: int, L: int, device: torch.device, statics: dict[str, Tensor]) -> _Buffers:
        def longs(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.long, device=device)

        return cls(tokens=longs(B, 1), position=longs(B, 1), cache_position=longs(1), mask=longs(B, L),
                   done=torch.zeros(B, dtype=torch.bool, device=device), generated=longs(B, L + 1), step=longs(1),
                   eos=longs(1), pad=longs(1), statics={k: torch.empty_like(v) for k, v in statics.items()})


Context = Callable[[dict[str, Tensor]], contextlib.AbstractContextManager[Any]]


class GraphDecoder:
    """Greedy decode steps of one causal LM, captured as a CUDA graph per (cache, batch, key) on CUDA.

    capture: None (default) = on CUDA; False = every step eagerly (the reference path); True = required (an
    error off CUDA). check_every: steps between the host's checks that every row has finished (each one a sync).
    compile: the step's model call goes through torch.compile (inductor's default mode: fused kernels, no CUDA
    graphs of its own; compiled at the first call), and the graph captures the compiled kernels; without it, the
    eager ones."""

    def __init__(self, model: nn.Module, capture: bool | None = None, check_every: int = 8,
                 compile: bool = False) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.model = model
        self.capture = capture
        self.check_every = check_every
        self._forward = torch.compile(model, dynamic=False) if compile else model
        self._buffers: dict[int, tuple[tuple, Any, _Buffers]] = {}  # id(cache) -> (key, cache, its buffers)
        self._last_cache: tuple | None = None  # see keep_static_cache (the plain-model path, `generate`)

    def clear(self) -> None:
        """Drop every captured graph and its buffers (e.g. after replacing the model's weights)."""
        self._buffers.clear()

    # ------------------------------------------------------------------------------------------------ API
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> Tensor:
        """A plain causal LM's greedy generation: left-padded prompts [B, T] -> sequences [B, T + new], as HF's
        `generate(do_sample=False, max_new_tokens=...)` returns them (no logits processors). The prompt runs
        eagerly into a kept static cache (`prefill`), the rest through `decode`."""
        _check_new_tokens(max_new_tokens)
        B, T = input_ids.shape
        kind = (B, self.model.dtype, input_ids.device)
        self._last_cache, cache = keep_static_cache(self.model, self._last_cache, kind, T + max_new_tokens - 1)
        first = prefill(self.model, input_ids, attention_mask, cache)
        new = self.decode(cache, attention_mask, first, max_new_tokens, eos_token_id, pad_token_id)
        return torch.cat([input_ids, new], dim=1)

    @torch.no_grad()
    def decode(self, cache: Any, attention_mask: Tensor, first_logits: Tensor, max_new_tokens: int,
               eos_token_id: int | None = None, pad_token_id: int | None = None, key: tuple = (),
               statics: dict[str, Tensor] | None = None, context: Context | None = None) -> Tensor:
        """New tokens [B, n <= max_new_tokens] after prompts whose T positions (mask [B, T]) `cache` holds and
        whose last position gave `first_logits` [B, V].

        statics: the caller's step inputs (e.g. {"expert": [B]}), copied into buffers of their own; `context(
        buffers)` is entered around the steps (and the capture) and must make the model read those buffers, not
        the tensors given. key: what else the captured step depends on (a new key captures anew)."""
        B, T = attention_mask.shape
        L = cache.layers[0].max_cache_len
        _check_new_tokens(max_new_tokens)
        if T + max_new_tokens - 1 > L:
            raise ValueError(f"a static cache of {L} positions cannot hold a prompt of {T} and {max_new_tokens} "
                             f"new tokens (needs {T + max_new_tokens - 1})")
        statics = statics or {}
        buf = self._buffers_for(cache, B, L, attention_mask.device, key, statics)
        if pad_token_id is None:
            pad_token_id = eos_token_id if eos_token_id is not None else 0
        first = first_logits.float().argmax(-1)  # [B]
        buf.tokens[:, 0] = first
        buf.position.copy_(attention_mask.long().sum(-1, keepdim=True))  # the first new token's position
        buf.cache_position.fill_(T)
        buf.mask.zero_()
        buf.mask[:, :T] = attention_mask
        buf.eos.fill_(-1 if eos_token_id is None else eos_token_id)
        buf.pad.fill_(pad_token_id)
        torch.eq(first, buf.eos, out=buf.done)
        buf.generated[:, 0] = first
        buf.step.fill_(1)
        for name, value in statics.items():
            buf.statics[name].copy_(value)
        with (context or _no_context)(buf.statics):
            for k in range(1, max_new_tokens):
                if k % self.check_every == 0 and bool(buf.done.all()):
                    break
                if buf.graph is None and self._captures(attention_mask.device):
                    self._capture(buf, cache, L)
                if buf.graph is not None:
                    buf.graph.replay()
                else:
                    self._step(buf, cache)
        return _cut(buf.generated[:, :max_new_tokens], eos_token_id)

    # -------------------------------------------------------------------------------------------- internals
    def _captures(self, device: torch.device) -> bool:
        if self.capture is None:
            return device.type == "cuda"
        if self.capture and device.type != "cuda":
            raise RuntimeError("GraphDecoder(capture=True) needs a CUDA device; capture=None captures where it can")
        return self.capture

    def _buffers_for(self, cache: Any, B: int, L: int, device: torch.device, key: tuple,
                     statics: dict[str, Tensor]) -> _Buffers:
        """The buffers (and graph) of `cache` while the rest of the key holds, else new ones in their place: one
        entry per cache, so a graph whose weights moved away is freed, not kept beside the new one."""
        full = (B, L, str(device), key, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(statics.items())))
        kept = self._buffers.get(id(cache))
        if kept is None or kept[0] != full or kept[1] is not cache:
            kept = self._buffers[id(cache)] = (full, cache, _Buffers.allocate(B, L, device, statics))
        return kept[2]

    def _step(self, buf: _Buffers, cache: Any) -> None:
        """One token for every row (see the module docstring); only in-place writes to `buf` and `cache`."""
        buf.mask.index_fill_(1, buf.cache_position, 1)
        logits = self._forward(input_ids=buf.tokens, attention_mask=buf.mask, position_ids=buf.position,
                            cache_position=buf.cache_position, past_key_values=cache, use_cache=True).logits[:, -1]
        nxt = torch.where(buf.done, buf.pad, logits.argmax(-1))  # [B]
        buf.done |= nxt == buf.eos
        buf.generated.index_copy_(1, buf.step, nxt[:, None])
        buf.tokens.copy_(nxt[:, None])
        buf.position += 1
        buf.cache_position += 1
        buf.step += 1

    def _capture(self, buf: _Buffers, cache: Any, L: int) -> None:
        """Warm the step up on a side stream (first launches, cuBLAS workspaces), then capture it. The warm-up runs
        the step, the capture only records it: the call's state (the buffers, and the cache's own counters, e.g.
        transformers 5.2x's `cumulative_length`, which it writes at) is saved before and put back after. The
        warm-up's keys and values land in slots that the call's own steps write before they read them."""
        saved = {name: t.clone() for name, t in vars(buf).items() if isinstance(t, Tensor)}
        counters = [(t, t.clone()) for layer in cache.layers for name, t in vars(layer).items()
                    if isinstance(t, Tensor) and name not in ("keys", "values")]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                buf.cache_position.fill_(L - 1)
                buf.step.fill_(L)
                self._step(buf, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(buf, cache)
        for name, t in saved.items():
            getattr(buf, name).copy_(t)
        for t, before in counters:
            t.copy_(before)
        buf.graph = graph


def _check_new_tokens(n: int) -> None:
    if n < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {n}")


@contextlib.contextmanager
def _no_context(_statics: dict[str, Tensor]) -> Iterator[None]:
    yield


def _cut(new: Tensor, eos_token_id: int | None) -> Tensor:
    """New tokens [B, N] -> the first n columns, n where HF's generate stops: after the column in which the last
    unfinished row emitted eos (N when a row never did)."""
    if eos_token_id is None:
        return new
    hit = new == eos_token_id
    if not bool(hit.any(-1).all()):
        return new
    n = int(hit.int().argmax(-1).max()) + 1  # argmax: each row's first eos
    return new[:, :n]
