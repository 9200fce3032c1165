"""``patchrec serve``: online recommendation over HTTP for any trained model (docs/serve.md).

Example::

    patchrec serve --model runs/demo/pft-i                 # an LLM run: plan and settings from its config
    patchrec serve --model runs/sasrec-persrec --db users.sqlite --port 8080

``--model`` is a ``patchrec baseline`` output directory (popularity, GRU4Rec, SASRec / HSTU with or without
PerSRec) or an LLM run (a run directory, its ``model/``, or a checkpoint; the plan vanilla / pft-i / pft-s /
persrec and its options come from the run's ``train_config.json`` as ``patchrec eval`` resolves them, the
catalog and prompt from its ``data``). API: ``POST /v1/events``, ``POST /v1/recommend``,
``GET /v1/users/{id}``, ``GET /healthz``, ``GET /metrics``; OpenAPI at ``/openapi.json``.

Concurrent requests are packed into one batch (``--batch-window-ms``, ``--batch-rows``; ``--batch-requests
1`` turns batching off). Users' interactions and PerSRec states live in SQLite (``--db``). Binds 127.0.0.1;
any other address needs ``--token-file``. SIGTERM / Ctrl-C drain the requests in flight, then exit 0.
Needs the ``serve`` extra: ``pip install -e ".[serve]"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from patchrec.commands.eval import (
    FALLBACK,
    PERSREC_OPTIONS,
    find_train_config,
    resolve_model_path,
    resolve_settings,
)

DEFAULTS_NOTE = "(default %(default)s)"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from patchrec.serve.config import ServeConfig

    d = ServeConfig()
    parser = subparsers.add_parser(
        "serve", help="serve a trained model over HTTP (dynamic batching, SQLite users and PerSRec states)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="patchrec baseline directory, or an LLM run / model directory / checkpoint")
    model.add_argument("--data", default=None,
                       help="LLM: release directory or 'synthetic' (default: its train_config.json's data)")
    model.add_argument("--tokenizer", default=None, help="LLM: tokenizer directory (default: the model's)")
    model.add_argument("--ranking", choices=("exact", "beam"), default="exact",
                       help="LLM: exact (every title's log-likelihood) or beam " + DEFAULTS_NOTE)
    model.add_argument("--protocol", choices=("authors", "clean"), default="authors",
                       help="LLM beam protocol " + DEFAULTS_NOTE)
    model.add_argument("--beams", type=int, default=20, help="LLM beam: titles returned, the largest k "
                       + DEFAULTS_NOTE)
    model.add_argument("--groups", type=int, default=20, help="LLM beam: diverse groups " + DEFAULTS_NOTE)
    model.add_argument("--diversity", type=float, default=0.8,
                       help="LLM beam: Hamming penalty " + DEFAULTS_NOTE)
    model.add_argument("--max-rows", type=int, default=8192,
                       help="LLM: rows per forward pass " + DEFAULTS_NOTE)
    model.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="LLM weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    model.add_argument("--refold-every", type=int, default=d.refold_every,
                       help="PerSRec window layout: rebuild a user's state every m interactions "
                            "(provisional default %(default)s)")

    net = parser.add_argument_group("network and storage")
    net.add_argument("--host", default=d.host, help="address to bind " + DEFAULTS_NOTE)
    net.add_argument("--port", type=int, default=d.port, help="TCP port, 0 = any free one " + DEFAULTS_NOTE)
    net.add_argument("--token-file", default=None,
                     help="file with a bearer token every request must carry (required off loopback)")
    net.add_argument("--db", default=None, help="SQLite file (default: serve.sqlite in the model directory)")

    batch = parser.add_argument_group("batching and backpressure")
    batch.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                       help="wait this long after a request for others to join its batch " + DEFAULTS_NOTE)
    batch.add_argument("--batch-rows", type=int, default=d.batch_rows,
                       help="row budget of one batch " + DEFAULTS_NOTE)
    batch.add_argument("--batch-requests", type=int, default=d.batch_requests,
                       help="most requests per batch; 1 = batching off " + DEFAULTS_NOTE)
    batch.add_argument("--queue-size", type=int, default=d.queue_size,
                       help="waiting requests before 503 + Retry-After " + DEFAULTS_NOTE)
    batch.add_argument("--timeout-s", type=float, default=d.timeout_s,
                       help="per-request timeout (504) " + DEFAULTS_NOTE)
    batch.add_argument("--drain-s", type=float, default=d.drain_s,
                       help="on SIGTERM, time allowed for requests in flight " + DEFAULTS_NOTE)

    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max-k", type=int, default=d.max_k, help="largest k " + DEFAULTS_NOTE)
    limits.add_argument("--max-history", type=int, default=d.max_history,
                        help="items of an inline history " + DEFAULTS_NOTE)
    limits.add_argument("--max-event-items", type=int, default=d.max_event_items,
                        help="items per events request " + DEFAULTS_NOTE)
    limits.add_argument("--max-users", type=int, default=d.max_users,
                        help="users per recommend request " + DEFAULTS_NOTE)
    limits.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help="largest request body " + DEFAULTS_NOTE)

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    run_group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run_group.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                           default="warning", help="server log level " + DEFAULTS_NOTE)
    parser.set_defaults(run=run)
    return parser


def serve_config(args: argparse.Namespace):
    from patchrec.serve.config import ServeConfig

    names = [f.name for f in dataclasses.fields(ServeConfig)]
    return ServeConfig(**{n: getattr(args, n) for n in names})


def llm_scorer(args: argparse.Namespace, device):
    """The LLM run's scorer, with its plan and settings resolved as ``patchrec eval`` resolves them."""
    import torch
    from transformers.utils import logging as hf_logging

    from patchrec.serve.llm import LLMScorer, LLMSettings

    hf_logging.disable_progress_bar()  # "Loading weights": a server's log is no terminal

    model_dir = resolve_model_path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model}: neither a patchrec baseline directory nor an LLM "
                                f"model (no config.json in {model_dir})")  # fmt: skip
    # no overrides: the run's settings (or eval's fallbacks), as `patchrec eval` with no flags resolves them
    given = argparse.Namespace(plan=None, k=None, g=None, max_items=None, force=False,
                               **dict.fromkeys(PERSREC_OPTIONS))  # fmt: skip
    settings, _ = resolve_settings(given, model_dir)
    persrec = {name: settings.get(name, FALLBACK[name]) for name in PERSREC_OPTIONS}
    data = args.data
    if data is None:
        path = find_train_config(model_dir)
        data = json.loads(path.read_text()).get("data") if path is not None else None
        if not data:
            raise ValueError(f"--model {args.model}: no train_config.json with 'data' found: pass --data")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    llm = LLMSettings(
        plan=settings["plan"], max_items=settings["max_items"], k=settings["k"], g=settings["g"], **persrec,
        ranking=args.ranking, protocol=args.protocol, beams=args.beams, groups=args.groups,
        diversity=args.diversity, max_rows=args.max_rows,
    )  # fmt: skip
    scorer = LLMScorer(model_dir, data, llm, tokenizer=args.tokenizer, device=device,
                       dtype=getattr(torch, dtype_name), refold_every=args.refold_every)  # fmt: skip
    return scorer, model_dir


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        from patchrec.serve.loading import baseline_kind, baseline_scorer
        from patchrec.serve.server import serve
    except ImportError as err:
        raise ValueError(f"patchrec serve needs the serve extra ({err}): pip install -e '.[serve]'") from err

    config = serve_config(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if baseline_kind(args.model) is not None:
        llm_only = {"--data": args.data, "--tokenizer": args.tokenizer, "--dtype": args.dtype}
        given = [flag for flag, value in llm_only.items() if value is not None]
        if given or args.ranking != "exact":
            raise ValueError(f"{', '.join(given) or '--ranking'} apply to LLM models, not a baseline "
                             "directory")
        scorer = baseline_scorer(args.model, refold_every=config.refold_every, device=device)
        model_dir = Path(args.model)
    else:
        scorer, model_dir = llm_scorer(args, device)
    return serve(scorer, config, model_dir, log_level=args.log_level)


__all__ = ["add_parser", "run", "serve_config"]
