"""How a caption becomes the MLLM's text beyond the family's chat template: part of a checkpoint's prompt format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptLayout:
    """How a caption becomes the MLLM's text beyond the chat template: part of a checkpoint's prompt format."""

    suffix: str = ""  # text after the generation prompt, before the query slots (reference imports: "\n")
    # a whole prompt with "{caption}" where the (stripped) caption goes, used instead of the chat template, system
    # prompt and suffix (OpenUni imports); it takes no input images
    template: str = ""
    empty: str | None = None  # with a template: the whole prompt for an empty caption (None: the template with "")

    def __post_init__(self) -> None:
        if self.template and "{caption}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} has no '{{caption}}' where the caption goes")
        if self.empty is not None and not self.template:
            raise ValueError("an empty-caption prompt needs a prompt template")

    def fill(self, caption: str, mark: str) -> tuple[str, str]:
        """The templated prompt of one caption, with `mark` where the caption goes, and the caption to put there."""
        caption = caption.strip()
        if not caption and self.empty is not None:
            return self.empty + mark, ""
        return self.template.replace("{caption}", mark), caption


PLAIN = PromptLayout()  # the family's chat template as it is
