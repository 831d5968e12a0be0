"""The `embed` model: text_input (optionally through the chat template) or input_ids -> prompt_embeds FP16,
with the checkpoint's own embedding matrix and an optional soft prompt in front. It stands where a user's own
encoder (multimodal, retrieval, soft-prompt) would stand in front of `llm` in an ensemble."""
from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import InvalidRequest
from ..model.spec import resolve_model
from .embedder import Embedder
from .triton_logging import dump_stacks_on_sigusr1

dump_stacks_on_sigusr1()  # where a stuck initialize stands, when the launcher asks


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v.get("string_value", "") for k, v in
                  json.loads(args["model_config"]).get("parameters", {}).items()}
        model_dir = params.get("model_dir") or os.environ.get("PAGEDLLM_MODEL_DIR", "")
        if not model_dir:
            raise ValueError("the embed model needs a checkpoint: set the `model_dir` parameter in config.pbtxt")
        model_dir = str(resolve_model(model_dir, relative_to=args["model_repository"]))  # as llm resolves it
        soft_prompt = params.get("soft_prompt") or None
        if soft_prompt and not os.path.isabs(soft_prompt):
            soft_prompt = os.path.join(args["model_repository"], soft_prompt)
        self.embedder = Embedder(model_dir, soft_prompt)
        self.chat_default = params.get("apply_chat_template", "false").lower() == "true"

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            text = pb_utils.get_input_tensor_by_name(request, "text_input")
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
            if (text is None) == (ids is None):
                raise InvalidRequest("prompt: send exactly one of text_input, input_ids")
            chat = pb_utils.get_input_tensor_by_name(request, "apply_chat_template")
            chat = self.chat_default if chat is None else bool(chat.as_numpy().reshape(-1)[0])
            if text is not None:
                raw = text.as_numpy().reshape(-1)
                if raw.size != 1:
                    raise InvalidRequest(f"text_input: expected one string, got {raw.size}")
                value = raw[0].decode("utf-8", "replace") if isinstance(raw[0], bytes) else str(raw[0])
                if not value:
                    raise InvalidRequest("text_input: the prompt is empty")
                token_ids = self.embedder.token_ids(value, chat)
            else:
                ids = ids.as_numpy().reshape(-1)
                self.embedder.check_count(ids.size)  # before anything proportional to it
                token_ids = ids.tolist()
            embeds = self.embedder.embed(token_ids).numpy().astype(np.float16)
        except InvalidRequest as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("prompt_embeds", embeds)])
