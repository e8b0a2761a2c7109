"""The batched engine: continuous batching over a paged KV pool, shared prefixes, kept stream
KV, caption-as-draft decoding and unmerged multi-LoRA.

One thread runs ``step()`` in a loop: take new requests and cancellations -> admit waiting
requests whose KV fits the pool -> schedule one batch (every decoding sequence's next token,
then prefill chunks round-robin within ``max_batch_tokens``) -> one forward pass
(:class:`~lm_service.engines.paged.PagedDecoder`) -> sample, verify drafts, finish sequences.

What is reused, and why the result cannot change (greedy decoding is exact; the tests compare
token ids with the reference engine):

- **Prompt prefix.** The tokens before the audio (``<|im_start|>user\\n<|audio_bos|>``, after an
  optional system turn) are computed once per (adapter, prefix) and copied into every sequence.
- **A stream's audio.** After a live request's prefill passes its audio, the KV of [prefix +
  audio] is kept for its stream. The stream's next request with the same ``audio_start`` reuses it
  up to the first audio token that differs (compared exactly), so a window that grows (an interim
  anchored at its segment's start) or whose tokens did not change prefills only what is new.
  Several prompts over one window (a caption and questions) share it the same way.
- **Caption as draft.** A stream's previous caption (same prompt and adapter) is appended to the
  prompt as a draft; one forward pass gives the greedy token after every draft position, and the
  longest agreeing prefix is kept, plus the next token. An unchanged scene costs about one pass.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lm_service.engines.base import (
    CaptionRequest,
    CaptionResult,
    EngineStats,
    FinishReason,
    validate_request,
)
from lm_service.engines.kv import KVPool, free_memory_bytes
from lm_service.engines.limits import CPU_KV_DEFAULT_MB, EngineLimits
from lm_service.engines.lora import AdapterStore, LoraAdapter
from lm_service.engines.paged import PagedDecoder, StepInputs
from services import metrics
from services.errors import InvalidArgument, ResourceExhausted
from services.model.adapters import AdapterResolver
from services.model.generation import sample_next
from services.model.loading import LoadedModel
from services.model.modeling import MiDashengLM
from services.model.processor import (
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_SPAN,
    AUDIO_TOKEN,
    MiDashengProcessor,
    build_prompt,
)

log = logging.getLogger(__name__)


@dataclass
class _Prompt:
    """A (prompt, system) pair, tokenized around the audio span (ids are the same as tokenizing the
    whole expanded text: special tokens are never merged with their neighbours)."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]


@dataclass
class _Kept:
    """KV kept between requests: a prompt prefix, or a stream's [prefix + audio]."""

    blocks: list[int]
    tokens: int
    audio_start: int = 0
    audio: torch.Tensor | None = None  # the audio tokens the KV was computed from
    prefix_ids: tuple[int, ...] = ()


@dataclass(eq=False)  # identity: sequences are compared by who they are
class _Seq:
    req: CaptionRequest
    future: Future[CaptionResult]
    submitted: float
    prompt: _Prompt | None = None
    adapter: LoraAdapter | None = None
    embeds: torch.Tensor | None = None  # (P, H) prompt embeddings
    prefix_len: int = 0
    audio_end: int = 0  # prefix + audio tokens
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose KV is written and valid
    reused: int = 0
    draft: list[int] = field(default_factory=list)
    accepted: int = 0
    generated: list[int] = field(default_factory=list)
    stopped: bool = False
    kept: bool = False  # its [prefix + audio] KV has been kept for its stream
    generator: torch.Generator | None = None

    @property
    def prompt_len(self) -> int:
        assert self.embeds is not None
        return int(self.embeds.shape[0])

    @property
    def stream_key(self) -> tuple[str, str, str] | None:
        r = self.req
        return (r.stream, r.adapter, r.system_prompt) if r.stream else None

    @property
    def draft_key(self) -> tuple[str, str, str, str] | None:
        r = self.req
        return (r.stream, r.adapter, r.system_prompt, r.prompt) if r.stream else None


