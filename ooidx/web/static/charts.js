// Small SVG charts for the management page: a line chart of a time series and
// horizontal stacked bars. No library: plain DOM, sized to their container.

const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function frame(container, height, label) {
  const width = Math.max(240, Math.floor(container.clientWidth || 480));
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", height, role: "img",
                          "aria-label": label, preserveAspectRatio: "none" });
  svg.appendChild(el("title", {}, label));
  container.replaceChildren(svg);
  return { svg, width };
}

// A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten.
export function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit",
                                                     hourCycle: "h23" });
}

// An axis label: whole numbers as they are, fractions with the digits the scale needs.
function tick(value, max, format) {
  if (format) return format(value);
  if (Number.isInteger(value)) return String(value);
  return value.toFixed(max < 1 ? 2 : 1);
}

// points: [{t: seconds, v: number}], oldest first.
export function lineChart(container, points, { format = String, axis = null, label = "", height = 170 } = {}) {
  const latest = points.length ? points[points.length - 1].v : null;
  const peak = points.reduce((m, p) => Math.max(m, p.v), 0);
  const summary = points.length
    ? `${label}: now ${format(latest)}, peak ${format(peak)} over the last ${points.length} samples`
    : `${label}: waiting for data`;
  const { svg, width } = frame(container, height, summary);
  const left = 64, right = 12, top = 12, bottom = 24;
  const plotW = width - left - right, plotH = height - top - bottom;
  const max = niceMax(peak);

  for (const fraction of [0, 0.5, 1]) {
    const y = top + plotH - fraction * plotH;
    svg.appendChild(el("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }));
    svg.appendChild(el("text", { x: left - 8, y: y + 4, class: "axis", "text-anchor": "end" }, tick(max * fraction, max, axis)));
  }
  if (points.length < 2) {
    svg.appendChild(el("text", { x: left + plotW / 2, y: top + plotH / 2, class: "axis waiting",
                                 "text-anchor": "middle" }, "Collecting samples…"));
    return;
  }
  const t0 = points[0].t, t1 = points[points.length - 1].t;
  const span = Math.max(t1 - t0, 1);
  const x = (t) => left + ((t - t0) / span) * plotW;
  const y = (v) => top + plotH - (Math.max(v, 0) / max) * plotH;
  const line = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join("");
  const base = (top + plotH).toFixed(1);
  svg.appendChild(el("path", { d: `${line}L${x(t1).toFixed(1)},${base}L${x(t0).toFixed(1)},${base}Z`, class: "area" }));
  svg.appendChild(el("path", { d: line, class: "line" }));
  const last = points[points.length - 1];
  svg.appendChild(el("circle", { cx: x(last.t), cy: y(last.v), r: 3.5, class: "point" }));
  svg.appendChild(el("text", { x: left, y: height - 6, class: "axis" }, clock(t0)));
  svg.appendChild(el("text", { x: width - right, y: height - 6, class: "axis", "text-anchor": "end" }, clock(t1)));
}

// rows: [{label, hits, misses}]; drawn as one stacked bar each, largest first.
export function barChart(container, rows, { format = String, label = "" } = {}) {
  const shown = rows.slice(0, 12);
  const rowH = 26, top = 28, bottom = 8;
  const height = top + Math.max(shown.length, 1) * rowH + bottom;
  const summary = shown.length
    ? `${label}: ` + shown.map((r) => `${r.label} ${format(r.hits)} hits, ${format(r.misses)} misses`).join("; ")
    : `${label}: no requests yet`;
  const { svg, width } = frame(container, height, summary);
  const left = Math.min(200, Math.max(90, width * 0.22)), right = 110;
  const plotW = Math.max(width - left - right, 40);

  // legend
  svg.appendChild(el("rect", { x: left, y: 6, width: 12, height: 12, rx: 2, class: "bar-hits" }));
  svg.appendChild(el("text", { x: left + 18, y: 16, class: "axis" }, "hits"));
  svg.appendChild(el("rect", { x: left + 64, y: 6, width: 12, height: 12, rx: 2, class: "bar-misses" }));
  svg.appendChild(el("text", { x: left + 82, y: 16, class: "axis" }, "misses"));

  if (!shown.length) {
    svg.appendChild(el("text", { x: left, y: top + 16, class: "axis waiting" }, "No requests through the proxy yet."));
    return;
  }
  const max = niceMax(Math.max(...shown.map((r) => r.hits + r.misses)));
  shown.forEach((row, i) => {
    const y = top + i * rowH;
    const name = row.label.length > 26 ? row.label.slice(0, 25) + "…" : row.label;
    svg.appendChild(el("text", { x: left - 8, y: y + 16, class: "label", "text-anchor": "end" }, name));
    const hitsW = (row.hits / max) * plotW, missesW = (row.misses / max) * plotW;
    svg.appendChild(el("rect", { x: left, y: y + 4, width: Math.max(hitsW, 0), height: rowH - 8, rx: 2, class: "bar-hits" }));
    svg.appendChild(el("rect", { x: left + hitsW, y: y + 4, width: Math.max(missesW, 0), height: rowH - 8, rx: 2,
                                 class: "bar-misses" }));
    svg.appendChild(el("text", { x: left + hitsW + missesW + 6, y: y + 16, class: "axis" },
                       `${format(row.hits)} / ${format(row.misses)}`));
  });
}
