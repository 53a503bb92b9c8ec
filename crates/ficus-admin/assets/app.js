// The dashboard's one script, vendored into the binary (no CDN): it keeps the
// page live. Tenant rows and the tenant page follow `/ui/events` (server-sent
// events from the change feed) without a reload; the overview reloads on a
// change. When the browser cannot keep the stream open, the page falls back to
// reloading itself every 30 seconds. No reload throws away what the operator
// has typed into a form.
"use strict";
(function () {
  var page = document.body.getAttribute("data-page");
  var light = document.getElementById("live");
  var failures = 0;
  var fallback = null;

  // A reload while the operator has typed into a form would throw their words
  // away, and a click just after it would send the emptied form, which the
  // browser refuses. While any form holds typed input the page is not
  // reloaded: it says so, and reloads once the input is sent or cleared.
  var held = false;
  function typed() {
    var fields = document.querySelectorAll("form input, form textarea, form select");
    for (var i = 0; i < fields.length; i++) {
      var f = fields[i];
      if (f.type === "hidden" || f.type === "submit") continue;
      if (f.type === "checkbox" || f.type === "radio") {
        if (f.checked !== f.defaultChecked) return true;
      } else if (f.tagName === "SELECT") {
        for (var j = 0; j < f.options.length; j++) {
          if (f.options[j].selected !== f.options[j].defaultSelected) return true;
        }
      } else if (f.value !== f.defaultValue) {
        return true;
      }
    }
    return false;
  }
  function reload() {
    if (!typed()) { location.reload(); return; }
    if (held) return;
    held = true;
    var note = document.getElementById("held");
    if (note) note.hidden = false;
    setInterval(function () { if (!typed()) location.reload(); }, 1000);
  }

  function pollInstead() {
    if (fallback) return;
    fallback = setInterval(reload, 30000);
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
    if (page === "overview") reload();
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
    source.addEventListener("resync", reload);
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
