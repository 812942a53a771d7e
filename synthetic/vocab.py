"""Tokenizer and image-processor files of the bundled model, readable by transformers.

The tokenizer is word-level (tokenizers' WordLevel model, whitespace + punctuation pre-tokenizer, no
normaliser: case matters) over exactly the words of the prompt template, every benchmark question and every
answer; `<s>` is prepended to every encoding, as LLaVA-1.5's tokenizer does. Ids: <unk> 0, <s> 1, </s> 2,
<pad> 3, <image> 4, then the words in sorted order.

The image processor is transformers' CLIP processor at the generator's size (resize shortest edge and centre
crop to image_size, which is the identity on generated images) with OpenAI-CLIP mean/std: the same
normalisation as LLaVA-1.5, so any image goes through the processor exactly as it would for a real LLaVA.

    python -m svdprune_jax.synthetic.vocab OUT_DIR      # writes tokenizer.json, tokenizer_config.json, preprocessor_config.json
"""

import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from svdprune_jax.synthetic.scene import SceneConfig
from svdprune_jax.synthetic.samples import ANSWERS, training_questions

UNK, BOS, EOS, PAD, IMAGE_TOKEN = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE_TOKEN)
PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's template; the answer follows, then </s>
FOLLOW_UP = "USER: {question} ASSISTANT:"  # a later turn of the same conversation (after "{answer}</s>")


def prompt(question: str) -> str:
    return PROMPT.format(question=question)


def follow_up(question: str) -> str:
    return FOLLOW_UP.format(question=question)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])


def words() -> list[str]:
    """Every word of the prompt template, the questions training asks and the answers, sorted."""
    answers = [a for family_answers in ANSWERS.values() for a in family_answers]
    texts = [prompt("").replace(IMAGE_TOKEN, " "), *training_questions(), *answers]
    split = _pre_tokenizer()
    return sorted({w for text in texts for w, _ in split.pre_tokenize_str(text)})


def build_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *words()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # matched whole before pre-tokenising, never split
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    return tok


def hf_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, extra_special_tokens={"image_token": IMAGE_TOKEN})


def image_processor(cfg: SceneConfig = SceneConfig()) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size},
                                 crop_size={"height": cfg.image_size, "width": cfg.image_size},
                                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


def save_processor_files(out_dir: str | Path, cfg: SceneConfig = SceneConfig()) -> Path:
    """Writes tokenizer.json, tokenizer_config.json and preprocessor_config.json into out_dir."""
    out = Path(out_dir)
    hf_tokenizer().save_pretrained(out)
    image_processor(cfg).save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m svdprune_jax.synthetic.vocab OUT_DIR")
    print(save_processor_files(sys.argv[1]))
