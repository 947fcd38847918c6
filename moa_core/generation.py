"""Generation for a `MixtureModel`: `generate()` routes each prompt once and decodes with its expert, reusing
the routing pass's KV cache as generate's prompt cache, and torch.compile / a static cache where HF's
generate uses them. Kept apart from moa_core.model (the routing model and its training forward): this is
the inference-speed code, whose rules follow HF's generate (which settings make it build, pick or compile
its own cache).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import lora_kernels
from .graph_decode import (
    CaptureError, GraphDecoder, StaticCaches, prefill, prompt_inputs, prompt_positions, tensor_addresses,
    weight_addresses,
)
from .routing import Routing


def _cache_reusable(model: nn.Module, input_ids: Tensor, gen_kwargs: dict[str, Any]) -> bool:
    """Whether generate's prompt cache can come from the routing pass: one sequence per prompt (no beams,
    no extra return sequences), a cache generate would build itself (dynamic or static) and that the model's
    own generation config does not choose, a prompt of 2+ tokens. Settings come from the call, else the
    model's generation config."""
    return (
        input_ids.shape[1] >= 2
        and _gen_setting(model, gen_kwargs, "use_cache", True)
        and "past_key_values" not in gen_kwargs
        and "generation_config" not in gen_kwargs
        and getattr(model.generation_config, "cache_implementation", None) is None
        and gen_kwargs.get("cache_implementation") in (None, "dynamic", "static")
        and _rows_per_prompt(model, gen_kwargs) == 1
    )


def _first_logits_given(model: nn.Module, gen_kwargs: dict[str, Any]) -> bool:
    """Whether generate's first step can take its logits from the routing pass instead of running the last prompt
    token again (see `_given_prefill`): HF's generate has its `_prefill` step (transformers 4.5x-5.x), and the
    call asks for nothing that only a real forward returns (attentions, hidden states), nor an assistant or a
    chunked prefill, which bypass or split that step."""
    return (
        callable(getattr(model, "_prefill", None))
        and not any(_gen_setting(model, gen_kwargs, k, False) for k in ("output_attentions", "output_hidden_states"))
        and not any(gen_kwargs.get(k) is not None for k in ("assistant_model", "prompt_lookup_num_tokens"))
        and _gen_setting(model, gen_kwargs, "prefill_chunk_size", None) is None
    )


@contextlib.contextmanager
def _given_prefill(model: nn.Module, first: Any) -> Iterator[None]:
    """HF's generate runs the prompt (or the part of it its cache lacks) through the model once, eagerly, in
    `_prefill`, then decodes with its compiled step. When the routing pass has already run the whole prompt, its
    cache and its last position's logits are that step's result: for this call `_prefill` returns `first` (an
    output with `logits` [B, 1, V] and `past_key_values`) instead of an eager forward of MoA's 24-odd layers,
    which cost as much host time as the compiled routing pass itself."""
    model._prefill = lambda *args, **kwargs: first  # an instance attribute shadows the method for this call only
    try:
        yield
    finally:
        del model._prefill


def _gen_setting(model: nn.Module, gen_kwargs: dict[str, Any], key: str, default: Any) -> Any:
    """A generate setting as HF will use it: the call's, else the model's generation config, else `default`."""
    value = gen_kwargs.get(key, getattr(model.generation_config, key, None))
    return default if value is None else value


def _rows_per_prompt(model: nn.Module, gen_kwargs: dict[str, Any]) -> int:
    """How many rows HF's generate expands each prompt into (beams, or returned sequences)."""
    return max(int(_gen_setting(model, gen_kwargs, "num_beams", 1)),
               int(_gen_setting(model, gen_kwargs, "num_return_sequences", 1)))


