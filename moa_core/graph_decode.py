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
    done |= next in eos; generated[:, step] = next; tokens = next; position += 1; cache_position += 1; step += 1

(The cache writes the token's key and value at slot c: transformers 5.2x's StaticLayer counts that slot itself,
which `decode` checks starts equal.) Every tensor the step reads or writes is a buffer allocated once per (cache,
batch, key) and refilled before each call, so the graph captured on the first call replays on the next ones. What
is not a buffer is read at its captured address: the weights may change in place; `key` names their addresses
(`weight_addresses`), so weights moved elsewhere mean a new capture, and whatever else the step depends on (the
caller's routing settings). On the CPU (or with capture=False) the same step runs eagerly each token: the
reference path the tests compare with HF's generate. The host checks whether every row has finished only every
`check_every` steps; the result is cut where HF's generate would have stopped.

The prompt pass (a plain model's prefill, a MixtureModel's routing pass) may be captured too, one graph per prompt
shape (`GraphDecoder(prompt_shapes=n)` keeps the last n): eagerly it launches one kernel per op from Python, which
at batch 32 x 128 tokens on an H200 left it host-bound (BENCHMARKS.md). A captured prompt reads its attention
as a 4D additive mask built before the replay (`prompt_attention`), since HF's own mask code reads the padding
mask's values on the host to pick a faster kernel, which a capture cannot do.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


def prompt_positions(attention_mask: Tensor) -> Tensor:
    """[B, T] mask of a (left-)padded prompt -> position ids counted from each row's first real token,
    the way HF's generate derives them (padding positions get 0; attention never reads them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class StaticCaches:
    """A model's static KV caches, one per kind = (batch, dtype, device), the `size` kinds used last kept (the least
    recently used dropped first). A call gets its kind's cache, reset, while it is long enough, else a new one in its
    place, never shorter than the model's last static cache. A new cache per call would give a compiled or captured
    decode step new tensor addresses (a re-capture), and one of another length new shapes (a recompile); keeping one
    per kind lets calls of alternating batch sizes each replay their own graphs. HF's generate, which builds a cache
    per call, keeps the length for the same reason in `_previous_max_cache_length`, read and set here too, so that
    the calls a MixtureModel leaves to HF's own cache (e.g. with `expert=` given) see the same length."""

    def __init__(self, size: int = 2, on_drop: Callable[[Any], None] | None = None) -> None:
        if size < 1:
            raise ValueError(f"a StaticCaches keeps at least 1 cache, got size={size}")
        self.size = size
        self.on_drop = on_drop  # called with each cache dropped, before a new one is made (its graphs go with it)
        self._held: OrderedDict[tuple, tuple[int, Any]] = OrderedDict()  # kind -> (length, cache); last used last

    def get(self, model: nn.Module, kind: tuple, max_len: int) -> Any:
        """The StaticCache for a call of `kind` needing `max_len` positions (see the class docstring)."""
        from transformers import StaticCache

        max_len = max(max_len, getattr(model, "_previous_max_cache_length", 0))
        held = self._held.pop(kind, None)
        if held is not None and held[0] >= max_len:
            held[1].reset()
        else:
            if held is not None:  # too short: it goes before the new one's memory is taken
                self._dropped(held[1])
            while len(self._held) >= self.size:
                self._dropped(self._held.popitem(last=False)[1][1])
            held = (max_len, StaticCache(config=model.config, max_cache_len=max_len))
            model._previous_max_cache_length = max_len
        self._held[kind] = held
        return held[1]

    def _dropped(self, cache: Any) -> None:
        if self.on_drop is not None:
            self.on_drop(cache)

    def clear(self) -> None:
        for _, cache in list(self._held.values()):
            self._dropped(cache)
        self._held.clear()

    def holds(self, cache: Any) -> bool:
        return any(c is cache for _, c in self._held.values())

    @property
    def last(self) -> Any:
        """The cache handed out last, or None."""
        return next(reversed(self._held.values()))[1] if self._held else None


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


