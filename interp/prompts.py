"""The one prompt builder: what a model sees for a text and its images, for every analysis
(scoring, the causal analyses, similarity, occlusion, sweeps). :meth:`interp.model.LVLM.prompt`
delegates here.

Order: the processor's own chat template (one user turn: the images, then the text; with the
generation prompt); else the architecture's published chat format (:data:`FALLBACK_TEMPLATES`,
for a checkpoint saved without a template); else ``"<marker>\\n" * n_images + text``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatFormat:
    """An architecture's published single-turn chat format. ``image``: what one image becomes
    (``{marker}`` is the processor's image marker); ``prompt``: the user turn up to the
    assistant's first token, with ``{images}`` (the images, in order) and ``{text}``;
    ``answer_sep``: what the format puts between the prompt and the assistant's answer."""
    image: str
    prompt: str
    answer_sep: str

    def render(self, marker: str, text: str, n_images: int = 1) -> str:
        return self.prompt.format(images=self.image.format(marker=marker) * n_images, text=text)


_QWEN = ChatFormat("<|vision_start|>{marker}<|vision_end|>",
                   "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                   "{images}{text}<|im_end|>\n<|im_start|>assistant\n", "")

FALLBACK_TEMPLATES: dict[str, ChatFormat] = {
    "llava": ChatFormat("{marker}\n", "USER: {images}{text} ASSISTANT:", " "),
    "llava_next": ChatFormat("{marker}\n", "[INST] {images}{text} [/INST]", " "),
    "qwen2vl": _QWEN,
    "qwen25vl": _QWEN,
    "gemma3": ChatFormat("{marker}", "<start_of_turn>user\n{images}{text}<end_of_turn>\n<start_of_turn>model\n", ""),
}
"""Each architecture's published chat format (LLaVA-1.5 ``USER: <image>\\n… ASSISTANT:``,
LLaVA-v1.6-Mistral ``[INST] <image>\\n… [/INST]``, Qwen2-VL/2.5-VL ChatML, Gemma3-it), keyed by
adapter name; used only when a checkpoint's processor has no chat template of its own."""

PLAIN = ChatFormat("{marker}\n", "{images}{text}", " ")
"""For an architecture without a published format: the images then the text; an answer is
taken to follow after a space, as the next word of plain text does."""


def has_template(processor: Any) -> bool:
    """Whether the processor carries its own chat template."""
    return bool(getattr(processor, "chat_template", None))


def chat_format(adapter_name: str) -> ChatFormat:
    """The fallback format of an architecture (:data:`FALLBACK_TEMPLATES`, else :data:`PLAIN`)."""
    return FALLBACK_TEMPLATES.get(adapter_name, PLAIN)


def _user_turn(text: str, n_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def prompt(processor: Any, adapter_name: str, marker: str, text: str, n_images: int = 1) -> str:
    """The prompt string for ``text`` after ``n_images`` images (one ``marker`` each): the
    processor's chat template with the generation prompt when it has one, else the
    architecture's :data:`FALLBACK_TEMPLATES` entry, else ``marker\\n`` per image + text."""
    if has_template(processor):
        return processor.apply_chat_template([_user_turn(text, n_images)], add_generation_prompt=True)
    return chat_format(adapter_name).render(marker, text, n_images)
