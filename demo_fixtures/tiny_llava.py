"""A tiny, random LLaVA-1.5-shaped model for tests and the demo build.

Tests never load anything from a hub, yet the caption engines must be exercised through
the same code path the real ``llava-hf/llava-1.5-7b-hf`` takes: ``from_pretrained`` of a
``LlavaForConditionalGeneration`` and an ``AutoProcessor`` whose chat template renders
LLaVA-1.5's prompt. This module builds such a checkpoint in well under a second and about
half a megabyte: a 2-layer Llama (head_dim 16), a 2-layer CLIP vision tower on 28×28
inputs (2×2 patches of 14 → 4 image tokens), a byte-level BPE tokenizer trained here on a
built-in English corpus, and LLaVA-1.5's own chat template.

The weights are random, so captions are gibberish, but they are deterministic (seeded),
non-empty (EOS is held back for the first tokens) and depend on the image (the projector
is scaled up so the 4 image tokens dominate the prompt), which lets tests tell captions of
different images apart and compare engines token for token.
"""

from __future__ import annotations

import re
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 28
PATCH_SIZE = 14
MIN_NEW_TOKENS = 4

# LLaVA-1.5's chat template as shipped with llava-hf/llava-1.5-7b-hf: images first, then
# text, then ' ASSISTANT:'. For a user message [image, text] it renders exactly
# ``USER: <image>\n{text} ASSISTANT:`` (no BOS: the tokenizer adds it).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Enough English for a byte-level BPE to learn whole words of the instruction and of
# typical captions, so the tiny model's output reads as (random) words.
_CORPUS = """\
Describe the image in a very detailed manner if we remove the degradation artifacts from the image.
The image shows a woman in a white space suit standing in front of an American flag.
A brown and white cat with green eyes is sitting on a wooden floor and looking at the camera.
A cup of coffee with milk foam sits on a white saucer on a table next to a spoon.
A rocket is launching into a blue sky with a bright cloud of smoke and fire below it.
A red motorcycle is parked on a street in front of a building with large windows.
The photo shows a grey stone wall made of bricks with green moss growing between them.
A man holding a camera stands in a field of grass under a clear sky.
The surface of the moon is covered with craters, rocks and dust in shades of grey.
Many small galaxies and stars shine in the deep dark space of the night sky.
A close view of the retina of an eye with red blood vessels on an orange background.
A field of green grass with small flowers and a few leaves in bright sunlight.
Gravel and small stones of different colors lie on the ground near a path.
The picture is sharp and clear, with fine textures, natural colors and soft light.
There is a tree with green leaves, a house with a red roof and a car on the road.
People are walking along the beach near the water while the sun sets over the sea.
A dog runs across a garden with a ball in its mouth while children play nearby.
The mountains in the background are covered with snow and the lake reflects the sky.
"""


def _train_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained locally (no download), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    lines = _CORPUS.splitlines()
    tok.train_from_iterator(lines * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Llama-style: BOS in front of every encoded prompt, as LLaVA-1.5's tokenizer does.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def _suppressed_ids(tokenizer) -> list[int]:
    """Token ids the random model may not generate: special tokens other than EOS and
    tokens that are not (space +) letters, so captions decode to readable words."""
    word = re.compile(r"^ ?[A-Za-z]+$")
    keep_special = {tokenizer.eos_token_id}
    out = []
    for tid in range(len(tokenizer)):
        if tid in keep_special:
            continue
        text = tokenizer.decode([tid])
        if tid in tokenizer.all_special_ids or not word.match(text):
            out.append(tid)
    return out


def build_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save (safetensors) a tiny random LLaVA model + processor into ``out_dir``.

    Loadable with ``LlavaForConditionalGeneration.from_pretrained(out_dir)`` and
    ``AutoProcessor.from_pretrained(out_dir)``; the same ``seed`` gives the same files'
    contents (weights, vocabulary, configs).
    """
    import torch
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
        LlavaForConditionalGeneration, LlavaProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    n_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped by the "default" strategy
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=n_tokens, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # At the default init (std 0.02) the ~30 text tokens drown the 4 image tokens and
        # every image gets the same caption. Larger vision and projector weights (image
        # features differ more), smaller token embeddings (attention output, which carries
        # the image, dominates the residual stream) and a larger lm_head (peaked logits)
        # make greedy output depend on the image. Tuned by eye on skimage's photos.
        g = torch.Generator().manual_seed(seed + 1)
        for lin in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            fan_in = lin.weight.shape[1]
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (6.0 / fan_in**0.5))
        for param in model.model.vision_tower.parameters():
            if param.dim() == 2:
                param.mul_(3.0)
        model.model.language_model.embed_tokens.weight.mul_(0.5)
        lm_head = model.lm_head.weight
        lm_head.copy_(torch.randn(lm_head.shape, generator=g) * (2.0 / lm_head.shape[1] ** 0.5))

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
        min_new_tokens=MIN_NEW_TOKENS, suppress_tokens=_suppressed_ids(tokenizer),
    )

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":  # python -m demo_fixtures.tiny_llava OUT_DIR
    import sys

    print(build_tiny_llava(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny/llava"))
