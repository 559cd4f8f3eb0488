"""The ``nezha-zoo`` command line.

nezha-zoo demo                 build a small Electra, load it in every backend, compare
nezha-zoo inspect DIR [--json] family, claimed class and the head the tensors are, parameters, dtypes, tokenizer files
nezha-zoo convert SRC DST --to FORMAT [--dtype D] [--max-shard-size S] [--force] [--quiet] [--json]
                               (tokenizer files are copied unchanged)
nezha-zoo merge BASE ADAPTER DST [--to FORMAT] [--dtype D] [--force] [--json]
                               BASE with a LoRA adapter (PEFT format) merged in, streamed like convert
nezha-zoo verify DIR [--backends pt,tf,flax] [--json]   outputs of every backend, max-abs differences
nezha-zoo run TASK DIR TEXT... [--framework pt|tf|flax] [--top-k N] [--context TEXT] [--json]
                               answer from the command line (nezha_zoo.pipeline)
nezha-zoo export DIR OUT --to saved-model|tflite|onnx|jax [--head H] [--json]
                               a serving artifact, checked against the live model before it is written

Errors are one line on stderr and exit status 2 (``nezha-zoo --debug ...`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import traceback

__all__ = ["main"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from nezha_zoo.conversion.inspect import inspect_checkpoint

    info = inspect_checkpoint(args.path, head=args.head)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        lines = [
            f"path        {info['path']}",
            f"format      {info['format']}",
            f"family      {info['family']} ({info['model_type']})",
            f"config      {info['claimed_class'] or 'names no class of this family'}",
            f"tensors are {info['tensors_class'] or 'no head exactly'}",
            f"class       {info['class']}",
            f"parameters  {info['parameters']:,} declared, {info['parameters_in_checkpoint']:,} in the checkpoint",
            f"tensors     {info['tensors']}  dtypes {info['dtypes']}",
            f"missing     {', '.join(info['missing_keys']) or 'none'}",
            f"unexpected  {', '.join(info['unexpected_keys']) or 'none'}",
            f"tokenizer   {', '.join(info['tokenizer_files']) or 'none'}",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
    _note(info)
    for error in info["errors"]:  # the same rule convert and verify apply (the mismatch is noted above)
        if error != info.get("head_error"):
            sys.stderr.write(f"nezha-zoo: invalid: {error}\n")
    return 1 if info["missing_keys"] or info["unexpected_keys"] or info["errors"] else 0


def _note(info: dict) -> None:
    """The one line that says the tensors overrule config.json (or what fits nothing), on stderr."""
    for key in ("head_note", "head_error"):
        if info.get(key):
            sys.stderr.write(f"nezha-zoo: {info[key]}\n")


def _progress_bar(args: argparse.Namespace):
    """A tqdm bar on stderr, or None with --quiet/--json, off a terminal, or without tqdm."""
    if args.quiet or args.json or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="converting", file=sys.stderr, leave=False)


def _cmd_convert(args: argparse.Namespace) -> int:
    from nezha_zoo.conversion.convert import convert

    bar = _progress_bar(args)
    try:
        info = convert(
            args.src,
            args.dst,
            args.to,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            force=args.force,
            source_format=args.source_format,
            head=args.head,
            progress=(lambda _name, nbytes: bar.update(nbytes)) if bar is not None else None,
            adapter=getattr(args, "adapter", None),
        )
    finally:
        if bar is not None:
            bar.close()
    _note(info)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    elif not args.quiet:
        dropped = (
            f"; dropped {', '.join(info['dropped_keys'])} (not in transformers PyTorch)" if info["dropped_keys"] else ""
        )
        sys.stdout.write(
            f"{info['from']} -> {info['to']}: {info['class']}, {info['tensors']} tensors, "
            f"{info['parameters']:,} parameters, {info['bytes'] / 2**20:.1f} MiB in {info['seconds']:.2f}s "
            f"-> {info['destination']} ({', '.join(info['files'])}){dropped}\n"
        )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from nezha_zoo.conversion.verify import verify

    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    info = verify(args.path, backends=backends, head=args.head)
    _note(info)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        lines = [f"{info['path']}: {info['format']}, {info['class']}"]
        for b, st in info["backends"].items():
            lines.append(f"  {b:<5} {st['status']}" + (f" ({st['detail']})" if st.get("detail") else ""))
        if info["rows"]:
            lines.append(f"  {'field':<28} {'backend':<8} {'vs':<5} {'max |diff|':>11} {'tolerance':>10}")
            for r in info["rows"]:
                d = "missing" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3e}"
                flag = "ok" if r["ok"] else "FAIL"
                ref = r.get("reference", "")
                lines.append(f"  {r['field']:<28} {r['backend']:<8} {ref:<5} {d:>11} {r['tolerance']:>10.0e} {flag}")
        lines.append("verify: ok" if info["ok"] else "verify: FAILED (differences beyond tolerance, or < 2 backends)")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0 if info["ok"] else 1


def _jsonable(x):
    """A pipeline's result with numpy arrays and scalars as lists and Python numbers."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x.tolist() if hasattr(x, "tolist") else x


