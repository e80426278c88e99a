"""Prompt encoding with UMT5 (as diffusers' AnyFlow pipelines do it), cached per prompt.

A live stream re-sends the same few prompts (switching back and forth); encoding is the one model call a prompt
switch costs besides the cache re-encode, so embeddings are kept in a small LRU.
"""

from __future__ import annotations

import html
import re
from collections import OrderedDict

import torch

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # AnyFlowFARPipeline's default, for a tokenizer that sets no limit of its own
_NO_LIMIT = 2**20  # transformers' "no limit" is a huge model_max_length (about 1e30)


def clean_prompt(text: str) -> str:
    """diffusers' `prompt_clean` without ftfy: unescape HTML twice, collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def max_sequence_length(tokenizer) -> int:
    """Prompt tokens the model reads: its tokenizer's own `model_max_length` (the one source: our models' tokenizers
    set it), else diffusers' default."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _NO_LIMIT else DEFAULT_MAX_SEQUENCE_LENGTH


class PromptEncoder:
    """`encode(prompt) -> (1, max_sequence_length, dim)` embeddings, zero past the prompt's tokens."""

    def __init__(self, tokenizer, text_encoder, cache_size: int = 32):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length(tokenizer)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt is a string, got {type(prompt).__name__}")
        prompt = clean_prompt(prompt)
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        inputs = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        mask = inputs.attention_mask.to(device)
        states = self.text_encoder(inputs.input_ids.to(device), mask).last_hidden_state
        length = int(mask.sum())
        embeds = torch.zeros_like(states)
        embeds[:, :length] = states[:, :length]
        self._cache[prompt] = embeds
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeds
