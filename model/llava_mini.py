"""LLaVA-Mini, exactly as released, split for streaming (DESIGN sections 2 and 3).

    m = LlavaMini.from_pretrained(path, vision_tower=None, dtype=None, device=None)
    states = m.encode_frames(pixels)            # (T, 3, S, S) CLIP-normalized; once per frame, in batches
    logits = m.video_logits(input_ids, states)  # (1, L) with one -200 -> (1, L-1+T*nq, vocab) float32
    new_ids = m.generate(input_ids, states, max_new_tokens=32)
    answer = m.ask(video_or_states, "question")

Ingest (`encode_frames`, question-independent, batched over frames):
    CLIP -> compressor -> projector -> pre-fusion layers over [P(V), P(c), prefix text]
    keeping each layer's keys/values of those rows and the compressor rows' output (the vision token).
Question (`fuse_question`): only the question's own rows run through the pre-fusion layers,
    attending to each frame's cached rows, all frames of a chunk in one batched pass; the fused
    text is averaged over frames in float32; then the LLM over [text, T*nq frame tokens, text].

The monolithic per-frame computation lives in `model/oracle.py` and the tests hold this split to it.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lmcore import cancel
from lmcore.errors import BadArgument, CheckpointError, ContextTooLong
from lmcore.limits import MAX_CHOICES
from lmcore.policy import FusionPolicy
from lmcore.stops import cut_at_stop

from . import prompt as prompt_mod
from .checkpoint import load_strict, load_tokenizer, read_state_dict, stop_ids
from .compressor import Compressor
from .config import IMAGE_TOKEN_INDEX, LlavaMiniConfig, parse_dtype
from .llama import DecoderLayer, KVBuffer, RMSNorm, Rotary
from .states import FrameSource, FrameStates
from .vision import VisionTower, find_vision_tower, load_clip


@dataclass
class Answer:
    """One answered question: text, the frames and span it used, the policies, timings (s)."""

    text: str
    token_ids: list[int]
    frames: int
    frames_fused: int
    time_span: tuple[float, float] | None
    policy: str
    kv_policy: str
    prompt_tokens: int
    llm_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    decode_report: dict | None = None
    gaps: list = field(default_factory=list)     # [start_s, end_s] spans with no frames (decode damage, drops)
    dropped: int = 0                             # frames of the window overwritten before it was read
    finish_reason: str = "stop"                  # "stop" (a stop token) or "length" (max_new_tokens / context)
    choices: list[dict] | None = None            # with `choices=`: [{"text", "logprob", "share"}] per candidate
    unknown_words: list[str] = field(default_factory=list)   # question words the tokenizer reads as unknown
    llm_rows_run: int | None = None              # prompt rows the LLM ran: fewer than llm_tokens when the head
                                                 # [prefix rows, frame tokens] was reused (`ContextCache`)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VideoContext:
    """The LLM's keys/values over [fused prompt prefix, T*nq frame tokens] for one set of frames
    and one fusion policy: made once by `LlavaMini.prepare_context`, reused by every question whose
    prompt starts with that prefix and the placeholder. Holds (layers, 1, nkv, P + T*nq, D) x 2."""

    states: FrameStates
    policy: FusionPolicy
    kv: KVBuffer

    def __len__(self) -> int:
        return len(self.states)

    @property
    def nbytes(self) -> int:
        return 2 * self.kv.k.numel() * self.kv.k.element_size()


class ContextCache:
    """LLM keys/values of the question-independent head of the LLM input, [fused prefix rows, frame
    tokens], kept after a question by a key its caller gives (`stream_answer`'s `context_key`: the
    identity of the frames, e.g. a hash of the records read) and the fusion policy, so that the next
    question over the same frames runs only its own rows through the LLM (as `prepare_context`, without
    a pass of its own: the head is the first question's). Least recently used heads are dropped past
    `max_bytes` (0: nothing kept). Heads live on `device` (default the host's memory: a reuse copies the
    head to the model's device, so kept heads never take GPU memory a question needs). A `context_key`
    that is a tuple starting with a stream id can be dropped by `discard_stream`. Thread-safe; the heads
    are only read."""

    def __init__(self, max_bytes: int = 0, device: str | torch.device = "cpu"):
        self.max_bytes = int(max_bytes)
        self.device = torch.device(device)
        self._heads: "OrderedDict[Any, KVBuffer]" = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.dropped = 0
        self._lock = threading.Lock()

    @staticmethod
    def _nbytes(kv: KVBuffer) -> int:
        return 2 * kv.k.numel() * kv.k.element_size()

    def unhit(self) -> None:
        """The last `get`'s head could not be used (its frames changed meanwhile): a miss, not a hit."""
        with self._lock:
            self.hits -= 1
            self.misses += 1

    def get(self, key) -> KVBuffer | None:
        with self._lock:
            kv = self._heads.get(key)
            if kv is None:
                self.misses += 1
                return None
            self._heads.move_to_end(key)
            self.hits += 1
            return kv

    def put(self, key, buf: KVBuffer, head: int) -> bool:
        """Keep a copy of `buf`'s first `head` rows under `key` (least recently used heads dropped first, so
        the copy never comes on top of a full budget); False when over the budget alone or out of memory."""
        n = 2 * buf.k[:, :, :, :head].numel() * buf.k.element_size()
        if n > self.max_bytes:
            return False
        with self._lock:
            self._pop(key)
            while self._heads and self.bytes + n > self.max_bytes:
                self._pop(next(iter(self._heads)))
                self.dropped += 1
        kv = KVBuffer.__new__(KVBuffer)
        try:
            kv.k = buf.k[:, :, :, :head].to(self.device, copy=True)
            kv.v = buf.v[:, :, :, :head].to(self.device, copy=True)
        except (MemoryError, RuntimeError):            # torch.OutOfMemoryError is a RuntimeError: keep nothing
            return False
        kv.n = kv.capacity = head
        with self._lock:
            self._pop(key)
            self._heads[key] = kv
            self.bytes += n
            while self.bytes > self.max_bytes:         # another thread's head came in meanwhile
                self._pop(next(iter(self._heads)))
                self.dropped += 1
        return True

    def _pop(self, key) -> None:
        old = self._heads.pop(key, None)
        if old is not None:
            self.bytes -= self._nbytes(old)

    def discard(self, key) -> None:
        with self._lock:
            self._pop(key)

    def discard_stream(self, stream_id: str) -> int:
        """Drop the heads whose `context_key` is a tuple starting with `stream_id`; how many."""
        with self._lock:
            gone = [k for k in self._heads if isinstance(k[0], tuple) and k[0] and k[0][0] == stream_id]
            for k in gone:
                self._pop(k)
            return len(gone)

    def stats(self) -> dict:
        with self._lock:
            return {"contexts": len(self._heads), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "dropped": self.dropped}


@dataclass
class PrefusedRows:
    """A window's frames for a watch question, already fused at ingest: the float32 sums over the
    window's frames of the question rows' outputs (`LlavaMini.watch_rows`) and of the fused prefix rows,
    plus every frame's vision token. `ask`/`stream_answer` take it like any FrameSource; the result is
    the exact answer over those frames, without reading a single key/value.

    rows_sum: (S, H) float32; prefix_sum: (P, H) float32; n_fused: frames summed;
    tokens: (T, nq, H); input_ids: the watch's prompt (a question must be exactly it)."""

    rows_sum: torch.Tensor
    prefix_sum: torch.Tensor
    n_fused: int
    tokens: torch.Tensor
    input_ids: tuple[int, ...]
    n_vision_rows: int
    n_cached: int
    prefix_ids: tuple[int, ...]
    kv_policy: str = "exact"
    pts: torch.Tensor | None = None
    dropped_before: int = 0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_cached_rows(self) -> int:
        return self.n_cached

    def vision_tokens(self, device) -> torch.Tensor:
        return self.tokens.to(device)

    def iter_chunks(self, frames, size, device):
        raise BadArgument("expected a question that fuses frames to read keys/values, got a watch's rows")


class LlavaMiniNet(nn.Module):
    """Parameters in the official layout: state-dict keys equal the checkpoint's."""

    def __init__(self, cfg: LlavaMiniConfig, vision_width: int):
        super().__init__()
        H = cfg.hidden_size
        m = nn.Module()
        m.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        m.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        m.norm = RMSNorm(H, cfg.rms_norm_eps)
        m.mm_projector = nn.Sequential(nn.Linear(vision_width, H), nn.GELU(), nn.Linear(H, H))
        m.compressor = Compressor(vision_width, cfg.compressor_size, cfg.compressor_heads)
        m.prefusion_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.prefusion_layer_num))
        self.model = m
        self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)