def prompt_attention(attention_mask: Tensor, cache_len: int, dtype: torch.dtype) -> Tensor:
    """[B, T] mask of left-padded prompts -> [B, 1, T, L] additive attention mask over a static cache of L >= T slots:
    0 where query i may read key j (j <= i, j a real token), the dtype's lowest value elsewhere. A padding query that
    may read nothing gets equal scores everywhere (finite, never read by a real token) where -inf would give NaN.
    HF takes a 4D mask as it is, for sdpa and eager attention alike, without looking at its values."""
    B, T = attention_mask.shape
    keys = torch.arange(cache_len, device=attention_mask.device)
    causal = keys[None, :] <= torch.arange(T, device=attention_mask.device)[:, None]  # [T, L]
    real = torch.zeros(B, cache_len, dtype=torch.bool, device=attention_mask.device)
    real[:, :T] = attention_mask.bool()
    allowed = causal[None, None] & real[:, None, None, :]  # [B, 1, T, L]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def prompt_inputs(input_ids: Tensor, attention_mask: Tensor, cache: Any, dtype: torch.dtype) -> dict[str, Tensor]:
    """What a captured prompt pass over left-padded prompts [B, T] into the empty static `cache` reads: ids and mask
    [B, T], positions [B, T] (`prompt_positions`), cache_position [T] and attention [B, 1, T, L]
    (`prompt_attention`)."""
    L = max(layer.max_cache_len for layer in cache.layers)
    T = input_ids.shape[1]
    return {"ids": input_ids, "mask": attention_mask, "positions": prompt_positions(attention_mask),
            "cache_position": torch.arange(T, device=input_ids.device),
            "attention": prompt_attention(attention_mask, L, dtype)}


def tensor_addresses(tensors: Iterable[Tensor]) -> tuple:
    """Where, and in what shape, each tensor lives (see `weight_addresses`): (data pointers, shapes), in order."""
    tensors = tensors if isinstance(tensors, (list, tuple)) else list(tensors)
    # unbound methods mapped in C: no per-tensor Python frame, no shape-to-tuple copy (torch.Size is a tuple)
    return tuple(map(Tensor.data_ptr, tensors)), tuple(map(Tensor.size, tensors))


def weight_addresses(module: nn.Module, extra: list[Tensor] | tuple[Tensor, ...] = ()) -> tuple:
    """Where (and in what shape) every parameter and buffer of `module`, and each tensor of `extra`, lives: part of a
    captured step's key. A captured step reads those addresses; a weight moved elsewhere (`p.data = ...`,
    `load_state_dict(assign=True)`, a new expert) needs a new capture; one changed in place needs none.

    Computed afresh on every call (it runs before each greedy call's replay, while the GPU waits): a walk over each
    submodule's own `_parameters`, `_buffers` and `_modules`, breadth first, each module once, the registries
    `parameters()` and `buffers()` read, without their name prefixes and per-member generators (a Qwen2-0.5B
    mixture of 8 experts, 1132 tensors: 0.8 ms on the CPU where those took 2.4 ms). A tensor two modules share
    (tied weights) is listed under each; a None slot (a Linear without bias) is skipped."""
    tensors: list[Tensor] = []
    modules = [module]
    seen = {id(None)}  # a submodule slot set to None is passed over as if seen
    for m in modules:  # grows as it goes; ids stay unique while `modules` holds every module
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m._parameters:
            tensors += m._parameters.values()
        if m._buffers:
            tensors += m._buffers.values()
        if m._modules:
            modules += m._modules.values()
    tensors += extra
    return tensor_addresses([t for t in tensors if t is not None])


