"""An LLM agent: pass the SDK's usage object and agentwatch reads the token counts from it.

    python examples/agents/openai_style_agent.py

``usage=`` accepts OpenAI (chat or responses) and Anthropic usage objects, or plain dicts, without
agentwatch importing either SDK. The client below is a stand-in with OpenAI's response shape, so
the example needs no network and no API key.
"""

import random
import time
from dataclasses import dataclass

import producers
from producers import heartbeat


@dataclass
class Usage:  # the fields of openai.types.CompletionUsage
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class Completion:
    model: str
    content: str
    usage: Usage


class FakeCompletions:
    def create(self, model: str, messages: list[dict[str, str]]) -> Completion:
        time.sleep(0.05)
        prompt, answer = random.randint(300, 900), random.randint(50, 200)
        return Completion(model, "...", Usage(prompt, answer, prompt + answer))


class FakeChat:
    completions = FakeCompletions()


class FakeOpenAI:  # stands in for openai.OpenAI()
    chat = FakeChat()


def main() -> None:
    producers.init(agent="openai-style-agent", interval=0.1)
    client = FakeOpenAI()
    for question in ["plan", "search", "draft", "review", "publish"]:
        response = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": question}]
        )
        heartbeat(usage=response.usage, model=response.model, fp=question)

    # A step known to take longer than the usual interval: say so first, so neither the
    # silence nor the stall detector fires while it runs.
    producers.extend(60)
    time.sleep(0.2)  # e.g. a long batch job
    heartbeat()

    producers.shutdown()  # a deliberate stop: the pipeline retires the agent, no alert


if __name__ == "__main__":
    main()
