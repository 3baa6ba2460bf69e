"""A ticket service for the OpenAPI adapter's tests, served by FastAPI, which writes the service's
OpenAPI document (/openapi.json, OpenAPI 3.1) from the code below: the gateway reads that
document, not one written for the test.

Operations (by operationId):
  get_ticket     GET    /tickets/{ticket_id}   path, query (array) and header parameters
  create_ticket  POST   /tickets               JSON body and a query flag; answers 201
  close_ticket   DELETE /tickets/{ticket_id}
  broken_ticket  GET    /broken/{ticket_id}    answers a body its documented schema refuses

Every request the operations receive is kept, as sent (method, raw path, raw query, the headers
that matter, body), and listed at /_seen, which the document does not show, so the tests can
check what the gateway sent. Prints the port on stdout once it listens.
"""

import asyncio
import socket
import sys
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

app = FastAPI(title="Tickets", version="1.0.0")
SEEN = []
KEPT_HEADERS = ("authorization", "idempotency-key", "traceparent", "x-region", "content-type")


async def keep(request: Request):
    SEEN.append(
        {
            "method": request.method,
            "rawPath": request.scope["raw_path"].decode(),
            "query": request.scope["query_string"].decode(),
            "headers": {k: v for k, v in request.headers.items() if k in KEPT_HEADERS},
            "body": (await request.body()).decode(),
        }
    )


class Ticket(BaseModel):
    id: str
    title: str
    status: Literal["open", "closed"]
    priority: Literal["low", "high"]


class NewTicket(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    priority: Literal["low", "high"] = "low"


@app.get("/tickets/{ticket_id}", operation_id="get_ticket", response_model=Ticket)
async def get_ticket(
    request: Request,
    ticket_id: str,
    fields: Annotated[list[str], Query()] = [],
    x_region: Annotated[str | None, Header()] = None,
):
    """Reads one ticket."""
    await keep(request)
    return Ticket(id=ticket_id, title=f"fields={','.join(fields)} region={x_region}", status="open", priority="low")


@app.post("/tickets", operation_id="create_ticket", response_model=Ticket, status_code=201)
async def create_ticket(request: Request, ticket: NewTicket, notify: bool = False):
    """Opens a ticket."""
    await keep(request)
    return Ticket(id="T-100", title=f"{ticket.title} notify={notify}", status="open", priority=ticket.priority)


@app.delete("/tickets/{ticket_id}", operation_id="close_ticket", response_model=Ticket)
async def close_ticket(request: Request, ticket_id: str):
    """Closes a ticket."""
    await keep(request)
    return Ticket(id=ticket_id, title="closed", status="closed", priority="low")


@app.get("/broken/{ticket_id}", operation_id="broken_ticket", response_model=Ticket)
async def broken_ticket(request: Request, ticket_id: str):
    """Documented as a ticket; answers something else."""
    await keep(request)
    return JSONResponse({"id": 7, "status": "lost"})


@app.get("/_seen", include_in_schema=False)
async def seen():
    return SEEN


@app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def elsewhere(request: Request, rest: str):
    """Any other path: kept too, so a request that escaped its operation's path is seen."""
    await keep(request)
    return JSONResponse({"detail": "Not Found"}, status_code=404)


def main():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    # Listening before the port is printed: the tests connect as soon as they read it.
    sock.listen(128)
    print(sock.getsockname()[1], flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    sys.exit(main())
