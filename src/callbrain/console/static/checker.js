// The protocol checker in the browser: a port of callbrain.testing.checker.
//
// The rules and the shapes of the frames a server may send are not restated here:
// they come from /console/protocol.json, made from the Python checker's RULES and
// frame models, and a test runs this checker and the Python one over the same
// frames. No dependency, no build step: an ES module the console serves itself.

// ------------------------------------------------------------------ parsing

// JSON.parse forgets whether 5 was written 5 or 5.0, and rounds integers past
// 2**53; the Python checker sees both. Where the browser gives each value's source
// text to the reviver, it is kept here, per object and key.
const SOURCES = new WeakMap();

export function parseFrame(text) {
  return JSON.parse(text, function (key, value, context) {
    if (typeof value === "number" && context && typeof context.source === "string") {
      let sources = SOURCES.get(this);
      if (!sources) SOURCES.set(this, (sources = new Map()));
      sources.set(key, context.source);
    }
    return value;
  });
}

function source(holder, key) {
  const sources = SOURCES.get(holder);
  return sources ? sources.get(key) : undefined;
}

function isPlainObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

// An integer as Python reads JSON: written without a fraction or exponent.
function isInteger(holder, key) {
  const value = holder[key];
  if (typeof value !== "number") return false;
  const text = source(holder, key);
  return text === undefined ? Number.isInteger(value) : /^-?\d+$/.test(text);
}

// Compares holder[key] with schema[bound] exactly where both were written as
// integers (ids go up to 2**63 - 1, past what a number holds).
function compare(holder, key, schema, bound) {
  const text = source(holder, key);
  const limit = source(schema, bound);
  const integer = /^-?\d+$/;
  if (text !== undefined && limit !== undefined && integer.test(text) && integer.test(limit)) {
    const a = BigInt(text);
    const b = BigInt(limit);
    return a < b ? -1 : a > b ? 1 : 0;
  }
  const value = holder[key];
  return value < schema[bound] ? -1 : value > schema[bound] ? 1 : 0;
}

// The protocol's rules and frame shapes, read as frames are (exact integers).
export async function loadProtocol(url = "/console/protocol.json") {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return parseFrame(await response.text());
}

// ------------------------------------------------------- frame shapes (JSON Schema)

// The part of JSON Schema that pydantic writes for the outbound frames, read as
// pydantic's strict mode reads values: no coercion, booleans are not numbers.
function valid(holder, key, schema, root) {
  const value = holder[key];
  if (schema.$ref) {
    return valid(holder, key, root.$defs[schema.$ref.split("/").pop()], root);
  }
  if (schema.anyOf) return schema.anyOf.some((option) => valid(holder, key, option, root));
  if ("const" in schema && value !== schema.const) return false;
  switch (schema.type) {
    case "null":
      return value === null;
    case "boolean":
      return typeof value === "boolean";
    case "string":
      return typeof value === "string";
    case "integer":
      if (!isInteger(holder, key)) return false;
      break;
    case "number":
      if (typeof value !== "number") return false;
      break;
    case "object":
      return isPlainObject(value) && validObject(value, schema, root);
    default:
      break;
  }
  if (typeof value === "number") {
    if (schema.minimum !== undefined && compare(holder, key, schema, "minimum") < 0) return false;
    if (schema.exclusiveMinimum !== undefined && compare(holder, key, schema, "exclusiveMinimum") <= 0) {
      return false;
    }
    if (schema.maximum !== undefined && compare(holder, key, schema, "maximum") > 0) return false;
  }
  return true;
}

function validObject(value, schema, root) {
  const properties = schema.properties || {};
  for (const name of schema.required || []) {
    if (!(name in value)) return false;
  }
  for (const name of Object.keys(value)) {
    if (name in properties) {
      if (!valid(value, name, properties[name], root)) return false;
    } else if (schema.additionalProperties === false) {
      return false;
    }
  }
  return true;
}

// ----------------------------------------------------------------- the checker

const PYTHON_WORD = /[\p{L}\p{N}_][^.!?]*[.!?](\s|$)/u;

