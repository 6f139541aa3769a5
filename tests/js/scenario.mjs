// Drives Switchboard's gateway with the official `phoenix` npm client, as a web app would.
// Usage: node scenario.mjs <scenario> <socket url, e.g. ws://127.0.0.1:4000/socket> <token>
// Prints one JSON object per line on stdout; tests/e2e/test_js_client.py reads them as they
// come (it restarts the gateway when it sees {"type": "mid-stream"}).
import { randomUUID } from "node:crypto";
import { Socket } from "phoenix";
import WebSocket from "ws";

const [scenario, url, token] = process.argv.slice(2);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const fail = (reason) => { say({ type: "fail", reason }); process.exit(1); };
setTimeout(() => fail("scenario timed out"), Number(process.env.SCENARIO_TIMEOUT_MS || 60000));

// Node 20 has no global WebSocket: without `transport` the client silently long-polls.
const options = {
  transport: WebSocket,
  reconnectAfterMs: () => 100,
  rejoinAfterMs: () => 100,
  logger: process.env.PHX_DEBUG ? (kind, msg, data) => console.error(kind, msg, data) : undefined,
};
if (scenario === "generate-authtoken") options.authToken = token;
else options.params = { token };

const socket = new Socket(url, options);
socket.onOpen(() => say({ type: "open" }));
socket.onClose((event) => say({ type: "close", code: event.code }));
socket.connect();

const topic = `task:${randomUUID()}`;
let lastSeq = 0;
// Params as a function: every rejoin sends the last seq seen, so nothing is missed or repeated.
const channel = socket.channel(topic, () => ({ last_seq: lastSeq }));
const events = [];
let midStreamSaid = false;

const record = (event) => (payload) => {
  if (typeof payload.seq === "number") {
    if (payload.seq <= lastSeq) fail(`${event} seq ${payload.seq} after ${lastSeq}`);
    lastSeq = payload.seq;
  }
  events.push({ event, ...payload });
  if (scenario === "rejoin-after-restart" && event === "chunk" && !midStreamSaid) {
    midStreamSaid = true;
    say({ type: "mid-stream", seq: payload.seq });
  }
  if (event === "llm_response" || event === "error") finish(event);
};
for (const event of ["progress", "chunk", "llm_response", "error"]) channel.on(event, record(event));

let generated = false;
channel
  .join()
  .receive("ok", (response) => {
    say({ type: "joined", response });
    if (generated) return; // a rejoin: the task is already running
    generated = true;
    channel
      .push("llm_generate", { prompt: process.env.PROMPT || "Hello from phoenix.js" })
      .receive("ok", (reply) => say({ type: "ack", reply, events_before_ack: events.length }))
      .receive("error", (reply) => fail(`llm_generate refused: ${JSON.stringify(reply)}`))
      .receive("timeout", () => fail("llm_generate timed out"));
  })
  .receive("error", (reply) => fail(`join refused: ${JSON.stringify(reply)}`));

function finish(last) {
  channel
    .leave()
    .receive("ok", () => {
      say({ type: "done", last, events, left: true, channel_state: channel.state });
      socket.disconnect(() => process.exit(0), 1000);
    })
    .receive("timeout", () => fail("leave timed out"));
}
