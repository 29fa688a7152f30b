"""One engine process of ``cachegen bench stream``: ``python -m bench.stream_phase --spec F --out O``.

``populate``: store the context at every level (loading off) and time recompute and an unshaped local load.
``measure``: with the engine's store reads shaped to one bandwidth, time each fetch mode. The levels each load
used are read back from the connector's log lines by the orchestrator. With ``--trace`` (tc shaping only: the
process runs inside the shaped namespace, ``--link``) only the adaptive mode is timed, and every request replays
the trace on the real link from its first store bytes on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")


def _engine(spec: dict, shape: str, save_levels: list[str], store_url: str = ""):
    from vllm import LLM

    from cachegen.config import Settings
    from server.engine import llm_kwargs

    settings = Settings.from_env(
        store={"url": store_url or spec["store_url"]},
        codec={"save_levels": save_levels},
        stream={"shape_trace": shape, "prior_bandwidth_bps": spec.get("prior_bps", 1e9)},
    )
    return LLM(**llm_kwargs(settings, Path(spec["model_dir"]), is_connector=True, is_prefix_caching=False))


def _ttft(llm, ids: list[int], knobs: dict, max_tokens: int = 1) -> tuple[float, list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, extra_args={"kv_transfer_params": {"cachegen": knobs}}
    )
    started = time.perf_counter()
    output = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    return time.perf_counter() - started, list(output.outputs[0].token_ids)


def populate(spec: dict) -> dict:
    llm = _engine(spec, "", spec["all_levels"])
    ids = spec["prompt"]
    _ttft(llm, spec["warmup"], {"load": False, "save": False})
    _, reference = _ttft(llm, ids, {"load": False, "save": True}, max_tokens=spec["output_tokens"])
    _wait_stored(spec, ids)
    recompute = [_ttft(llm, ids, {"load": False, "save": False})[0] for _ in range(spec["repeats"])]
    smallest = spec["smallest_level"]
    local = [_ttft(llm, ids, {"levels": [smallest], "save": False})[0] for _ in range(spec["repeats"])]
    return {"reference": reference, "ttft_recompute_s": recompute, "ttft_local_smallest_s": local}


def _wait_stored(spec: dict, ids: list[int], timeout_s: float = 600) -> None:
    from cachegen.model import kv_layout, model_fingerprint
    from cachegen.spec import chunk_keys
    from cachegen.store import open_store

    model_dir = Path(spec["model_dir"])
    layout = kv_layout(model_dir, "bfloat16", spec["tokens_per_chunk"])
    keys = chunk_keys(ids, layout, model_fingerprint(model_dir, layout), tenant="")[
        : (len(ids) - 1) // layout.tokens_per_chunk
    ]
    store, deadline = open_store(spec["store_url"]), time.monotonic() + timeout_s
    while True:
        found = store.lookup(keys)
        if len(found) == len(keys) and all(len(info.levels) == len(spec["all_levels"]) for info in found):
            return
        if time.monotonic() > deadline:
            raise SystemExit("chunks did not reach the store at every level in time")
        time.sleep(0.5)


def measure(spec: dict, args: argparse.Namespace) -> dict:
    llm = _engine(spec, args.shape, ["raw"], args.store_url)
    ids = spec["prompt"]
    _ttft(llm, spec["warmup"], {"load": False, "save": False})
    replay = _Replay(args)
    modes = {"adaptive": spec["modes"]["adaptive"]} if args.trace else spec["modes"]
    results = {}
    for mode, knobs in modes.items():
        knobs = {**knobs, "save": False}
        runs = [replay(_ttft, llm, ids, knobs) for _ in range(spec["repeats"])]
        _, output = replay(_ttft, llm, ids, knobs, spec["output_tokens"])
        results[mode] = {"ttft_s": [seconds for seconds, _ in runs], "output": output, "rates_applied": replay.applied}
        label = args.shape or args.trace or "tc"
        print(f"  {label} {mode}: TTFT {sorted(s for s, _ in runs)}", file=sys.stderr, flush=True)
    return results


class _Replay:
    """Runs a request as it is, or (``--trace``) while the real link replays the trace from its first bytes."""

    def __init__(self, args: argparse.Namespace) -> None:
        from bench.netshape import NetnsLink
        from cachegen.stream.bandwidth import parse_trace

        self._link = NetnsLink(**json.loads(args.link)) if args.trace else None
        self._trace = parse_trace(Path(args.trace).read_text()) if args.trace else None
        self.applied: list[list[tuple[float, float]]] = []
        """Per request: (seconds since the trace's second 0, rate set) for each rate change made."""

    def __call__(self, request: Callable[..., _T], *args: object) -> _T:
        if self._link is None:
            return request(*args)
        from bench.netshape import TraceFollower

        with TraceFollower(self._link, self._trace) as follower:
            result = request(*args)
        self.applied.append([(round(rate.at_s, 4), rate.rate_bps) for rate in follower.applied])
        return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--phase", choices=["populate", "measure"], required=True)
    parser.add_argument("--store-url", default="", help="the store to measure from (default: the spec's)")
    parser.add_argument("--shape", default="", help="in-process shaping: a rate or trace file ('' for none)")
    parser.add_argument("--trace", default="", help="tc: replay this trace on --link for every request")
    parser.add_argument("--link", default="", help="tc: the shaped namespace, as JSON (bench.netshape.NetnsLink)")
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    result = populate(spec) if args.phase == "populate" else measure(spec, args)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