function pyStr(value) {
  if (value === undefined || value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  return typeof value === "string" ? value : JSON.stringify(value);
}

function isId(value) {
  return typeof value === "number" && Number.isInteger(value) && value >= 0;
}

function clip(text, limit = 60) {
  return text.length <= limit ? text : text.slice(0, limit - 1) + "…";
}

class Turn {
  constructor(responseId, requestedAt, reminder = false) {
    this.responseId = responseId;
    this.requestedAt = requestedAt;
    this.reminder = reminder;
    this.supersededAt = null;
    this.seenNewerAt = null;
    this.firstFrameAt = null;
    this.firstTextAt = null;
    this.firstSentenceAt = null;
    this.completedAt = null;
    this.completes = 0;
    this.text = "";
    this.actions = {};
  }

  get live() {
    return this.supersededAt === null;
  }
}

// Feed it every frame of one call (onSent, onReceived); read .violations.
// `protocol` is /console/protocol.json. Times are seconds.
export class ProtocolChecker {
  constructor(protocol, { pingDeadlineS } = {}) {
    this.protocol = protocol;
    this.pingDeadlineS = pingDeadlineS ?? protocol.ping_deadline_s;
    this.violations = [];
    this.turns = new Map();
    this.pingRtts = [];
    this.staleFrames = 0;
    this.missedPings = 0;
    this.received = 0;
    this.start = null;
    this.pings = new Map();
    this.latestId = -1;
    this.toolCalls = new Set();
    this.begin = new Turn(0, 0);
  }

  onSent(frame, at) {
    this.clock(at);
    const kind = frame.interaction_type;
    if (kind === "ping_pong" && isId(frame.timestamp)) {
      this.pings.set(frame.timestamp, { sentAt: at, reported: false });
    } else if (kind === "response_required" || kind === "reminder_required") {
      const rid = frame.response_id;
      if (isId(rid) && rid > this.latestId) {
        for (const turn of this.allTurns()) {
          if (turn.responseId < rid && turn.supersededAt === null) turn.supersededAt = at;
        }
        this.latestId = rid;
        this.turns.set(rid, new Turn(rid, at, kind === "reminder_required"));
      }
    }
  }

  // `raw` is the frame's text, or {binary: byteLength} for a binary frame.
  onReceived(raw, at) {
    this.clock(at);
    this.received += 1;
    this.checkPings(at);
    if (typeof raw !== "string") {
      this.violate("binary_frame", `${raw.binary} bytes`, at);
      return null;
    }
    let frame;
    try {
      frame = parseFrame(raw);
    } catch {
      frame = null;
    }
    if (!isPlainObject(frame)) {
      this.violate("not_json", clip(raw), at);
      return null;
    }
    const kind = frame.response_type;
    const schema = typeof kind === "string" ? this.protocol.frames[kind] : undefined;
    if (schema === undefined) {
      this.violate("unknown_response_type", `response_type=${JSON.stringify(kind)}`, at);
      return frame;
    }
    this.checkShape(frame, schema, at);
    if (kind === "config" && this.received > 1) {
      this.violate("config_not_first", `config arrived as frame ${this.received}`, at);
    } else if (kind === "ping_pong") {
      this.onPong(frame, at);
    } else if (kind === "response") {
      this.onResponse(frame, at);
    } else if (kind === "agent_interrupt") {
      this.checkActions(frame, null, at);
    } else if (kind === "tool_call_invocation") {
      this.toolCalls.add(pyStr(frame.tool_call_id));
    } else if (kind === "tool_call_result" && !this.toolCalls.has(pyStr(frame.tool_call_id))) {
      this.violate("unmatched_tool_result", `tool_call_id=${pyStr(frame.tool_call_id)}`, at);
    }
    return frame;
  }

  checkPings(now) {
    for (const ping of this.pings.values()) {
      if (now - ping.sentAt > this.pingDeadlineS && !ping.reported) {
        ping.reported = true;
        this.missedPings += 1;
        this.violate("ping_missed", `no echo after ${this.pingDeadlineS.toFixed(0)} s`, now);
      }
    }
  }

  finish(at, { requireComplete = true } = {}) {
    this.checkPings(at);
    if (requireComplete) {
      for (const turn of this.turns.values()) {
        if (turn.live && turn.completes === 0) {
          this.violate("turn_incomplete", "no content_complete", at, turn.responseId);
        }
      }
    }
    return this.violations;
  }

  onPong(frame, at) {
    const ping = this.pings.get(frame.timestamp);
    if (ping === undefined) {
      this.violate("unexpected_pong", `timestamp=${JSON.stringify(frame.timestamp)}`, at);
      return;
    }
    this.pings.delete(frame.timestamp);
    this.pingRtts.push(at - ping.sentAt);
    if (at - ping.sentAt > this.pingDeadlineS && !ping.reported) {
      this.missedPings += 1;
      this.violate("ping_missed", `echo after ${(at - ping.sentAt).toFixed(1)} s`, at);
    }
    // Proof the server read every frame sent before this ping.
    for (const turn of this.allTurns()) {
      if (turn.supersededAt !== null && turn.supersededAt <= ping.sentAt) {
        turn.seenNewerAt = turn.seenNewerAt ?? at;
      }
    }
  }

  onResponse(frame, at) {
    if (!isInteger(frame, "response_id")) return; // reported as invalid_frame
    const rid = frame.response_id;
    const turn = this.turns.get(rid) ?? (rid === 0 ? this.begin : undefined);
    if (turn === undefined) {
      this.violate("unrequested_response", "no request had this id", at, rid);
      return;
    }
    // A frame for this id proves the server read every request up to it.
    for (const older of this.allTurns()) {
      if (older.responseId < rid && older.supersededAt !== null) {
        older.seenNewerAt = older.seenNewerAt ?? at;
      }
    }
    if (turn.seenNewerAt !== null) {
      this.staleFrames += 1;
      this.violate("stale_frame", `content=${clip(pyStr(frame.content))}`, at, rid);
      return;
    }
    if (turn.completes) this.violate("frame_after_complete", "", at, rid);
    const content = frame.content;
    if (turn.firstFrameAt === null) turn.firstFrameAt = at;
    if (typeof content === "string" && content) {
      turn.text += content;
      turn.firstTextAt = turn.firstTextAt ?? at;
      if (turn.firstSentenceAt === null && PYTHON_WORD.test(turn.text)) turn.firstSentenceAt = at;
    }
    this.checkActions(frame, turn, at);
    if (frame.content_complete === true) {
      turn.completes += 1;
      if (turn.completes === 2) this.violate("duplicate_complete", "", at, rid);
      if (turn.completedAt === null) {
        turn.completedAt = at;
        if (turn.firstSentenceAt === null && turn.text.trim()) turn.firstSentenceAt = at;
      }
    }
  }

  checkActions(frame, turn, at) {
    const chosen = chosenActions(frame, this.protocol.exclusive_actions);
    const rid = turn ? turn.responseId : null;
    if (chosen.length > 1) {
      this.violate("exclusive_actions", `one frame sets ${JSON.stringify(chosen.sort())}`, at, rid);
      return;
    }
    if (turn === null || !chosen.length) return;
    const before = Object.keys(turn.actions);
    if (before.length && (before.length !== chosen.length || before.some((k) => !chosen.includes(k)))) {
      const both = [...new Set([...before, ...chosen])].sort();
      this.violate("exclusive_actions", `one response sets ${JSON.stringify(both)}`, at, rid);
    }
    for (const key of chosen) turn.actions[key] = frame[key];
  }

  checkShape(frame, schema, at) {
    const rid = isInteger(frame, "response_id") ? frame.response_id : null;
    const nulls = Object.keys(frame).filter((key) => frame[key] === null).sort();
    if (nulls.length) this.violate("null_field", nulls.join(", "), at, rid);
    // Unknown fields are ignored by Retell: only the known ones are typed.
    const known = {};
    const sources = new Map();
    for (const key of Object.keys(frame)) {
      if (key in (schema.properties || {}) && frame[key] !== null) {
        known[key] = frame[key];
        if (source(frame, key) !== undefined) sources.set(key, source(frame, key));
      }
    }
    SOURCES.set(known, sources);
    const shaped = validObject(known, schema, schema);
    // The frame models' own rule: one call action at most (a pydantic validator).
    const actions = schema.properties && "end_call" in schema.properties;
    if (!shaped || (actions && chosenActions(known, this.protocol.exclusive_actions).length > 1)) {
      const kind = String(frame.response_type);
      this.violate("invalid_frame", `not a valid ${kind} frame`, at, rid);
    }
  }

  allTurns() {
    return [this.begin, ...this.turns.values()];
  }

  clock(at) {
    if (this.start === null) this.start = this.begin.requestedAt = at;
  }

  violate(rule, detail, at, responseId = null) {
    const start = this.start ?? at;
    this.violations.push({ rule, detail, at: at - start, responseId, meaning: this.protocol.rules[rule] });
  }
}

function chosenActions(frame, names) {
  return names.filter((key) =>
    key === "end_call" ? frame[key] === true : frame[key] !== undefined && frame[key] !== null,
  );
}
