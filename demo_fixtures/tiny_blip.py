"""A tiny, random BLIP captioner for tests (Table III's "BLIP captions" row, at toy size).

Built the way ``Salesforce/blip-image-captioning-large`` is laid out and loaded through
the same ``BlipForConditionalGeneration.from_pretrained`` / ``AutoProcessor`` path: a
2-layer ViT on 32×32 inputs (4 patches), a 2-layer BERT-style text decoder with
cross-attention, and a WordPiece vocabulary of the words of tiny_llava's corpus with
BERT's special tokens plus BLIP's decoder-start token. Random weights: the captions are
random words, deterministic for a seed.
"""

from __future__ import annotations

import re
from pathlib import Path

from demo_fixtures.tiny_llava import _CORPUS

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
IMAGE_SIZE = 32
MIN_NEW_TOKENS = 4


def _vocab() -> list[str]:
    words = sorted({w for w in re.findall(r"[a-z]+", _CORPUS.lower())})
    return SPECIALS + words + [".", ","]


def build_tiny_blip(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save (safetensors) a tiny random BLIP captioner + processor into ``out_dir``."""
    import torch
    from transformers import (
        BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
        BlipTextConfig, BlipVisionConfig, GenerationConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _vocab()
    ids = {t: i for i, t in enumerate(vocab)}
    tokenizer = BertTokenizer(vocab=ids, do_lower_case=True, bos_token="[DEC]", model_max_length=64)
    text = BlipTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                          bos_token_id=ids["[DEC]"], eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"],
                          pad_token_id=ids["[PAD]"])
    vision = BlipVisionConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        # At the default init the image barely reaches the decoder and every image gets the
        # same caption: larger vision weights and cross-attention (image features differ
        # more and weigh more), a larger output head (peaked logits).
        g = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if param.dim() == 2 and (name.startswith("vision_model") or "crossattention" in name):
                param.copy_(torch.randn(param.shape, generator=g) * (3.0 / param.shape[1] ** 0.5))
        head = model.text_decoder.cls.predictions.decoder.weight
        head.copy_(torch.randn(head.shape, generator=g) * (4.0 / head.shape[1] ** 0.5))
    suppressed = [ids[t] for t in SPECIALS if t != "[SEP]"]
    model.generation_config = GenerationConfig(
        bos_token_id=ids["[DEC]"], eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"], do_sample=False,
        min_new_tokens=MIN_NEW_TOKENS, suppress_tokens=suppressed, no_repeat_ngram_size=1)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                              tokenizer=tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":  # python -m demo_fixtures.tiny_blip OUT_DIR
    import sys

    print(build_tiny_blip(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny/blip"))
