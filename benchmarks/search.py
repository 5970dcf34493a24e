"""Search: FAISS build time and recall@10 (exact against HNSW and IVF), and `threetowers
serve`'s queries/s and p50/p99 latency with 1 and 8 concurrent clients, at 1k, 20k and 200k
indexed vectors; and `threetowers index`'s own rate on the world's test images.

    .venv/bin/python benchmarks/search.py [--run runs/demo] [--quick]

The large indexes hold synthetic vectors shaped like the run's index rows (each part a unit
vector, clustered as embeddings are), so the served queries are the run's own text
embeddings, as in use. The server is the real command in its own process; the clients are
threads of this one, so on a 2-core machine they share the cores with it. Writes
``benchmarks/results/search.json`` and ``search.md``; times come with the peak fp32 matmul
measured in the same run, and nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import matmul  # noqa: E402

from threetowers.apps.search import ann  # noqa: E402
from threetowers.apps.search.build import build_index  # noqa: E402
from threetowers.apps.search.index_files import Contents, Layout, write_index  # noqa: E402
from threetowers.apps.search.items import index_source  # noqa: E402
from threetowers.apps.search.parts import Parts  # noqa: E402
from threetowers.model.trained import load_trained  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUERIES = [
    f"a {size} {colour} {shape} {where} on {place}"
    for size in ("small", "big")
    for colour in ("red", "blue", "green", "yellow")
    for shape in ("star", "circle", "house", "heart", "arrow")
    for where in ("at the top", "in the lower left")
    for place in ("sand", "grass")
]


def synthetic(n: int, parts: Parts, seed: int) -> np.ndarray:
    """``n`` rows of unit parts drawn around 256 centres per part (float32)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in parts.names:
        centres = rng.standard_normal((256, parts.dim)).astype(np.float32)
        x = centres[rng.integers(0, 256, n)] + 0.7 * rng.standard_normal((n, parts.dim))
        blocks.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def faiss_side(vectors: np.ndarray, queries: np.ndarray, kinds: list[str]) -> dict:
    """Build time, recall@10 against exact search and in-process ms/query of each kind."""
    out = {}
    truth = ann.exact_top(vectors, queries, 10)
    for kind in kinds:
        index, record = ann.build_ann(vectors, queries, kind)
        start = time.perf_counter()
        for row in queries:
            ann.ann_search(index, record, row[None], 10)
        per_query = (time.perf_counter() - start) / len(queries)
        _, found = ann.ann_search(index, record, queries, 10)
        out[kind] = {
            "build_seconds": record.build_seconds,
            "params": record.params,
            "recall_at_10": ann.recall(found, truth),
            "ms_per_query": per_query * 1e3,
        }
        print(
            f"  {kind:>5}: build {record.build_seconds:6.2f} s, recall@10 "
            f"{out[kind]['recall_at_10']:.3f} {record.params}, "
            f"{per_query * 1e3:.2f} ms/query",
            flush=True,
        )
    return out


def write_synthetic_index(directory: Path, run, vectors: np.ndarray, parts: Parts) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="JPEG")
    thumbnail = buffer.getvalue()
    n = len(vectors)
    sizes = np.zeros(n, np.int64)
    sizes[0] = len(thumbnail)  # one stored thumbnail: the benchmark never asks for them
    contents = Contents(
        vectors=vectors,
        ids=[f"s{i}" for i in range(n)],
        locations=["synthetic"] * n,
        captions=[[] for _ in range(n)],
        caption_vectors=np.zeros((0, vectors.shape[1]), np.float32),
        thumbnail_sizes=sizes,
        thumbnails=thumbnail,
    )
    header = {
        "fingerprint": run.fingerprint,
        "run": str(run.run_dir.resolve()),
        "step": run.step,
        "mode": run.model.mode,
        "source": f"{n} synthetic vectors",
    }
    manifest = write_index(Layout(directory), contents, parts, header)
    manifest |= {"bad_samples": {}, "skipped_examples": []}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def serve(directory: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "threetowers"), "serve", str(directory)]
    process = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/api/info", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def load(url: str, clients: int, per_client: int, alpha: float) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as session:
            for i in range(per_client):
                text = QUERIES[(number * per_client + i) % len(QUERIES)]
                start = time.perf_counter()
                response = session.get(
                    "/api/search", params={"text": text, "k": 10, "alpha": alpha}
                )
                elapsed = time.perf_counter() - start
                response.raise_for_status()
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(ordered),
        "queries_per_s": len(ordered) / wall,
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
    }