# HF generation settings under which its generate does more than greedy argmax with eos and pad (a logits processor,
# a search mode, a stopping rule: `GenerationMixin._get_logits_processor` and its stopping criteria), each with the
# values that add nothing; GraphDecoder implements none of them
NEUTRAL_SETTINGS: dict[str, tuple] = {
    "do_sample": (None, False), "num_beams": (None, 1), "num_beam_groups": (None, 1), "num_return_sequences": (None, 1),
    "penalty_alpha": (None,), "dola_layers": (None,), "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,), "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "force_words_ids": (None,), "sequence_bias": (None,), "guidance_scale": (None, 1.0), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False), "exponential_decay_length_penalty": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "renormalize_logits": (None, False), "watermarking_config": (None,),
    "max_time": (None,), "stop_strings": (None,), "token_healing": (None, False), "constraints": (None,),
    "use_mtp": (None, False), "is_assistant": (None, False), "use_cache": (None, True),
    "cache_implementation": (None, "static", "dynamic"),  # a quantized or offloaded cache would change the numbers
    # what generate returns: sequences only, as the decoder does
    "return_dict_in_generate": (None, False), "output_scores": (None, False), "output_logits": (None, False),
    "output_attentions": (None, False), "output_hidden_states": (None, False),
}
# sampling settings, which greedy decoding (do_sample off) never reads
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
# the arguments of a generate call that the decoder takes (besides NEUTRAL_SETTINGS at their neutral values)
GREEDY_ARGUMENTS = ("max_new_tokens", "do_sample", "eos_token_id", "pad_token_id")


def greedy_refusal(model: nn.Module, gen_kwargs: dict[str, Any]) -> str | None:
    """Why HF's `model.generate(**gen_kwargs)` may give other tokens than greedy argmax with eos and pad (the call's
    arguments over the model's generation config), or None when it gives exactly those: the calls a
    graph_decode.GraphDecoder may take over."""
    if extra := sorted(set(gen_kwargs) - set(GREEDY_ARGUMENTS) - set(NEUTRAL_SETTINGS) - set(SAMPLING_ONLY)):
        return f"arguments the graph decoder does not take: {', '.join(extra)}"
    if gen_kwargs.get("max_new_tokens") is None:
        return "no max_new_tokens"
    # HF applies an explicit None (no eos at all; padding with eos[0]) where the decoder would take the config's
    if given_none := [k for k in ("eos_token_id", "pad_token_id") if k in gen_kwargs and gen_kwargs[k] is None]:
        return f"{given_none[0]}=None given explicitly"
    for name, neutral in NEUTRAL_SETTINGS.items():
        value = _gen_setting(model, gen_kwargs, name, None)
        if not any(value is n or value == n for n in neutral):
            return f"{name}={value!r} (a logits processor, search mode or stopping rule the graph decoder lacks)"
    return None


def _hf_compiles_decode(model: nn.Module, gen_kwargs: dict[str, Any]) -> bool:
    """Whether HF's generate will torch.compile its decode step for these arguments: a static cache, on an
    accelerator or with a compile_config that compiles on every device, and compilation not disabled."""
    if gen_kwargs.get("cache_implementation") != "static" or gen_kwargs.get("disable_compile"):
        return False
    cc = gen_kwargs.get("compile_config") or model.generation_config.compile_config
    return model.device.type != "cpu" or bool(cc is not None and getattr(cc, "_compile_all_devices", False))


def _max_new_tokens(model: nn.Module, prompt_len: int, gen_kwargs: dict[str, Any]) -> int:
    """The new tokens HF's generate allows this call: max_new_tokens, else max_length - prompt, else its default of
    20 new tokens within the model's positions."""
    gc = model.generation_config
    new = gen_kwargs.get("max_new_tokens", gc.max_new_tokens)
    if new is not None:
        return int(new)
    max_length = gen_kwargs.get("max_length", gc.max_length)
    if max_length is None:
        max_length = prompt_len + 20
        if (positions := getattr(model.config, "max_position_embeddings", None)) is not None:
            max_length = min(max_length, positions)
    return int(max_length) - prompt_len


def _static_cache_len(model: nn.Module, prompt_len: int, gen_kwargs: dict[str, Any]) -> int:
    """Positions of the static cache a call needs, as HF's generate sizes its own: prompt + new tokens - 1 (the
    last new token is never fed back), at least `max_cache_len` when the generation config sets one; the cache
    itself is never shorter than the model's last one (graph_decode.StaticCaches). The same length as the base
    model's cache also means the same attention shapes: on an H200 (BENCHMARKS.md), with one position more than the
    base's (192 against 191), inductor's key/value kernel before cuDNN attention took 15.5 instead of 4.4 us per
    call, a quarter of MoA's decode-step GPU time at batch 32."""
    needed = prompt_len + _max_new_tokens(model, prompt_len, gen_kwargs) - 1
    ceiling = gen_kwargs.get("max_cache_len", getattr(model.generation_config, "max_cache_len", None))
    return max(needed, ceiling or 0)