def eos_ids(model: nn.Module, eos_token_id: int | list[int] | None) -> list[int]:
    """The eos ids a greedy call stops rows at, as HF's generate picks them: the call's, else the model's generation
    config's (an int or a list, e.g. Qwen2-Instruct's two); [] when neither sets one."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(e) for e in torch.as_tensor(eos_token_id).reshape(-1).tolist()]  # an int, a list, a tensor, numpy


def pad_id(model: nn.Module, pad_token_id: int | None, eos: list[int]) -> int:
    """What a finished row emits, as HF's generate picks it: the call's, else the generation config's, else the first
    eos id, else 0."""
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return int(pad_token_id)


@dataclass
class _Buffers:
    """The step's inputs and outputs at fixed addresses (B rows, L cache slots, E eos ids)."""

    tokens: Tensor  # [B, 1] the token fed at this step
    position: Tensor  # [B, 1] its position id (counted from the row's first real token)
    cache_position: Tensor  # [1] its slot in the cache
    mask: Tensor  # [B, L] the slots each row attends to
    done: Tensor  # [B] bool: the row has emitted an eos id
    generated: Tensor  # [B, L + 1] the new tokens
    step: Tensor  # [1] where the next new token goes in `generated`
    eos: Tensor  # [E] the eos ids (-1: none)
    pad: Tensor  # [1]
    statics: dict[str, Tensor] = field(default_factory=dict)  # the caller's own inputs (a MixtureModel's experts)
    graph: Any = None  # torch.cuda.CUDAGraph once captured

    @classmethod
    def allocate(cls, B: int, L: int, E: int, device: torch.device, statics: dict[str, Tensor]) -> _Buffers:
        def longs(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.long, device=device)

        return cls(tokens=longs(B, 1), position=longs(B, 1), cache_position=longs(1), mask=longs(B, L),
                   done=torch.zeros(B, dtype=torch.bool, device=device), generated=longs(B, L + 1), step=longs(1),
                   eos=longs(E), pad=longs(1),
                   statics={k: torch.empty_like(v, device=device) for k, v in statics.items()})

    def finished(self, tokens: Tensor) -> Tensor:
        """tokens [B] -> [B] bool: which are an eos id (a compare per id: no host work, capturable)."""
        return (tokens[:, None] == self.eos[None, :]).any(-1)


class _Saved:
    """The call's state before a warm-up: every buffer, and the cache's own tensor counters (transformers 5.2x's
    StaticLayer writes at its `cumulative_length`, not at the `cache_position` it is given)."""

    def __init__(self, buf: _Buffers, cache: Any) -> None:
        self.saved = [(t, t.clone()) for t in vars(buf).values() if isinstance(t, Tensor)]
        self.saved += [(t, t.clone()) for layer in cache.layers for name, t in vars(layer).items()
                       if isinstance(t, Tensor) and name not in ("keys", "values")]

    def restore(self) -> None:
        for t, before in self.saved:
            t.copy_(before)


@dataclass
class _DecodeGraph:
    """One decode step kept: the cache it writes, its buffers (and graph, once captured)."""

    cache: Any
    buffers: _Buffers


@dataclass
class _PromptGraph:
    """One captured prompt pass: the inputs it reads, the outputs it writes (at fixed addresses), its cache."""

    inputs: dict[str, Tensor]
    cache: Any
    outputs: dict[str, Tensor] = field(default_factory=dict)
    graph: Any = None


class CaptureError(RuntimeError):
    """Capturing a step failed (e.g. an op that syncs with the host), or compiling it for the capture did: the same
    call can still run without the decoder (MixtureModel.generate falls back to HF's generate)."""


