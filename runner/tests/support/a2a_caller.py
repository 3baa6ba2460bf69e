# A2A caller for ContextOS's interop tests, built on the official Python SDK (a2a-sdk): it calls a
# ContextOS agent through the gateway's A2A endpoint, as another team's agent would. It resolves
# the agent's card, sends a message streamed, and follows its task through input-required (an
# approval, given by the test meanwhile) to completed; then starts a second task and cancels it.
# Prints one JSON line per thing it sees; reads one line from stdin each time it waits on the test.
# Run: python a2a_caller.py <agent URL> <bearer token> <message id prefix>

import asyncio
import json
import sys

import httpx
from google.protobuf.json_format import MessageToDict, ParseDict

from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    SendMessageRequest,
    SubscribeToTaskRequest,
)


def say(**fields):
    print(json.dumps(fields), flush=True)


def wait_for_test():
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the test went away")


def request(message_id, text, data=None, return_immediately=False):
    parts = [{"text": text}]
    if data is not None:
        parts.append({"data": data})
    return ParseDict(
        {
            "message": {"messageId": message_id, "role": "ROLE_USER", "parts": parts},
            "configuration": {"returnImmediately": return_immediately},
        },
        SendMessageRequest(),
    )


def event_of(response):
    """One stream response as (kind, its JSON)."""
    for kind in ("task", "message", "status_update", "artifact_update"):
        if response.HasField(kind):
            return kind, MessageToDict(getattr(response, kind))
    raise SystemExit(f"an empty stream response: {response}")


async def main():
    url, token, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120)
    card = await A2ACardResolver(http, url).get_agent_card()
    say(event="card", card=MessageToDict(card))
    client = ClientFactory(ClientConfig(streaming=True, httpx_client=http)).create(card)

    # A task streamed until it waits on a person.
    task_id, state = None, None
    stream = client.send_message(
        request(f"{prefix}-1", "checkout-api returns 5xx since 10:00", {"service": "checkout-api"})
    )
    async for response in stream:
        kind, body = event_of(response)
        if kind == "task":
            task_id, state = body["id"], body["status"]["state"]
        elif kind == "status_update":
            state = body["status"]["state"]
        say(event="stream", kind=kind, body=body)
    say(event="paused", task=task_id, state=state)
    wait_for_test()

    # Followed again once the test approved; the output arrives before the task completes.
    async for response in client.subscribe(SubscribeToTaskRequest(id=task_id)):
        kind, body = event_of(response)
        say(event="resumed", kind=kind, body=body)
    task = MessageToDict(await client.get_task(GetTaskRequest(id=task_id)))
    say(event="final", task=task)

    # A second task, answered at once and cancelled.
    second = None
    polling = ClientFactory(ClientConfig(streaming=False, httpx_client=http)).create(card)
    async for response in polling.send_message(request(f"{prefix}-2", "look again", return_immediately=True)):
        kind, body = event_of(response)
        second = body["id"]
    cancelled = MessageToDict(await client.cancel_task(CancelTaskRequest(id=second)))
    say(event="cancelled", task=cancelled)
    await http.aclose()


asyncio.run(main())
