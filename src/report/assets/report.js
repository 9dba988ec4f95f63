// fpipe report: draws the overlaid charts of the page with uPlot (inlined above this script)
// from the JSON in <script id="report-data">, then, once the page has loaded, records a
// self-check that tests and the render-time script read: how many plots were expected, how
// many drew data, any errors, and how long rendering took (`render_ms`: from the start of
// navigation to the last chart's first draw; `charts_ms`: the part this script took).
(function () {
  "use strict";
  var t0 = performance.now();
  // Script errors and failed resources, recorded from the start by the page's <head> script.
  var errors = window.__reportErrors || [];
  var consoleError = console.error;
  console.error = function () {
    errors.push(Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
  // Only chromatic colours: the self-check tells drawn lines from the grey grid and axes by
  // their colour.
  var PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#8c564b",
    "#bcbd22", "#17becf", "#9467bd", "#e41a1c", "#4daf4a"];
  // performance.now() when each plot first drew (uPlot draws in a microtask after `new`).
  var firstDraw = {};

  // Series with different x values share one x array: the union of all x, nulls elsewhere
  // (uPlot draws across the gaps with spanGaps).
  function align(series) {
    var xs = {};
    series.forEach(function (s) { s.x.forEach(function (x) { xs[x] = true; }); });
    var x = Object.keys(xs).map(Number).sort(function (a, b) { return a - b; });
    var at = new Map(x.map(function (v, i) { return [v, i]; }));
    var data = [x];
    series.forEach(function (s) {
      var y = new Array(x.length).fill(null);
      for (var i = 0; i < s.x.length; i++) { y[at.get(s.x[i])] = s.y[i]; }
      data.push(y);
    });
    return data;
  }

  function fmt(v) {
    if (v == null || !isFinite(v)) return "-";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return String(+v.toPrecision(4));
  }

  // Tick labels; a log axis passes null for the ticks it leaves unlabelled.
  function ticks(u, vals) {
    return vals.map(function (v) { return v == null ? "" : fmt(v); });
  }

  function draw(plot, el) {
    var width = Math.max(320, el.clientWidth - 16);
    var opts = {
      width: width,
      height: 320,
      hooks: {
        draw: [function () {
          if (!(plot.id in firstDraw)) firstDraw[plot.id] = performance.now();
        }]
      },
      scales: { x: plot.log_x ? { time: false, distr: 3, log: 10 } : { time: false } },
      axes: [
        { label: plot.x_label, values: ticks },
        { label: plot.y_label, size: 60, values: ticks }
      ],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      series: [{ label: plot.x_label, value: function (u, v) { return fmt(v); } }].concat(
        plot.series.map(function (s, i) {
          return {
            label: s.label,
            stroke: PALETTE[i % PALETTE.length],
            width: 2,
            dash: s.run > 0 ? [6, 4] : undefined,
            spanGaps: true,
            points: { show: s.x.length < 3 },
            value: function (u, v) { return fmt(v); }
          };
        }))
    };
    return new uPlot(opts, align(plot.series), el);
  }

  // Pixels of a line: opaque enough and coloured (grid, axes and tick text are grey).
  function drawnPixels(el) {
    var cv = el.querySelector("canvas");
    if (!cv || cv.width === 0 || cv.height === 0) return 0;
    var px = cv.getContext("2d").getImageData(0, 0, cv.width, cv.height).data;
    var n = 0;
    for (var i = 0; i < px.length; i += 4) {
      var hi = Math.max(px[i], px[i + 1], px[i + 2]);
      var lo = Math.min(px[i], px[i + 1], px[i + 2]);
      if (px[i + 3] > 128 && hi - lo > 60) n++;
    }
    return n;
  }

  var data = JSON.parse(document.getElementById("report-data").textContent);
  data.plots.forEach(function (plot) {
    var el = document.getElementById("plot-" + plot.id);
    if (!el) { errors.push("no element for plot " + plot.id); return; }
    try {
      draw(plot, el);
    } catch (e) {
      errors.push("plot " + plot.id + ": " + e);
    }
  });
  var round = function (ms) { return Math.round(ms * 10) / 10; };
  // Runs on `load`, after the microtasks in which uPlot drew.
  function finish() {
    var drawn = 0;
    var last = t0;
    data.plots.forEach(function (plot) {
      var el = document.getElementById("plot-" + plot.id);
      if (!el) return;
      if (!(plot.id in firstDraw)) { errors.push("plot " + plot.id + " never drew"); return; }
      last = Math.max(last, firstDraw[plot.id]);
      if (drawnPixels(el) > 20) drawn++; else errors.push("plot " + plot.id + " drew no line");
    });
    var images = document.querySelectorAll("img.inline");
    var shown = 0;
    images.forEach(function (img) { if (img.complete && img.naturalWidth > 0) shown++; });
    var failed = performance.getEntriesByType("resource").filter(function (r) {
      return r.name.indexOf("data:") !== 0;
    }).map(function (r) { return r.name; });
    var check = {
      plots: data.plots.length,
      drawn: drawn,
      images: images.length,
      images_shown: shown,
      external_resources: failed,
      errors: errors,
      render_ms: round(last),
      charts_ms: round(last - t0)
    };
    document.getElementById("selfcheck").textContent = JSON.stringify(check);
    document.body.setAttribute("data-rendered", "1");
  }
  if (document.readyState === "complete") finish(); else window.addEventListener("load", finish);
})();
