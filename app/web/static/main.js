// Entry point: tabs (hash-addressable, arrow keys move between them), the model line in the
// header, and the first loads of each view. Every load that cannot reach the server leaves the page
// as it is and shows the Retry banner.

import { ConnectionError, getJSON } from "./api.js";
import { loadSteerJobs } from "./compare-steer.js";
import { loadExtras, setupCompare } from "./compare.js";
import { refresh as refreshDiffing, setupDiffing } from "./diffing.js";
import { refresh as refreshExperiments, setupExperiments } from "./experiments.js";
import { refresh as refreshJobs, setupJobs } from "./jobs.js";
import { setupTooltip } from "./tokens.js";
import { offline, online, setupRetry } from "./ui.js";

const VIEWS = ["compare", "experiments", "jobs", "diffing"];
const LOAD = { compare: loadCompare, experiments: refreshExperiments, jobs: refreshJobs, diffing: refreshDiffing };

function openTab(name, focus = false) {
  if (!VIEWS.includes(name)) name = "compare";
  for (const view of VIEWS) {
    const tab = document.getElementById(`tab-${view}`);
    const on = view === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    document.getElementById(`view-${view}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  LOAD[name]();
}

function setupTabs() {
  VIEWS.forEach((view, i) => {
    const tab = document.getElementById(`tab-${view}`);
    tab.addEventListener("click", () => openTab(view));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) openTab(VIEWS[(i + step + VIEWS.length) % VIEWS.length], true);
    });
  });
  window.addEventListener("hashchange", () => openTab(location.hash.slice(1)));
}

async function loadCompare() {
  try {
    const info = await getJSON("/info");
    const demo = info.demo ? ` · demo marker “${info.demo.marker}”` : "";
    document.getElementById("models").textContent =
      `after ${info.model_after.model_id} · before ${info.model_before.model_id}${demo}`;
    if (info.demo && !document.getElementById("c-search").value) document.getElementById("c-search").value = info.demo.marker;
    await Promise.all([loadExtras(), loadSteerJobs()]);
    online();
  } catch (exc) {
    if (exc instanceof ConnectionError) offline(exc.message, loadCompare);
    else document.getElementById("models").textContent = `server: ${exc.message}`;
  }
}

setupRetry();
setupTooltip();
setupCompare();
setupExperiments();
setupJobs(openTab);
setupDiffing(openTab);
setupTabs();
openTab(location.hash.slice(1) || "compare");
// The header's model line comes from Compare's /info call: load it too when the page opens elsewhere.
if (location.hash !== "#compare") loadCompare();
