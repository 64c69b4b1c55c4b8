"""Prompts as the official `llava_llama_3_1` conversation builds them.

The tokenizer's chat template over [system, user "<image>\\n" + question] with
add_generation_prompt=False, then LLaVA's `tokenizer_image_token`: the text is
split at "<image>", each chunk tokenized on its own (with the tokenizer's
special tokens), the placeholder inserted as id -200, and the BOS of every
chunk after the first dropped. The training code removes a doubled BOS (the
chat template writes one and the tokenizer adds one); we do the same.
"""
from __future__ import annotations

import torch

from lmcore.errors import BadArgument

from .config import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

DEFAULT_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                  "content that the user provides, and assist the user with a variety of tasks using natural "
                  "language.")

# Used only when a tokenizer ships without a chat template: the Llama 3 format.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def chat_text(tokenizer, question: str, system: str = DEFAULT_SYSTEM) -> str:
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": DEFAULT_IMAGE_TOKEN + "\n" + question}]
    template = getattr(tokenizer, "chat_template", None) or LLAMA3_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=False)


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    chunks = [tokenizer(c).input_ids for c in prompt.split(DEFAULT_IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    bos = tokenizer.bos_token_id
    if chunks and chunks[0] and bos is not None and chunks[0][0] == bos:
        offset = 1
        ids.append(chunks[0][0])
    for i, c in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(c[offset:])
    if len(ids) >= 2 and bos is not None and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def build_input_ids(tokenizer, question: str, system: str = DEFAULT_SYSTEM) -> torch.Tensor:
    """(1, L) long with exactly one -200 placeholder."""
    if tokenizer is None:
        raise BadArgument("expected a checkpoint with a tokenizer to ask in words, got none; "
                          "pass input_ids to video_logits/generate instead")
    if DEFAULT_IMAGE_TOKEN in question:
        raise BadArgument(f"expected a question without the {DEFAULT_IMAGE_TOKEN} placeholder, got one")
    return torch.tensor([tokenizer_image_token(chat_text(tokenizer, question, system), tokenizer)])


def prefix_ids(tokenizer, system: str = DEFAULT_SYSTEM) -> tuple[int, ...]:
    """The prompt tokens before the placeholder: question-independent, fused at ingest."""
    ids = build_input_ids(tokenizer, "x", system)[0].tolist()
    return tuple(ids[:ids.index(IMAGE_TOKEN_INDEX)])
