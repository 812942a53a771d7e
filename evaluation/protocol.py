"""LLaVA-1.5's own evaluation protocol (llava/eval/model_vqa_loader.py with `--conv-mode vicuna_v1` and the
model's `image_aspect_ratio=pad`), each part selectable alone, so numbers line up with the pruning literature.

  pad_square  the image centred on a square of the processor's `image_mean` colour (LLaVA's `expand2square`)
              before the processor resizes and crops it;
  system      the vicuna_v1 conversation: its system line, then " USER: <image>\\n{text} ASSISTANT:";
  ocr         TextVQA: "\\nReference OCR token: a, b, c" after the question (no line when a question has none),
              as in LLaVA's llava_textvqa_val_v051_ocr.jsonl;
  instruction LLaVA's short-answer instruction ("\\nAnswer the question using a single word or phrase.") ending the
              user text, added once: question files that already carry it (LLaVA's jsonl) are parsed back to their
              parts.
"""
import dataclasses
from collections.abc import Sequence

from PIL import Image

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CONVERSATION = "USER: <image>\n{question} ASSISTANT:"
INSTRUCTION = "Answer the question using a single word or phrase."
OCR_PREFIX = "Reference OCR token: "


@dataclasses.dataclass(frozen=True)
class Protocol:
    pad_square: bool = True
    system: bool = True
    ocr: bool = True
    instruction: bool = True

    @property
    def template(self) -> str:
        """The prompt template with one <image> and {question} (the user text)."""
        return f"{SYSTEM} {CONVERSATION}" if self.system else CONVERSATION

    def user_text(self, question: str, ocr_tokens: Sequence[str] | None) -> str:
        ocr = f"\n{OCR_PREFIX}{', '.join(ocr_tokens)}" if self.ocr and ocr_tokens else ""
        return f"{question}{ocr}" + (f"\n{INSTRUCTION}" if self.instruction else "")

    def image(self, image: Image.Image, fill: Sequence[float]) -> Image.Image:
        """The image as LLaVA hands it to the processor; `fill` is the processor's image_mean (0-1 floats)."""
        return expand2square(image, tuple(int(c * 255) for c in fill)) if self.pad_square else image


PROTOCOLS = {
    "llava15": Protocol(),  # LLaVA-1.5's published GQA / TextVQA numbers
    # the processor's centre crop, no system line, no OCR: the harness's protocol before this preset
    "plain": Protocol(pad_square=False, system=False, ocr=False),
}


def expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """`image` centred on a square canvas of colour `fill` (the longer side; offsets rounded down)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def parse_user_text(text: str) -> tuple[str, tuple[str, ...] | None]:
    """(question, OCR tokens or None) of a user text in LLaVA's question-file form; ValueError if it is not."""
    suffix = "\n" + INSTRUCTION
    if not text.endswith(suffix):
        raise ValueError(f"does not end with LLaVA's instruction {INSTRUCTION!r}")
    body = text[:-len(suffix)]
    question, sep, ocr = body.partition("\n" + OCR_PREFIX)
    if "\n" in question or "\n" in ocr:
        raise ValueError("has lines other than the question, the OCR tokens and the instruction")
    return question, (tuple(ocr.split(", ")) if sep else None)
