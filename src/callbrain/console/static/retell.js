// Retell's side of a call in the browser: a port of callbrain.testing.chat (ChatCall,
// as `callbrain chat` plays it), every frame checked by checker.js.
import { ProtocolChecker } from "./checker.js";

export { ProtocolChecker, loadProtocol } from "./checker.js";

function isPlainObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function clip(text, limit = 60) {
  return text.length <= limit ? text : text.slice(0, limit - 1) + "…";
}


const CLOSE_MEANING = {
  1000: "a deliberate hang-up",
  1005: "no status code: Retell reports error_llm_websocket_open",
  1006: "abnormal, no close frame: Retell would reconnect",
  1007: "corrupt payload",
  1011: "a server error",
};

class Reply {
  constructor(key, kind) {
    this.key = key;
    this.kind = kind; // greeting | reply | reminder | unprompted
    this.parts = [];
    this.complete = false;
    this.interrupted = false;
    this.action = null; // {end_call: true} | {transfer_number: "..."} | {digit_to_press: "..."}
    this.warnedLate = false;
  }

  get text() {
    return this.parts.join("");
  }
}

// One simulated Retell call over a WebSocket, shown through `view`:
//   view.stream(reply, chunk)        a reply grew
//   view.ended(reply, how)           "complete" | "interrupted" | "discarded" | "hung up"
//   view.said(text)                  the caller's line
//   view.note(text, level)           level: info | warn | error | action
//   view.tool(frame) / view.toolResult(frame)
//   view.violation(violation)
//   view.state(state)                connecting | open | replying | listening | ended
export class RetellCall {
  constructor(url, { callId, dynamicVariables = {}, protocol, view, pingIntervalS = 2, pingTimeoutS = 5 }) {
    this.url = url;
    this.callId = callId;
    this.dynamicVariables = dynamicVariables;
    this.view = view;
    this.pingIntervalS = pingIntervalS;
    this.pingTimeoutS = pingTimeoutS;
    this.checker = new ProtocolChecker(protocol);
    this.transcript = [];
    this.replies = new Map([[0, new Reply("r0", "greeting")]]);
    this.interrupts = new Map();
    this.latest = 0;
    this.nextId = 1;
    this.framesSeen = 0;
    this.violationsShown = 0;
    this.sentPings = new Set();
    this.lastPing = 0;
    this.lastEcho = 0;
    this.warnedEcho = false;
    this.pinger = null;
    this.closing = false;
    this.ended = false;
    this.idle = false;
    this.config = null;
    this.lastUpdate = null;
  }

  now() {
    return performance.now() / 1000;
  }

  start() {
    this.view.state("connecting");
    const ws = (this.ws = new WebSocket(this.url));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => this.view.state("open");
    ws.onmessage = (event) => this.onMessage(event.data);
    ws.onclose = (event) => this.onClosed(event.code);
  }

