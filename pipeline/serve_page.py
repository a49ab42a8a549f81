"""The page `GET /` of the Serve app (`pipeline.serve`): pick or drop an image, see the overlay
and the instance table. Plain HTML and JavaScript, no build step; it calls the app's own
`/predict` (JSON for the table, `format=png` for the overlay) and `/model`."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>PEP instance segmentation</title>
<style>
  body { font: 14px sans-serif; margin: 1.5em; max-width: 1100px; }
  #drop { border: 2px dashed #888; padding: 1.5em; text-align: center; margin: 1em 0; }
  #drop.over { background: #eef; }
  #overlay { max-width: 100%; display: none; image-rendering: pixelated; }
  table { border-collapse: collapse; margin-top: 1em; }
  td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
  .error { color: #b00; }
</style>
</head>
<body>
<h1>PEP instance segmentation</h1>
<p id="model">model: loading...</p>
<div id="drop">Drop a JPEG, PNG or TIFF image here, or
  <input type="file" id="file" accept="image/jpeg,image/png,image/tiff"></div>
<label>score threshold <input id="threshold" type="number" min="0" max="1" step="0.05"
  placeholder="model default"></label>
<label>max instances <input id="max" type="number" min="1" step="1"
  placeholder="model default"></label>
<p id="status"></p>
<img id="overlay" alt="overlay of the predicted instances">
<table id="instances">
  <thead><tr><th>#</th><th>class</th><th>score</th><th>box x, y, w, h</th></tr></thead>
  <tbody></tbody>
</table>
<script>
const $ = (id) => document.getElementById(id);

fetch("model").then((r) => r.json()).then((m) => {
  $("model").textContent = "model: " + m.uri + (m.version ? " (version " + m.version + ")" : "")
    + (m.follows ? ", following " + m.follows : "") + ", on " + m.device;
});

async function predict(file) {
  const query = new URLSearchParams();
  if ($("threshold").value !== "") query.set("score_threshold", $("threshold").value);
  if ($("max").value !== "") query.set("max_instances", $("max").value);
  const send = (extra) => fetch("predict?" + query + extra, {
    method: "POST", body: file,
    headers: {"Content-Type": file.type || "application/octet-stream"},
  });
  $("status").className = "";
  $("status").textContent = "predicting " + file.name + "...";
  const [json, png] = await Promise.all([send(""), send("&format=png")]);
  if (!json.ok) {
    let reason = json.statusText;
    try { reason = (await json.json()).error; } catch (e) {}
    $("status").className = "error";
    $("status").textContent = json.status + ": " + reason;
    return;
  }
  const instances = await json.json();
  const body = $("instances").tBodies[0];
  body.replaceChildren();
  instances.forEach((r, i) => {
    const row = body.insertRow();
    const box = r.bbox.map((v) => Math.round(v)).join(", ");
    [i + 1, r.category_name, r.score.toFixed(3), box].forEach((v) => {
      row.insertCell().textContent = v;
    });
  });
  if (png.ok) {
    $("overlay").src = URL.createObjectURL(await png.blob());
    $("overlay").style.display = "block";
  }
  $("status").textContent = file.name + ": " + instances.length + " instance(s), model version "
    + json.headers.get("X-Model-Version");
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) predict(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) predict(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""