def served(directory: Path, requests: int, alpha: float) -> dict:
    process, url = serve(directory)
    try:
        for _ in range(5):  # warm-up
            httpx.get(url + "/api/search", params={"text": QUERIES[0], "k": 10})
        out = {}
        for clients in (1, 8):
            out[f"clients_{clients}"] = result = load(url, clients, requests // clients, alpha)
            print(
                f"  served, {clients} client(s): {result['queries_per_s']:.0f} queries/s, "
                f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms",
                flush=True,
            )
        return out
    finally:
        process.terminate()
        process.wait(timeout=30)


def index_rate(run, retrieval: Path, work: Path) -> dict:
    """`threetowers index` end to end (decode, embed with f and h, FAISS, write) on the
    world's test images."""
    source = index_source(data=retrieval)
    start = time.perf_counter()
    manifest = build_index(run, source, work / "world-index", progress=False)
    seconds = time.perf_counter() - start
    print(f"  index of {manifest['images']} world test images: {seconds:.1f} s", flush=True)
    return {"images": manifest["images"], "captions": manifest["captions"], "seconds": seconds}


def real_side(run, pairs: Path, work: Path, weights: dict, parts: Parts) -> dict:
    """The same FAISS comparison on the run's own embeddings of the world's training pairs:
    images searched by captions, captions by images (the served directions)."""
    start = time.perf_counter()
    build_index(run, index_source(data=pairs), work / "pairs-index", exact_below=0, progress=False)
    seconds = time.perf_counter() - start
    images = np.load(work / "pairs-index" / "images.npy").astype(np.float32)
    captions = np.load(work / "pairs-index" / "captions.npy").astype(np.float32)
    print(
        f"{len(images)} real image and {len(captions)} caption vectors ({seconds:.0f} s to index)",
        flush=True,
    )
    rng = np.random.default_rng(0)

    def sample(rows: np.ndarray) -> np.ndarray:
        return parts.weighted(rows[rng.permutation(len(rows))[:256]], weights)

    kinds = ["exact", "hnsw", "ivf"]
    return {
        "index_seconds": seconds,
        "images": {"vectors": len(images), "faiss": faiss_side(images, sample(captions), kinds)},
        "captions": {
            "vectors": len(captions),
            "faiss": faiss_side(captions, sample(images), kinds),
        },
    }


def markdown(results: dict) -> str:
    peak = results["peak_matmul_gflops"]
    lines = [
        "# Search benchmark",
        "",
        f"CPU, {results['cores']} cores; peak fp32 matmul {peak:.0f} GFLOP/s in the same run. "
        f"Index rows: {results['parts']} parts of {results['part_dim']} (the run's shape); "
        f"served queries: the run's text embeddings at alpha = {results['alpha']}.",
        "",
        "| vectors | kind | build s | recall@10 | params | ms/query (in process) |",
        "|---|---|---|---|---|---|",
    ]
    for n, size in results["sizes"].items():
        for kind, row in size["faiss"].items():
            lines.append(
                f"| {n} | {kind} | {row['build_seconds']:.2f} | {row['recall_at_10']:.3f} "
                f"| {row['params'] or '—'} | {row['ms_per_query']:.2f} |"
            )
    lines += [
        "",
        "| vectors | served index | clients | queries/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for n, size in results["sizes"].items():
        for row in size["server"].values():
            lines.append(
                f"| {n} | {size['served_kind']} | {row['clients']} | {row['queries_per_s']:.0f} "
                f"| {row['p50_ms']:.1f} | {row['p99_ms']:.1f} |"
            )
    real = results.get("real")
    if real:
        lines += [
            "",
            "The run's own embeddings of the world's training pairs (256 queries from the "
            "other side, a fresh draw, at the same alpha):",
            "",
            "| searched | vectors | kind | build s | recall@10 | params | ms/query |",
            "|---|---|---|---|---|---|---|",
        ]
        for searched in ("images", "captions"):
            for kind, row in real[searched]["faiss"].items():
                lines.append(
                    f"| {searched} | {real[searched]['vectors']} | {kind} "
                    f"| {row['build_seconds']:.2f} | {row['recall_at_10']:.3f} "
                    f"| {row['params'] or '—'} | {row['ms_per_query']:.2f} |"
                )
    rate = results["index_world"]
    lines += [
        "",
        f"`threetowers index` on the world's {rate['images']} test images (and "
        f"{rate['captions']} captions): {rate['seconds']:.1f} s "
        f"({rate['seconds'] * peak / 160:.1f} s normalised to 160 GFLOP/s).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs/demo"), help="a trained run")
    parser.add_argument("--quick", action="store_true", help="1k and 20k only, fewer requests")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    run = load_trained(args.run)
    parts = Parts.of(run.model)
    alpha = 0.5 if parts.mixes else 1.0
    rest = {name: (1 - alpha) / (len(parts.names) - 1) for name in parts.names[1:]}
    weights = {"f": alpha} | rest
    peak = matmul.peak_matmul_gflops(torch.device("cpu"))
    print(f"peak fp32 matmul: {peak:.0f} GFLOP/s", flush=True)
    sizes = (1_000, 20_000) if args.quick else (1_000, 20_000, 200_000)
    requests = 80 if args.quick else 400
    results = {
        "peak_matmul_gflops": peak,
        "cores": torch.get_num_threads(),
        "run": str(Path(args.run).resolve()),
        "parts": len(parts.names),
        "part_dim": parts.dim,
        "alpha": alpha,
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in sizes:
            print(f"{n} vectors", flush=True)
            vectors = synthetic(n, parts, seed=n)
            queries = parts.weighted(synthetic(256, parts, seed=n + 1), weights)
            entry = {"faiss": faiss_side(vectors, queries, ["exact", "hnsw", "ivf"])}
            manifest = write_synthetic_index(work / str(n), run, vectors, parts)
            entry["served_kind"] = manifest["ann"]["kind"]
            entry["server"] = served(work / str(n), requests, alpha)
            results["sizes"][str(n)] = entry
        retrieval = Path(run.cfg.data.world.dir) / "retrieval" / "dataset_world.json"
        results["index_world"] = index_rate(run, ROOT / retrieval, work)
        if not args.quick:
            pairs = ROOT / run.cfg.data.world.dir / "pairs"
            results["real"] = real_side(run, pairs, work, weights, parts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "search.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