  get replying() {
    return !this.idle && !this.ended;
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.checker.onSent(frame, this.now()); // before the send: a fast server may answer first
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  // The caller is typing (speaking): Retell sends the growing utterance as update_only.
  typing(partial) {
    const text = partial.trim();
    if (this.ended || text === this.lastUpdate) return;
    this.lastUpdate = text;
    const transcript = text ? [...this.transcript, { role: "user", content: text }] : this.transcript;
    this.send({ interaction_type: "update_only", transcript, turntaking: "user_turn" });
  }

  // The caller says `text`, barging in if the agent is speaking. Returns the request's id.
  say(text) {
    if (this.ended) return null;
    this.interruptOpenReplies();
    this.view.said(text);
    this.transcript.push({ role: "user", content: text });
    this.lastUpdate = null;
    this.send({ interaction_type: "update_only", transcript: this.transcript, turntaking: "agent_turn" });
    return this.request("reply");
  }

  // The caller stays silent. Retell asks for no reminder while a reply is open.
  remind() {
    if (this.ended) return null;
    if (this.replying) {
      this.view.note("the agent is still replying; Retell sends no reminder until it is done", "info");
      return null;
    }
    this.view.note("(the caller stays silent)", "info");
    return this.request("reminder");
  }

  request(kind) {
    const rid = this.nextId++;
    const interaction = kind === "reminder" ? "reminder_required" : "response_required";
    this.replies.set(rid, new Reply(`r${rid}`, kind));
    this.latest = rid;
    this.idle = false;
    this.view.state("replying");
    this.send({ interaction_type: interaction, response_id: rid, transcript: this.transcript });
    return rid;
  }

  interruptOpenReplies() {
    for (const reply of [this.replies.get(this.latest), ...this.interrupts.values()]) {
      this.cut(reply, "interrupted");
    }
  }

  cut(reply, how) {
    if (!reply || reply.complete || reply.interrupted) return;
    reply.interrupted = true;
    // Retell's transcript keeps what the agent got out before it was cut off.
    if (reply.text) this.transcript.push({ role: "agent", content: reply.text });
    this.view.ended(reply, how);
  }

  hangUp() {
    if (this.ended) return;
    this.closing = true;
    const reply = this.replies.get(this.latest);
    if (this.replying) this.cut(reply, "hung up");
    this.checker.finish(this.now(), { requireComplete: false });
    this.showViolations();
    this.stop();
    if (this.ws) this.ws.close(1000);
  }

  stop() {
    this.ended = true;
    if (this.pinger !== null) clearInterval(this.pinger);
    this.pinger = null;
    this.view.state("ended");
  }

  onMessage(data) {
    const raw = typeof data === "string" ? data : { binary: data.byteLength ?? 0 };
    const frame = this.checker.onReceived(raw, this.now());
    this.framesSeen += 1;
    this.showViolations();
    if (frame === null) return;
    try {
      this.dispatch(frame);
    } catch (error) {
      this.view.note(`the page failed on a ${frame.response_type} frame: ${error}`, "error");
    }
  }

  showViolations() {
    for (const violation of this.checker.violations.slice(this.violationsShown)) {
      this.view.violation(violation);
    }
    this.violationsShown = this.checker.violations.length;
  }

  dispatch(frame) {
    // Retell reads a frame without response_type as a response.
    const kind = frame.response_type ?? "response";
    if (kind === "config") this.onConfig(frame);
    else if (kind === "ping_pong") this.onPong(frame);
    else if (kind === "response") this.onContent(frame, this.replies.get(frame.response_id));
    else if (kind === "agent_interrupt") {
      const iid = frame.interrupt_id;
      if (!this.interrupts.has(iid)) {
        // A new interrupt_id discards any earlier interrupt still playing.
        for (const older of this.interrupts.values()) this.cut(older, "discarded");
        this.interrupts.set(iid, new Reply(`i${iid}`, "unprompted"));
      }
      this.onContent(frame, this.interrupts.get(iid));
    } else if (kind === "tool_call_invocation") this.view.tool(frame);
    else if (kind === "tool_call_result") this.view.toolResult(frame);
    else if (kind === "update_agent") this.view.note(`update_agent ${JSON.stringify(frame.agent_config)}`, "info");
    else if (kind === "metadata") this.view.note(`metadata ${JSON.stringify(frame.metadata)}`, "info");
    else this.view.note(`unknown frame ${clip(JSON.stringify(frame), 160)}`, "warn");
  }

  onConfig(frame) {
    const flags = isPlainObject(frame.config) ? frame.config : {};
    const on = Object.keys(flags).filter((name) => flags[name] === true).join(", ") || "nothing on";
    if (this.framesSeen > 1) {
      this.view.note(`config (${on}) ignored: it must be the first frame`, "warn");
      return;
    }
    this.config = flags;
    this.view.note(`config: ${on}`, "info");
    if (flags.call_details === true) {
      this.send({ interaction_type: "call_details", call: this.callObject() });
    }
    if (flags.auto_reconnect === true) {
      this.lastEcho = this.now();
      this.ping();
      this.pinger = setInterval(() => this.ping(), this.pingIntervalS * 1000);
    }
  }

  callObject() {
    return {
      call_id: this.callId,
      call_type: "web_call",
      agent_id: "agent_callbrain_console",
      call_status: "registered",
      direction: "inbound",
      metadata: { playground: true },
      retell_llm_dynamic_variables: this.dynamicVariables,
    };
  }

  ping() {
    this.checker.checkPings(this.now());
    this.showViolations();
    const silent = this.now() - this.lastEcho;
    if (silent > this.pingTimeoutS && !this.warnedEcho) {
      this.warnedEcho = true;
      this.view.note(`no ping_pong echo for ${silent.toFixed(0)} s: Retell would close this socket and reconnect`, "warn");
    } else if (this.warnedEcho && silent <= this.pingTimeoutS) {
      this.warnedEcho = false;
      this.view.note("ping_pong echoes are back", "info");
    }
    this.lastPing = Math.max(Date.now(), this.lastPing + 1); // distinct, so echoes match
    this.sentPings.add(this.lastPing);
    this.send({ interaction_type: "ping_pong", timestamp: this.lastPing });
  }

  onPong(frame) {
    // Any ping_pong keeps Retell's connection alive; only our own count as echoes.
    this.lastEcho = this.now();
    this.sentPings.delete(frame.timestamp);
  }

  onContent(frame, reply) {
    // Content for a superseded or never-requested id: Retell drops it silently.
    if (reply === undefined || reply.interrupted) return;
    if (reply.complete) {
      if (!reply.warnedLate) {
        reply.warnedLate = true;
        this.view.note(`content after content_complete on ${reply.key} (Retell ignores it)`, "warn");
      }
      return;
    }
    if (typeof frame.content === "string" && frame.content) {
      reply.parts.push(frame.content);
      this.view.stream(reply, frame.content);
    }
    for (const name of ["end_call", "transfer_number", "digit_to_press"]) {
      if (frame[name] !== undefined && frame[name] !== null && frame[name] !== false) {
        reply.action = { [name]: frame[name] };
      }
    }
    if (frame.content_complete === true) this.onComplete(reply);
  }

  onComplete(reply) {
    reply.complete = true;
    if (reply.text) this.transcript.push({ role: "agent", content: reply.text });
    this.view.ended(reply, "complete");
    if (reply.key === `r${this.latest}`) {
      this.idle = true;
      this.view.state("listening");
    }
    // Actions run once the content has been spoken, which is now.
    const action = reply.action || {};
    if (action.end_call) {
      this.view.note("the agent hung up", "action");
      this.stop();
      if (this.ws) this.ws.close(1000);
      return;
    }
    if (action.transfer_number) {
      this.view.note(`transfer to ${action.transfer_number} (Retell would transfer the call now)`, "action");
    } else if (action.digit_to_press) {
      this.view.note(`presses digits ${action.digit_to_press}`, "action");
    }
    this.send({ interaction_type: "update_only", transcript: this.transcript, turntaking: "user_turn" });
  }

  onClosed(code) {
    if (this.closing || this.ended) {
      this.stop();
      return;
    }
    const meaning = CLOSE_MEANING[code] ?? "unexpected";
    this.view.note(`the server closed the socket: code ${code} (${meaning})`, code === 1000 ? "info" : "error");
    this.stop();
  }
}
