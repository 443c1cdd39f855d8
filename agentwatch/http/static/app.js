// agentwatch dashboard: refresh the live part of the page in place.
// The server renders (and escapes) every piece of agent text; this script only swaps the
// server's HTML for the #live element, so nothing an agent wrote is ever built into markup here.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var status = document.getElementById("updated");
  if (!live) { return; }
  var every = Math.max(200, Number(document.body.getAttribute("data-refresh") || "2") * 1000);
  var last = Date.now();
  var problem = "";

  function show() {
    if (!status) { return; }
    var age = Math.round((Date.now() - last) / 1000);
    status.textContent = problem ? problem : (age <= 1 ? "live" : "updated " + age + "s ago");
    status.className = problem ? "updated stale" : "updated";
  }

  function schedule() { window.setTimeout(tick, every); }

  function tick() {
    if (document.hidden) { schedule(); return; }
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    fetch(url.toString(), { credentials: "same-origin", cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401 || response.redirected) { window.location.reload(); return null; }
        return response.text().then(function (html) {
          live.innerHTML = html;
          last = Date.now();
          problem = response.ok ? "" : "Redis unavailable";
        });
      })
      .catch(function () { problem = "agentwatch server unreachable"; })
      .then(function () { show(); schedule(); });
  }

  window.setInterval(show, 1000);
  show();
  schedule();
})();
