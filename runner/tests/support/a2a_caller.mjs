// A2A caller for ContextOS's interop tests, built on the official JavaScript SDK (@a2a-js/sdk):
// it calls a ContextOS agent through the gateway's A2A endpoint without streaming — a message
// answered at once, then its task polled through input-required (an approval, given by the test
// meanwhile) to completed; then a second task cancelled. Prints one JSON line per thing it sees;
// reads one line from stdin each time it waits on the test.
// Run: node a2a_caller.mjs <node_modules dir holding @a2a-js/sdk> <agent URL> <token> <message id prefix>

import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';

const [modules, url, token, prefix] = process.argv.slice(2);
const require = createRequire(path.join(modules, 'noop.js'));
const { Role, TaskState } = require('@a2a-js/sdk');
const {
  ClientFactory,
  ClientFactoryOptions,
  DefaultAgentCardResolver,
  JsonRpcTransportFactory,
} = require('@a2a-js/sdk/client');

const say = (fields) => process.stdout.write(`${JSON.stringify(fields)}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const waitForTest = async () => {
  const next = await lines.next();
  if (next.done) throw new Error('the test went away');
};

// Every request carries the caller's token.
const authFetch = (input, init = {}) => {
  const headers = new Headers(init.headers);
  headers.set('authorization', `Bearer ${token}`);
  return fetch(input, { ...init, headers });
};
const factory = new ClientFactory(
  ClientFactoryOptions.createFrom(ClientFactoryOptions.default, {
    transports: [new JsonRpcTransportFactory({ fetchImpl: authFetch })],
    cardResolver: new DefaultAgentCardResolver({ fetchImpl: authFetch }),
  }),
);
const client = await factory.createFromUrl(`${url}/.well-known/agent-card.json`, '');

const part = (content) => ({ content, metadata: undefined, filename: '', mediaType: '' });
const message = (id, words, data) => ({
  message: {
    messageId: id,
    contextId: '',
    taskId: '',
    role: Role.ROLE_USER,
    parts: [part({ $case: 'text', value: words }), ...(data ? [part({ $case: 'data', value: data })] : [])],
    metadata: undefined,
    extensions: [],
    referenceTaskIds: [],
  },
  configuration: {
    acceptedOutputModes: [],
    taskPushNotificationConfig: undefined,
    historyLength: undefined,
    returnImmediately: true,
  },
  metadata: undefined,
  tenant: '',
});
const stateName = (task) => TaskState[task.status?.state] ?? String(task.status?.state);
const partJson = (p) => (p.content?.$case === 'data' ? { data: p.content.value } : { text: p.content?.value });
const taskJson = (task) => ({
  id: task.id,
  contextId: task.contextId,
  state: stateName(task),
  message: (task.status?.message?.parts ?? []).map(partJson),
  artifacts: (task.artifacts ?? []).map((a) => ({ name: a.name, parts: a.parts.map(partJson) })),
});

async function pollUntil(id, done) {
  for (let i = 0; i < 600; i += 1) {
    const task = await client.getTask({ id, historyLength: undefined, tenant: '' });
    if (done(task.status?.state)) return task;
    await sleep(250);
  }
  throw new Error(`task ${id} never got there`);
}

const first = await client.sendMessage(message(`${prefix}-1`, 'checkout-api returns 5xx since 10:00', { service: 'checkout-api' }));
say({ event: 'sent', task: taskJson(first) });
const paused = await pollUntil(first.id, (s) => s === TaskState.TASK_STATE_INPUT_REQUIRED);
say({ event: 'paused', task: taskJson(paused) });
await waitForTest();
const done = await pollUntil(first.id, (s) => s === TaskState.TASK_STATE_COMPLETED || s === TaskState.TASK_STATE_FAILED);
say({ event: 'final', task: taskJson(done) });

const second = await client.sendMessage(message(`${prefix}-2`, 'look again'));
const cancelled = await client.cancelTask({ id: second.id, metadata: undefined, tenant: '' });
say({ event: 'cancelled', task: taskJson(cancelled) });
process.exit(0);
