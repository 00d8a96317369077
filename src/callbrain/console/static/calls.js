// The calls page, live: server-sent events from /console/events keep "Live now"
// up to date, and move a call that ended to the top of the recent calls.
const live = document.querySelector("#live");
const liveBody = document.querySelector("#live-calls tbody");
const recentBody = document.querySelector("#recent-calls tbody");
const status = document.querySelector("#live-status");
const template = document.querySelector("#call-row");
const search = (live.dataset.q || "").toLowerCase();
const kind = live.dataset.kind;

function shown(call) {
  const playground = Boolean((call.tags || {}).playground);
  if (kind === "playground" && !playground) return false;
  if (kind === "calls" && playground) return false;
  if (!search) return true;
  const text = [call.call_id, call.agent, JSON.stringify(call.variables || {})].join(" ").toLowerCase();
  return text.includes(search);
}

function ms(value) {
  if (value === null || value === undefined) return "-";
  return `${value < 10 ? value.toFixed(1) : value.toFixed(0)} ms`;
}

function when(iso) {
  return iso ? iso.replace("T", " ").replace(/\..*$|Z$/, "").slice(0, 19) : "-";
}

function row(call) {
  const tr = template.content.firstElementChild.cloneNode(true);
  const cell = (name) => tr.querySelector(`[data-col="${name}"]`);
  tr.dataset.callId = call.call_id;
  cell("started").textContent = when(call.started_at);
  const link = cell("call").querySelector("a");
  link.href = `/console/calls/${encodeURIComponent(call.call_id)}`;
  link.textContent = call.call_id;
  const badge = cell("call").querySelector(".badge");
  if (badge && !(call.tags || {}).playground) badge.remove();
  if (!badge && (call.tags || {}).playground) {
    const span = document.createElement("span");
    span.className = "badge playground";
    span.textContent = "playground";
    cell("call").append(" ", span);
  }
  cell("agent").textContent = call.agent;
  const v = call.variables || {};
  cell("number").textContent = (v.from_number || "") + (v.to_number ? ` → ${v.to_number}` : "");
  cell("duration").textContent = call.duration_s === null ? "-" : `${call.duration_s.toFixed(1)} s`;
  cell("turns").textContent = String(call.turns);
  cell("worst").textContent = ms(call.worst_first_frame_ms);
  const end = cell("end").querySelector(".end");
  end.className = `end end-${call.end}`;
  end.textContent = call.live ? (call.responding ? "responding" : "listening") : call.end;
  return tr;
}

function find(body, callId) {
  return Array.from(body.rows).find((tr) => tr.dataset.callId === callId);
}

function counted() {
  const count = liveBody.rows.length;
  document.querySelector("#live-count").textContent = String(count);
  document.querySelector("#live-table").hidden = count === 0;
  if (!status.dataset.error) status.textContent = count ? "" : "No call in progress.";
}

function snapshot(calls) {
  liveBody.replaceChildren(...calls.filter(shown).map(row));
  counted();
}

function update(call) {
  const old = find(liveBody, call.call_id);
  if (call.live) {
    if (!shown(call)) return;
    if (old) old.replaceWith(row(call));
    else liveBody.prepend(row(call));
  } else {
    if (old) old.remove();
    if (shown(call)) {
      const before = find(recentBody, call.call_id);
      if (before) before.remove();
      const tr = row(call);
      tr.classList.add("just-ended");
      recentBody.prepend(tr);
      document.querySelector("#recent-empty")?.remove();
    }
  }
  counted();
}

const events = new EventSource("/console/events");
events.addEventListener("snapshot", (event) => {
  delete status.dataset.error;
  snapshot(JSON.parse(event.data).calls);
});
events.addEventListener("call", (event) => update(JSON.parse(event.data)));
events.addEventListener("error", () => {
  status.dataset.error = "yes";
  status.textContent = "Live updates lost; reconnecting…";
});
