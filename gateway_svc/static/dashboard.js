// The operator dashboard's client: joins `admin:dashboard` with the token from the page's
// URL (?token=...), renders every `snapshot` push, and sends the operator's actions.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const socket = new Phoenix.Socket("/socket", { params: { token } });
const channel = socket.channel("admin:dashboard", {});
const status = document.getElementById("status");

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function button(label, action, taskId) {
  const td = document.createElement("td");
  const b = document.createElement("button");
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.task = taskId;
  b.onclick = () => {
    b.disabled = true;
    channel.push(action, { task_id: taskId })
      .receive("ok", () => { b.textContent = label + " ✓"; })
      .receive("error", (e) => { b.textContent = (e && e.reason) || "error"; b.disabled = false; });
  };
  td.appendChild(b);
  return td;
}

function fill(id, rows, render) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell("none", "empty");
    td.colSpan = document.querySelectorAll(`#${id} th`).length;
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = row.task_id || row.queue || row.provider || "";
    for (const td of render(row)) tr.appendChild(td);
    body.appendChild(tr);
  }
}

// A figure the gateway could not get (no NATS, or its source did not answer) is null.
function figure(value, digits) {
  if (value === null || value === undefined) return "\u2013";
  return digits === undefined ? String(value) : value.toFixed(digits);
}

function render(s) {
  document.getElementById("sockets").textContent = s.sockets;
  document.getElementById("channels").textContent = s.channels;
  document.getElementById("history").textContent = figure(s.history_pending);
  document.getElementById("history_lag").textContent = figure(s.history_lag_s, 1);
  fill("queues", s.queues, (q) => [
    cell(q.queue), cell(q.waiting, "num"), cell(q.oldest_s.toFixed(1), "num"),
    cell(q.running, "num"), cell(q.concurrency, "num"), cell(q.mean_run_s.toFixed(2), "num"),
    cell(q.max_depth, "num"), cell(q.throughput_per_s.toFixed(1), "num"),
  ]);
  fill("tasks", s.tasks, (t) => {
    const p = document.createElement("td");
    const bar = document.createElement("progress");
    bar.max = 1; bar.value = t.progress; p.appendChild(bar);
    const active = t.status === "queued" || t.status === "processing";
    return [cell(t.task_id), cell(t.user_id), cell(t.status, "status"), p, cell(t.model),
      cell(t.node), active ? button("cancel", "cancel_task", t.task_id) : cell("")];
  });
  fill("dead_letters", s.dead_letters, (d) => [
    cell(d.task_id), cell(d.queue), cell(d.error), cell(d.attempts, "num"),
    (() => {
      const td = document.createElement("td");
      td.append(button("retry", "retry_dead_letter", d.task_id).firstChild, " ",
                button("discard", "discard_dead_letter", d.task_id).firstChild);
      return td;
    })(),
  ]);
  fill("providers", s.providers, (p) => [
    cell(p.provider), cell(p.breaker), cell(p.requests, "num"), cell(p.errors, "num"),
    cell(p.mean_first_token_s.toFixed(3), "num"), cell(p.mean_total_s.toFixed(3), "num"),
  ]);
}

channel.on("snapshot", render);
channel.join()
  .receive("ok", (snapshot) => { status.textContent = "live"; render(snapshot); })
  .receive("error", (e) => { status.textContent = "refused: " + ((e && e.reason) || "error"); });
socket.onError(() => { status.textContent = "disconnected"; });
socket.connect();
