// The dashboard's one script, vendored into the binary (no CDN): it keeps the
// page live. Tenant rows and the tenant page follow `/ui/events` (server-sent
// events from the change feed) without a reload; the overview reloads on a
// change. When the browser cannot keep the stream open, the page falls back to
// reloading itself every 30 seconds.
"use strict";
(function () {
  var page = document.body.getAttribute("data-page");
  var light = document.getElementById("live");
  var failures = 0;
  var fallback = null;

  function pollInstead() {
    if (fallback) return;
    fallback = setInterval(function () { location.reload(); }, 30000);
  }

  function apply(t) {
    var scopes = document.querySelectorAll('[data-tenant="' + CSS.escape(t.id) + '"]');
    scopes.forEach(function (scope) {
      var stage = scope.querySelector('[data-field="stage"]');
      var version = scope.querySelector('[data-field="version"]');
      if (stage && t.stage) {
        stage.textContent = t.stage;
        stage.className = stage.className.replace(/stage-\w+/, "stage-" + t.stage);
      }
      if (version && t.version !== undefined) version.textContent = String(t.version);
      if (scope.tagName === "TR") scope.classList.add("changed");
      if (page === "tenant") {
        var stale = document.getElementById("stale");
        if (stale) stale.hidden = false;
      }
    });
    if (page === "overview") location.reload();
  }

  if (!window.EventSource) { pollInstead(); return; }
  var source = null;

  function connect() {
    var seq = document.body.getAttribute("data-seq") || "";
    source = new EventSource("/ui/events" + (seq ? "?from=" + encodeURIComponent(seq) : ""));
    source.addEventListener("open", function () {
      failures = 0;
      if (light) light.classList.add("on");
    });
    source.addEventListener("tenant", function (e) {
      try { apply(JSON.parse(e.data)); } catch (err) { /* a malformed event changes nothing */ }
    });
    source.addEventListener("resync", function () { location.reload(); });
    source.addEventListener("error", function () {
      if (light) light.classList.remove("on");
      failures += 1;
      if (failures >= 3) { source.close(); pollInstead(); }
    });
  }

  // A page the browser keeps in its back-forward cache would keep its stream
  // open; six such pages use up the browser's connections to the host and the
  // next page cannot load. Close the stream when the page is hidden; a page
  // restored from the cache reloads, since it missed what changed meanwhile.
  window.addEventListener("pagehide", function () {
    if (source) { source.close(); source = null; }
    if (light) light.classList.remove("on");
  });
  window.addEventListener("pageshow", function (e) {
    if (e.persisted) location.reload();
  });
  connect();
})();
