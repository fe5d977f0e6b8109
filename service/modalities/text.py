"""The ``text`` modality: completions and language-model loss."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, Field, StrictBool, StrictInt, WithJsonSchema, model_validator

from service.codecs import DecodeError, decode_array, is_array_dict
from service.modalities.base import ModalityAdapter, Number, RequestBase, ResponseBase, checked_batch, each
from vla_foundry.errors import InvalidInputError
from vla_foundry.pipelines.interfaces import TextServing
from vla_foundry.pipelines.text import TextEvaluation
from vla_foundry.sampling import SamplingParams

_DEFAULTS = SamplingParams()


def _token_rows(value: Any) -> Any:
    """Token ids as rows: one list of ints, a list of such lists, or a typed integer array (1-D or 2-D).

    Strict: "1", 1.0 and true are not token ids.
    """
    if value is None:
        return None
    if is_array_dict(value):
        try:
            array = decode_array(value)
        except DecodeError as e:
            raise ValueError(str(e)) from e
        if array.dtype.kind not in "iu":
            raise ValueError(f"token id arrays must have an integer dtype; got {array.dtype.str}")
        if array.ndim not in (1, 2):
            raise ValueError(f"token id arrays must be 1-D or 2-D; got shape {list(array.shape)}")
        value = array.tolist()
    if isinstance(value, list) and all(type(t) is int for t in value) and value:
        value = [value]
    if not (isinstance(value, list) and all(isinstance(r, list) and all(type(t) is int for t in r) for r in value)):
        raise ValueError("must be token ids: a list of ints, a list of such lists, or an integer array")
    if any(not -2**63 <= t < 2**63 for row in value for t in row):  # (no vocabulary comes near; a model process's
        raise ValueError("token ids must be 64-bit integers")  # channel carries no larger ones)
    return value


# What /openapi.json says a token-id field takes: every form ``_token_rows`` reads (it always yields a list of rows).
TOKEN_ROWS_SCHEMA = {"anyOf": [
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "description": "One sequence."},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}, "description": "Sequences."},
    {"type": "object", "description": "An integer typed array, 1-D or 2-D (service/codecs.py).",
     "properties": {"dtype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                    "data": {"type": "string", "contentEncoding": "base64"}},
     "required": ["dtype", "shape", "data"]}]}
TokenRows = Annotated[list[list[int]], BeforeValidator(_token_rows), WithJsonSchema(TOKEN_ROWS_SCHEMA)]


def stop_list(stop: Union[None, str, list[str]]) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def usage_of(result, n: int = 1) -> dict:
    """Token counts; ``n``: choices per prompt (each prompt's row ran n times, and counts once, as OpenAI counts)."""
    prompt_tokens = result.prompt_tokens // n
    return {"prompt_tokens": prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": prompt_tokens + result.completion_tokens}


def _rows(value):
    """A single prompt string → a list of one."""
    return [value] if isinstance(value, str) else value


class SamplingFields(RequestBase):
    """The generation settings every text-producing request shares."""

    max_new_tokens: StrictInt = Field(_DEFAULTS.max_new_tokens, ge=1,
                                      description="New tokens per prompt (at most VLA_MAX_NEW_TOKENS).")
    temperature: Number = Field(_DEFAULTS.temperature, ge=0, description="0 (or below 1e-5) = greedy.")
    top_k: StrictInt = Field(_DEFAULTS.top_k, ge=0, lt=2**31, description="0 = off.")
    top_p: Number = Field(_DEFAULTS.top_p, gt=0, le=1, description="1 = off.")
    stop: Optional[Union[str, list[str]]] = Field(None, description="Stop strings (not included in the text).")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63, description="Same seed, same request ⇒ same tokens.")
    use_cache: StrictBool = Field(True, description="Use the KV cache: faster; the same tokens when greedy (sampled "
                                              "tokens may differ, as prompts of different lengths then run apart).")

    @model_validator(mode="after")
    def _check_sampling(self):
        if self.max_new_tokens > self.cap_max_new_tokens:
            if "max_new_tokens" not in self.model_fields_set:  # the default, over a smaller cap: the cap
                self.max_new_tokens = self.cap_max_new_tokens
                return self
            raise InvalidInputError(f"max_new_tokens must be <= {self.cap_max_new_tokens}; got {self.max_new_tokens}",
                                    field="max_new_tokens")
        return self

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    def stop_strings(self) -> list[str]:
        return stop_list(self.stop)

    def generation_settings(self) -> dict:
        """The keywords a pipeline's ``complete``/``caption`` (and their ``start_*``) take from these fields."""
        return {"sampling": self.sampling(), "stop": self.stop_strings(), "seed": self.seed}


class TextPredictRequest(SamplingFields):
    prompt: Optional[Union[str, list[str]]] = Field(None, description="One prompt or a list (needs a tokenizer).")
    prompt_token_ids: Optional[TokenRows] = Field(None, description="Token ids: one list, a list of lists, or an "
                                                                   "integer array.")

    @model_validator(mode="after")
    def _check(self):
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise InvalidInputError("give exactly one of `prompt` or `prompt_token_ids`", field="prompt")
        check_prompt_rows(self)
        return self


def prompt_count(request) -> int:
    """How many prompts a request gives (``prompt`` rows or ``prompt_token_ids`` rows; 0 for none)."""
    return len(_rows(request.prompt) or request.prompt_token_ids or [])


def check_prompt_rows(request) -> None:
    """At most the app's batch of prompts (``prompt`` rows or ``prompt_token_ids`` rows); refused naming the field
    the client sent."""
    count = prompt_count(request)
    if count > request.cap_batch:
        given = "prompt_token_ids" if request.prompt_token_ids is not None else "prompt"
        raise InvalidInputError(f"at most {request.cap_batch} prompts per request; got {count}", field=given)


class CompletionOut(BaseModel):
    text: Optional[str] = Field(None, description="None when the deployment has no tokenizer.")
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TextPredictResponse(ResponseBase):
    completions: list[CompletionOut]
    usage: Usage
    seed: int


def completion_payload(result, key: str = "completions") -> dict:
    """A pipeline's ``CompletionResult`` as the response body."""
    return {
        key: [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
              for c in result.completions],
        "usage": usage_of(result),
        "seed": result.seed,
    }


def predict_one(pipeline: TextServing, request: TextPredictRequest):
    return pipeline.complete(_rows(request.prompt), request.prompt_token_ids, use_cache=request.use_cache,
                             **request.generation_settings())


def start_one(pipeline: TextServing, request: TextPredictRequest):
    """The request's generation for the deployment's continuous batcher (without the cache: its result)."""
    if not request.use_cache:
        return predict_one(pipeline, request)
    return pipeline.start_completion(_rows(request.prompt), request.prompt_token_ids, **request.generation_settings())


def encode_completions(request, result) -> dict:
    return completion_payload(result)


class TextEvaluateRequest(RequestBase):
    input_ids: Optional[TokenRows] = Field(None, description="Sequences to score (rows may differ in length).")
    attention_mask: Optional[TokenRows] = Field(None, description="1 = token, 0 = padding; same shape as input_ids.")
    texts: Optional[list[str]] = Field(None, description="Texts to score (needs a tokenizer).")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _check(self):
        if (self.input_ids is None) == (self.texts is None):
            raise InvalidInputError("give exactly one of `input_ids` or `texts`", field="input_ids")
        count = len(self.input_ids or self.texts or [])
        given = "input_ids" if self.input_ids is not None else "texts"  # (the field the client sent)
        if count == 0:
            raise InvalidInputError("the batch is empty; send at least one sequence", field=given)
        if count > self.cap_batch:
            raise InvalidInputError(f"at most {self.cap_batch} sequences per request; got {count}", field=given)
        return self


class TextEvaluateResponse(ResponseBase):
    loss: float
    num_samples: int
    num_tokens: int
    perplexity: Optional[float] = Field(None, description="exp(loss); null when it overflows.")
    seed: int


def check_evaluate(pipeline: TextServing, request: TextEvaluateRequest) -> TextEvaluation:
    return TextEvaluation(request.input_ids, request.attention_mask, request.texts, request.seed)


def evaluate_each(pipeline: TextServing, evaluations: list[TextEvaluation]) -> list:
    return pipeline.evaluate_each(evaluations)


# Several clients' evaluations in one forward pass; each gets the loss it gets alone (over its own tokens).
evaluate = checked_batch(check_evaluate, evaluate_each)

# Only small evaluations share a call: a shared call of max_batch_size of them is then never larger than what one
# request may be alone (its logits are rows × length × vocabulary); a larger one runs alone.
SHARED_EVALUATION_TOKENS = 2048


def evaluate_batch_key(request: TextEvaluateRequest) -> Optional[str]:
    # Characters bound a text's tokens from above for the tokenizers here (a token is at least one character).
    size = sum(map(len, request.input_ids)) if request.input_ids is not None else sum(map(len, request.texts))
    return "evaluate" if size <= SHARED_EVALUATION_TOKENS else None


# Generation: requests decode together in the deployment's continuous batcher (start_one), or one request per
# model call where it has none (predict_one). Evaluations queued together share one forward pass.
ADAPTER = ModalityAdapter(TextPredictRequest, TextPredictResponse, each(predict_one),
                          TextEvaluateRequest, TextEvaluateResponse, evaluate,
                          encode_predict=encode_completions, evaluate_batch_key=evaluate_batch_key,
                          start_predict=start_one, generation_rows=prompt_count)