def _run_lines(task: str, result) -> list[str]:
    """Human-readable lines of one text's result."""
    if task in ("feature-extraction", "sentence-embedding"):
        head = ", ".join(f"{v:.4f}" for v in result.reshape(-1)[:8])
        return [f"shape {tuple(result.shape)}  [{head}{', ...' if result.size > 8 else ''}]"]
    if task == "text-generation":
        return [r["generated_text"] for r in result]
    rows = result if isinstance(result, list) else [result]
    if rows and isinstance(rows[0], list):  # fill-mask with several masks: one list per mask
        return [f"mask {i}: " + line for i, r in enumerate(rows) for line in _run_lines(task, r)]
    lines = []
    for r in rows:
        if task == "fill-mask":
            lines.append(f"{r['score']:.4f}  {r['token_str']!r}  {r['sequence']}")
        elif task == "text-classification":
            lines.append(f"{r['label']}  {r['score']:.4f}")
        elif task == "token-classification":
            label = r.get("entity_group", r.get("entity"))
            lines.append(f"{label}  {r['score']:.4f}  {r['word']!r}  [{r['start']}:{r['end']}]")
        else:  # question-answering
            lines.append(f"{r['answer']!r}  [{r['start']}:{r['end']}]  {r['score']:.4f}")
    return lines or ["(nothing)"]