@contextlib.contextmanager
def _capturing(what: str, recording: bool) -> Iterator[None]:
    """Failures of a capture as CaptureError: any error while recording (`recording`), only torch.compile's own while
    warming up (the warm-up is an eager run of the step: any other error there is the step's, and HF's generate
    would meet it too; dynamo reports those as TorchRuntimeError); never running out of memory, which a fallback
    would hide, also where a compile error wraps it."""
    try:
        yield
    except Exception as exc:
        dynamo = torch._dynamo.exc
        compiling = isinstance(exc, dynamo.TorchDynamoException) and not isinstance(exc, dynamo.TorchRuntimeError)
        if _out_of_memory(exc) or not (recording or compiling):
            raise
        raise CaptureError(f"capturing the {what} as a CUDA graph failed ({type(exc).__name__}: {exc})") from exc


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc`, or an error it wraps (its cause or context, dynamo's inner exception), is running out of
    memory."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        seen.add(id(exc))
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
    return False


Context = Callable[[dict[str, Tensor]], contextlib.AbstractContextManager[Any]]
EOS_SLOTS = 4


class GraphDecoder:
    """Greedy decode steps of one causal LM, each captured as one CUDA graph on CUDA, kept per (cache, key).

    capture: None (default) = on CUDA; False = every step eagerly (the reference path); True = required (an
    error off CUDA). check_every: steps between the host's checks that every row has finished (each one a sync).
    compile: the step's model call goes through torch.compile (inductor's default mode: fused kernels, no CUDA
    graphs of its own; compiled at the first call), and the graph captures the compiled kernels; without it, the
    eager ones. prompt_shapes: how many prompt passes to keep captured, one per (batch, prompt length, cache), the
    least recently used dropped first; 0 (default) runs the prompt eagerly. Each new shape costs two warm-up passes
    and a capture, and each kept one holds its activations' memory: worth it where prompt shapes repeat (fixed-length
    batches, prompts padded to a few lengths). cache_kinds: how many static caches `caches` keeps, one per (batch,
    dtype, device) (StaticCaches): calls of alternating batch sizes each replay their own graphs. decode_graphs: how
    many decode steps to keep captured, one per (cache, key) (e.g. a MixtureModel's routed step and its folded one,
    `MixtureModel.fold_single_expert`), the least recently used dropped first. Graphs over a cache that `caches`
    drops go with it, before its replacement is filled (they could never replay, yet hold memory). Capture needs a
    cache without sliding-window layers and sdpa or eager attention (the others read tensor values on the host)."""

    def __init__(self, model: nn.Module, capture: bool | None = None, check_every: int = 8,
                 compile: bool = False, prompt_shapes: int = 0, decode_graphs: int = 4, cache_kinds: int = 2) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if prompt_shapes < 0:
            raise ValueError(f"prompt_shapes must be >= 0, got {prompt_shapes}")
        if decode_graphs < 1:
            raise ValueError(f"decode_graphs must be >= 1, got {decode_graphs}")
        self.model = model
        self.prompt_shapes = prompt_shapes
        self._prompts: OrderedDict[tuple, _PromptGraph] = OrderedDict()  # least recently used first
        self.decode_graphs = decode_graphs
        # (full key) -> decode step, least recently used first: a key past `decode_graphs` drops the oldest, so a
        # graph whose weights moved is freed with its memory pool
        self._decodes: OrderedDict[tuple, _DecodeGraph] = OrderedDict()
        self.capture = capture
        self.check_every = check_every
        self.compiled = compile
        self._compiled_model: Any = None  # torch.compile's wrapper, made at the first step (see _forward)
        # the static caches of `generate` and of a MixtureModel's generate_greedy: the memory the graphs read
        self.caches = StaticCaches(cache_kinds, on_drop=self._forget)
        self._layer_kinds: Any = None  # see _config_cache

    @property
    def _kept(self) -> tuple[tuple, Any, _Buffers] | None:
        """The most recently used decode step: (key, cache, buffers and graph), or None."""
        if not self._decodes:
            return None
        full, kept = next(reversed(self._decodes.items()))
        return full, kept.cache, kept.buffers

    def clear(self) -> None:
        """Drop the captured graphs, their buffers and the static caches."""
        self._decodes.clear()
        self._prompts.clear()
        self.caches.clear()

    # ------------------------------------------------------------------------------------------------ API
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> Tensor:
        """A plain causal LM's greedy generation: left-padded prompts [B, T] -> sequences [B, T + new], the tokens
        of HF's `generate(do_sample=False, max_new_tokens=...)` with no logits processors (eos and pad default to
        the generation config's, as there). The prompt runs into a kept static cache (`prefill`; captured per shape
        with `prompt_shapes`), sized as HF sizes its own, the rest through `decode`."""
        _check_new_tokens(max_new_tokens)
        self.captures(input_ids.device)
        B, T = input_ids.shape
        kind = (B, self.model.dtype, input_ids.device)
        cache = self.caches.get(self.model, kind, T + max_new_tokens - 1)
        key = weight_addresses(self.model)
        if self.prompt_shapes:
            inputs = prompt_inputs(input_ids, attention_mask, cache, self.model.dtype)
            first = self.prompt(lambda b: {"logits": self._prefill(b, cache)}, inputs, cache, key)["logits"]
        else:
            first = prefill(self.model, input_ids, attention_mask, cache)
        new = self.decode(cache, attention_mask, first, max_new_tokens, eos_token_id, pad_token_id, key=key)
        return torch.cat([input_ids, new], dim=1)

    @torch.no_grad()
    def prompt(self, run: Callable[[dict[str, Tensor]], dict[str, Tensor]], inputs: dict[str, Tensor], cache: Any,
               key: tuple = ()) -> dict[str, Tensor]:
        """A prompt pass `run(inputs) -> outputs` that fills the empty static `cache`, captured once per shape of
        `inputs` (and `key`, and cache) and replayed after, on CUDA with `prompt_shapes` > 0; run eagerly otherwise.
        `run` must read only `inputs` (e.g. `prompt_inputs`) and tensors at fixed addresses (weights, the cache), and
        may not read tensor values on the host. The outputs are the graph's own tensors: use them before the next
        call. key: as `decode`'s (the weights' addresses, the caller's routing settings)."""
        device = next(iter(inputs.values())).device
        if not self.prompt_shapes or not self.captures(device, cache):
            return run(inputs)
        # id(cache): the graph writes that cache's tensors (an entry holds its cache, so the id is not reused meanwhile)
        full = (tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items())), str(device), key, id(cache))
        kept = self._entry(self._prompts, full, cache, self.prompt_shapes, lambda: _PromptGraph(
            inputs={k: torch.empty_like(v) for k, v in inputs.items()}, cache=cache))
        for name, value in inputs.items():
            kept.inputs[name].copy_(value)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            if kept.graph is None:
                try:
                    self._capture_prompt(kept, run)
                except CaptureError:
                    del self._prompts[full]  # not kept half-made: the next call tries afresh
                    raise
            kept.graph.replay()
        return kept.outputs

    def _prefill(self, inputs: dict[str, Tensor], cache: Any) -> Tensor:
        """A plain model's prompt pass over `prompt_inputs` -> the last position's logits [B, V]."""
        return self.model(input_ids=inputs["ids"], attention_mask=inputs["attention"],
                          position_ids=inputs["positions"], cache_position=inputs["cache_position"],
                          past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def decode(self, cache: Any, attention_mask: Tensor, first_logits: Tensor, max_new_tokens: int,
               eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, key: tuple = (),
               statics: dict[str, Tensor] | None = None, context: Context | None = None) -> Tensor:
        """New tokens [B, n <= max_new_tokens] (a new tensor) after prompts whose T positions (mask [B, T]) `cache`
        holds and whose last position gave `first_logits` [B, V].

        statics: the caller's step inputs (e.g. {"expert": [B]}), copied into buffers of their own; `context(
        buffers)` is entered around the steps (and the capture) and must make the model read those buffers, not
        the tensors given. key: what else the captured step depends on (its weights' addresses, the caller's
        routing settings); a new key captures anew."""
        B, T = attention_mask.shape
        L = max(layer.max_cache_len for layer in cache.layers)  # a hybrid cache's sliding layers hold fewer
        _check_new_tokens(max_new_tokens)
        capturing = self.captures(attention_mask.device, cache)
        if T + max_new_tokens - 1 > L:
            raise ValueError(f"a static cache of {L} positions cannot hold a prompt of {T} and {max_new_tokens} "
                             f"new tokens (needs {T + max_new_tokens - 1})")
        if (held := int(cache.get_seq_length())) != T:  # one sync per call: the steps write at the cache's count
            raise ValueError(f"the cache holds {held} positions but the prompts have {T}: prefill all of them first")
        eos = eos_ids(self.model, eos_token_id)
        statics = statics or {}
        # eos ids in a buffer of at least EOS_SLOTS (padded with -1): calls with one id or a config's two share a graph
        buf = self._buffers_for(cache, B, L, max(EOS_SLOTS, len(eos)), attention_mask.device, key, statics)
        first = first_logits.float().argmax(-1)  # [B]
        buf.tokens[:, 0] = first
        buf.position.copy_(attention_mask.long().sum(-1, keepdim=True))  # the first new token's position
        buf.cache_position.fill_(T)
        buf.mask.zero_()
        buf.mask[:, :T] = attention_mask
        buf.eos.fill_(-1)
        buf.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        buf.pad.fill_(pad_id(self.model, pad_token_id, eos))
        buf.done.copy_(buf.finished(first))
        buf.generated[:, 0] = first
        buf.step.fill_(1)
        for name, value in statics.items():
            buf.statics[name].copy_(value)
        cuda = capturing and attention_mask.device.type == "cuda"
        on_device = torch.cuda.device(attention_mask.device) if cuda else contextlib.nullcontext()
        with on_device, (context or _no_context)(buf.statics):  # capture on the tensors' device, not the current one
            for k in range(1, max_new_tokens):
                if k % self.check_every == 0 and bool(buf.done.all()):
                    break
                if buf.graph is None and capturing:
                    try:
                        self._capture(buf, cache)
                    except CaptureError:
                        self._decodes.popitem()  # this call's (the most recent): not kept half-made
                        raise
                if buf.graph is not None:
                    buf.graph.replay()
                else:
                    self._step(buf, cache)
        return _cut(buf.generated[:, :max_new_tokens], eos).clone()

    def will_capture(self, device: torch.device) -> bool:
        """Whether a call on `device` would capture its step, as a yes or no with no error: the calls a caller may
        hand the decoder for speed (MixtureModel.generate does). Not under autocast: a static cache holds one dtype
        and autocast's keys and values come in two (evaluation under bf16 autocast crashed so)."""
        asked = self.capture is None or bool(self.capture)  # None: where it can (refusal names the device)
        return asked and not torch.is_autocast_enabled(device.type) and self.refusal(device) is None

    def refusal(self, device: torch.device, cache: Any = None) -> str | None:
        """Why a step on `device` (over `cache`, when known) cannot be captured, or None when it can."""
        if device.type != "cuda":
            return "a captured decode step needs a CUDA device"
        attention = getattr(getattr(self.model, "config", None), "_attn_implementation", "sdpa")
        if attention not in ("sdpa", "eager"):
            return (f"a captured decode step needs sdpa or eager attention, not {attention!r} (load the model with "
                    "attn_implementation='sdpa')")
        if any(getattr(layer, "is_sliding", False) for layer in (cache or self._config_cache()).layers):
            return "a captured decode step cannot use sliding-window cache layers (they count on the host)"
        return None

    def _config_cache(self) -> Any:
        """A StaticCache of the model's config, one slot long (its layers allocate nothing until written): which
        layer kinds (sliding-window or full) a static cache of this model would have, before any is made."""
        if self._layer_kinds is None:
            from transformers import StaticCache

            self._layer_kinds = StaticCache(config=self.model.config, max_cache_len=1)
        return self._layer_kinds

    # -------------------------------------------------------------------------------------------- internals
    def captures(self, device: torch.device, cache: Any = None) -> bool:
        """Whether a call on `device` (over `cache`, when known) captures its step; an error where it must and cannot,
        and for a call that cannot run at all (under autocast). Call it before any work: `generate` and
        `MixtureModel.generate_greedy` do. capture=None captures on CUDA and runs eagerly elsewhere; on CUDA, a
        setting that cannot be captured is an error, not a silent eager loop."""
        if torch.is_autocast_enabled(device.type):
            raise ValueError("greedy graph decoding under torch.autocast: a static cache holds one dtype, and autocast "
                             "gives keys and values of two; cast the model instead (model.to(torch.bfloat16))")
        if (self.capture is not None and not self.capture) or (self.capture is None and device.type != "cuda"):
            return False
        if (why := self.refusal(device, cache)) is not None:
            error = RuntimeError if device.type != "cuda" else ValueError
            raise error(f"{why}; use GraphDecoder(capture=False) for the eager step")
        return True

    @property
    def _forward(self) -> Any:
        """The step's model call: the model, or (compile) its torch.compile wrapper, made when first needed (making it
        imports dynamo, which a decoder that never steps on CUDA, e.g. a CPU-served model's, need not pay)."""
        if not self.compiled:
            return self.model
        if self._compiled_model is None:
            self._compiled_model = torch.compile(self.model, dynamic=False)
        return self._compiled_model

    def _forget(self, cache: Any) -> None:
        """Drop the graphs over `cache` (`caches` dropped it: they can never replay, yet hold it and their pools)."""
        for table in (self._decodes, self._prompts):
            for old in [k for k, kept in table.items() if kept.cache is cache]:
                del table[old]

    def _live(self, cache: Any, current: Any) -> bool:
        """Whether graphs over `cache` may replay again: it is this call's, or one `caches` still holds (a cache the
        caller or `caches` dropped is never given again, yet its graphs would keep it in memory)."""
        return cache is current or self.caches.holds(cache)

    def _entry(self, table: OrderedDict, full: tuple, cache: Any, limit: int, make: Callable[[], Any]) -> Any:
        """`table`'s entry (a _DecodeGraph or _PromptGraph) for key `full`, now the most recently used; else `make()`
        in its place. Entries over a cache no longer live (`_live`) go first, then the least recently used past
        `limit`, so that their memory is freed before the new entry's is taken."""
        for old in [k for k, kept in table.items() if not self._live(kept.cache, cache)]:
            del table[old]
        kept = table.pop(full, None)
        if kept is None:
            while len(table) >= limit:
                table.popitem(last=False)
            kept = make()
        table[full] = kept
        return kept

    def _buffers_for(self, cache: Any, B: int, L: int, E: int, device: torch.device, key: tuple,
                     statics: dict[str, Tensor]) -> _Buffers:
        """The kept buffers (and graph) of the call's key and cache, else new ones (see `_decodes`)."""
        full = (B, L, E, str(device), key, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(statics.items())),
                id(cache))  # as in `prompt`
        return self._entry(self._decodes, full, cache, self.decode_graphs,
                           lambda: _DecodeGraph(cache, _Buffers.allocate(B, L, E, device, statics))).buffers

    def _step(self, buf: _Buffers, cache: Any) -> None:
        """One token for every row (see the module docstring); only in-place writes to `buf` and `cache`."""
        buf.mask.index_fill_(1, buf.cache_position, 1)
        logits = self._forward(input_ids=buf.tokens, attention_mask=buf.mask, position_ids=buf.position,
                               cache_position=buf.cache_position, past_key_values=cache, use_cache=True).logits[:, -1]
        nxt = torch.where(buf.done, buf.pad, logits.argmax(-1))  # [B]
        buf.done |= buf.finished(nxt)
        buf.generated.index_copy_(1, buf.step, nxt[:, None])
        buf.tokens.copy_(nxt[:, None])
        buf.position += 1
        buf.cache_position += 1
        buf.step += 1

    def _capture(self, buf: _Buffers, cache: Any) -> None:
        """Warm the step up (first launches, cuBLAS workspaces, a compile), then capture it. The warm-up runs the
        step, the capture only records it: each warm-up step starts from the call's saved state (`_Saved`), so it
        is the call's own first step, writing the slot that step writes before it reads it, and the state is put
        back afterwards, whatever happens."""
        saved = _Saved(buf, cache)
        try:
            with _capturing("decode step", recording=False), self._side_stream():
                for _ in range(2):
                    saved.restore()
                    self._step(buf, cache)
            saved.restore()
            with _capturing("decode step", recording=True):
                buf.graph = self._record(lambda: self._step(buf, cache))
        finally:
            saved.restore()

    def _capture_prompt(self, kept: _PromptGraph, run: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> None:
        """Warm the prompt pass up twice, then capture it; the cache is emptied before each pass (`reset`: in place,
        and a fresh cache's counters are made by the first pass) and after, whatever happens."""
        try:
            with _capturing("prompt pass", recording=False), self._side_stream():
                for _ in range(2):
                    kept.cache.reset()
                    run(kept.inputs)
            kept.cache.reset()

            def record() -> None:  # the outputs of the recording are the tensors each replay writes
                kept.outputs = run(kept.inputs)

            with _capturing("prompt pass", recording=True):
                kept.graph = self._record(record)
        finally:
            kept.cache.reset()

    @staticmethod
    def _side_stream() -> contextlib.AbstractContextManager[Any]:
        """Where the warm-up runs: a side stream, as torch.cuda.graph's documentation asks."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        return _joined(side)

    @staticmethod
    def _record(step: Callable[[], None]) -> Any:
        """`step` captured (recorded, not run) as a CUDA graph, on a capture stream of the current device
        (torch.cuda.graph's default capture stream belongs to whichever device was current at its first use)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            step()
        return graph


@contextlib.contextmanager
def _joined(side: Any) -> Iterator[None]:
    """Run on stream `side`, then make the current stream wait for it (also when the work raised: what follows,
    e.g. restoring the saved state, must not race with it)."""
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        torch.cuda.current_stream().wait_stream(side)


def _check_new_tokens(n: int) -> None:
    if n < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {n}")


@contextlib.contextmanager
def _no_context(_statics: dict[str, Tensor]) -> Iterator[None]:
    yield


def _cut(new: Tensor, eos: list[int]) -> Tensor:
    """New tokens [B, N] -> the first n columns, n where HF's generate stops: after the column in which the last
    unfinished row emitted an eos id (N when a row never did)."""
    if not eos:
        return new
    hit = torch.isin(new, torch.tensor(eos, device=new.device))
    if not bool(hit.any(-1).all()):
        return new
    n = int(hit.int().argmax(-1).max()) + 1  # argmax: each row's first eos
    return new[:, :n]