def _fusion_attention():
    from triton_kernels.fusion_attention import fusion_attention
    return fusion_attention


class LlavaMini:
    def __init__(self, net: LlavaMiniNet, vision: VisionTower, cfg: LlavaMiniConfig, tokenizer=None,
                 stop_token_ids: list[int] | None = None, *, batch_size: int = 16, question_chunk: int = 256,
                 question_mem_bytes: int = 1 << 29, name: str = "llava-mini"):
        self.net, self.vision, self.cfg, self.tokenizer = net.eval(), vision.eval(), cfg, tokenizer
        self.stop_token_ids = list(stop_token_ids or [])
        self.batch_size = batch_size            # frames per ingest batch: bounds peak memory
        self.question_chunk = question_chunk    # frames per question-time fusion pass (at most)
        self.question_mem_bytes = question_mem_bytes  # activations of one pass: fewer frames for long questions
        self.name = name
        p = self.net.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self._prefix: tuple[int, ...] | None = None
        self.tokenizer_error: CheckpointError | None = None
        self.fusion_attention: Callable = _fusion_attention()
        self.lock = threading.RLock()           # one forward pass at a time (see generate_iter)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=None, device=None, *, batch_size: int = 16,
                        question_chunk: int = 256) -> "LlavaMini":
        ckpt = Path(path).expanduser()
        if not ckpt.is_dir():
            raise CheckpointError(f"expected a checkpoint folder, got no folder at {ckpt}")
        cfg = LlavaMiniConfig.from_file(ckpt / "config.json")
        dtype = parse_dtype(dtype) or parse_dtype(cfg.torch_dtype) or torch.float32
        device = torch.device(device) if device is not None else torch.device("cpu")
        sd = read_state_dict(ckpt, dtype)
        cfg.infer_from_weights({k: tuple(v.shape) for k, v in sd.items()})
        if "model.compressor.pos_embed" not in sd and "model.compressor.query" in sd:
            # a fixed table (requires_grad False); rebuilt exactly as the official code builds it
            from .compressor import sincos_pos_embed_2d
            sd["model.compressor.pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(
                sd["model.compressor.query"].shape[-1], cfg.compressor_size)).to(dtype)
        folder = find_vision_tower(ckpt, cfg, vision_tower)
        clip = load_clip(folder, dtype, attn="sdpa" if device.type == "cuda" else "eager")
        vision = VisionTower(clip, cfg.mm_vision_select_layer, folder)
        width = sd.get("model.compressor.query", torch.empty(0, cfg.mm_hidden_size)).shape[-1]
        if vision.width != width or vision.width != cfg.mm_hidden_size:
            raise CheckpointError(
                f"expected a vision tower of width {cfg.mm_hidden_size} (mm_hidden_size; compressor width {width}), "
                f"got width {vision.width} from {folder}")
        with torch.device("meta"):
            net = LlavaMiniNet(cfg, width)
        net = net.to_empty(device="cpu").to(dtype)
        net.rotary = Rotary(cfg)
        optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        load_strict(net, sd, source=str(ckpt), optional=optional)
        if cfg.tie_word_embeddings and "lm_head.weight" not in sd:
            net.lm_head.weight = net.model.embed_tokens.weight
        net.model.compressor.pos_embed.requires_grad_(False)
        net.requires_grad_(False)
        net.model.compressor.invalidate()
        try:
            tok, tok_error = load_tokenizer(ckpt), None
        except CheckpointError as e:          # logits/generate need no tokenizer: fail only in ask()
            tok, tok_error = None, e
        m = cls(net.to(device), vision.to(device), cfg, tok, stop_ids(ckpt, cfg.eos_token_id, cfg.vocab_size),
                batch_size=batch_size, question_chunk=question_chunk, name=ckpt.name)
        m.tokenizer_error = tok_error
        return m

    # ------------------------------------------------------------------ small helpers
    @property
    def preprocess(self) -> dict:
        """size, mean, std the frames must be prepared with (see stream.preprocess)."""
        return self.vision.preprocess

    @property
    def default_prefix_ids(self) -> tuple[int, ...]:
        """Prompt tokens before the placeholder in the standard prompt: fused at ingest."""
        if self._prefix is None:
            self._prefix = ()
            if self.tokenizer is not None:
                try:
                    self._prefix = prompt_mod.prefix_ids(self.tokenizer)
                except Exception as e:       # e.g. a chat template that does not render: ingest still works,
                    import warnings          # questions then fuse the prompt's prefix rows themselves
                    warnings.warn(f"could not build the standard prompt prefix ({type(e).__name__}: {e}); "
                                  "encoding frames without a fused prefix")
        return self._prefix

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net.model.embed_tokens(ids.clamp(min=0).to(self.device))

    def _positions(self, start: int, n: int):
        pos = torch.arange(start, start + n, device=self.device)
        return self.net.rotary(pos, self.dtype)

    def _check_ids(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise BadArgument(f"expected input_ids of shape (1, L), got {shape}")
        ids = input_ids[0].long().cpu()
        where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(where) != 1:
            raise BadArgument(f"expected exactly one {IMAGE_TOKEN_INDEX} placeholder in input_ids, got {len(where)}")
        bad = ids[(ids >= self.cfg.vocab_size) | ((ids < 0) & (ids != IMAGE_TOKEN_INDEX))]
        if len(bad):
            raise BadArgument(f"expected token ids in [0, {self.cfg.vocab_size}) or {IMAGE_TOKEN_INDEX}, "
                              f"got {bad[0].item()}")
        return ids, where[0]

    # ------------------------------------------------------------------ ingest
    @torch.no_grad()
    def encode_frames_multi(self, parts: list[torch.Tensor], pts: list | None = None, **kw) -> list[FrameStates]:
        """Frames of several streams in one batched pass: `parts[i]` (T_i, 3, S, S) -> its own
        FrameStates, with `pts[i]` its timestamps. Identical to encoding each part alone (frames
        never see each other), but the batches are full: the Encoder gathers streams this way."""
        if not parts:
            return []
        sizes = [int(p.shape[0]) for p in parts]
        flat = None if pts is None else [float(t) for ts in pts for t in ts]
        states = self.encode_frames(torch.cat(list(parts)), pts=flat, **kw)
        out, i = [], 0
        for n in sizes:
            out.append(states.select(slice(i, i + n)))
            i += n
        return out

    @torch.no_grad()
    def encode_frames(self, pixels: torch.Tensor, *, prefix_ids="default", pts=None, batch_size=None,
                      kv_policy: str = "exact", out_device=None, progress=None) -> FrameStates:
        """pixels (T, 3, S, S) float, CLIP-normalized -> FrameStates. Question-independent.

        prefix_ids: prompt tokens before the placeholder to fuse now ("default": the standard
        prompt's, () for none); a question whose prompt starts differently is still exact, it
        just runs those rows itself. kv_policy: "exact" or "fp8" (e4m3 keys/values, per
        frame/layer/head scales; an approximation, reported with every answer)."""
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__
            raise BadArgument(f"expected pixels of shape (T, 3, H, W), got {shape}")
        S = self.vision.image_size
        if tuple(pixels.shape[2:]) != (S, S):
            raise BadArgument(f"expected frames of {S}x{S} (the vision tower's size), got "
                              f"{pixels.shape[2]}x{pixels.shape[3]}")
        if kv_policy not in ("exact", "fp8"):
            raise BadArgument(f"expected kv_policy 'exact' or 'fp8', got {kv_policy!r}")
        prefix = self.default_prefix_ids if prefix_ids == "default" else tuple(int(i) for i in (prefix_ids or ()))
        if IMAGE_TOKEN_INDEX in prefix:
            raise BadArgument("expected prefix_ids before the placeholder, got one containing it")
        bs = batch_size or self.batch_size
        out_device = torch.device(out_device) if out_device is not None else self.device
        parts = []
        T = pixels.shape[0]
        bar = _progress(T, "encode", progress)
        for i in range(0, T, bs):
            with self.lock:
                parts.append(self._encode_batch(pixels[i:i + bs], prefix, kv_policy).to(out_device))
            bar.update(min(bs, T - i))
        bar.close()
        states = FrameStates.cat(parts)
        if pts is not None:
            states.pts = torch.as_tensor(pts, dtype=torch.float64).reshape(-1)
            if len(states.pts) != T:
                raise BadArgument(f"expected {T} timestamps, got {len(states.pts)}")
        return states

    def _encode_batch(self, px: torch.Tensor, prefix: tuple[int, ...], kv_policy: str) -> FrameStates:
        m = self.net.model
        B = px.shape[0]
        V = self.vision(px.to(self.device, self.dtype))                     # (B, N, Dv)
        c = m.compressor(V)                                                 # (B, nq, Dv)
        pv, pc = m.mm_projector(V), m.mm_projector(c)                       # (B, N, H), (B, nq, H)
        n_vis = pv.shape[1] + pc.shape[1]
        pids = torch.tensor(prefix, dtype=torch.long)
        kidx = (pids > 0).nonzero().flatten().to(self.device)              # masked prefix rows are no keys
        pemb = self._embed(pids)                                            # (P, H)
        x = torch.cat([pv, pc, pemb[kidx].expand(B, -1, -1)], dim=1)        # (B, C, H)
        cos, sin = self._positions(0, x.shape[1])
        ks, vs = [], []
        for layer in m.prefusion_layers:
            x, k, v = layer.full(x, cos, sin)                               # k, v (B, nkv, C, D)
            ks.append(k)
            vs.append(v)
        keys, values = torch.stack(ks, 1), torch.stack(vs, 1)               # (B, P, nkv, C, D)
        prefix_out = None
        if len(prefix):
            prefix_out = pemb.expand(B, -1, -1).clone()                     # (B, P, H)
            prefix_out[:, kidx] = x[:, n_vis:]
        st = FrameStates(tokens=x[:, pv.shape[1]:n_vis].contiguous(), keys=keys, values=values,
                         n_vision_rows=n_vis, prefix_ids=prefix, prefix_out=prefix_out)
        if kv_policy == "fp8":
            from triton_kernels.fusion_attention import quantize_kv_fp8_rows
            st.keys, st.k_scale = quantize_kv_fp8_rows(keys)
            st.values, st.v_scale = quantize_kv_fp8_rows(values)
            st.kv_policy = "fp8"
        return st

    # ------------------------------------------------------------------ question
    def _check_context(self, L: int, T: int) -> None:
        total = L - 1 + T * self.cfg.nq
        if total > self.cfg.max_context:
            raise ContextTooLong(f"expected at most {self.cfg.max_context} tokens in the LLM's context, got {total} "
                                 f"({L - 1} prompt + {T}x{self.cfg.nq} frame tokens)")

    def check_context_for(self, question: str, frames: int) -> None:
        """`ContextTooLong` now if `question` over `frames` frames would not fit the LLM's context (what the
        question would raise once the frames are encoded: the CLI asks before it decodes a long video)."""
        ids, _ = self._check_ids(self.prompt_ids(question))
        self._check_context(len(ids), frames)

    def frames_per_pass(self, n_rows: int) -> int:
        """Frames fused in one pass for a question of `n_rows` rows: `question_chunk`, fewer when
        the pass's activations (rows x frames x the MLP's width, float32) would exceed
        `question_mem_bytes` (attention scores are bounded inside the fusion attention)."""
        c = self.cfg
        per_frame = 4 * max(1, n_rows) * (3 * c.intermediate_size + 8 * c.hidden_size)
        return max(1, min(self.question_chunk, self.question_mem_bytes // per_frame))

    def _fused_sums(self, emb, rows: torch.Tensor, C: int, states: FrameSource, frames: torch.Tensor,
                    prefix: bool):
        """One pass over `frames` (`frames_per_pass` at a time): float32 sums over frames of
        (a) the pre-fusion outputs of the unmasked text rows `rows`, which sit after C cached rows,
        all frames of a chunk in one batched pass per layer: (len(rows), H); and (b) when `prefix`,
        the prefix rows fused at ingest: (P, H), else None; and (c) how many frames were summed
        (fewer than len(frames) only when a cache-backed source lost frames mid-read)."""
        m = self.net.model
        H = self.cfg.hidden_size
        acc = torch.zeros(len(rows), H, dtype=torch.float32, device=self.device)
        pacc = torch.zeros(len(states.prefix_ids), H, dtype=torch.float32, device=self.device) if prefix else None
        if len(rows):
            cos, sin = self._positions(C, len(rows))
            q_emb = emb[rows.to(self.device)]                              # (S, H)
        n = 0
        for st in states.iter_chunks(frames, self.frames_per_pass(len(rows)), self.device):
            cancel.check()                                                 # a question whose client went away
            n += len(st)
            if len(st) == 0:
                continue
            if len(rows):
                acc += self._fuse_chunk(q_emb, cos, sin, st, C).float().sum(0)
            if prefix:
                pacc += st.prefix_out.float().sum(0)
        return acc, pacc, n

    def _fuse_chunk(self, q_emb, cos, sin, st: FrameStates, C: int) -> torch.Tensor:
        """The question rows `q_emb` (S, H) through the pre-fusion layers against each frame of `st`'s
        C cached rows: (Tc, S, H) in the model dtype."""
        h = q_emb.expand(len(st), -1, -1)                                  # (Tc, S, H)
        for l, layer in enumerate(self.net.model.prefusion_layers):
            cancel.check()                                                 # a long question: per layer too
            kw = {"k_scale": st.k_scale[:, l], "v_scale": st.v_scale[:, l]} if st.kv_policy == "fp8" else {}
            h = layer.cached(h, cos, sin, st.keys[:, l, :, :C], st.values[:, l, :, :C], self.fusion_attention, **kw)
        return h

    def _question_rows(self, ids: torch.Tensor, states) -> tuple[torch.Tensor, int, bool]:
        """(unmasked question rows fused per frame, cached rows C, prefix cached?) for prompt `ids`."""
        p = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0])
        P = len(states.prefix_ids)
        cached_prefix = 0 < P <= p and tuple(ids[:P].tolist()) == states.prefix_ids
        C = states.n_cached_rows if cached_prefix else states.n_vision_rows
        start = P if cached_prefix else 0
        q_rows = ((ids > 0) & (torch.arange(len(ids)) >= start)).nonzero().flatten()
        return q_rows, C, cached_prefix

    def prefused(self, question: str, *, rows_sum: torch.Tensor, prefix_sum: torch.Tensor, n_fused: int,
                 tokens: torch.Tensor, n_vision_rows: int, prefix_ids, pts=None, kv_policy: str = "exact",
                 dropped_before: int = 0) -> "PrefusedRows":
        """A `PrefusedRows` for `question` from sums of its stored per-frame rows (see `watch_rows`)."""
        from types import SimpleNamespace
        ids, _ = self._check_ids(self.prompt_ids(question))
        prefix_ids = tuple(int(i) for i in prefix_ids)
        n_cached = n_vision_rows + sum(1 for i in prefix_ids if i > 0)
        view = SimpleNamespace(prefix_ids=prefix_ids, n_vision_rows=n_vision_rows, n_cached_rows=n_cached)
        _, _, cached = self._question_rows(ids, view)
        if not cached:
            raise BadArgument("expected frames encoded with the standard prompt prefix for a watch, got other")
        return PrefusedRows(rows_sum=rows_sum, prefix_sum=prefix_sum, n_fused=n_fused, tokens=tokens,
                            input_ids=tuple(ids.tolist()),
                            n_vision_rows=n_vision_rows, n_cached=n_cached, prefix_ids=prefix_ids,
                            kv_policy=kv_policy, pts=pts, dropped_before=dropped_before)

    @torch.no_grad()
    def watch_rows(self, question: str, states: FrameStates) -> torch.Tensor:
        """A standing question fused with each frame at ingest (DESIGN section 8, watches): the
        pre-fusion outputs of its rows, (T, S, H) in the model dtype. Summed over any window's frames
        (in float32, as `fuse_question` does) they give that window's exact fused text without the
        frames' keys/values: see `PrefusedRows`."""
        ids, _ = self._check_ids(self.prompt_ids(question))
        q_rows, C, cached = self._question_rows(ids, states)
        if not cached:
            raise BadArgument("expected frames encoded with the standard prompt prefix to fuse a watch, got other")
        cos, sin = self._positions(C, len(q_rows))
        q_emb = self._embed(ids)[q_rows.to(self.device)]
        with self.lock:
            return self._fuse_chunk(q_emb, cos, sin, states.to(self.device), C)

    @staticmethod
    def _fusion_frames(states, policy: FusionPolicy) -> torch.Tensor:
        """The frames a question is fused with: the policy's choice among the frames that hold
        keys/values (all of them, unless a retention policy dropped some: `kv_frames`)."""
        kvf = getattr(states, "kv_frames", None)
        if kvf is None:
            return policy.frames(len(states))
        if len(kvf) == 0:
            raise BadArgument(f"expected frames that still hold keys/values to fuse the question with, got none "
                              f"of the window's {len(states)} (its retention policy keeps only tokens and "
                              "prefix rows there); ask about a more recent window or use a watch")
        return kvf[policy.frames(len(kvf))]

    @torch.no_grad()
    def fuse_question(self, input_ids: torch.Tensor, states: FrameSource, policy=None, *, _tail_only=False):
        """The LLM's input embeddings (1, L-1+T*nq, H) and what was used."""
        ids, p = self._check_ids(input_ids)
        policy = FusionPolicy.parse(policy)
        T, L = len(states), len(ids)
        if T == 0:
            raise BadArgument("expected at least one encoded frame, got 0")
        self._check_context(L, T)
        emb = self._embed(ids)                                             # (L, H)
        P = len(states.prefix_ids)
        q_rows, C, cached_prefix = self._question_rows(ids, states)        # unmasked rows (ids <= 0: padding)
        if isinstance(states, PrefusedRows):                               # a watch: fused at ingest
            if not cached_prefix or tuple(ids.tolist()) != states.input_ids:
                raise BadArgument("expected the watch's own question for its pre-fused rows, got another prompt")
            acc, pacc, n = states.rows_sum.to(self.device), states.prefix_sum.to(self.device), states.n_fused
            frames = torch.arange(n)
        else:
            frames = self._fusion_frames(states, policy)
            acc, pacc, n = self._fused_sums(emb, q_rows, C, states, frames, prefix=cached_prefix and not _tail_only)
        if n == 0:
            raise BadArgument(f"expected frames to fuse the question with, got none: all {len(frames)} were "
                              "overwritten while being read (the stream's ring is too small for this window)")
        text = emb.float() * n                                             # masked rows: sum of n raw embeddings
        text[q_rows.to(self.device)] = acc
        if isinstance(states, PrefusedRows):
            desc = "exact (watch: fused at ingest)" if n == T else f"watch: fused at ingest with {n} of {T} frames"
        elif getattr(states, "kv_frames", None) is not None:              # retention tiers: a mixed window
            desc = states.kv_description(len(frames), policy, frames)
        else:
            desc = policy.describe(T)
        if n < len(frames):                                                # a ring overwrote frames mid-read
            desc += f" ({len(frames) - n} of {len(frames)} frames overwritten while read: fused {n})"
        info = {"frames": T, "frames_fused": n, "policy": desc, "kv_policy": states.kv_policy,
                "prompt_tokens": L, "llm_tokens": L - 1 + T * self.cfg.nq, "prefix_cached": cached_prefix,
                "fused_all": n == len(frames)}
        if _tail_only:                                                     # rows after the placeholder
            return (text[p + 1:] / n).to(self.dtype)[None], info
        if cached_prefix:
            text[:P] = pacc
        text = (text / n).to(self.dtype)                                   # average in float32, as officially
        vis = states.vision_tokens(self.device).reshape(T * self.cfg.nq, -1)
        embeds = torch.cat([text[:p], vis, text[p + 1:]], dim=0)[None]    # (1, L-1+T*nq, H)
        return embeds, info

    @torch.no_grad()
    def prepare_context(self, states: FrameSource, policy=None) -> "VideoContext":
        """The question-independent head of the LLM input, [fused prefix rows, T*nq frame tokens],
        run through the LLM once; questions whose prompt is that prefix followed by the placeholder
        then run only their own rows (exact: same causal computation, split at a row boundary)."""
        policy = FusionPolicy.parse(policy)
        P, T = len(states.prefix_ids), len(states)
        if P == 0:
            raise BadArgument("expected states encoded with a prompt prefix (prefix_ids) to prepare a context, "
                              "got none")
        self._check_context(P + 1, T)
        frames = self._fusion_frames(states, policy)
        _, pacc, n = self._fused_sums(None, torch.empty(0, dtype=torch.long), 0, states, frames, prefix=True)
        if n < len(frames):
            raise BadArgument(f"expected all {len(frames)} frames of the window to stay in the cache while the "
                              f"context was prepared, got {len(frames) - n} overwritten; ask about a later window")
        prefix = (pacc / n).to(self.dtype)
        head = torch.cat([prefix, states.vision_tokens(self.device).reshape(T * self.cfg.nq, -1)])[None]
        buf = KVBuffer(self.cfg, 1, head.shape[1], self.dtype, self.device)
        self._llm(head, buf, all_logits=False)
        return VideoContext(states=states, policy=policy, kv=buf)

    def _prefill(self, input_ids, video, policy, extra: int, contexts: ContextCache | None = None,
                 context_key=None):
        """Embed, fuse and prefill the LLM for a question; returns (last logits, buffer, info).
        With `contexts` and `context_key` (the identity of `video`'s frames), the LLM's keys/values of
        [fused prefix rows, frame tokens] are taken from `contexts` when an earlier question over the same
        frames and policy left them there (info["context"] "reused": only the question's rows run), else
        kept there after this question's pass ("kept")."""
        ctx = video if isinstance(video, VideoContext) else None
        states = ctx.states if ctx else video
        ids = input_ids[0].tolist() if torch.is_tensor(input_ids) and input_ids.dim() == 2 else None
        P = len(states.prefix_ids)
        if ctx is not None and policy is not None and FusionPolicy.parse(policy) != ctx.policy:
            ctx = None                                                     # a different policy: no reuse
        fits = ids is not None and tuple(ids[:P]) == states.prefix_ids and len(ids) > P and \
            ids[P] == IMAGE_TOKEN_INDEX                                    # the prefix, then the placeholder
        key = None
        if contexts is not None and context_key is not None and ctx is None and fits and P > 0 and \
                len(ids) > P + 1 and \
                not isinstance(states, PrefusedRows) and contexts.max_bytes > 0:
            pol = FusionPolicy.parse(policy)
            key = (context_key, pol.name, pol.max_fused_frames, states.prefix_ids)
            kv = contexts.get(key)
            if kv is not None:
                ctx = VideoContext(states=states, policy=pol, kv=kv)
        if ctx is not None and fits:
            t = time.perf_counter()
            tail, info = self.fuse_question(input_ids, states, ctx.policy, _tail_only=True)
            info["fuse_s"] = time.perf_counter() - t
            if key is not None and not info["fused_all"]:                 # frames overwritten since the head
                contexts.discard(key)                                      # was made: the plain pass, fewer frames
                contexts.unhit()
                first = info["fuse_s"]
                logits, buf, info = self._prefill(input_ids, states, policy, extra)
                info["fuse_s"] += first                                    # both fusions, not in prefill_s
                return logits, buf, info
            if key is not None:
                info["context"] = "reused"
            head = ctx.kv.n
            buf = KVBuffer(self.cfg, 1, head + tail.shape[1] + extra, self.dtype, self.device)
            buf.k[:, :, :, :head] = ctx.kv.k[:, :, :, :head]
            buf.v[:, :, :, :head] = ctx.kv.v[:, :, :, :head]
            buf.n = head
            info["llm_rows_run"] = tail.shape[1]
            if tail.shape[1] == 0:                                         # prompt ends at the placeholder
                raise BadArgument("expected prompt text after the placeholder to reuse a context, got none")
            return self._llm(tail, buf, all_logits=False)[:, -1], buf, info
        t = time.perf_counter()
        embeds, info = self.fuse_question(input_ids, states, ctx.policy if ctx else policy)
        info["fuse_s"] = time.perf_counter() - t
        buf = KVBuffer(self.cfg, 1, embeds.shape[1] + extra, self.dtype, self.device)
        info["llm_rows_run"] = embeds.shape[1]
        logits = self._llm(embeds, buf, all_logits=False)[:, -1]
        if key is not None and info["fused_all"] and contexts.put(key, buf, P + len(states) * self.cfg.nq):
            info["context"] = "kept"           # the head rows of this very pass: the next question's are equal
        return logits, buf, info

    @torch.no_grad()
    def next_token_logits(self, input_ids: torch.Tensor, video, policy=None) -> torch.Tensor:
        """Logits (1, vocab) float32 of the token after the prompt; `video` is FrameStates or a VideoContext."""
        return self._prefill(input_ids, video, policy, 0)[0]

    def _llm(self, embeds: torch.Tensor, buf: KVBuffer | None, *, all_logits: bool) -> torch.Tensor:
        m = self.net.model
        n0 = buf.n if buf is not None else 0
        cos, sin = self._positions(n0, embeds.shape[1])
        h = embeds
        for i, layer in enumerate(m.layers):
            cancel.check()
            if buf is None:
                h, _, _ = layer.full(h, cos, sin)
            else:
                h = layer.decode(h, cos, sin, buf.k[i], buf.v[i], n0)
        if buf is not None:
            buf.n = n0 + embeds.shape[1]
        h = m.norm(h if all_logits else h[:, -1:])
        return self.net.lm_head(h).float()

    @torch.no_grad()
    def video_logits(self, input_ids: torch.Tensor, states: FrameStates, policy=None) -> torch.Tensor:
        """(1, L) ids with one -200 -> logits (1, L-1+T*nq, vocab) float32, as the official forward."""
        embeds, _ = self.fuse_question(input_ids, states, policy)
        return self._llm(embeds, None, all_logits=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, states, max_new_tokens: int = 32, *,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 policy=None, stop_ids: list[int] | None = None, _info: dict | None = None,
                 contexts: ContextCache | None = None, context_key=None) -> torch.Tensor:
        """New tokens only, (1, n); greedy unless do_sample. Stops after a stop id (kept, as HF does).
        `states` is a FrameSource, or a VideoContext from `prepare_context` for repeated questions;
        `contexts`/`context_key`: see `_prefill`."""
        out = list(self.generate_iter(input_ids, states, max_new_tokens, do_sample=do_sample,
                                      temperature=temperature, top_p=top_p, seed=seed, policy=policy,
                                      stop_ids=stop_ids, _info=_info, contexts=contexts, context_key=context_key))
        return torch.tensor([out], dtype=torch.long)

    def generate_iter(self, input_ids: torch.Tensor, states, max_new_tokens: int = 32, *,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                      seed: int | None = None, policy=None, stop_ids: list[int] | None = None,
                      _info: dict | None = None, contexts: ContextCache | None = None, context_key=None):
        """`generate`, one token id at a time, as each is chosen. Closing the iterator (a client that
        went away) stops it: no further LLM step runs. Each forward pass holds the model's lock, so
        questions from several threads interleave their steps on one model, never run two at once;
        `_info` is filled when the iteration ends (normally or closed)."""
        t0 = time.perf_counter()
        self._check_ids(input_ids)
        T = len(states.states if isinstance(states, VideoContext) else states)
        room = self.cfg.max_position_embeddings - (input_ids.shape[1] - 1 + T * self.cfg.nq)
        steps = max(0, min(max_new_tokens, room))
        with torch.no_grad(), cancel.acquire(self.lock):
            t_lock = time.perf_counter()                   # waited for the questions before it
            logits, buf, info = self._prefill(input_ids, states, policy, steps, contexts, context_key)
        info["finish_reason"] = "length"
        t1 = time.perf_counter()
        if _info is not None:
            _info.update(info, wait_s=t_lock - t0, prefill_s=t1 - t_lock - info["fuse_s"], generate_s=0.0)
        stops = set(self.stop_token_ids if stop_ids is None else stop_ids)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        try:
            for step in range(steps):
                tok = _pick(logits[0], do_sample, temperature, top_p, gen)
                if tok in stops:
                    info["finish_reason"] = "stop"
                yield tok
                if tok in stops or step == steps - 1:
                    break
                with torch.no_grad(), cancel.acquire(self.lock):
                    e = self.net.model.embed_tokens(torch.tensor([[tok]], device=self.device))
                    logits = self._llm(e, buf, all_logits=False)[:, -1]
        finally:
            if _info is not None:
                _info["generate_s"] = time.perf_counter() - t1
                _info["finish_reason"] = info["finish_reason"]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The answer's text: the tokenizer's decode, special tokens left out, stripped. A checkpoint whose
        tokenizer writes numbers one digit a token, joined by spaces on decode (a word-level one: the demo
        checkpoint's says 28 as "2 8"), says so with `"lmstream_join_digits": true` in its
        tokenizer_config.json, and runs of digits are joined back ("28")."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
        if getattr(self.tokenizer, "init_kwargs", {}).get("lmstream_join_digits"):
            text = _DIGIT_SPACE.sub("", text)
        return text

    MAX_CHOICES = MAX_CHOICES
    MAX_CHOICE_TOKENS = 256
    #: What a Llama 3 chat model writes before its answer when the prompt stops after the user's turn
    #: (the official `llava_llama_3_1` prompt does): scored as a shared preamble (`score_choices`).
    ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

    def choice_ids(self, choices: Sequence[str]) -> list[list[int]]:
        """Each candidate answer's token ids; a clear error for what cannot be scored: too few or
        too many, blank, words the tokenizer does not know (they would score alike), special
        tokens, two candidates with the same tokens."""
        if isinstance(choices, str) or not 2 <= len(choices) <= self.MAX_CHOICES:
            n = "a single string" if isinstance(choices, str) else len(choices)
            raise BadArgument(f"expected 2 to {self.MAX_CHOICES} choices, got {n}")
        if self.tokenizer is None and self.tokenizer_error is not None:
            raise self.tokenizer_error
        if self.tokenizer is None:
            raise BadArgument("expected a checkpoint with a tokenizer to score choices, got none")
        if not self.stop_token_ids:
            raise BadArgument("expected the checkpoint to name stop tokens (generation_config eos_token_id) to "
                              "score choices, got none")
        tk = self.tokenizer
        special = set(getattr(tk, "all_special_ids", []) or []) | set(self.stop_token_ids)
        out: list[list[int]] = []
        seen: dict[tuple[int, ...], str] = {}
        for c in choices:
            if not isinstance(c, str) or not c.strip():
                raise BadArgument(f"expected each choice to be non-empty text, got {c!r}")
            toks = list(tk(c.strip(), add_special_tokens=False)["input_ids"])
            if not toks:
                raise BadArgument(f"expected choice {c!r} to have at least one token, got none")
            if len(toks) > self.MAX_CHOICE_TOKENS:
                raise BadArgument(f"expected each choice to be at most {self.MAX_CHOICE_TOKENS} tokens, got "
                                  f"{len(toks)} for {c[:40]!r}")
            bad = [t for t in toks if t in special or not 0 <= t < self.cfg.vocab_size]
            if bad:
                words = tk.convert_ids_to_tokens(bad) if all(0 <= t < len(tk) for t in bad) else bad
                raise BadArgument(f"expected choice {c!r} in words this model's tokenizer knows, got "
                                  f"{', '.join(map(str, words))} (a word outside its vocabulary, or a special "
                                  "token: the checkpoint's tokenizer.json lists the words)")
            if tuple(toks) in seen:
                raise BadArgument(f"expected choices that differ as tokens, got {seen[tuple(toks)]!r} and {c!r}, "
                                  "which this tokenizer reads as the same tokens")
            seen[tuple(toks)] = c
            out.append(toks)
        return out

    def _preamble_ids(self) -> list[int]:
        """The assistant header's ids when this tokenizer has it, else []."""
        tk = self.tokenizer
        hid = tk.convert_tokens_to_ids("<|start_header_id|>") if tk is not None else None
        if hid is None or hid == getattr(tk, "unk_token_id", None):
            return []
        return list(tk(self.ASSISTANT_HEADER, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def score_choices(self, input_ids: torch.Tensor, states, choices: Sequence[str], *, policy=None,
                      preamble: "str | Sequence[int]" = "auto", _info: dict | None = None,
                      contexts: ContextCache | None = None, context_key=None) -> list[float]:
        """log P(choice, then a stop token | prompt, video) for each candidate answer, in nats.

        The prompt is fused and prefilled once; each candidate's tokens then run on that cache,
        embedded as generated tokens are (not fused), so a candidate's score is the sum of the
        log-softmax that `generate`'s steps would give those very tokens, plus the log of the
        probability of stopping right after them (any stop id). The computation is the plain
        model's: no approximation, only the answer is read as a choice instead of sampled.
        `preamble`: token ids every answer starts with, scored as given (the same for every
        candidate, so they do not change the ranking); "auto": the assistant header
        (`ASSISTANT_HEADER`) when the model's most likely next token opens it, as a Llama 3 chat
        checkpoint does after the official prompt, else none. The lock is taken per pass, so
        other questions interleave with a long list of candidates."""
        cands = self.choice_ids(choices)
        stops = torch.tensor(self.stop_token_ids, device=self.device)
        longest = max(len(t) for t in cands)
        head = self._preamble_ids() if preamble == "auto" else list(preamble or [])
        t0 = time.perf_counter()
        with cancel.acquire(self.lock):
            t_lock = time.perf_counter()
            logits0, buf, info = self._prefill(input_ids, states, policy, longest + len(head), contexts, context_key)
        if preamble == "auto":
            head = head if head and int(torch.argmax(logits0[0])) == head[0] else []
        need = buf.n + len(head) + longest
        if need > self.cfg.max_context:
            raise ContextTooLong(f"expected at most {self.cfg.max_context} tokens in the LLM's context, got {need} "
                                 f"({buf.n} prompt and frames + {len(head)} preamble + {longest} of the longest "
                                 "choice)")
        t1 = time.perf_counter()
        if head:
            with self.lock:
                e = self.net.model.embed_tokens(torch.tensor([head], device=self.device))
                logits0 = self._llm(e, buf, all_logits=False)[:, -1]
        n0 = buf.n
        out: list[float] = []
        for toks in cands:
            with cancel.acquire(self.lock):
                buf.n = n0                                                 # the prompt's cache; rows after it rewritten
                e = self.net.model.embed_tokens(torch.tensor([toks], device=self.device))
                rows = torch.cat([logits0[:, None], self._llm(e, buf, all_logits=True)], dim=1)[0].float()
            lse = torch.logsumexp(rows, -1)                                # (len + 1,): no (len + 1, vocab) copy
            ids = torch.tensor(toks, device=rows.device)
            s = (rows[torch.arange(len(toks), device=rows.device), ids] - lse[:-1]).sum() \
                + torch.logsumexp(rows[-1, stops], 0) - lse[-1]
            out.append(float(s))
        if _info is not None:
            _info.update(info, wait_s=t_lock - t0, prefill_s=t1 - t_lock - info["fuse_s"],
                         score_s=time.perf_counter() - t1,
                         choice_preamble=len(head))
        return out

    # ------------------------------------------------------------------ words in, words out
    def unknown_words(self, question: str) -> list[str]:
        """The question's words that the tokenizer maps to its unknown token, in order, once each
        (a word-level vocabulary such as the demo checkpoint's; [] for a tokenizer without one).
        The model reads each as the same token, so an answer to such a question may be off."""
        tok = self.tokenizer
        unk = getattr(tok, "unk_token_id", None)
        if tok is None or unk is None:
            return []
        out: list[str] = []
        try:                                    # each unknown token's own text: words, digits, emoji, "!!", "-"
            enc = tok(question, add_special_tokens=False, return_offsets_mapping=True)
            pieces = [question[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
        except (NotImplementedError, TypeError, ValueError, KeyError):     # a slow tokenizer: words alone
            pieces = [w for w in re.findall(r"[^\W\d_]+", question)
                      if unk in tok(w, add_special_tokens=False)["input_ids"]]
        for w in pieces:
            w = w.strip().lower()
            if w and w not in out:
                out.append(w)
        return out

    def prompt_ids(self, question: str) -> torch.Tensor:
        if self.tokenizer is None and self.tokenizer_error is not None:
            raise self.tokenizer_error
        return prompt_mod.build_input_ids(self.tokenizer, question)

    def ask(self, video, question: str, *, max_new_tokens: int = 64, policy=None, window=None, fps: float = 1.0,
            kv_policy: str = "exact", progress=None, retain=None, **gen_kw) -> Answer:
        """Answer `question` about `video`: a `FrameSource` (FrameStates, CachedFrames, ...), a
        VideoContext, a (T, 3, S, S) pixel tensor, or a path (decoded into a frame cache that
        spills to a temporary file, then read back chunk by chunk: memory stays flat in the
        video's length). timings: decode_s / encode_s (the video), fuse_s, prefill_s, generate_s.
        `retain`: a retention policy for a path's frames (`frame_cache.retention.Retention`)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if gen_kw.get("choices") is not None:
            self.choice_ids(gen_kw["choices"])      # bad choices fail before any frame is encoded
        if isinstance(video, (FrameStates, VideoContext, FrameSource, PrefusedRows)):
            return self._answer(video, question, max_new_tokens, policy, window, timings, None, gen_kw)
        if torch.is_tensor(video):
            states = self.encode_frames(video, kv_policy=kv_policy, progress=progress)
            timings["encode_s"] = time.perf_counter() - t0
            return self._answer(states, question, max_new_tokens, policy, window, timings, None, gen_kw)
        import tempfile
        from dataclasses import asdict as _asdict
        from frame_cache import InProcessFrameCache
        from stream.ingest import ingest_video
        from stream.window import CachedFrames
        self.prompt_ids(question)                   # a bad question fails before the video is decoded
        with tempfile.TemporaryDirectory(prefix="lmstream-ask-") as tmp, \
                InProcessFrameCache(spill_dir=tmp) as cache:
            report = ingest_video(self, video, cache, "file", fps=fps, window=window, kv_policy=kv_policy,
                                  progress=progress, timings=timings, retain=retain)
            src = CachedFrames(cache, "file", dtype=self.dtype)
            return self._answer(src, question, max_new_tokens, policy, None, timings, _asdict(report), gen_kw)

    def _answer(self, states, question, max_new_tokens, policy, window, timings, report, gen_kw) -> Answer:
        for kind, *rest in self.stream_answer(states, question, max_new_tokens=max_new_tokens, policy=policy,
                                              window=window, timings=timings, report=report, **gen_kw):
            if kind == "answer":
                return rest[0]
        raise AssertionError("stream_answer ended without an answer")

    def stream_answer(self, states, question: str, *, max_new_tokens: int = 64, policy=None, window=None,
                      timings: dict | None = None, report: dict | None = None, extra_gaps=(),
                      choices: Sequence[str] | None = None, stop: Sequence[str] = (),
                      contexts: ContextCache | None = None, context_key=None, **gen_kw):
        """Answer `question` about `states` (a FrameSource or VideoContext) as it is generated:
        yields ("token", token_id, text_piece) for each new token (pieces concatenate to the text said),
        then ("answer", Answer). Closing the generator stops generation at once.
        `stop`: strings that end the answer where one is first complete (`lmcore.stops.cut_at_stop`, as
        OpenAI and vLLM): no LLM step runs after it, `Answer.text` ends before it, finish_reason "stop"
        (the pieces already yielded hold the stop string's text: a streaming client cuts them itself).
        With `choices` (2 or more candidate answers) nothing is generated: the answer is the
        candidate the model gives the highest probability (`score_choices`), `Answer.choices`
        holds every candidate's log-probability, and only the ("answer", Answer) event comes.
        `contexts`, `context_key`: keep the LLM's keys/values of [prefix rows, frame tokens] for the next
        question over the same frames (`ContextCache`; `Answer.llm_rows_run` says how many rows ran)."""
        timings = {} if timings is None else timings
        if window is not None and context_key is not None:
            raise BadArgument("expected a context_key naming the frames answered about, got one with a window "
                              "that narrows them: make the source for the window (and its key) instead")
        if window is not None and isinstance(states, VideoContext):
            raise BadArgument("expected FrameStates to select a window, got a prepared VideoContext")
        if window is not None and not isinstance(states, FrameStates):
            raise BadArgument("expected FrameStates to select a window, got a frame source: choose the window "
                              "when making the source (e.g. CachedFrames(cache, id, start, end))")
        if window is not None and states.pts is not None:
            states = states.window(*window)
            if len(states) == 0:
                raise BadArgument(f"expected frames inside the window {window[0]}:{window[1]} s, got none")
        ids = self.prompt_ids(question)
        info: dict = {}
        toks: list[int] = []
        said = ""
        scored = None
        if choices is not None:                           # read the answer as the likeliest candidate
            if gen_kw.get("do_sample"):
                raise BadArgument("expected either choices or sampling, got both")
            lps = self.score_choices(ids, states, choices, policy=policy, _info=info, contexts=contexts,
                                     context_key=context_key)
            best = max(range(len(lps)), key=lps.__getitem__)
            w = torch.softmax(torch.tensor(lps, dtype=torch.float64), 0).tolist()   # share among the candidates
            scored = [{"text": c.strip(), "logprob": round(lp, 4), "share": round(x, 4)}
                      for c, lp, x in zip(choices, lps, w)]
            said = scored[best]["text"]
            toks = list(self.tokenizer(said, add_special_tokens=False)["input_ids"])
            info["generate_s"] = 0.0
            timings["score_s"] = info["score_s"]
        else:
            cut, stopped = said, False
            gen = self.generate_iter(ids, states, max_new_tokens, policy=policy, _info=info, contexts=contexts,
                                     context_key=context_key, **gen_kw)
            try:
                for tok in gen:
                    toks.append(tok)
                    # pieces concatenate to the final (stripped) text: trailing spaces wait for the next word,
                    # and a decode that rewrote earlier characters emits nothing until it agrees again
                    text = self.detokenize(toks)
                    piece = text[len(said):] if text.startswith(said) else ""
                    said += piece
                    yield "token", tok, piece
                    if stop and piece:
                        cut, stopped = cut_at_stop(said, list(stop))
                        if stopped:
                            break
            finally:
                gen.close()                               # fills `info` (finish_reason, generate_s)
            if stopped:
                said, info["finish_reason"] = cut, "stop"
        timings.update({k: info[k] for k in ("wait_s", "fuse_s", "prefill_s", "generate_s") if k in info})
        text = said                                       # what the pieces said, cut before a stop string
        span = None
        fs = states.states if isinstance(states, VideoContext) else states
        if fs.pts is not None and len(fs.pts):
            span = (float(fs.pts.min()), float(fs.pts.max()))
        gaps = [list(g) for g in (report or {}).get("gaps", [])] + [list(g) for g in extra_gaps]
        dropped = int(getattr(fs, "dropped_before", 0) or 0)
        if dropped and span is not None:
            gaps.insert(0, [None, span[0]])             # frames before the window's first were overwritten
        yield "answer", Answer(text=text, token_ids=toks, frames=info["frames"], frames_fused=info["frames_fused"],
                               time_span=span, policy=info["policy"], kv_policy=info["kv_policy"],
                               prompt_tokens=info["prompt_tokens"], llm_tokens=info["llm_tokens"],
                               llm_rows_run=info.get("llm_rows_run"),
                               timings={k: round(v, 4) for k, v in timings.items()},
                               decode_report=report, gaps=gaps, dropped=dropped,
                               finish_reason=info.get("finish_reason", "stop"), choices=scored,
                               unknown_words=self.unknown_words(question))


_DIGIT_SPACE = re.compile(r"(?<=\d) (?=\d)")


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen) -> int:
    if not do_sample:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), -1)
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        cut = sp.cumsum(-1) - sp > top_p
        sp[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


class _NoBar:
    def update(self, n): ...
    def close(self): ...


def _progress(total: int, desc: str, progress):
    if progress is None:
        progress = total >= 256
    if not progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="frame", leave=False)
