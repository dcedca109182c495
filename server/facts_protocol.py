"""Pydantic models of the admin API for facts and memorization jobs (mome's own API)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.protocol import ChatMessage, RequestModel

_TEXT = {"type": "string", "minLength": 1}
_ABSENT = {"type": "null"}


def _form(required: list[str], **fields) -> dict:
    absent = {"messages", "question", "answer", "prompt", "completion"} - set(fields)
    return {"required": required, "properties": {**fields, **dict.fromkeys(absent, _ABSENT),
                                                  "subject": {"anyOf": [_TEXT, _ABSENT]}}}


# `_one_form` in JSON Schema, so that the document says which facts are well formed (blank text
# and a last message not from the user stay rules of the validator alone).
_FORMS = {"anyOf": [
    _form(["question", "answer"], question=_TEXT, answer=_TEXT),
    _form(["messages", "answer"], messages={"type": "array", "minItems": 1}, answer=_TEXT),
    _form(["prompt", "completion"], prompt=_TEXT, completion=_TEXT),
]}


class FactIn(RequestModel):
    """A chat-style fact (`messages` or `question`, plus `answer`) or a completion-style fact
    (`prompt`, plus `completion`). `subject` optionally names the entity the fact is about."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_FORMS)

    messages: list[ChatMessage] | None = None
    question: str | None = None
    answer: str | None = None
    prompt: str | None = None
    completion: str | None = None
    subject: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> FactIn:
        chat = self.messages is not None or self.question is not None
        completion = self.prompt is not None
        if chat == completion:
            raise ValueError("a fact has either `messages`/`question` (chat) or `prompt` "
                             "(completion), not both and not neither")
        if chat:
            if self.messages is not None and self.question is not None:
                raise ValueError("give `messages` or `question`, not both")
            if self.messages is not None and (not self.messages
                                              or self.messages[-1].role != "user"):
                raise ValueError("`messages` must end with a user message")
            if self.question is not None and not self.question.strip():
                raise ValueError("`question` is empty")
            if not self.answer or not self.answer.strip():
                raise ValueError("a chat fact needs a non-empty `answer`")
            if self.completion is not None:
                raise ValueError("`completion` belongs to completion facts; use `answer`")
        else:
            if not self.prompt.strip():
                raise ValueError("`prompt` is empty")
            if not self.completion or not self.completion.strip():
                raise ValueError("a completion fact needs a non-empty `completion`")
            if self.answer is not None:
                raise ValueError("`answer` belongs to chat facts; use `completion`")
        if self.subject is not None and not self.subject.strip():
            raise ValueError("`subject` is empty")
        return self

    @property
    def kind(self) -> str:
        return "completion" if self.prompt is not None else "chat"

    def payload(self) -> dict:
        data = self.model_dump(exclude_none=True, mode="json")
        if self.messages is not None:  # as the chat template reads them: roles and plain text
            data["messages"] = [m.template_message() for m in self.messages]
        return data


MAX_FACTS_PER_REQUEST = 10_000


class FactsRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")
    facts: list[FactIn] = Field(min_length=1, max_length=MAX_FACTS_PER_REQUEST)


class FactsAccepted(BaseModel):
    job_id: str
    fact_ids: list[str]


FactStatus = Literal["queued", "training", "memorized", "failed", "superseded"]


class FactOut(BaseModel):
    id: str
    kind: str
    status: FactStatus
    fact: dict
    job_id: str | None
    experts: list[int]
    steps: int
    loss: float | None
    error: str | None
    replaced_by: str | None = None  # set when a later fact with the same prompt replaced it
    created_at: float
    updated_at: float


class FactList(BaseModel):
    """One page of facts, oldest first (OpenAI's list shape: pass `last_id` as `after`)."""

    object: Literal["list"] = "list"
    data: list[FactOut]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class JobOut(BaseModel):
    id: str
    status: Literal["queued", "running", "done"]
    total: int
    memorized: int
    failed: int
    superseded: int  # replaced since by a later fact with the same prompt
    pending: int
    fact_ids: list[str]
    created_at: float
    finished_at: float | None
    seconds_per_fact: float | None