def _cmd_run(args: argparse.Namespace) -> int:
    from nezha_zoo.pipelines import pipeline

    pipe = pipeline(args.task, model=args.path, framework=args.framework)
    kw = {}
    if args.task == "question-answering":
        if args.context is None:
            raise ValueError("question-answering needs --context TEXT (the TEXT arguments are the questions)")
        kw["context"] = args.context
    elif args.context is not None:
        raise ValueError(f"--context is for question-answering, not {args.task}")
    if args.top_k is not None:
        if args.task not in ("fill-mask", "text-classification", "question-answering"):
            raise ValueError(f"--top-k is for fill-mask, text-classification and question-answering, not {args.task}")
        kw["top_k"] = args.top_k
    if args.task == "token-classification":
        kw["aggregation_strategy"] = args.aggregation_strategy
    if args.task == "text-generation":
        kw["max_new_tokens"] = args.max_new_tokens
    texts = list(args.text)
    results = pipe(texts, **kw)
    if args.json:
        out = [{"text": t, "result": _jsonable(r)} for t, r in zip(texts, results)]
        sys.stdout.write(json.dumps(out if len(out) > 1 else out[0], indent=2, ensure_ascii=False) + "\n")
    else:
        lines = []
        for t, r in zip(texts, results):
            if len(texts) > 1:
                lines.append(f"{t}:")
            lines += [("  " if len(texts) > 1 else "") + line for line in _run_lines(args.task, r)]
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from nezha_zoo.conversion.export import export

    info = export(args.src, args.out, args.to, head=args.head)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        sig = info["signature"]
        sys.stdout.write(
            f"{info['source']} -> {info['destination']} ({info['format']}): {info['class']}, "
            f"inputs {', '.join(sig['inputs'])} {sig['dtype']} ({', '.join(sig['dims'])}), "
            f"outputs {', '.join(sig['outputs'])}; {info['bytes'] / 2**20:.1f} MiB in {info['seconds']:.1f}s, "
            f"max |diff| vs the live model {info['max_abs_diff']:.2e}\n"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nezha_zoo.cli.demo import main as demo_main

    return demo_main(["--out", args.out] if args.out else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nezha-zoo",
        description="Six transformer families for PyTorch, TensorFlow/Keras and Flax from one spec.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a checkpoint directory (any format) against the spec")
    p.add_argument("path", help="directory with config.json and weights of any format convert reads")
    p.add_argument("--head", help="head to check against (default: the head the tensors are)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_inspect)

    from nezha_zoo.conversion.convert import DTYPES
    from nezha_zoo.conversion.formats import FORMATS, READ_FORMATS, WRITE_FORMATS

    formats = "\n".join(f"  {n:<12} {f.description} ({', '.join(f.files)})" for n, f in FORMATS.items())
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint directory between PyTorch, TF/Keras and Flax formats",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Convert the checkpoint in SRC (format detected from its files) to FORMAT in DST.\n"
            "Tensors stream one at a time; DST appears only when complete.  Tokenizer files\n"
            "(tokenizer.json, vocab.txt, ...; sentence-transformers' pooling) are copied unchanged.\n\n"
            "formats:\n" + formats
        ),
        epilog="example: nezha-zoo convert ./electra-pt ./electra-flax --to hf-flax",
    )
    p.add_argument("src", help="checkpoint directory (config.json + weights)")
    p.add_argument("dst", help="output directory (must be absent or empty unless --force)")
    p.add_argument(
        "--to", required=True, choices=WRITE_FORMATS, metavar="FORMAT", help=f"one of {', '.join(WRITE_FORMATS)}"
    )
    p.add_argument(
        "--from", dest="source_format", choices=READ_FORMATS, metavar="FORMAT", help="read SRC as this format"
    )
    p.add_argument("--head", help="class head to convert as (default: the head the tensors are)")
    p.add_argument("--dtype", choices=DTYPES, help="cast floating parameters (default: keep each tensor's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="shard limit of safetensors output (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace the weights already in DST")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "merge",
        help="write BASE with a LoRA adapter merged in (W + scaling * B @ A), streamed like convert",
        epilog="example: nezha-zoo merge ./electra-pt ./my-adapter ./electra-merged",
    )
    p.add_argument("src", metavar="base", help="checkpoint directory (config.json + weights of any format)")
    p.add_argument("adapter", help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("dst", help="output directory (must be absent or empty unless --force)")
    p.add_argument("--to", default="safetensors", choices=WRITE_FORMATS, metavar="FORMAT", help="default safetensors")
    p.add_argument("--dtype", choices=DTYPES, help="cast floating parameters (default: keep each tensor's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="shard limit of safetensors output (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace the weights already in DST")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_convert, source_format=None, head=None)

    p = sub.add_parser("verify", help="load a checkpoint in every installed backend and compare outputs")
    p.add_argument("path", help="checkpoint directory of any format convert reads")
    p.add_argument("--backends", help="comma-separated subset of pt,tf,flax (default: every installed one)")
    p.add_argument("--head", help="class head (default: the head the tensors are)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_verify)

    from nezha_zoo.pipelines import TASKS

    p = sub.add_parser(
        "run",
        help="answer from the command line: run a task pipeline on a checkpoint directory",
        description="Run nezha_zoo.pipeline(TASK, DIR) on each TEXT and print the answers.",
        epilog='example: nezha-zoo run question-answering ./qa "Where does John live?" --context "He lives in Paris."',
    )
    p.add_argument("task", choices=sorted(TASKS), metavar="TASK", help=f"one of {', '.join(sorted(TASKS))}")
    p.add_argument("path", help="checkpoint directory with tokenizer files")
    p.add_argument("text", nargs="+", help="input text(s); the question(s) for question-answering")
    p.add_argument("--framework", choices=("pt", "tf", "flax"), default="pt", help="backend to run (default pt)")
    p.add_argument("--top-k", type=int, help="answers per text (fill-mask, text-classification, question-answering)")
    p.add_argument("--context", help="the context of question-answering")
    p.add_argument(
        "--aggregation-strategy",
        choices=("none", "simple", "first"),
        default="simple",
        help="token-classification word grouping (default simple)",
    )
    p.add_argument("--max-new-tokens", type=int, default=20, help="text-generation length (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_run)

    from nezha_zoo.conversion.export import EXPORT_FORMATS

    p = sub.add_parser(
        "export",
        help="write a serving artifact (TF SavedModel, TFLite, ONNX, jax.export) checked against the live model",
        description=(
            "Export the checkpoint in SRC to a new directory OUT.  The artifact takes int32 input_ids, "
            "attention_mask (and token_type_ids where the family uses them) with dynamic batch and length; "
            "it is reloaded and compared with the live model (max-abs <= 1e-4) before OUT appears."
        ),
        epilog="example: nezha-zoo export ./electra-pt ./electra-onnx --to onnx",
    )
    p.add_argument("src", help="checkpoint directory (config.json + weights, any format convert reads)")
    p.add_argument("out", help="output directory (must not exist)")
    # No argparse choices: an unknown format is the command's one-line error (exit 2), not a usage dump.
    p.add_argument("--to", required=True, metavar="FORMAT", help=f"one of {', '.join(EXPORT_FORMATS)}")
    p.add_argument("--head", help="class head to export (default: the head the tensors are)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="build a small Electra and compare PyTorch, TensorFlow and Flax on it")
    p.add_argument("--out", help="directory to save the demo checkpoint in (default: a temporary one)")
    p.set_defaults(func=_cmd_demo)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so staging directories, locks and children are cleaned up."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """Run the ``nezha-zoo`` command; returns its exit status.

    Every error is one line on stderr (``nezha-zoo: error: ...``) and status 2, never a traceback
    (``--debug`` prints it too).  SIGTERM and Ctrl-C unwind like an error (partial output removed,
    the lock released, child processes killed) and exit with 143 / 130.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return args.func(args)
    except (KeyboardInterrupt, _Terminated) as e:
        sys.stderr.write("nezha-zoo: interrupted; nothing was written\n")
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"nezha-zoo: error: {message}\n")
        return 2
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
