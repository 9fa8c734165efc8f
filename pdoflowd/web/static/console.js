// pdoflowd web console: live progress by server-sent events.
// The pages work without this file; it only keeps progress bars, counts,
// statuses and ETAs current while a page is open.
(function () {
  "use strict";

  function follow() {
    var ids = [];
    document.querySelectorAll("[data-live]").forEach(function (el) {
      el.getAttribute("data-live").split(" ").forEach(function (id) {
        if (id && ids.indexOf(id) < 0) { ids.push(id); }
      });
    });
    if (!ids.length || !window.EventSource) { return; }
    var query = ids.map(function (id) {
      return "posting=" + encodeURIComponent(id);
    }).join("&");
    var source = new EventSource("/events?" + query);
    source.addEventListener("progress", function (event) {
      var postings = JSON.parse(event.data);
      Object.keys(postings).forEach(function (id) {
        update(id, postings[id]);
      });
    });
    source.addEventListener("end", function () { source.close(); });
  }

  function set(scope, field, text) {
    scope.querySelectorAll("[data-field='" + field + "']").forEach(
      function (el) { el.textContent = text; });
  }

  function update(id, p) {
    document.querySelectorAll("[data-posting='" + id + "']").forEach(
      function (scope) {
        var ended = p.jobs.done + p.jobs.errored_out;
        set(scope, "status", p.status);
        set(scope, "counts", ended + "/" + p.total);
        set(scope, "eta", p.eta === null ? "\u2013" : p.eta);
        set(scope, "detail", Object.keys(p.jobs).map(function (s) {
          return s + " " + p.jobs[s];
        }).join(", "));
        scope.querySelectorAll("progress[data-field='bar']").forEach(
          function (bar) { bar.value = p.percent; });
      });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", follow);
  } else {
    follow();
  }
})();
