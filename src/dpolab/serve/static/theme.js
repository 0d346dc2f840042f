// Applied before first paint (loaded in <head>) so the page never flashes the wrong theme.
// The choice is remembered; without one the system preference decides.
(function () {
  var saved = null;
  try { saved = localStorage.getItem("dpolab-theme"); } catch (e) { /* storage disabled */ }
  if (saved === "light" || saved === "dark") document.documentElement.dataset.theme = saved;
  document.addEventListener("DOMContentLoaded", function () {
    var button = document.getElementById("theme-toggle");
    if (!button) return;
    button.addEventListener("click", function () {
      var dark = document.documentElement.dataset.theme
        ? document.documentElement.dataset.theme === "dark"
        : window.matchMedia("(prefers-color-scheme: dark)").matches;
      var next = dark ? "light" : "dark";
      document.documentElement.dataset.theme = next;
      try { localStorage.setItem("dpolab-theme", next); } catch (e) { /* storage disabled */ }
    });
  });
})();
