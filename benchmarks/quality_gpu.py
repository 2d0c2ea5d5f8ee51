"""Quality of every setting served by SGLang on the GPU machine (the sglang-gpu rows of quality_smollm2.json).

For each setting: start a server (plain ``sglang.launch_server`` for ``dense``, ``sglang_sparse.launch_server``
with the setting's flags otherwise), wait for /health, run the frontend-language harness
(:func:`sglang_sparse.eval.harness.run_eval`), write ``OUT_DIR/<setting>.json``, stop the server. A setting whose
server does not come up is recorded as failed and skipped. The flags match the CPU-reference settings of
benchmarks/quality_cpu.py (length floors low enough that every setting acts at every length).

    # on the GPU machine (haystack wheel reachable; --gguf converts the GGUF into --model first, needs `gguf`):
    python benchmarks/quality_gpu.py --model /tmp/q/smollm2 --gguf /tmp/q/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out-dir $OUT --samples 50 --configs dense,claa-keep0.2
    # back here: merge the per-setting files into the combined table and replot
    python benchmarks/quality_gpu.py --merge DIR/*.json

"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.quality_plot import DEFAULT_JSON, DEFAULT_PNG, plot  # noqa: E402

# every server: no prefill CUDA graphs (capturing them for a new model costs minutes of start-up; the
# sparse prefill runs without them anyway) and decode graphs only up to the harness's concurrency
COMMON_FLAGS = ["--disable-prefill-cuda-graph", "--cuda-graph-max-bs", "32"]
# every prompt (all are >= 1K tokens); CLAA leaves a request whose prompt starts with a cached prefix
# unfiltered (its prefix KV exists already), and the harness's prompts share the chat template's first page,
# so the radix cache is off for CLAA settings (with it on, ~30 % of the requests ran dense)
_CLAA = ["--sparse-prefill", "claa", "--claa-min-prompt-len", "16", "--disable-radix-cache"]
_PRHS = ["--sparse-decode", "prhs", "--prhs-min-context-len", "0"]
_ART = ["--art", "on"]
SETTINGS = {
    # name: (launcher module, extra flags)
    "dense": ("sglang.launch_server", ["--attention-backend", "flashinfer"]),
    "dense(sparse-backend)": ("sglang_sparse.launch_server", []),
    "claa-keep0.1": ("sglang_sparse.launch_server", _CLAA + ["--claa-keep-ratio", "0.1"]),
    "claa-keep0.2": ("sglang_sparse.launch_server", _CLAA + ["--claa-keep-ratio", "0.2"]),
    "claa-keep0.4": ("sglang_sparse.launch_server", _CLAA + ["--claa-keep-ratio", "0.4"]),
    "prhs-d0.05-b1/16": ("sglang_sparse.launch_server", _PRHS + ["--prhs-delta", "0.05", "--prhs-budget", "1/16"]),
    "prhs-d0.01-b1/16": ("sglang_sparse.launch_server", _PRHS + ["--prhs-delta", "0.01", "--prhs-budget", "1/16"]),
    "prhs-d0.05-b1/4": ("sglang_sparse.launch_server", _PRHS + ["--prhs-delta", "0.05", "--prhs-budget", "1/4"]),
    "claa-keep0.2-F24": ("sglang_sparse.launch_server", _CLAA + ["--claa-keep-ratio", "0.2",
                                                                 "--claa-filter-layer", "24"]),
    "art-tau0.01": ("sglang_sparse.launch_server", _ART + ["--art-tau-mag", "0.01", "--art-tau-dir", "1e-4"]),
    "art-tau0.001": ("sglang_sparse.launch_server", _ART + ["--art-tau-mag", "1e-3", "--art-tau-dir", "1e-6"]),
    "all(claa0.2+prhs+art-tau0.001)": ("sglang_sparse.launch_server",
                                       _CLAA + ["--claa-keep-ratio", "0.2"] + _PRHS
                                       + ["--prhs-delta", "0.05", "--prhs-budget", "1/16"]
                                       + _ART + ["--art-tau-mag", "1e-3", "--art-tau-dir", "1e-6"]),
}


def _csv(s):
    return [x for x in s.split(",") if x.strip()]


# SGLang's start-up error when the GPU memory free at its start (other servers on the same GPU) leaves no room
# for the KV pool; worth another try once the other servers have settled
NO_KV_MEMORY = "leave no GPU memory for the KV cache"
START_RETRIES = 2


def run_setting(name: str, args) -> dict:
    """One setting, with up to START_RETRIES more tries (30 s apart) when its server found too little free
    GPU memory at start-up (several settings sharing one GPU start at about the same time)."""
    for attempt in range(START_RETRIES + 1):
        res = _run_setting_once(name, args)
        if not (res.get("failed") == "server did not come up" and NO_KV_MEMORY in res.get("log_tail", "")):
            return res
        if attempt < START_RETRIES:
            print(f"[quality_gpu] {name}: too little free GPU memory at start-up; trying again in 30 s", flush=True)
            time.sleep(30)
    return res


def _run_setting_once(name: str, args) -> dict:
    from benchmarks.serving import server

    module, flags = SETTINGS[name]
    cmd = [sys.executable, "-m", module, "--model-path", str(args.model), "--context-length", "8192",
           "--grammar-backend", "none", "--mem-fraction-static", str(args.mem_fraction)] + COMMON_FLAGS + flags \
        + args.server_args.split()
    safe = name.replace("/", "_")
    log_path = Path(args.out_dir) / f"server-{safe}.log"
    print(f"[quality_gpu] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(server(cmd, args.port, str(log_path), timeout=args.start_timeout))
        except (RuntimeError, TimeoutError) as e:     # exited or never healthy
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            print(f"[quality_gpu] {name}: server did not come up ({e.__class__.__name__})\n{tail}", flush=True)
            return {"config": name, "failed": "server did not come up", "log_tail": tail}
        up = time.time() - t0
        print(f"[quality_gpu] {name}: server up in {up:.0f}s; evaluating", flush=True)
        from sglang_sparse.eval.harness import format_table, run_eval

        res = run_eval(url, args.tasks, args.lengths, args.samples, seed=args.seed, haystack=args.haystack,
                       num_threads=args.num_threads, config=name, where="sglang-gpu", progress=True)
    res["meta"]["server_command"] = " ".join(cmd + ["--port", str(args.port)])
    res["meta"]["server_start_s"] = round(up, 1)
    print(format_table(res["rows"]), flush=True)
    errors = sum(r.get("errors", 0) for r in res["rows"])
    if errors:
        # requests that got no answer (a server that died mid-run) measure nothing: the file is kept for
        # diagnosis, marked failed, and --merge leaves it out
        from benchmarks.serving import problem_lines

        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        res["failed"] = f"{errors} of {sum(r['samples'] for r in res['rows'])} requests got no answer"
        res["server_problems"] = problem_lines(text, limit=10)
        print(f"[quality_gpu] {name}: {res['failed']}; server log: {res['server_problems']}", flush=True)
    (Path(args.out_dir) / f"{safe}.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def merge(files, json_path: Path, png: Path) -> None:
    from sglang_sparse.eval.harness import merge_rows

    for f in files:
        data = json.loads(Path(f).read_text())
        if "rows" not in data or "meta" not in data:
            print(f"skip {f} (not a harness result)")
            continue
        if data.get("failed") or any(r.get("errors") for r in data["rows"]):
            print(f"skip {f} (failed run: {data.get('failed') or 'requests without an answer'})")
            continue
        meta = dict(data["meta"])
        meta["records_file"] = Path(f).name
        merge_rows(json_path, data["rows"], f"sglang-gpu/{meta.get('config')}", meta)
        print(f"merged {f}: {len(data['rows'])} rows")
    plot(json.loads(json_path.read_text())["rows"], png)
    print(f"wrote {json_path}, {png}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="converted SmolLM2 checkpoint dir")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="SmolLM2 GGUF to convert into --model first (skipped when --model already holds it)")
    ap.add_argument("--configs", type=_csv, default=list(SETTINGS), help=f"subset of {list(SETTINGS)}")
    ap.add_argument("--tasks", type=_csv, default=["single_needle", "multi_key", "multi_value", "kv_retrieval",
                                                   "variable_tracking"])
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in _csv(s)], default=[1024, 2048, 4096, 7168])
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", default="essays")
    ap.add_argument("--num-threads", type=int, default=32)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--mem-fraction", type=float, default=0.6,
                    help="--mem-fraction-static of each server: a fraction of the GPU memory free when it starts "
                         "(0.3 lets several settings share one GPU)")
    ap.add_argument("--server-args", default="", help="extra flags for every server, e.g. '--disable-cuda-graph'")
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "quality_gpu_out")))
    ap.add_argument("--merge", nargs="+", default=None, help="merge these per-setting JSON files and replot")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG)
    args = ap.parse_args(argv)

    if args.merge:
        merge(args.merge, args.json, args.png)
        return 0
    if args.model is None:
        ap.error("--model is required (or --merge)")
    bad = [c for c in args.configs if c not in SETTINGS]
    if bad:
        ap.error(f"unknown settings {bad}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.gguf is not None:
        from benchmarks.models.smollm2 import ensure_smollm2

        ensure_smollm2(out=args.model, gguf=args.gguf)
    summary = {}
    for name in args.configs:
        res = run_setting(name, args)
        summary[name] = "failed" if res.get("failed") else "ok"
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[quality_gpu] {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
