"""Text prompts to the CLIP embeddings that condition the SD-family UNets.

The zoo's pipelines run on a precomputed prompt embedding (the empty prompt by default), so no text
encoder runs per frame; this computes it once from a checkpoint's `text_encoder/` and `tokenizer/`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


@torch.no_grad()
def encode_prompt(model: str | os.PathLike, prompts: list[str], max_length: int | None = None,
                  subfolders: tuple[str, str] = ("text_encoder", "tokenizer")) -> Tensor:
    """CLIP text embeddings `(len(prompts), L, D)` (the encoder's last hidden state).

    Args:
        model: a folder (or Hub id, resolved by transformers) holding the text encoder and tokenizer.
        prompts: the texts; `""` is the empty prompt.
        max_length: tokens `L`, padded and truncated; the tokenizer's `model_max_length` (77) when None.
        subfolders: where the text encoder and the tokenizer are inside `model`.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    encoder_folder, tokenizer_folder = subfolders
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder=tokenizer_folder)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder=encoder_folder).eval()
    ids = tokenizer(prompts, max_length=max_length or tokenizer.model_max_length, padding="max_length",
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0].float()
