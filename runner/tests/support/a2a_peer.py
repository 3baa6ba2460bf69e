"""A2A peer for ContextOS's interop tests, built on the official Python SDK (a2a-sdk).

Serves several agents on one loopback port, each under its own path, all run by the SDK's own
request handler, task store and JSON-RPC routes:

  /plain      answers SendMessage, no streaming
  /stream     the same agent, streaming (SendStreamingMessage over SSE)
  /ceiling    declares, in its card, that it may act up to risk `destructive`
  /elsewhere  a card whose JSON-RPC endpoint is on another port (the gateway must not follow)

Skills (the message's metadata `skill`): `echo` completes with what it received (text, data,
delegation) as an artifact; `ask` stops with TASK_STATE_INPUT_REQUIRED and completes with the
answer (an answer of `again` asks a second question first); `slow` works until cancelled;
`nag` asks again after every answer (often in the same words, in a new status message);
`fail` fails. `GET /seen` lists the requests received (method, ids, headers), so a test can
check what the gateway sent. Prints the port on stdout once it listens.
"""

import asyncio
import json
import socket
import sys

import uvicorn
from google.protobuf.json_format import MessageToDict
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from a2a.helpers.proto_helpers import new_task_from_user_message, new_text_message
from a2a.server.agent_execution import AgentExecutor
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentSkill,
    Part,
    TaskState,
)

SEEN = []
RISK_CEILING = "https://contextos.dev/a2a/risk-ceiling/v1"


class Peer(AgentExecutor):
    async def execute(self, context, event_queue):
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        metadata = MessageToDict(context.message.metadata) if context.message.metadata else {}
        # A follow-up message carries no metadata of its own: the skill is the task's first.
        first = task.history[0].metadata if task.history else None
        skill = metadata.get("skill") or (MessageToDict(first).get("skill", "") if first else "")
        text = "\n".join(p.text for p in context.message.parts if p.HasField("text"))
        data = [MessageToDict(p.data) for p in context.message.parts if p.HasField("data")]
        say = lambda words: new_text_message(words, context_id=task.context_id, task_id=task.id)
        if skill == "echo":
            await updater.start_work()
            received = {
                "text": text,
                "data": data,
                "delegation": metadata.get("contextos.dev/delegation"),
                "messageId": context.message.message_id,
            }
            await updater.add_artifact(
                [Part(text="echo: " + (text or json.dumps(data, sort_keys=True)))], name="echo"
            )
            data_part = Part()
            data_part.data.struct_value.update(received)
            await updater.add_artifact([data_part], name="received")
            await updater.complete()
        elif skill == "ask":
            asked = sum(
                1 for m in task.history if m.role == 2 and any(p.text.endswith("?") for p in m.parts)
            )
            if task.status.state != TaskState.TASK_STATE_INPUT_REQUIRED:
                await updater.requires_input(say("Which region should the refund go to?"))
            elif text == "again" and asked < 2:
                await updater.requires_input(say("Are you sure? Name the region once more?"))
            else:
                await updater.add_artifact([Part(text=f"refund sent to {text}")], name="refund")
                await updater.complete()
        elif skill == "nag":
            # Asks again whatever it is told, with a new status message each time.
            await updater.requires_input(say("Are you sure?"))
        elif skill == "slow":
            await updater.start_work()
            for _ in range(600):
                await asyncio.sleep(0.1)
            await updater.complete()
        else:
            await updater.failed(say("no such order"))

    async def cancel(self, context, event_queue):
        task = context.current_task
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.cancel(new_text_message("cancelled by the caller", context_id=task.context_id, task_id=task.id))


def card(name, url, streaming, extensions=()):
    skills = [
        AgentSkill(id=s, name=s, description=f"the {s} skill", tags=["test"])
                for s in ("echo", "ask", "slow", "fail", "nag")
    ]
    return AgentCard(
        name=name,
        description=f"ContextOS interop peer ({name})",
        version="1.0.0",
        supported_interfaces=[AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=streaming, extensions=list(extensions)),
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain", "application/json"],
        skills=skills,
    )


def agent(path, agent_card):
    handler = DefaultRequestHandler(
        agent_executor=Peer(), task_store=InMemoryTaskStore(), agent_card=agent_card
    )
    routes = create_agent_card_routes(agent_card) + create_jsonrpc_routes(handler, rpc_url="/rpc")
    return Mount(path, routes=routes)


class Record(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        if request.method == "POST":
            body = await request.body()
            try:
                rpc = json.loads(body)
            except ValueError:
                rpc = {}
            params = rpc.get("params") or {}
            message = params.get("message") or {}
            SEEN.append(
                {
                    "path": request.url.path,
                    "method": rpc.get("method"),
                    "messageId": message.get("messageId"),
                    "taskId": message.get("taskId") or params.get("id"),
                    "a2aVersion": request.headers.get("a2a-version"),
                    "traceparent": request.headers.get("traceparent"),
                    "idempotencyKey": request.headers.get("idempotency-key"),
                    "authorization": request.headers.get("authorization"),
                }
            )
        return await call_next(request)


async def seen(_request):
    return JSONResponse(SEEN)


def main():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    ceiling = AgentExtension(uri=RISK_CEILING, description="risk ceiling")
    ceiling.params.update({"maxRisk": "destructive"})
    routes = [
        Route("/seen", seen),
        agent("/plain", card("plain", f"{base}/plain/rpc", False)),
        agent("/stream", card("stream", f"{base}/stream/rpc", True)),
        agent("/ceiling", card("ceiling", f"{base}/ceiling/rpc", False, [ceiling])),
        agent("/elsewhere", card("elsewhere", f"http://127.0.0.1:{port + 1}/rpc", False)),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(Record)
    print(port, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    sys.exit(main())
