// A2A peer for ContextOS's interop tests, built on the official JavaScript SDK (@a2a-js/sdk):
// the same agents as a2a_peer.py — /plain (no streaming) and /stream, skills echo, ask, slow
// and fail — run by the SDK's DefaultRequestHandler, task store and Express JSON-RPC handler.
// `GET /seen` lists the JSON-RPC requests received. Prints the port once it listens.
// Run: node a2a_peer.mjs <node_modules dir holding @a2a-js/sdk and express>

import { createRequire } from 'node:module';
import path from 'node:path';

const modules = process.argv[2];
const require = createRequire(path.join(modules, 'noop.js'));
const express = require('express');
const { TaskState, Role } = require('@a2a-js/sdk');
const { DefaultRequestHandler, InMemoryTaskStore } = require('@a2a-js/sdk/server');
const { jsonRpcHandler, agentCardHandler, UserBuilder } = require('@a2a-js/sdk/server/express');

const seen = [];
const text = (value) => ({ content: { $case: 'text', value }, metadata: undefined, filename: '', mediaType: '' });
const data = (value) => ({ content: { $case: 'data', value }, metadata: undefined, filename: '', mediaType: '' });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function agentMessage(words, task) {
  return {
    messageId: `${task.taskId}-${Date.now()}-${Math.random()}`,
    contextId: task.contextId,
    taskId: task.taskId,
    role: Role.ROLE_AGENT,
    parts: [text(words)],
    metadata: undefined,
    extensions: [],
    referenceTaskIds: [],
  };
}

function status(ctx, state, message) {
  return {
    kind: 'statusUpdate',
    data: {
      taskId: ctx.taskId,
      contextId: ctx.contextId,
      status: { state, message, timestamp: new Date().toISOString() },
      metadata: undefined,
    },
  };
}

function artifact(ctx, name, parts) {
  return {
    kind: 'artifactUpdate',
    data: {
      taskId: ctx.taskId,
      contextId: ctx.contextId,
      artifact: { artifactId: `${name}-${ctx.taskId}`, name, description: '', parts, metadata: undefined, extensions: [] },
      append: false,
      lastChunk: true,
      metadata: undefined,
    },
  };
}

class Peer {
  constructor() {
    this.cancelled = new Set();
  }

  async execute(ctx, bus) {
    const message = ctx.userMessage;
    const task = ctx.task ?? {
      id: ctx.taskId,
      contextId: ctx.contextId,
      status: { state: TaskState.TASK_STATE_SUBMITTED, message: undefined, timestamp: new Date().toISOString() },
      artifacts: [],
      history: [message],
      metadata: undefined,
    };
    bus.publish({ kind: 'task', data: task });
    const metadata = message.metadata ?? {};
    const waiting = ctx.task?.status?.state === TaskState.TASK_STATE_INPUT_REQUIRED;
    const skill = metadata.skill ?? (waiting ? 'ask' : '');
    const words = message.parts.filter((p) => p.content?.$case === 'text').map((p) => p.content.value).join('\n');
    const values = message.parts.filter((p) => p.content?.$case === 'data').map((p) => p.content.value);
    const here = { taskId: ctx.taskId, contextId: ctx.contextId };
    if (skill === 'echo') {
      bus.publish(status(here, TaskState.TASK_STATE_WORKING));
      bus.publish(artifact(here, 'echo', [text(`echo: ${words || JSON.stringify(values)}`)]));
      bus.publish(artifact(here, 'received', [data({
        text: words,
        data: values,
        delegation: metadata['contextos.dev/delegation'] ?? null,
        messageId: message.messageId,
      })]));
      bus.publish(status(here, TaskState.TASK_STATE_COMPLETED));
    } else if (skill === 'ask') {
      if (!waiting) {
        bus.publish(status(here, TaskState.TASK_STATE_INPUT_REQUIRED, agentMessage('Which region should the refund go to?', here)));
      } else {
        bus.publish(artifact(here, 'refund', [text(`refund sent to ${words}`)]));
        bus.publish(status(here, TaskState.TASK_STATE_COMPLETED));
      }
    } else if (skill === 'slow') {
      bus.publish(status(here, TaskState.TASK_STATE_WORKING));
      for (let i = 0; i < 600 && !this.cancelled.has(ctx.taskId); i += 1) {
        await sleep(100);
      }
      if (!this.cancelled.has(ctx.taskId)) {
        bus.publish(status(here, TaskState.TASK_STATE_COMPLETED));
      }
    } else {
      bus.publish(status(here, TaskState.TASK_STATE_FAILED, agentMessage('no such order', here)));
    }
    bus.finished();
  }

  async cancelTask(taskId, bus) {
    this.cancelled.add(taskId);
    bus.publish(status({ taskId, contextId: '' }, TaskState.TASK_STATE_CANCELED));
    bus.finished();
  }
}

function card(name, url, streaming) {
  return {
    name,
    description: `ContextOS interop peer (${name}, JavaScript SDK)`,
    supportedInterfaces: [{ url, protocolBinding: 'JSONRPC', tenant: '', protocolVersion: '1.0' }],
    provider: undefined,
    version: '1.0.0',
    documentationUrl: undefined,
    capabilities: { streaming, pushNotifications: false, extensions: [], extendedAgentCard: false },
    securitySchemes: {},
    securityRequirements: [],
    defaultInputModes: ['text/plain', 'application/json'],
    defaultOutputModes: ['text/plain', 'application/json'],
    skills: ['echo', 'ask', 'slow', 'fail'].map((id) => ({
      id,
      name: id,
      description: `the ${id} skill`,
      tags: ['test'],
      examples: [],
      inputModes: [],
      outputModes: [],
      securityRequirements: [],
    })),
    signatures: [],
    iconUrl: undefined,
  };
}

const app = express();
app.use(express.json({ limit: '1mb' }));
app.use((req, _res, next) => {
  if (req.method === 'POST') {
    const params = req.body?.params ?? {};
    const message = params.message ?? {};
    seen.push({
      path: req.path,
      method: req.body?.method,
      messageId: message.messageId ?? null,
      taskId: message.taskId ?? params.id ?? null,
      a2aVersion: req.get('a2a-version') ?? null,
      traceparent: req.get('traceparent') ?? null,
      idempotencyKey: req.get('idempotency-key') ?? null,
      authorization: req.get('authorization') ?? null,
    });
  }
  next();
});
app.get('/seen', (_req, res) => res.json(seen));

const server = app.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const base = `http://127.0.0.1:${port}`;
  for (const [name, streaming] of [['plain', false], ['stream', true]]) {
    const handler = new DefaultRequestHandler(card(name, `${base}/${name}/rpc`, streaming), new InMemoryTaskStore(), new Peer());
    app.use(`/${name}/.well-known/agent-card.json`, agentCardHandler({ agentCardProvider: handler }));
    app.use(`/${name}/rpc`, jsonRpcHandler({ requestHandler: handler, userBuilder: UserBuilder.noAuthentication }));
  }
  process.stdout.write(`${port}\n`);
});
