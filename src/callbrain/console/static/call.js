// One call's page: while the call is in progress, its timeline is fetched again
// (rendered by the server) each time the call changes.
const holder = document.querySelector("#call-view");
let events = null;
let pending = null;

async function refresh() {
  pending = null;
  const response = await fetch(holder.dataset.src, { credentials: "same-origin" });
  if (!response.ok) return;
  const focused = document.activeElement && document.activeElement.id;
  holder.innerHTML = await response.text();
  if (focused) document.getElementById(focused)?.focus();
  const h1 = holder.querySelector("h1");
  if (!holder.querySelector(".badge.live") && events) {
    events.close();
    events = null;
    holder.dataset.live = "no";
    if (h1) h1.setAttribute("data-ended", "yes");
  }
}

if (holder.dataset.live === "yes") {
  events = new EventSource("/console/events");
  events.addEventListener("call", (event) => {
    const call = JSON.parse(event.data);
    if (call.call_id !== holder.dataset.callId) return;
    if (pending === null) pending = setTimeout(refresh, call.live ? 300 : 0);
  });
}
