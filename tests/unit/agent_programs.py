"""Agent programs written against the OpenAI chat API (the `openai` client), used by
test_agents.py through rollout.agent.program: they know nothing of megarlhf."""

import re

import openai

from megarlhf.agents.calc import evaluate


def solve(base_url, trajectory, row):
    """Asks, runs the calculator on a <tool>calc: ...</tool> request, asks again, grades."""
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": row["prompt"]}]
    for _ in range(3):
        reply = client.chat.completions.create(model="policy", messages=messages,
                                               user=trajectory)
        text = reply.choices[0].message.content
        messages.append({"role": "assistant", "content": text})
        call = re.search(r"<tool>calc:(.*?)</tool>", text)
        if not call:
            got = re.search(r"answer:\s*(-?\d+)", text)
            return float(got is not None and int(got.group(1)) == int(row["answer"]))
        messages.append({"role": "tool", "content": f"<result>{evaluate(call.group(1))}</result>"})
    return 0.0


def rewrites_history(base_url, trajectory, row):
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": row["prompt"]}]
    reply = client.chat.completions.create(model="policy", messages=messages, user=trajectory)
    messages.append({"role": "assistant", "content": reply.choices[0].message.content + " !"})
    messages.append({"role": "user", "content": "again"})
    client.chat.completions.create(model="policy", messages=messages, user=trajectory)
    return 1.0


def crashes(base_url, trajectory, row):
    raise RuntimeError("agent bug")


def no_number(base_url, trajectory, row):
    return "great"
