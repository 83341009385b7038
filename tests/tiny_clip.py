"""A tiny, randomly initialised CLIP checkpoint folder, as `CLIPModel.save_pretrained` writes it,
for the `clip` backbone and the `clip-text:PATH` encoder on the CPU (no download, no real weights).

The vision tower takes the synthetic benchmark's 96 px images in 24 px patches: 4 x 4 = 16 regions.
The joint space has the synthetic label vectors' 32 dimensions, so clip_zeroshot scores a
synthetic dataset as it is. The tokenizer is CLIP's byte-level BPE over single characters (no
merges): every printable ASCII name encodes, one token per character.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE, PATCH, JOINT_DIM = 96, 24, 32
GRID = IMAGE_SIZE // PATCH


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in map(chr, range(33, 127)):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            tower, vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1
        ),
        vision_config=dict(tower, image_size=IMAGE_SIZE, patch_size=PATCH),
        projection_dim=JOINT_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder
