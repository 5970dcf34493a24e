// The search page: a text or image query, re-run whenever alpha, k or the target changes.
// Results are built with textContent only: captions come from data and are never HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let query = null; // {text} or {image: Blob}
let latest = 0; // the newest request; answers to older ones are dropped
let timer = null;

async function start() {
  const info = await (await fetch("/api/info")).json();
  const captions = info.captions ? `, ${info.captions} captions` : "";
  $("about").textContent =
    `${info.images} images${captions} · ${info.mode} run at step ${info.step} · ${info.ann} index`;
  $("alpha-control").hidden = !info.mixes;
  $("target-choice").hidden = !info.captions;
  $("query").maxLength = info.limits.max_text_chars;
}

function params() {
  const out = new URLSearchParams({ k: $("k").value, alpha: $("alpha").value });
  if (query && query.image) out.set("target", $("target").value);
  return out;
}

async function search() {
  if (!query) return;
  const id = ++latest;
  const p = params();
  let response;
  if (query.text !== undefined) {
    p.set("text", query.text);
    response = await fetch(`/api/search?${p}`);
  } else {
    const form = new FormData();
    form.append("image", query.image, query.name || "query");
    response = await fetch(`/api/search?${p}`, { method: "POST", body: form });
  }
  const body = await response.json();
  if (id !== latest) return;
  if (!response.ok) {
    show([], body.error, true);
    return;
  }
  const mixed = $("alpha-control").hidden ? "" : ` at α = ${Number(body.alpha).toFixed(2)}`;
  show(body.results, `${body.results.length} results${mixed} in ${body.took_ms.toFixed(0)} ms`);
}

function show(results, message, isError = false) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
  const grid = $("results");
  grid.replaceChildren(
    ...results.map((hit, rank) => {
      const card = document.createElement("figure");
      card.className = "card";
      card.dataset.id = hit.id;
      card.dataset.rank = String(rank);
      const image = document.createElement("img");
      image.src = hit.image_url;
      image.alt = hit.caption || hit.id;
      image.loading = "lazy";
      const meta = document.createElement("figcaption");
      meta.className = "meta";
      const caption = document.createElement("div");
      caption.className = "caption";
      caption.textContent = hit.caption || hit.id;
      const score = document.createElement("div");
      score.className = "score";
      score.textContent = `${hit.score.toFixed(3)} · ${hit.id}`;
      meta.append(caption, score);
      card.append(image, meta);
      return card;
    }),
  );
}

function soon() {
  clearTimeout(timer);
  timer = setTimeout(search, 120);
}

function useImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    show([], "drop an image file", true);
    return;
  }
  query = { image: file, name: file.name };
  const preview = $("query-image");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  search();
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  query = { text: $("query").value };
  $("query-image").hidden = true;
  search();
});
$("alpha").addEventListener("input", () => {
  $("alpha-value").textContent = Number($("alpha").value).toFixed(2);
  soon();
});
$("k").addEventListener("change", search);
$("target").addEventListener("change", search);
$("upload").addEventListener("change", () => useImage($("upload").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  useImage(event.dataTransfer.files[0]);
});
start().catch(() => show([], "the server did not answer /api/info", true));