@dataclass
class _Planned:
    seq: _Seq
    n_prompt: int  # prompt tokens fed this step
    draft: list[int]  # draft tokens fed after the prompt's last token
    decode: bool  # one decode token (the last generated)


class BatchedEngine:
    name = "batched"

    def __init__(
        self,
        loaded: LoadedModel,
        limits: EngineLimits | None = None,
        adapters: AdapterResolver | None = None,
        run_thread: bool = True,
    ) -> None:
        """``run_thread=False`` leaves stepping to the caller (tests drive ``step()`` themselves)."""
        if loaded.processor is None:
            raise ValueError("the caption engine needs the decoder and tokenizer (not an audio-only load)")
        self.model: MiDashengLM = loaded.model
        self.processor: MiDashengProcessor = loaded.processor
        self.limits = limits or EngineLimits()
        self.decoder = PagedDecoder(self.model.decoder)
        self.device, self.dtype = self.decoder.device, self.decoder.dtype
        geometry = self.decoder.geometry()
        if self.limits.kv_cache_mb:
            budget = self.limits.kv_cache_mb * 2**20
        elif self.device.type == "cuda":
            budget = int(free_memory_bytes(self.device) * self.limits.kv_memory_fraction)
        else:
            budget = CPU_KV_DEFAULT_MB * 2**20  # a fraction of host RAM would be far too much
        self.pool = KVPool.from_budget(geometry, budget, self.limits.block_size, self.device)
        log.info(
            "batched engine: KV pool of %d blocks x %d tokens (%.0f MiB, %d bytes per token) on %s",
            self.pool.num_blocks,
            self.pool.block_size,
            budget / 2**20,
            geometry.bytes_per_token,
            self.device,
        )
        self.adapters = AdapterStore(adapters, self.device, self.dtype, self.limits.adapter_cache_mb * 2**20)
        self.stop_ids = set(self.processor.stop_ids())
        self._inbox: deque[_Seq] = deque()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._prompts: OrderedDict[tuple[str, str], _Prompt] = OrderedDict()
        self._prefixes: OrderedDict[tuple[str, tuple[int, ...]], _Kept] = OrderedDict()
        self._streams: OrderedDict[tuple[str, str, str], _Kept] = OrderedDict()
        self._drafts: OrderedDict[tuple[str, str, str, str], list[int]] = OrderedDict()
        self._ended: deque[str] = deque()
        self._encoders: OrderedDict[str, nn.ModuleDict] = OrderedDict()
        self._cv = threading.Condition()
        self._stats = EngineStats()
        self._rotate = 0
        self._stop = threading.Event()
        self._encode_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="batched-engine", daemon=True)
        if run_thread:
            self._thread.start()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    # --- interface ------------------------------------------------------------------------------

    def submit(self, requests: Sequence[CaptionRequest]) -> list[Future[CaptionResult]]:
        for r in requests:
            validate_request(r, self.hidden_size)
        if self._stop.is_set():
            raise ResourceExhausted("the caption engine is shutting down")
        now = time.monotonic()
        seqs = [_Seq(r, Future(), now) for r in requests]
        with self._cv:
            backlog = len(self._inbox) + len(self._waiting)
            if backlog + len(seqs) > self.limits.max_waiting:
                raise ResourceExhausted(
                    f"the caption engine has {backlog} requests waiting for memory; retry in a few seconds"
                )
            self._inbox.extend(seqs)
            self._cv.notify()
        return [s.future for s in seqs]

    def encode_audio(self, clips: Sequence[torch.Tensor], adapter: str = "") -> list[torch.Tensor]:
        enc = self._encoder_for(adapter)
        order = sorted(range(len(clips)), key=lambda i: clips[i].numel())
        out: list[torch.Tensor | None] = [None] * len(clips)
        with self._encode_lock, torch.inference_mode():
            for start in range(0, len(order), 16):
                part = order[start : start + 16]
                lengths = torch.tensor([clips[i].numel() for i in part])
                audio = torch.zeros(len(part), int(lengths.max()))
                for row, i in enumerate(part):
                    audio[row, : clips[i].numel()] = clips[i]
                encoder: Any = enc["audio_encoder"]
                feats, mask = encoder.forward_audio(audio.to(self.device), lengths.to(self.device))
                tokens, _ = enc["audio_projector"](feats, mask)
                for row, i in enumerate(part):
                    out[i] = tokens[row, : self.model.token_count(clips[i].numel())].clone()
        return [t for t in out if t is not None]

    def check_adapter(self, adapter: str) -> None:
        if adapter:
            self.adapters.get(adapter)

    def end_stream(self, stream: str) -> None:
        with self._cv:
            self._ended.append(stream)
            self._cv.notify()

    def stats(self) -> EngineStats:
        with self._cv:
            s = EngineStats(**vars(self._stats))
            s.running, s.waiting = len(self._running), len(self._waiting) + len(self._inbox)
        s.kv_used_tokens = self.pool.used_blocks * self.pool.block_size
        s.kv_capacity_tokens = self.pool.capacity_tokens
        s.adapters_loaded = self.adapters.names()
        return s

    def close(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self._cv:
            for s in [*self._inbox, *self._waiting, *self._running]:
                if not s.future.done():
                    s.future.set_exception(ResourceExhausted("the caption engine shut down"))
            self._inbox.clear()

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                if not self._inbox and not self._waiting and not self._running and not self._ended:
                    self._cv.wait(timeout=0.1)
            try:
                self.step()
            except Exception as e:  # fail what was in flight, keep serving
                log.exception("engine step failed")
                for s in list(self._running):
                    self._fail(s, e)

    def step(self) -> int:
        """One scheduling round; returns how many sequences ran."""
        self._take_new()
        self._release_ended_streams()
        self._drop_cancelled()
        self._admit()
        plan = self._schedule()
        if not plan:
            return 0
        t0 = time.perf_counter()
        inputs, rows = self._inputs(plan)
        logits = self.decoder.forward(self.pool, inputs)
        self._advance(plan, rows, logits)
        metrics.ENGINE_STEP_SECONDS.observe(time.perf_counter() - t0)
        self._report()
        return len(plan)

    # --- intake ---------------------------------------------------------------------------------

    def _take_new(self) -> None:
        with self._cv:
            new, self._inbox = list(self._inbox), deque()
        for s in new:
            try:
                self._prepare(s)
            except Exception as e:  # this request only (an unknown adapter, a prompt the tokenizer refuses)
                self._fail(s, e)
                continue
            self._waiting.append(s)

    def _prepare(self, s: _Seq) -> None:
        r = s.req
        s.adapter = self.adapters.get(r.adapter) if r.adapter else None
        s.prompt = self._prompt(r.prompt, r.system_prompt)
        audio = r.audio_tokens.to(self.device, self.dtype)
        prefix = torch.tensor(s.prompt.prefix_ids, dtype=torch.long, device=self.device)
        suffix = torch.tensor(s.prompt.suffix_ids, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            s.embeds = torch.cat([self.decoder.embed(prefix), audio, self.decoder.embed(suffix)])
        s.prefix_len = len(s.prompt.prefix_ids)
        s.audio_end = s.prefix_len + int(audio.shape[0])
        if r.options.temperature == 0 and self.limits.drafts:
            draft = r.draft if r.draft is not None else self._drafts.get(s.draft_key) if s.draft_key else None
            s.draft = list(draft or ())[: r.options.max_new_tokens]
        if r.options.temperature > 0 and r.options.seed is not None:
            s.generator = torch.Generator(device=self.device).manual_seed(r.options.seed)

    def _prompt(self, prompt: str, system: str) -> _Prompt:
        key = (prompt, system)
        p = self._prompts.get(key)
        if p is None:
            if any(t in prompt or t in system for t in (AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS)):
                raise InvalidArgument("the prompt may not hold audio placeholder tokens of its own")
            before, _, after = build_prompt(prompt, system or None).partition(AUDIO_SPAN)
            tok = self.processor.tokenizer
            p = _Prompt(
                tuple(tok(before + AUDIO_BOS, add_special_tokens=False)["input_ids"]),
                tuple(tok(AUDIO_EOS + after, add_special_tokens=False)["input_ids"]),
            )
            self._prompts[key] = p
            while len(self._prompts) > 1024:
                self._prompts.popitem(last=False)
        self._prompts.move_to_end(key)
        return p

    def _release_ended_streams(self) -> None:
        with self._cv:
            ended, self._ended = set(self._ended), deque()
        if not ended:
            return
        for key in [k for k in self._streams if k[0] in ended]:
            self.pool.release(self._streams.pop(key).blocks)
        for dkey in [k for k in self._drafts if k[0] in ended]:
            del self._drafts[dkey]
        if not self._streams and not self._running and not self._waiting:  # idle: hold nothing
            while self._prefixes:
                self.pool.release(self._prefixes.popitem()[1].blocks)

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._waiting if s.future.cancelled()]:
            self._waiting.remove(s)
            s.future.set_running_or_notify_cancel()  # tells waiters it is done (returns False)
        for s in [s for s in self._running if s.future.cancelled()]:
            self._finish(s, cancelled=True)

    # --- admission ------------------------------------------------------------------------------

    def _admit(self) -> None:
        now = time.monotonic()
        deferred: list[_Seq] = []
        while self._waiting and len(self._running) < self.limits.max_running:
            s = self._waiting[0]
            if self._shares_pending_audio(s):  # wait one step and reuse the other request's audio KV
                deferred.append(self._waiting.popleft())
                continue
            need = self.pool.blocks_for(s.prompt_len + s.req.options.max_new_tokens)
            if need > self.pool.num_blocks:
                self._waiting.popleft()
                self._fail(
                    s,
                    ResourceExhausted(
                        f"the request needs {need} KV blocks; the pool has {self.pool.num_blocks}"
                    ),
                )
                continue
            if not self._fork(s):
                if now - s.submitted > self.limits.max_wait_seconds:
                    self._waiting.popleft()
                    self._fail(
                        s,
                        ResourceExhausted(
                            f"no KV memory freed up within {self.limits.max_wait_seconds:.0f} s; retry in a few seconds"
                        ),
                    )
                    continue
                break  # first come, first served: the head waits for memory
            self._waiting.popleft()
            self._running.append(s)
        self._waiting.extendleft(reversed(deferred))

    def _shares_pending_audio(self, s: _Seq) -> bool:
        key = s.stream_key
        return key is not None and any(
            o.stream_key == key and not o.kept and o.req.audio_start == s.req.audio_start
            for o in self._running
        )

    def _reusable(self, s: _Seq) -> tuple[_Kept | None, int]:
        """KV that ``s`` can start from, and how many of its tokens it covers."""
        if not self.limits.prefix_cache or s.prompt is None:
            return None, 0
        key = s.stream_key
        st = self._streams.get(key) if key is not None else None
        if st is not None and st.audio_start == s.req.audio_start and st.prefix_ids == s.prompt.prefix_ids:
            assert st.audio is not None and s.embeds is not None
            new_audio = s.embeds[s.prefix_len : s.audio_end]
            n = min(int(st.audio.shape[0]), int(new_audio.shape[0]))
            same = (st.audio[:n] == new_audio[:n]).all(dim=1)
            m = n if bool(same.all()) else int(same.to(torch.int8).argmin())
            self._streams.move_to_end(key)  # type: ignore[arg-type]
            return st, s.prefix_len + m
        pre = self._prefixes.get((s.req.adapter, s.prompt.prefix_ids))
        if pre is not None:
            self._prefixes.move_to_end((s.req.adapter, s.prompt.prefix_ids))
            return pre, pre.tokens
        return None, 0

    def _fork(self, s: _Seq) -> bool:
        """Give ``s`` its blocks (sharing what it can reuse); False when the pool cannot fit it yet."""
        src, reuse = self._reusable(s)
        bs = self.pool.block_size
        full, partial = divmod(reuse, bs)
        # Room for the prompt and every generated token; a draft (at most max_new_tokens) fits in it.
        total = self.pool.blocks_for(s.prompt_len + s.req.options.max_new_tokens)
        fresh = total - full
        if not self._make_room(fresh):
            return False
        blocks = []
        if src is not None and full:
            blocks = src.blocks[:full]
            self.pool.share(blocks)
        new = self.pool.alloc(fresh)
        if src is not None and partial:
            self.pool.copy_block(src.blocks[full], new[0], partial)
        s.blocks = blocks + new
        s.cached = s.reused = reuse
        return True

    def _make_room(self, blocks: int) -> bool:
        """Evict kept prefixes and stream KV (least recently used first) until ``blocks`` are free."""
        for kept in (self._prefixes, self._streams):
            while self.pool.free_blocks < blocks and kept:
                _key, old = kept.popitem(last=False)
                self.pool.release(old.blocks)
        return self.pool.free_blocks >= blocks

    # --- one batch ------------------------------------------------------------------------------

    def _schedule(self) -> list[_Planned]:
        budget = self.limits.max_batch_tokens
        plan: list[_Planned] = []
        prefilling = []
        for s in self._running:
            if s.cached >= s.prompt_len:
                plan.append(_Planned(s, 0, [], True))
                budget -= 1
            else:
                prefilling.append(s)
        if prefilling:
            k = self._rotate % len(prefilling)
            self._rotate += 1
            for s in prefilling[k:] + prefilling[:k]:  # fair: a different sequence goes first each step
                if budget <= 0:
                    break
                n = min(s.prompt_len - s.cached, budget)
                budget -= n
                draft: list[int] = []
                if s.cached + n == s.prompt_len and s.draft:
                    draft = s.draft[: max(0, budget)]
                    budget -= len(draft)
                plan.append(_Planned(s, n, draft, False))
        return plan

    def _inputs(self, plan: list[_Planned]) -> tuple[StepInputs, list[list[int]]]:
        """Pack the batch; also returns each planned sequence's logit rows (in ``logit_rows`` order)."""
        embeds: list[torch.Tensor] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[tuple[int, int, int]] = []  # (first packed row, new tokens, context length)
        logit_rows: list[int] = []
        rows_of: list[list[int]] = []
        lora: dict[int, tuple[LoraAdapter, list[int]]] = {}
        decode_ids: list[int] = []
        decode_at: list[int] = []
        row = 0
        for p in plan:
            s = p.seq
            start = s.cached
            if p.decode:
                n = 1
                decode_at.append(len(embeds))
                embeds.append(torch.empty(0))  # filled below, in one embedding call
                decode_ids.append(s.generated[-1])
            else:
                assert s.embeds is not None
                n = p.n_prompt + len(p.draft)
                part = [s.embeds[start : start + p.n_prompt]]
                if p.draft:
                    part.append(self.decoder.embed(torch.tensor(p.draft, device=self.device)))
                embeds.append(torch.cat(part) if len(part) > 1 else part[0])
            positions.extend(range(start, start + n))
            slots.extend(self.pool.slots(s.blocks, start, start + n))
            spans.append((row, n, start + n))
            wants = (
                [row]
                if p.decode
                else (
                    [row + p.n_prompt - 1 + i for i in range(len(p.draft) + 1)]
                    if start + p.n_prompt == s.prompt_len
                    else []
                )
            )
            rows_of.append(list(range(len(logit_rows), len(logit_rows) + len(wants))))
            logit_rows.extend(wants)
            if s.adapter is not None:
                lora.setdefault(id(s.adapter), (s.adapter, []))[1].extend(range(row, row + n))
            row += n
        if decode_ids:
            with torch.inference_mode():
                dec = self.decoder.embed(torch.tensor(decode_ids, device=self.device))
            for i, at in enumerate(decode_at):
                embeds[at] = dec[i : i + 1]
        b, q_len, k_len = len(plan), max(n for _, n, _ in spans), max(c for _, _, c in spans)
        q_index = torch.zeros(b, q_len, dtype=torch.long)
        q_valid = torch.zeros(b, q_len, dtype=torch.bool)
        kv_slots = torch.zeros(b, k_len, dtype=torch.long)
        mask = torch.zeros(b, 1, q_len, k_len, dtype=torch.bool)
        mask[:, :, :, 0] = True  # padded query rows see one key (their output is dropped)
        ar_q, ar_k = torch.arange(q_len), torch.arange(k_len)
        for i, ((first, n, ctx), p) in enumerate(zip(spans, plan, strict=True)):
            q_index[i, :n] = torch.arange(first, first + n)
            q_valid[i, :n] = True
            kv_slots[i, :ctx] = torch.tensor(self.pool.slots(p.seq.blocks, 0, ctx))
            pos = ctx - n + ar_q[:n, None]  # absolute position of each new token
            mask[i, 0, :n, :] = (ar_k[None, :] <= pos) & (ar_k[None, :] < ctx)
        move = self._to_device
        inputs = StepInputs(
            embeds=torch.cat(embeds),
            positions=move(torch.tensor(positions)),
            write_slots=move(torch.tensor(slots)),
            q_index=move(q_index),
            q_valid=move(q_valid),
            kv_slots=move(kv_slots),
            mask=move(mask),
            logit_rows=move(torch.tensor(logit_rows, dtype=torch.long)),
            lora_groups=[(a, move(torch.tensor(r))) for a, r in lora.values()],
        )
        return inputs, rows_of

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host-built index tensors to the device; on CUDA from pinned memory without waiting, so the
        step's only synchronisation is reading its sampled tokens back."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _advance(self, plan: list[_Planned], rows_of: list[list[int]], logits: torch.Tensor) -> None:
        greedy = logits.argmax(dim=-1).tolist()  # the step's one device -> host copy
        for p, rows in zip(plan, rows_of, strict=True):
            s = p.seq
            opts = s.req.options
            if p.decode:
                s.cached += 1
            else:
                s.cached += p.n_prompt
                self._keep(s)
            if not rows:
                continue  # a prefill chunk that did not reach the prompt's end
            if opts.temperature > 0:
                tokens = [int(sample_next(logits[rows[0] : rows[0] + 1], opts, s.generator)[0])]
            else:
                preds = [greedy[r] for r in rows]
                j = 0
                while j < len(p.draft) and preds[j] == p.draft[j]:
                    j += 1
                tokens = preds[: j + 1]
                s.cached += j  # the accepted draft tokens' KV is the generated tokens' KV
                s.accepted += j
            for t in tokens:
                if t in self.stop_ids:
                    s.stopped = True
                    break
                s.generated.append(t)
                if len(s.generated) >= opts.max_new_tokens:
                    break
            if s.stopped or len(s.generated) >= opts.max_new_tokens:
                self._finish(s)

    def _keep(self, s: _Seq) -> None:
        """Once a sequence's prefix (and audio) KV is written, keep it for later requests."""
        if not self.limits.prefix_cache or s.prompt is None:
            return
        bs = self.pool.block_size
        pkey = (s.req.adapter, s.prompt.prefix_ids)
        if s.cached >= s.prefix_len and pkey not in self._prefixes and s.prefix_len:
            blocks = s.blocks[: self.pool.blocks_for(s.prefix_len)]
            self.pool.share(blocks)
            self._prefixes[pkey] = _Kept(blocks, s.prefix_len)
            while len(self._prefixes) > 64:
                self.pool.release(self._prefixes.popitem(last=False)[1].blocks)
        key = s.stream_key
        if key is not None and not s.kept and s.cached >= s.audio_end:
            s.kept = True
            assert s.embeds is not None
            blocks = s.blocks[: -(-s.audio_end // bs)]
            self.pool.share(blocks)
            old = self._streams.pop(key, None)
            if old is not None:
                self.pool.release(old.blocks)
            self._streams[key] = _Kept(
                blocks,
                s.audio_end,
                s.req.audio_start,
                s.embeds[s.prefix_len : s.audio_end],
                s.prompt.prefix_ids,
            )
            while len(self._streams) > self.limits.max_stream_states:
                self.pool.release(self._streams.popitem(last=False)[1].blocks)

    # --- endings --------------------------------------------------------------------------------

    def _finish(self, s: _Seq, cancelled: bool = False) -> None:
        if s in self._running:
            self._running.remove(s)
        self.pool.release(s.blocks)
        s.blocks = []
        if not s.future.set_running_or_notify_cancel() or cancelled:
            return
        reason = FinishReason.STOP if s.stopped else FinishReason.LENGTH
        dkey = s.draft_key
        if dkey is not None and s.req.options.temperature == 0:
            stop = min(self.stop_ids) if s.stopped else None
            self._drafts[dkey] = s.generated + ([stop] if stop is not None else [])
            self._drafts.move_to_end(dkey)
            while len(self._drafts) > self.limits.max_stream_states:
                self._drafts.popitem(last=False)
        result = CaptionResult(
            text=self.processor.decode(s.generated),
            token_ids=tuple(s.generated),
            finish_reason=reason,
            prompt_tokens=s.prompt_len,
            computed_prompt_tokens=s.prompt_len - s.reused,
            draft_tokens=len(s.draft),
            accepted_tokens=s.accepted,
        )
        with self._cv:
            st = self._stats
            st.requests += 1
            st.generated_tokens += len(s.generated)
            st.prompt_tokens += s.prompt_len
            st.computed_prompt_tokens += s.prompt_len - s.reused
            st.draft_tokens += len(s.draft)
            st.accepted_tokens += s.accepted
        metrics.GENERATED_TOKENS.inc(len(s.generated))
        metrics.PROMPT_TOKENS.labels(kind="computed").inc(s.prompt_len - s.reused)
        metrics.PROMPT_TOKENS.labels(kind="reused").inc(s.reused)
        metrics.DRAFT_TOKENS.labels(outcome="accepted").inc(s.accepted)
        metrics.DRAFT_TOKENS.labels(outcome="rejected").inc(len(s.draft) - s.accepted)
        s.future.set_result(result)

    def _fail(self, s: _Seq, exc: BaseException) -> None:
        if s in self._running:
            self._running.remove(s)
        if s.blocks:
            self.pool.release(s.blocks)
            s.blocks = []
        if s.future.set_running_or_notify_cancel():
            s.future.set_exception(exc)

    def _report(self) -> None:
        metrics.ENGINE_RUNNING.set(len(self._running))
        metrics.ENGINE_WAITING.set(len(self._waiting))
        metrics.ENGINE_KV_USED.set(self.pool.used_blocks / self.pool.num_blocks)

    # --- offline encoding -----------------------------------------------------------------------

    def _encoder_for(self, adapter: str) -> nn.ModuleDict:
        """The audio encoder and projector, with an adapter's encoder-side LoRA merged in when it has any."""
        base = nn.ModuleDict(
            {"audio_encoder": self.model.audio_encoder, "audio_projector": self.model.audio_projector}
        )
        if not adapter:
            return base
        lora = self.adapters.get(adapter)
        if not lora.encoder:
            return base
        with self._encode_lock:
            if adapter in self._encoders:
                return self._encoders[adapter]
            merged = copy.deepcopy(base)
            with torch.no_grad():
                for path, (a, b, scale) in lora.encoder.items():
                    weight: torch.Tensor = merged.get_submodule(path).weight  # type: ignore[assignment]
                    weight += (scale * (b.float() @ a.float())).to(weight.dtype)
            self._encoders[adapter] = merged
            while len(self._encoders) > 2:
                self._encoders.popitem(last=False)
        return merged
