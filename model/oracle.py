"""The test oracle: LLaVA-Mini computed the plain, monolithic way, from transformers' own modules.

Per frame: [P(V), P(c), text] through the pre-fusion layers (transformers'
`LlamaDecoderLayer`, eager attention, the official 4-D mask and position ids),
the frame's vision token from the compressor rows, the fused text averaged
over frames in float32, then transformers' `LlamaForCausalLM` on the averaged
text with the placeholder replaced by the frames' tokens. The compressor is
the official `nn.MultiheadAttention` Resampler; the CLIP tower runs all its
layers and takes `hidden_states[select_layer]`.

It shares no computation code with `model/llava_mini.py` (only the weights),
so agreement between the two is evidence, not a tautology. It is slow on
purpose: every frame re-runs every row.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import read_state_dict, stop_ids
from .compressor import Compressor
from .config import IMAGE_TOKEN_INDEX, LlavaMiniConfig, parse_dtype
from .vision import find_vision_tower, load_clip


def _llama_config(cfg: LlavaMiniConfig):
    from transformers import LlamaConfig
    lc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings, attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias, tie_word_embeddings=cfg.tie_word_embeddings)
    lc._attn_implementation = "eager"
    return lc


def _causal_key_mask(key_masked: torch.Tensor, dtype) -> torch.Tensor:
    """(B, L) bool (True = padding) -> additive (B, 1, L, L): what transformers'
    `_prepare_4d_causal_attention_mask(~mask, ...)` builds (future rows and padding keys at dtype min)."""
    B, L = key_masked.shape
    blocked = torch.ones(L, L, dtype=torch.bool).triu(1)[None] | key_masked[:, None, :]
    am = torch.zeros(B, 1, L, L, dtype=dtype)
    return am.masked_fill(blocked[:, None], torch.finfo(dtype).min)


class OracleLlavaMini(nn.Module):
    def __init__(self, cfg: LlavaMiniConfig, clip: nn.Module, vision_width: int):
        super().__init__()
        from transformers import LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        lc = _llama_config(cfg)
        self.cfg = cfg
        self.llm = LlamaForCausalLM(lc)
        self.prefusion_layers = nn.ModuleList(LlamaDecoderLayer(lc, layer_idx=i)
                                              for i in range(cfg.prefusion_layer_num))
        self.prefusion_rotary = LlamaRotaryEmbedding(lc)
        H = cfg.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(vision_width, H), nn.GELU(), nn.Linear(H, H))
        self.compressor = Compressor(vision_width, cfg.compressor_size, cfg.compressor_heads)
        self.compressor.mode = "mha"
        self.clip = clip
        self.stop_token_ids: list[int] = []

    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=None) -> "OracleLlavaMini":
        ckpt = Path(path)
        cfg = LlavaMiniConfig.from_file(ckpt / "config.json")
        dtype = parse_dtype(dtype) or parse_dtype(cfg.torch_dtype) or torch.float32
        sd = read_state_dict(ckpt, dtype)
        cfg.infer_from_weights({k: tuple(v.shape) for k, v in sd.items()})
        clip = load_clip(find_vision_tower(ckpt, cfg, vision_tower), dtype)
        m = cls(cfg, clip, sd["model.compressor.query"].shape[-1]).to(dtype)
        groups = {"model.prefusion_layers.": m.prefusion_layers, "model.mm_projector.": m.mm_projector,
                  "model.compressor.": m.compressor}
        rest = {}
        for k, v in sd.items():
            for pre, mod in groups.items():
                if k.startswith(pre):
                    mod.state_dict()[k[len(pre):]].copy_(v)
                    break
            else:
                rest[k] = v
        missing, unexpected = m.llm.load_state_dict(rest, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
        assert not missing and not unexpected, (missing, unexpected)
        m.stop_token_ids = stop_ids(ckpt, cfg.eos_token_id, cfg.vocab_size)
        return m.eval().requires_grad_(False)

    # -- one frame, as `encode_images_mini` -------------------------------------------------------
    def _frame(self, image: torch.Tensor, input_ids: torch.Tensor):
        emb = self.llm.get_input_embeddings()
        all_text = emb(input_ids.clamp(min=0))
        padding_mask = input_ids <= 0
        feats = self.clip(image.to(all_text.dtype), output_hidden_states=True)
        feats = feats.hidden_states[self.cfg.mm_vision_select_layer][:, 1:]
        comp = self.mm_projector(self.compressor(feats))
        glob = self.mm_projector(feats)
        x = torch.cat([glob, comp, all_text], dim=1)
        mask = torch.cat([torch.zeros(1, glob.size(1) + comp.size(1), dtype=torch.bool), padding_mask], dim=1)
        am = _causal_key_mask(mask, x.dtype)
        pos = (~mask).long().cumsum(-1) - 1
        pos.masked_fill_(mask, 1)
        pe = self.prefusion_rotary(x, pos)
        for layer in self.prefusion_layers:
            out = layer(x, attention_mask=am, position_ids=pos, position_embeddings=pe)
            x = out[0] if isinstance(out, tuple) else out
        L = input_ids.size(1)
        text = x[:, -L:]
        comp = x[:, -L - comp.size(1):-L]
        text = text * (~padding_mask).unsqueeze(-1).int() + all_text * padding_mask.unsqueeze(-1)
        return comp, text

    @torch.no_grad()
    def inputs_embeds(self, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """images (1, T, 1, 3, S, S) as the official video call passes them."""
        T = images.size(1)
        toks, text_sum = [], 0
        for t in range(T):
            c, txt = self._frame(images[:, t, 0], input_ids)
            toks.append(c)
            text_sum = text_sum + txt.float()
        text = (text_sum / T).type_as(txt)[0]
        vis = torch.cat(toks, dim=1)[0]
        p = (input_ids[0] == IMAGE_TOKEN_INDEX).nonzero().item()
        return torch.cat([text[:p], vis, text[p + 1:]])[None]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds=self.inputs_embeds(input_ids, images)).logits.float()

    @torch.no_grad()
    def generate(self, input_ids, images, max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy, re-running the whole sequence each step (no cache: the plainest form)."""
        embeds = self.inputs_embeds(input_ids, images)
        out = []
        for _ in range(max_new_tokens):
            tok = int(self.llm(inputs_embeds=embeds).logits[0, -1].float().argmax())
            out.append(tok)
            if tok in self.stop_token_ids:
                break
            embeds = torch.cat([embeds, self.llm.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
        return torch.tensor([out])
