"""tinker-cookbook support: the base model's renderer, registered with the cookbook.

``import jaxreg.cookbook`` (the one import a cookbook script needs) installs the base
tokenizer into the HuggingFace hub cache (``jaxreg.service.tokenizer``) and registers
``RENDERER_NAME`` with ``tinker_cookbook.renderers.register_renderer``. The renderer
spells a conversation in the service's task format: a user turn is its content followed
by ``>``; an assistant turn is its content followed by the end-of-turn ``\\n`` (the
tokenizer's EOS); a prompt starts with ``<bos>``. So ``[user "R123", assistant "321"]``
renders as ``<bos>R123>321\\n``, exactly a ``jaxreg.service.tasks.make_example`` text.

Example (needs tinker-cookbook, so not run as a doctest)::

    import jaxreg.cookbook  # noqa: F401
    from tinker_cookbook import renderers, tokenizer_utils
    tok = tokenizer_utils.get_tokenizer("jaxreg/base")
    r = renderers.get_renderer("jaxreg/digits", tok)
"""

from __future__ import annotations

import tinker
from tinker_cookbook import renderers
from tinker_cookbook.renderers.base import (
    Message,
    ParseTermination,
    RenderContext,
    RenderedMessage,
    Renderer,
    ToolSpec,
    ensure_text,
)

from jaxreg.service.tokenizer import TOKENIZER_ID, install_tokenizer

__all__ = ["MODEL_NAME", "RENDERER_NAME", "DigitsRenderer"]

MODEL_NAME = TOKENIZER_ID
"""The base model's ``org/model`` name (the service also accepts ``jaxreg-base``)."""

RENDERER_NAME = "jaxreg/digits"
"""The name ``DigitsRenderer`` is registered under in the cookbook."""

_END = "\n"
_PROMPT_END = ">"


class DigitsRenderer(Renderer):
    """Renders conversations in the base model's ``<task><digits>><answer>\\n`` format."""

    @property
    def has_extension_property(self) -> bool:
        """Nothing is stripped from history, so rendering extends previous renders."""
        return True

    @property
    def _bos_tokens(self) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.bos_token, add_special_tokens=False)

    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        """A user turn renders as ``content>``; an assistant turn as ``content\\n``."""
        suffix = _END if message["role"] == "assistant" else _PROMPT_END
        text = ensure_text(message["content"]) + suffix
        output = [
            tinker.types.EncodedTextChunk(
                tokens=self.tokenizer.encode(text, add_special_tokens=False)
            )
        ]
        return RenderedMessage(header=None, output=output)

    def get_stop_sequences(self) -> list[int]:
        """Generation stops at the end-of-turn token ``\\n``."""
        return [self.tokenizer.eos_token_id]

    def parse_response(self, response: list[int]) -> tuple[Message, ParseTermination]:
        """The assistant message of sampled tokens; EOS when it ended with ``\\n``."""
        eos = self.tokenizer.eos_token_id
        if response and response[-1] == eos:
            text = str(self.tokenizer.decode(response[:-1]))
            return Message(role="assistant", content=text), ParseTermination.EOS
        text = str(self.tokenizer.decode(response))
        return Message(role="assistant", content=text), ParseTermination.MALFORMED

    def create_conversation_prefix_with_tools(
        self, tools: list[ToolSpec], system_prompt: str = ""
    ) -> list[Message]:
        """Not supported: the base vocabulary has no tool-calling format."""
        raise NotImplementedError("DigitsRenderer does not support tool calling")


install_tokenizer()
renderers.register_renderer(
    RENDERER_NAME, lambda tokenizer, image_processor=None: DigitsRenderer(tokenizer)
)
