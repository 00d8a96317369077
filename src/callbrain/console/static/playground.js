// The playground page: set up a call, then show what RetellCall (retell.js) hears.
import { RetellCall, loadProtocol } from "./retell.js";

const PATH = "/console";
const $ = (selector) => document.querySelector(selector);
const setup = $("#setup");
const agentSelect = $("#agent");
const rows = $("#variable-rows");
const log = $("#log");
const line = $("#line");
const speakBox = $("#speak");
const synth = "speechSynthesis" in window ? window.speechSynthesis : null;
let call = null;
let protocol = null;
const bubbles = new Map();

// ------------------------------------------------------------------ variables

function addVariable(name = "", value = "") {
  const row = $("#variable-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".var-name").value = name;
  row.querySelector(".var-value").value = value;
  row.querySelector(".remove").addEventListener("click", () => {
    row.remove();
    $("#add-variable").focus();
  });
  rows.append(row);
  return row;
}

function showAgent() {
  const option = agentSelect.selectedOptions[0];
  rows.replaceChildren();
  if (!option) return;
  const defaults = JSON.parse(option.dataset.variables || "{}");
  for (const [name, value] of Object.entries(defaults)) addVariable(name, String(value));
  $("#no-details").hidden = option.dataset.callDetails === "yes";
}

function variables() {
  const found = {};
  for (const row of rows.querySelectorAll(".variable")) {
    const name = row.querySelector(".var-name").value.trim();
    if (name) found[name] = row.querySelector(".var-value").value;
  }
  return found;
}

// ---------------------------------------------------------------- the log

function entry(kind, text) {
  const item = document.createElement("li");
  item.className = `entry ${kind}`;
  if (text !== undefined) item.textContent = text;
  log.append(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function labelled(kind, label, text) {
  const item = entry(kind);
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = label;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(who, " ", body);
  return item;
}

const REPLY_LABELS = { greeting: "Agent", reply: "Agent", reminder: "Agent (reminder)", unprompted: "Agent (unprompted)" };

function bubble(reply) {
  let item = bubbles.get(reply.key);
  if (!item) {
    item = labelled("agent streaming", REPLY_LABELS[reply.kind], "");
    item.dataset.reply = reply.key;
    bubbles.set(reply.key, item);
  }
  return item;
}

function speak(text) {
  if (!synth || !speakBox.checked || !text.trim()) return;
  synth.speak(new SpeechSynthesisUtterance(text));
}

const view = {
  said(text) {
    labelled("caller", "You", text);
  },
  stream(reply, chunk) {
    bubble(reply).querySelector(".text").textContent += chunk;
  },
  ended(reply, how) {
    const item = bubble(reply);
    item.classList.remove("streaming");
    item.dataset.end = how;
    if (how === "complete") {
      if (!reply.text) item.querySelector(".text").textContent = reply.kind === "greeting" ? "(no greeting: the caller speaks first)" : "(says nothing)";
      speak(reply.text);
      return;
    }
    if (synth) synth.cancel();
    const mark = document.createElement("span");
    mark.className = "cut";
    const dropped = reply.action ? " (its call action is dropped)" : "";
    mark.textContent = ` [${how}]${dropped}`;
    item.append(mark);
  },
  note(text, level) {
    entry(`note ${level}`, text);
  },
  tool(frame) {
    const item = labelled("tool", "Tool", `${frame.name} ${frame.arguments}`);
    item.dataset.tool = frame.name;
  },
  toolResult(frame) {
    const status = frame.successful === true ? "ok" : frame.successful === false ? "failed" : "done";
    const item = labelled(`result ${status}`, "Result", `${status}: ${frame.content}`);
    item.dataset.toolCallId = String(frame.tool_call_id);
  },
  violation(violation) {
    $("#checks-none").hidden = true;
    const item = document.createElement("li");
    const rid = violation.responseId === null ? "" : ` (response ${violation.responseId})`;
    item.textContent = `${violation.rule}${rid} at ${violation.at.toFixed(3)} s: ${violation.meaning}${violation.detail ? ` — ${violation.detail}` : ""}`;
    item.dataset.rule = violation.rule;
    $("#violations").append(item);
  },
  state(state) {
    const badge = $("#call-state");
    badge.textContent = state;
    badge.dataset.state = state;
    const over = state === "ended";
    for (const id of ["#line", "#send", "#remind", "#hangup"]) $(id).disabled = over;
    $("#start").disabled = !over && call !== null;
  },
};

// ------------------------------------------------------------------- the call

async function start(event) {
  event.preventDefault();
  if (call && !call.ended) return;
  if (protocol === null) protocol = await loadProtocol(`${PATH}/protocol.json`);
  const agent = agentSelect.value;
  const random = new Uint8Array(8);
  crypto.getRandomValues(random);
  const callId = "playground-" + Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}${PATH}/agents/${encodeURIComponent(agent)}/socket/${callId}`;
  log.replaceChildren();
  bubbles.clear();
  $("#violations").replaceChildren();
  $("#checks-none").hidden = false;
  $("#call-id").textContent = callId;
  $("#call-link").href = `${PATH}/calls/${callId}`;
  $("#call").hidden = false;
  const sendVariables = agentSelect.selectedOptions[0]?.dataset.callDetails === "yes";
  call = new RetellCall(url, { callId, dynamicVariables: sendVariables ? variables() : {}, protocol, view });
  call.start();
  line.focus();
}

let typingTimer = null;
line.addEventListener("input", () => {
  clearTimeout(typingTimer);
  typingTimer = setTimeout(() => call && call.typing(line.value), 250);
});

$("#say").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = line.value.trim();
  if (!text || !call || call.ended) return;
  clearTimeout(typingTimer);
  line.value = "";
  call.say(text);
});
$("#remind").addEventListener("click", () => call && call.remind());
$("#hangup").addEventListener("click", () => {
  if (call) call.hangUp();
  if (synth) synth.cancel();
  $("#start").focus();
});
$("#add-variable").addEventListener("click", () => addVariable().querySelector(".var-name").focus());
agentSelect.addEventListener("change", showAgent);
setup.addEventListener("submit", start);
window.addEventListener("pagehide", () => call && call.hangUp());
if (synth) $("#speak-label").hidden = false;
showAgent();
