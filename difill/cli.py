"""The ``difill`` command line. The subcommands and their output are a contract that editor
plugins and CI scripts rely on: keep them stable.

    difill serve [--tcp HOST:PORT]          LSP over stdio (or TCP)
    difill complete PATH:LINE:COL [--json]  the completion the server would offer there
    difill infill [--input F] [--output F]  JSON Lines in, JSON Lines out
    difill info [--json]                    version, model, backend, device, languages
    difill demo [FILE]                      complete at the marked cursor of a sample file
    difill eval ...                         fill-in-the-middle regression tests

Global options (before or after the subcommand): --model PATH, --backend torch|onnx,
--device cpu|cuda, --log-level. A user mistake prints one line on stderr and exits 2;
a model that cannot be loaded exits 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TextIO

from difill import __version__, default_model_path

# EngineSettings.dtype's names (difill.inference.engine.DTYPES, which imports torch: not at parse time).
DTYPE_CHOICES = ["float32", "bfloat16", "float16", "int8"]

log = logging.getLogger("difill")

CURSOR_MARK = "<|cursor|>"
MAX_FILE_BYTES = 5 * 2**20


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def global_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--model", default=argparse.SUPPRESS, help="model directory (default: the bundled model)")
    parent.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"], default=argparse.SUPPRESS)
    parent.add_argument("--device", choices=["cpu", "cuda"], default=argparse.SUPPRESS)
    parent.add_argument("--dtype", choices=DTYPE_CHOICES, default=argparse.SUPPRESS,
                        help="torch weights (default: bfloat16 on CUDA, float16 weights with float32 arithmetic on "
                             "the CPU; bfloat16 batches faster on CPUs with AMX; int8: CPU int8 weights, faster, rounds more)")
    parent.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING (default) or ERROR")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parent = global_options()
    parser = argparse.ArgumentParser(prog="difill", description="Code completion by masked diffusion.", parents=[parent])
    parser.add_argument("--version", action="version", version=f"difill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[parent], help="run the language server (stdio by default)")
    serve.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead of stdio")
    serve.add_argument("--log-file", help="also write the log to this file")

    complete = sub.add_parser("complete", parents=[parent], help="complete at PATH:LINE:COL (1-based)")
    complete.add_argument("position", metavar="PATH:LINE:COL")
    complete.add_argument("--json", action="store_true", help="print a JSON object with the completion and its stats")
    add_infill_options(complete)

    infill = sub.add_parser("infill", parents=[parent], help="complete JSON Lines cases (id, prefix, suffix, language)")
    infill.add_argument("--input", default="-", help="JSON Lines file (default: stdin)")
    infill.add_argument("--output", default="-", help="JSON Lines file (default: stdout)")
    infill.add_argument("--batch-size", type=int, default=8, help="cases denoised together (default 8)")
    infill.add_argument("--endpoint", metavar="URL", help="complete on a difill serve-model service instead of "
                        "the local model (bearer token: $DIFILL_API_TOKEN)")

    info = sub.add_parser("info", parents=[parent], help="version, model, backend, device and languages")
    info.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", parents=[parent], help=f"complete a sample file at its {CURSOR_MARK} mark")
    demo.add_argument("file", nargs="?", help=f"a file containing {CURSOR_MARK} (default: a bundled Python sample)")

    serve_model = sub.add_parser("serve-model", parents=[parent], help="HTTP inference service: OpenAI-style "
                                 "completions, requests batched across clients, optionally on Ray Serve")
    try:
        from difill.service import add_arguments as add_service_arguments
    except ImportError:  # an install without difill.service: the subcommand says so when run
        serve_model.set_defaults(service_missing=True)
    else:
        add_service_arguments(serve_model)

    sub.add_parser("eval", parents=[parent], add_help=False, help="fill-in-the-middle regression tests (difill eval --help)")
    return parser


def add_infill_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["auto", "line", "block"], default="auto")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--steps", type=int, help="fixed number of denoising steps (default: confidence threshold)")
    parser.add_argument("--no-syntax", action="store_true", help="turn the tree-sitter constraint off")


def load_engine(args: argparse.Namespace):
    from difill.inference.engine import Engine, EngineSettings

    try:
        return Engine.load(getattr(args, "model", None), backend=getattr(args, "backend", "torch"),
                           device=getattr(args, "device", "cpu"), settings=EngineSettings(dtype=getattr(args, "dtype", None)))
    except ValueError as exc:  # options that do not go together, e.g. --backend onnx --dtype bfloat16
        raise UserError(str(exc)) from exc


def read_source(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory")
    data = path.read_bytes()
    if len(data) > MAX_FILE_BYTES:
        raise UserError(f"{path}: {len(data)} bytes is larger than the {MAX_FILE_BYTES} bytes difill completes in")
    if b"\0" in data[:8192]:
        raise UserError(f"{path}: looks like a binary file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def parse_position(spec: str) -> tuple[Path, int, int]:
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise UserError(f"{spec!r}: expected PATH:LINE:COL with 1-based line and column numbers")
    line, col = int(parts[1]), int(parts[2])
    if line < 1 or col < 1:
        raise UserError(f"{spec!r}: line and column start at 1")
    return Path(parts[0]), line, col


def offset_of(text: str, line: int, col: int, where: str) -> int:
    """Character offset of a 1-based line and column (the column counts characters)."""
    lines = text.split("\n")
    if line > len(lines):
        raise UserError(f"{where}: line {line} is past the end of the file ({len(lines)} lines)")
    content = lines[line - 1].rstrip("\r")
    if col > len(content) + 1:
        raise UserError(f"{where}: column {col} is past the end of line {line} ({len(content)} characters)")
    return sum(len(x) + 1 for x in lines[: line - 1]) + col - 1


def request_from_options(args: argparse.Namespace, prefix: str, suffix: str, path: str | None = None, language: str | None = None):
    from difill.inference.engine import InfillRequest

    try:
        return InfillRequest(prefix=prefix, suffix=suffix, path=path, language=language, mode=args.mode,
                             max_tokens=args.max_tokens, steps=args.steps,
                             constrain_syntax=False if args.no_syntax else None)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def cmd_complete(args: argparse.Namespace) -> int:
    path, line, col = parse_position(args.position)
    text = read_source(path)
    offset = offset_of(text, line, col, args.position)
    request = request_from_options(args, text[:offset], text[offset:], path=str(path))
    result = load_engine(args).infill(request)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.completion)
    return 0


INFILL_FIELDS = {"id", "prefix", "suffix", "language", "max_tokens", "mode", "steps", "path"}


def infill_case(line: str):
    """Parse one JSON Lines case into (id, InfillRequest); raises ValueError with a clear message."""
    from difill.inference.engine import InfillRequest

    try:
        case = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(case, dict):
        raise ValueError("each line must be a JSON object")
    case_id = case.get("id")
    unknown = set(case) - INFILL_FIELDS
    if unknown:
        log.info("ignoring unknown fields %s", ", ".join(sorted(unknown)))
    for name in ("prefix", "suffix"):
        if not isinstance(case.get(name, ""), str):
            raise ValueError(f"{name} must be a string")
    if "prefix" not in case:
        raise ValueError("missing field 'prefix'")
    request = InfillRequest(prefix=case["prefix"], suffix=case.get("suffix", ""), language=case.get("language"),
                            path=case.get("path"), max_tokens=case.get("max_tokens"), mode=case.get("mode", "auto"),
                            steps=case.get("steps"))
    return case_id, request


def cmd_infill(args: argparse.Namespace) -> int:
    """JSON Lines in, JSON Lines out, in input order. Cases are denoised ``--batch-size`` at a
    time in one forward pass per step; a bad line gets an ``error`` and the others still run."""
    source: TextIO = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    sink: TextIO = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    if args.endpoint:
        from difill.service.client import RemoteEngine

        engine = RemoteEngine(args.endpoint)
    else:
        engine = load_engine(args)

    def flush(chunk: list[tuple[int, str]]) -> None:
        parsed: list[dict | tuple] = []
        for number, line in chunk:
            try:
                parsed.append(infill_case(line))
            except (ValueError, TypeError) as exc:
                parsed.append({"id": _loose_id(line), "line": number, "error": str(exc)})
        valid = [p for p in parsed if isinstance(p, tuple)]
        results = iter(engine.infill_batch([request for _, request in valid]))
        for (number, _), item in zip(chunk, parsed):
            if isinstance(item, dict):
                out = item
            else:
                result = next(results)
                if isinstance(result, Exception):
                    out = {"id": item[0], "line": number, "error": str(result)}
                else:
                    out = {"id": item[0], "completion": result.completion, "latency_ms": result.latency_ms,
                           "steps": result.steps, "tokens": result.tokens, "mode": result.mode, "language": result.language}
            if "error" in out:
                log.warning("line %d: %s", number, out["error"])
            sink.write(json.dumps(out) + "\n")
        sink.flush()

    with source, sink:
        chunk: list[tuple[int, str]] = []
        for number, line in enumerate(source, 1):
            if line.strip():
                chunk.append((number, line))
            if len(chunk) >= args.batch_size:
                flush(chunk)
                chunk = []
        if chunk:
            flush(chunk)
    return 0


def _loose_id(line: str):
    """The id of a case that failed validation, when the line is at least a JSON object."""
    try:
        case = json.loads(line)
    except json.JSONDecodeError:
        return None
    return case.get("id") if isinstance(case, dict) else None


def cmd_info(args: argparse.Namespace) -> int:
    from difill import grammars

    model = getattr(args, "model", None) or str(default_model_path())
    info = {"version": __version__, "model_path": model, "backend": getattr(args, "backend", "torch"),
            "device": getattr(args, "device", "cpu"), "languages": grammars.supported_languages()}
    engine = load_engine(args)
    info.update(engine.describe())
    info["unconstrained"] = "other languages complete without the syntax constraint"
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:16} {', '.join(value) if isinstance(value, list) else value}")
    return 0


def demo_text(file: str | None) -> tuple[str, str, str]:
    if file is None:
        path = Path(str(default_model_path().parent / "samples" / "demo.py"))
    else:
        path = Path(file)
    text = read_source(path)
    if CURSOR_MARK not in text:
        raise UserError(f"{path}: no {CURSOR_MARK} mark to complete at")
    prefix, suffix = text.split(CURSOR_MARK, 1)
    return str(path), prefix, suffix


def cmd_demo(args: argparse.Namespace) -> int:
    from difill.inference.engine import InfillRequest

    path, prefix, suffix = demo_text(args.file)
    engine = load_engine(args)
    print(f"difill {__version__}: {engine.name} ({engine.n_params / 1e6:.1f}M parameters, {engine.backend}, {engine.device})")
    print(f"completing {path} at the {CURSOR_MARK} mark\n")
    shown_prefix = "\n".join(prefix.split("\n")[-8:])
    start, end = ("\033[1;32m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for mode in ("line", "block"):
        result = engine.infill(InfillRequest(prefix=prefix, suffix=suffix, path=path, mode=mode))
        print(f"--- {mode} completion: {result.tokens} tokens, {result.steps} steps, {result.latency_ms:.0f} ms")
        print(shown_prefix + start + result.completion + end + suffix.split("\n")[0])
        if not result.completion and result.syntax_valid is False:
            print("(no suggestion: what the model wrote would break the file, and the syntax constraint dropped it)")
        elif not result.completion:
            print("(no suggestion: the model ended the infill at once)")
        print()
    return 0


def configure_logging(level: str, log_file: str | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING), handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "eval" in argv:  # the eval harness parses its own arguments
        index = argv.index("eval")
        from difill.evaluation.cli import main as eval_main

        head = build_parser().parse_args(argv[:index] + ["info"])  # global options before "eval"
        configure_logging(getattr(head, "log_level", "WARNING"))
        return eval_main(argv[index + 1:], defaults=head)
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "WARNING"), getattr(args, "log_file", None))
    from difill.inference.loader import ModelLoadError

    try:
        if args.command == "serve":
            from difill.lsp_server import run

            return run(model=getattr(args, "model", None), backend=getattr(args, "backend", "torch"),
                       device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", None), tcp=args.tcp,
                       log_file=args.log_file) or 0
        if args.command == "serve-model":
            if getattr(args, "service_missing", False):
                raise UserError("serve-model: difill.service is not installed (reinstall difill)")
            from difill.service import main as serve_model_main

            return serve_model_main(args)
        return {"complete": cmd_complete, "infill": cmd_infill, "info": cmd_info, "demo": cmd_demo}[args.command](args)
    except UserError as exc:
        print(f"difill: {exc}", file=sys.stderr)
        return 2
    except ModelLoadError as exc:
        print(f"difill: cannot load the model: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
