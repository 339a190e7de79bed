"""An LLM-style model (MLflow models-from-code): a ``ChatModel``, whose signature MLflow sets (chat
messages in, a chat completion out). It echoes the last message in capitals, deterministically (the
completion's ``created`` is fixed), so two servers can be compared answer for answer. Used by
tests/test_compat_mlflow_serve.py, side by side with `mlflow models serve`.
"""

import mlflow
from mlflow.pyfunc import ChatModel
from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage


class EchoChatModel(ChatModel):
    def predict(self, context, messages, params):
        text = messages[-1].content.upper()
        if params.max_tokens is not None:
            text = " ".join(text.split()[: params.max_tokens])
        choice = ChatChoice(index=0, message=ChatMessage(role="assistant", content=text), finish_reason="stop")
        return ChatCompletionResponse(choices=[choice], id="echo-1", model="echo", created=0)


mlflow.models.set_model(EchoChatModel())
