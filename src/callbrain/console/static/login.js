// A login link may carry the token after '#' (never sent to the server, so never in
// its logs): fill the form with it, forget it, and log in.
const match = /^#token=(.+)$/.exec(location.hash);
if (match) {
  history.replaceState(null, "", location.pathname + location.search);
  document.querySelector("#token").value = decodeURIComponent(match[1]);
  document.querySelector("#login-form").requestSubmit();
}
