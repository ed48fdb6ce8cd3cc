"""How one text is embedded: every per-request option the encoders apply, in one typed record per
text, from the request rules (request_rules.encoder_request) to the encoders (TextEncoder.encode).
A new option is a field here, its request parameter's name in contract.py, its reading in
request_rules.py, and its effect in the encoders."""

from __future__ import annotations

from dataclasses import dataclass

from nvembed_triton.protocol import contract


@dataclass(frozen=True)
class TextOptions:
    instruction: str = ""  # put before the text; NV-Embed-v2 leaves its tokens out of the mean
    truncate: str = contract.TRUNCATE_END  # a text over max_length: END keeps its start, START its end, NONE refuses it

    @classmethod
    def each(cls, count: int, **options: str) -> list[TextOptions]:
        """The same options for `count` texts."""
        return [cls(**options)] * count
