// Two sockets of one user with the official `phoenix` npm client, as two phones would: both
// join `user:<id>`; the first starts a generation on its own task channel; each prints the
// `task_updated` pushes it gets; once both saw the task complete, the second lists the
// history, opens the task, deletes it and lists again.
// Usage: node history.mjs <socket url> <token> <user id>
import { randomUUID } from "node:crypto";
import { Socket } from "phoenix";
import WebSocket from "ws";

const [url, token, user] = process.argv.slice(2);
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const fail = (reason) => { say({ type: "fail", reason }); process.exit(1); };
setTimeout(() => fail("scenario timed out"), Number(process.env.SCENARIO_TIMEOUT_MS || 60000));

const options = { transport: WebSocket, params: { token }, reconnectAfterMs: () => 100 };
const push = (channel, event, payload) => new Promise((resolve) => {
  channel.push(event, payload)
    .receive("ok", (reply) => resolve({ status: "ok", reply }))
    .receive("error", (reply) => resolve({ status: "error", reply }))
    .receive("timeout", () => fail(`${event} timed out`));
});
const join = (channel) => new Promise((resolve) => {
  channel.join()
    .receive("ok", resolve)
    .receive("error", (reply) => fail(`join refused: ${JSON.stringify(reply)}`));
});

const taskId = randomUUID();
const phones = ["phone-1", "phone-2"].map((name) => {
  const socket = new Socket(url, options);
  socket.connect();
  const history = socket.channel(`user:${user}`, {});
  const seen = new Set();
  let done;
  const completed = new Promise((resolve) => { done = resolve; });
  history.on("task_updated", (update) => {
    if (update.task_id !== taskId) return;
    say({ type: "update", phone: name, status: update.status, preview: update.preview || null, seq: update.seq });
    seen.add(update.status);
    if (update.status === "completed") done();
  });
  return { name, socket, history, completed, seen };
});

const joined = await Promise.all(phones.map((phone) => join(phone.history)));
say({ type: "joined", replies: joined });

const task = phones[0].socket.channel(`task:${taskId}`, {});
await join(task);
const ack = await push(task, "llm_generate", { prompt: process.env.PROMPT || "Hello" });
if (ack.status !== "ok") fail(`llm_generate refused: ${JSON.stringify(ack.reply)}`);
await Promise.all(phones.map((phone) => phone.completed));
say({ type: "seen", phones: phones.map((p) => ({ phone: p.name, statuses: [...p.seen] })) });

// History behind the hot path: the list may lag the live push by a batch; ask until it is in.
const second = phones[1].history;
let listed;
for (let i = 0; i < 50; i++) {
  listed = await push(second, "list_tasks", { limit: 10 });
  if (listed.status === "ok" && listed.reply.tasks.some((t) => t.task_id === taskId && t.status === "completed")) break;
  await new Promise((r) => setTimeout(r, 100));
}
say({ type: "listed", ...listed });
say({ type: "got", ...(await push(second, "get_task", { task_id: taskId })) });
say({ type: "deleted", ...(await push(second, "delete_task", { task_id: taskId })) });
say({ type: "listed_after", ...(await push(second, "list_tasks", { limit: 10 })) });
for (const phone of phones) phone.socket.disconnect();
say({ type: "done" });
process.exit(0);
