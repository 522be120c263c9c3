"""A scripted stand-in for an engine, for unit tests of the code around one (retries, parsing, rejection
reasons, what a stage sends). Features are verified with the real engines, never with this."""

from __future__ import annotations

from m3t_gen.backends.base import Backend, GenerationRequest, GenerationResult


class ScriptedBackend(Backend):
    """Answers from a script, one item per request in request order: a text (a clean stop, ``output_tokens``
    tokens) or a whole :class:`GenerationResult` (errors, reasoning). Records every request it was sent."""

    name = "scripted"

    def __init__(self, answers: list[str | GenerationResult], output_tokens: int = 0) -> None:
        self.answers = list(answers)
        self.output_tokens = output_tokens
        self.requests: list[GenerationRequest] = []

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.requests]

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.requests += requests
        return [self._result(self.answers.pop(0)) for _ in requests]

    def _result(self, answer: str | GenerationResult) -> GenerationResult:
        if isinstance(answer, GenerationResult):
            return answer
        return GenerationResult(text=answer, finish_reason="stop", output_tokens=self.output_tokens)