class RoutedGeneration:
    """`MixtureModel.generate` and its prompt cache. Mixed into MixtureModel, whose `model` (the HF causal LM),
    `spec`, `_routing(...)` context, `route`, `_routing_pass`, `_final_expert` and `_preset_routes` it uses."""

    model: nn.Module
    spec: Any  # MixtureSpec

    def _init_generation(self) -> None:
        # the static caches of HF-generate calls (generate_greedy's are its decoder's, `GraphDecoder.caches`)
        self._caches = StaticCaches()
        self._compiled: Any = None  # the compiled decoder, see _run_decoder
        self._plain_head: bool | None = None  # see _head_is_plain; checked once
        # generate_greedy's graph_decode.GraphDecoder: made on its first call with the defaults (eager kernels
        # captured on CUDA); set your own first for others, e.g. GraphDecoder(mm.model, compile=True)
        self.graph_decoder: Any = None
        # True (default): a `generate` call that is plain greedy (`greedy_refusal`), with the adapters on,
        # on a device where the decoder captures its step (CUDA), runs as `generate_greedy`: the same tokens, each
        # decode step one graph replay instead of HF's loop (H200, batch 32, BENCHMARKS.md: 4.7x eager generate's
        # speed).
        # False: HF's generate always.
        self.graph_decoding: bool = True
        # True: generate's routing pass runs through torch.compile where HF compiles the decode step; False (default):
        # eagerly. On an H200 (Qwen2-0.5B shape, batch 32, BENCHMARKS.md) compiling it cost 94 s of first-call
        # compile against the base's 23 s (eager: 48 s) to save ~14 ms per call (prompt pass 38 against 52 ms): worth
        # it only past a few thousand calls per process, e.g. a long-lived server.
        self.compile_routing_pass: bool = False
        # True: in `generate_greedy` (and the `generate` calls it takes over), a batch whose rows all use one expert
        # (batch 1 always) decodes with that expert's LoRA folded into a copy of the base weights
        # (lora_kernels.LoraFusion.fold, PEFT's merged adapter): the base model's GEMMs, q/k/v and gate/up one GEMM
        # each, no LoRA kernel; a mixed batch decodes routed, as before. The fold is redone only when the expert or a
        # weight changed, and the two decode steps are two graphs (GraphDecoder's `decode_graphs`). It needs the fused
        # path (CUDA with Triton, or `lora_fusion.enabled = True`) and MoA-style experts (no shared A, no universal
        # expert); otherwise calls decode routed. False (default): it costs one more copy of the wrapped
        # projections' weights (0.7 GB at Qwen2-0.5B's shape in bf16, about half a 7B model's weights), kept until
        # `configure_decoding(fold_single_expert=False)` or `lora_fusion.unfold()`.
        self.fold_single_expert: bool = False

    def configure_decoding(self, graph_decoding: bool = True, compile: bool = False, prompt_shapes: int = 0,
                           fold_single_expert: bool = False) -> None:
        """The decoding settings of params.yaml's `serve` section (config.ServeConfig, whose fields these are): whether
        greedy calls go to the graph decoder (`graph_decoding`), its step compiled and its prompt shapes kept
        (GraphDecoder's `compile` and `prompt_shapes`), and `fold_single_expert`. A new decoder: captures go."""
        self.graph_decoding = graph_decoding
        self.graph_decoder = GraphDecoder(self.model, compile=compile, prompt_shapes=prompt_shapes)
        self.fold_single_expert = fold_single_expert
        if not fold_single_expert:
            self.lora_fusion.unfold()  # their memory back

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, expert: Tensor | None = None,
                 adapters_off: bool = False, reuse_routing_cache: bool = True, experts_off: bool = False,
                 **gen_kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """Left-padded prompts [B, T] -> (sequences [B, T + new], expert used per row or None).

        Sequence routing decides once from the prompt and keeps the expert for every generated token.
        The routing pass is a full forward over the prompt, so with `reuse_routing_cache` its KV cache
        becomes generate's prompt cache (see `_prompt_cache_from_routing`) instead of a second prefill, and
        its last position's logits are generate's first step (see `_given_prefill`).
        `experts_off`: the routed experts off, the universal expert of MoDULA-Res on (its fallback).
        A plain greedy call on CUDA runs as `generate_greedy` instead (see `graph_decoding`)."""
        usual = reuse_routing_cache and not (adapters_off or experts_off)
        if self._decodes_in_graph(input_ids.device, gen_kwargs, usual):
            try:
                return self.generate_greedy(input_ids, attention_mask, gen_kwargs["max_new_tokens"],
                                            eos_token_id=gen_kwargs.get("eos_token_id"),
                                            pad_token_id=gen_kwargs.get("pad_token_id"), expert=expert)
            except CaptureError as exc:  # the call itself can still run: HF's generate below, from now on
                warnings.warn(f"{exc}. This model decodes with HF's generate from now on (graph_decoding = False); "
                              "params.yaml's serve.graph_decoding: false skips the attempt", stacklevel=3)
                self.graph_decoding = False
                self.graph_decoder.clear()
        self._check_expert(expert, input_ids.shape[0])  # (generate_greedy checks it on its own path)
        first = None  # the first step's output, when the routing pass provides it (see _given_prefill)
        if self.spec.routing == Routing.SEQUENCE and expert is None and not (adapters_off or experts_off):
            if reuse_routing_cache and _cache_reusable(self.model, input_ids, gen_kwargs):
                expert, cache, first = self._prompt_cache_from_routing(input_ids, attention_mask, gen_kwargs)
                # the cache is given: HF would warn that these settings of its own cache go unused
                gen_kwargs = {k: v for k, v in gen_kwargs.items() if k not in ("cache_implementation", "max_cache_len")}
                gen_kwargs["past_key_values"] = cache
            else:
                expert, _ = self.route(input_ids, attention_mask)
        forced = expert
        if expert is not None and (k := _rows_per_prompt(self.model, gen_kwargs)) > 1:
            forced = expert.repeat_interleave(k)  # generate repeats each prompt k times in place (beams)
        with self._routing(adapters_off=adapters_off, experts_off=experts_off, forced=forced):
            if first is not None:
                # the decode step then finds every layer's route as an eager first step would have left it (else
                # its compiled graph is traced once without and once with a route set)
                self._preset_routes()
            with contextlib.nullcontext() if first is None else _given_prefill(self.model, first):
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
        return out, expert

    @torch.no_grad()
    def generate_greedy(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                        eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                        expert: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Greedy generation with every decode step replayed from one CUDA graph (moa_core.graph_decode; eagerly
        on the CPU): left-padded prompts [B, T] -> (sequences [B, T + new], expert used per row or None), the
        tokens `generate(..., do_sample=False)` returns when no logits processor is configured (eos and pad default
        to the generation config's, as there).

        Sequence routing: the routing pass routes the prompts and fills the static cache (`expert` given: a
        prefill with those experts instead); the experts are copied into a buffer the captured step reads, so
        any mix of experts replays the same graph. Token routing: the routers run inside the step (with `expert`
        given, that expert in every layer instead, as `generate(expert=...)`)."""
        self._check_expert(expert, input_ids.shape[0])
        if self.graph_decoder is None:
            self.graph_decoder = GraphDecoder(self.model)
        self.graph_decoder.captures(input_ids.device)  # a setting that cannot capture fails before the routing pass
        T = input_ids.shape[1]
        gen_kwargs = {"cache_implementation": "static", "max_new_tokens": max_new_tokens}
        sequence = self.spec.routing == Routing.SEQUENCE
        fused = self.lora_fusion.ready()  # refreshes the stacked expert weights first: their addresses are keyed
        stacked = [t for g in self.lora_fusion.groups for t in (g.A, g.B, g.Bt, g.W, g.Wa, g.bias) if t is not None]
        key = (self.training, fused, lora_kernels.DECODE_LAYOUT, tuple(sorted(lora_kernels.MERGED_CONFIG.items())),
               lora_kernels.AUGMENT_MAX_EXTRA,
               weight_addresses(self, stacked))
        first = None
        if sequence and expert is None and self.graph_decoder.prompt_shapes and self._head_is_plain():
            # + what the routing pass decides on the host while it is captured (the layout, how it pools and picks)
            prompt_key = key + (lora_kernels.PROMPT_LAYOUT, self.spec.inference, self.spec.pooling)
            expert, cache, first = self._routed_prompt(input_ids, attention_mask, gen_kwargs, prompt_key)
        elif sequence and expert is None:
            expert, cache, first = self._prompt_cache_from_routing(input_ids, attention_mask, gen_kwargs, given=True,
                                                                   caches=self.graph_decoder.caches)
            if first is not None:
                first = first.logits[:, -1]
        else:
            cache = self._static_cache((input_ids.shape[0], self.model.dtype, input_ids.device),
                                       _static_cache_len(self.model, T, gen_kwargs), self.graph_decoder.caches)
        if first is None:  # the whole prompt, or (a head that is not plain) its last token after the routing pass
            start = T - 1 if cache.get_seq_length() else 0
            with self._routing(forced=expert):
                first = prefill(self.model, input_ids, attention_mask, cache, start)
        statics = {} if expert is None else {"expert": expert}
        context = self._decode_routing
        if fused and sequence and self._folds(expert):
            folded = self.lora_fusion.fold(int(expert[0]))
            key += ("folded", tensor_addresses(folded))  # the step reads them at those addresses
            statics, context = {}, self._folded_routing
        new = self.graph_decoder.decode(cache, attention_mask, first, max_new_tokens, eos_token_id, pad_token_id,
                                        key=key, statics=statics, context=context)
        return torch.cat([input_ids, new], dim=1), expert

    def _check_expert(self, expert: Tensor | None, rows: int) -> None:
        """A caller's `expert` ([B] integer indices) checked before any work: the kernels index the stacked experts
        with it unchecked (an index out of range would read, or in the augmented layout write, out of bounds)."""
        if expert is None:
            return
        n = min(self.spec.experts_per_layer)
        if expert.dim() != 1 or expert.shape[0] != rows or expert.dtype.is_floating_point or expert.dtype == torch.bool:
            raise ValueError(f"expert must be an integer tensor with one index per prompt row ({rows}), got "
                             f"{expert.dtype} of shape {tuple(expert.shape)}")
        lo, hi = torch.stack(torch.aminmax(expert)).tolist() if expert.numel() else (0, 0)  # one host sync
        if not (0 <= lo and hi < n):
            raise ValueError(f"expert indices must lie in [0, {n}) (the mixture's experts: {self.spec.experts}), got "
                             f"{sorted(set(expert.tolist()))}")

    def _folds(self, expert: Tensor | None) -> bool:
        """Whether generate_greedy's decode steps use the folded expert (see `fold_single_expert`): asked for, every
        row's expert the same (one host sync), and every wrapped projection foldable."""
        return (self.fold_single_expert and not self.training and expert is not None and expert.numel() > 0
                and self.lora_fusion.foldable(len(self.wrapped)) and bool((expert == expert[0]).all()))

    @contextlib.contextmanager
    def _folded_routing(self, _statics: dict[str, Tensor]) -> Iterator[None]:
        """The routing of decode steps with the expert folded into the weights: none (every layer's route empty)."""
        with self._routing(folded=True):
            self._preset_routes()
            yield

    def _routed_prompt(self, input_ids: Tensor, attention_mask: Tensor, gen_kwargs: dict[str, Any],
                       key: tuple) -> tuple[Tensor, Any, Tensor]:
        """generate_greedy's routing pass with its decoder's `prompt_shapes`: prompts [B, T] routed and written
        straight into the static cache in one pass, captured per prompt shape (GraphDecoder.prompt) -> (expert [B],
        cache, first step's logits [B, V]). The rows whose layers did not all choose their final expert are then run
        again eagerly with it and their cache rows replaced (`_rerun_stale`), as in `_prompt_cache_from_routing`."""
        T = input_ids.shape[1]
        cache = self._static_cache((input_ids.shape[0], self.model.dtype, input_ids.device),
                                   _static_cache_len(self.model, T, gen_kwargs), self.graph_decoder.caches)
        compiled = self.compile_routing_pass and _hf_compiles_decode(self.model, gen_kwargs)
        inputs = prompt_inputs(input_ids, attention_mask, cache, self.model.dtype)
        out = self.graph_decoder.prompt(lambda b: self._routing_pass_into(b, cache, compiled), inputs, cache, key)
        expert = out["expert"].clone()  # the graph's own tensor, which the next call overwrites, goes to the caller
        last = self._rerun_stale(input_ids, attention_mask, out["logits"], expert, cache, out["last"], compiled)
        return expert, cache, self.model.get_output_embeddings()(last)[:, -1]

    def _rerun_stale(self, input_ids: Tensor, attention_mask: Tensor, logits: Tensor, expert: Tensor, cache: Any,
                     last: Tensor, compiled: bool) -> Tensor:
        """After a routing pass over prompts [B, T] (per-layer logits [L, B, E], final expert [B]): the rows whose
        layers did not all choose their final expert are run again with it, and their rows of `cache`'s first T
        positions replaced -> the last hidden states [B, 1, H], those rows' replaced (`last` itself when none)."""
        stale = (logits.argmax(-1) != expert).any(0).nonzero().squeeze(1)  # [n] rows that met another expert
        if not stale.numel():
            return last
        T = input_ids.shape[1]
        with self._routing(forced=expert[stale]):
            redo = self._run_decoder(input_ids[stale], attention_mask[stale], True, compiled)
        for mine, theirs in zip(cache.layers, redo.past_key_values.layers):
            mine.keys[stale, :, :T] = theirs.keys
            mine.values[stale, :, :T] = theirs.values
        last = last.clone()
        last[stale] = redo.last_hidden_state[:, -1:]
        return last

    def _routing_pass_into(self, inputs: dict[str, Tensor], cache: Any, compiled: bool) -> dict[str, Tensor]:
        """The routing pass over graph_decode.prompt_inputs into the empty static `cache`, reading nothing on the host
        (capturable) -> {"logits": per-layer router logits [L, B, E], "expert": [B], "last": last hidden state
        [B, 1, H]}."""
        with self._routing(pool_mask=inputs["mask"]) as ctx:
            out = self._decoder(compiled)(input_ids=inputs["ids"], attention_mask=inputs["attention"],
                                          position_ids=inputs["positions"], cache_position=inputs["cache_position"],
                                          past_key_values=cache, use_cache=True)
            logits = torch.stack(ctx.router_logits)
        return {"logits": logits, "expert": self._final_expert(logits), "last": out.last_hidden_state[:, -1:]}

    def _decodes_in_graph(self, device: torch.device, gen_kwargs: dict[str, Any], usual: bool) -> bool:
        """Whether a `generate` call goes to `generate_greedy` (see `graph_decoding`); `usual`: the call routes as
        generate_greedy does (adapters and experts on, the routing pass's cache reused)."""
        if not (self.graph_decoding and usual) or greedy_refusal(self.model, gen_kwargs) is not None:
            return False
        decoder = self.graph_decoder or GraphDecoder(self.model)
        if not decoder.will_capture(device):  # the eager step is no faster than HF's loop
            return False
        self.graph_decoder = decoder
        return True

    @contextlib.contextmanager
    def _decode_routing(self, statics: dict[str, Tensor]) -> Iterator[None]:
        """The routing of `generate_greedy`'s decode steps: each row's expert from the decoder's buffer (sequence
        routing: every layer's route set once, before the steps), or the routers inside the step (token routing
        with no expert given)."""
        with self._routing(forced=statics.get("expert")):
            if "expert" in statics and self.spec.routing == Routing.SEQUENCE:
                self._preset_routes()
            yield

    def _prompt_cache_from_routing(self, input_ids: Tensor, attention_mask: Tensor, gen_kwargs: dict[str, Any],
                                   given: bool | None = None,
                                   caches: StaticCaches | None = None) -> tuple[Tensor, Any, Any]:
        """Route the prompts and keep the routing pass's KV cache as generate's prompt cache -> (expert [B], cache,
        first step's output or None).

        A row whose layers all chose its final expert ran the prompt through exactly the weights generation
        uses, so its keys and values are already right (a trained MoA router agrees with itself across
        layers almost always). The other rows are run again with their final expert and their cache rows
        (and last hidden states) replaced. Where generate lets us (`_first_logits_given`), the cache keeps all
        T positions and the first token's logits come from the last position's hidden state through the LM
        head: generate's first step is then no forward at all (`_given_prefill`; `given` overrides whether generate
        lets us: the graph decoder needs none of generate's internals, only a plain head). Otherwise the cache is cut
        to T - 1 positions and generate runs the last prompt token itself. With
        `cache_implementation="static"` the cache is copied into a reused `StaticCache` (from `caches`, default this
        model's own), so the compiled
        decode step keeps its static addresses; and where HF compiles that decode step (a static cache on
        an accelerator, or a compile_config that asks for it), the routing pass is compiled too: it stands
        in for the prefill, and eagerly its per-projection LoRA kernels and per-layer router hooks are
        launch-bound."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        T = input_ids.shape[1]
        if given is None:
            given = _first_logits_given(self.model, gen_kwargs)
        given = given and self._head_is_plain()
        compiled = self.compile_routing_pass and _hf_compiles_decode(self.model, gen_kwargs)
        expert, logits, out = self._routing_pass(input_ids, attention_mask, keep_cache=True, compiled=compiled)
        cache, last = out.past_key_values, out.last_hidden_state[:, -1:]  # last: [B, 1, H]
        last = self._rerun_stale(input_ids, attention_mask, logits, expert, cache, last, compiled)
        if not given:
            cache.crop(-1)  # drop the last position (a negative count removes positions; a positive one is deprecated)
        if gen_kwargs.get("cache_implementation") == "static":
            keys = cache.layers[0].keys
            static = self._static_cache((input_ids.shape[0], keys.dtype, keys.device),
                                        _static_cache_len(self.model, T, gen_kwargs), caches)
            for i, layer in enumerate(cache.layers):
                static.update(layer.keys, layer.values, i)
            cache = static
        first = None
        if given:
            first = CausalLMOutputWithPast(logits=self.model.get_output_embeddings()(last), past_key_values=cache)
        return expert, cache, first

    @torch.no_grad()
    def _head_is_plain(self) -> bool:
        """Whether the causal LM's logits are its output embedding applied to the decoder's last hidden state and
        nothing more, so that the routing pass can supply the first step's logits: not where the model's forward
        also soft-caps or scales them (Gemma-2's final soft-capping, Cohere's logit_scale, Granite's
        logits_scaling). Checked once per model, on two tokens with the adapters off (in train mode, where dropout
        could tell the two apart, the answer is not kept)."""
        if self._plain_head is not None:
            return self._plain_head
        ids = torch.tensor([[1, 2]], device=self.model.device)  # ids valid in any vocabulary
        with self._routing(adapters_off=True):
            full = self.model(input_ids=ids, use_cache=False).logits
            hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        mine = self.model.get_output_embeddings()(hidden)
        plain = full.shape == mine.shape and torch.allclose(full.float(), mine.float(), rtol=1e-4, atol=1e-4)
        if not self.model.training:
            self._plain_head = plain
        return plain

    def _run_decoder(self, input_ids: Tensor, attention_mask: Tensor, use_cache: bool, compiled: bool) -> Any:
        """The decoder stack (no LM head) over prompts [B, T] under the current routing, positions counted as
        `generate` counts them. `compiled`: through `torch.compile`, built once, in inductor's default mode (no
        CUDA graphs, since prompt shapes vary between calls); the router hooks trace into the graph."""
        return self._decoder(compiled)(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=prompt_positions(attention_mask), use_cache=use_cache)

    def _decoder(self, compiled: bool) -> nn.Module:
        """The decoder stack, or (compiled) it through `torch.compile`, built once."""
        if compiled and self._compiled is None:
            self._compiled = torch.compile(self.model.base_model)
        return self._compiled if compiled else self.model.base_model

    def _static_cache(self, kind: tuple, max_len: int, caches: StaticCaches | None = None) -> Any:
        """The StaticCache for a call of `kind` = (batch, dtype, device) needing `max_len` positions
        (`_static_cache_len`), from `caches` (default: this model's own, for HF-generate calls): see
        graph_decode.StaticCaches."""
        return (caches or self._caches).get(self.model, kind, max_len)
