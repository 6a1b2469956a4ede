// comfy_xdit status panel: the worker pool's state, from GET /comfy_xdit/status and the
// server's comfy_xdit.* events. Read-only: it shows state and sends nothing but that GET.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PANEL_ID = "comfy-xdit-status";

function panel() {
  let el = document.getElementById(PANEL_ID);
  if (!el) {
    el = document.createElement("div");
    el.id = PANEL_ID;
    Object.assign(el.style, {
      position: "fixed", left: "64px", bottom: "12px", zIndex: 1000, maxWidth: "360px",
      font: "12px monospace", background: "rgba(20,20,20,0.88)", color: "#ddd",
      border: "1px solid #555", borderRadius: "6px", padding: "8px 10px", whiteSpace: "pre-wrap",
    });
    document.body.appendChild(el);
  }
  return el;
}

function describe(status) {
  if (!status.pools || status.pools.length === 0) return "xDiT pool: not started";
  return status.pools.map((pool) => {
    const workers = (pool.workers || []).map((w) => `  rank ${w.rank} ${w.device} ${w.alive ? "alive" : "exited " + (w.exit || "")}`).join("\n");
    const model = pool.model ? `${pool.model.path} (${pool.model.dtype})` : "none";
    const job = pool.last_job;
    const last = job ? `${job.seconds}s, ${job.seconds_per_step ?? "?"} s/step` : "none yet";
    return `xDiT pool: ${pool.state} [${pool.degrees}]\nmodel: ${model} loaded ${pool.load_count}x\n${workers}\nlast job: ${last}`;
  }).join("\n\n");
}

function escapeText(text) {
  const node = document.createElement("span");
  node.textContent = text;
  return node;
}

async function refresh() {
  try {
    const response = await api.fetchApi("/comfy_xdit/status");
    const status = await response.json();
    const el = panel();
    el.replaceChildren(escapeText(describe(status)));
    el.dataset.pools = String((status.pools || []).length);
  } catch (error) {
    panel().replaceChildren(escapeText("xDiT pool: status unavailable"));
  }
}

app.registerExtension({
  name: "comfy_xdit.status",
  async setup() {
    api.addEventListener("comfy_xdit.progress", (event) => {
      const { step, total } = event.detail;
      panel().replaceChildren(escapeText(`xDiT sampling: step ${step}/${total}`));
    });
    api.addEventListener("comfy_xdit.status", () => refresh());
    await refresh();
  },
});
