"""Turns the committed results in bench/results/*.json into two README
sections: the comparison of training methods (between the compare-report
markers, from bench/compare.py) and the performance figures (between the
bench-report markers). Nothing in them is typed by hand, and every table
names the device it was measured on.

    python bench/report.py            # rewrite the sections in README.md
    python bench/report.py --check    # exit 1 if README.md is not up to date (CI)
    python bench/report.py --merge A.json B.json --out merged.json   # rows of split compare.py runs
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))  # the scripts' shared helpers, wherever this runs from

from common import InputError, not_results, read_json  # noqa: E402
from freeadv_fast.checkpoint import write_result  # noqa: E402
SECTIONS = ("compare-report", "bench-report")


def source(path, meta):
    date = str(meta.get("date", "?"))[:10]
    return f"*{meta.get('device', '?')}, {date}, `{path.name}`*"


def table(header, rows):
    """A markdown table: a header tuple and rows of cells."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header)] + [f"| {' | '.join(map(str, r))} |"
                                                                        for r in rows]


def train_step_section(path, data):
    meta = data["meta"]
    timed = "quick run" if meta.get("quick") else f"{meta['steps']} timed steps"
    lines = [f"**Training throughput**, {meta['model']} at {meta['image_size']}px, batch {meta['batch_size']} "
             f"({timed}): {source(path, meta)}", ""]
    def gib(r):
        if r.get("peak_memory_gib") is None:
            return "-"
        if r.get("cuda_graph") and not r.get("peak_from_first_call"):
            return "not counted"  # measured after the capture, whose memory the graph's pool holds uncounted
        return f"{r['peak_memory_gib']:.1f} GiB"
    first = lambda r: f"{r['first_call_s']:.1f} s" if r.get("first_call_s") is not None else "-"  # noqa: E731
    lines += table(("method", "images/s", "peak GPU memory", "first call (compiling)"),
                   [(r["method"], f"{r['images_per_s']:,.1f}", gib(r), first(r)) if "images_per_s" in r
                    else (r["method"], f"failed: {r.get('error', '?')}", "-", "-") for r in data["records"]])
    lines += [""] + table(("ratio", "value"), [(k, f"{v:.3f}") for k, v in data["ratios"].items()])
    for proj in data.get("projections", []):
        lines.append(f"\nProjected {proj['run']} with {proj['method']}: {proj['hours_one_device']:.1f} h on one "
                     f"device, {proj['hours_four_devices_ideal']:.1f} h on four (ideal scaling); the paper: "
                     f"{proj['paper']}.")
    return lines


def kernels_section(path, data):
    meta = data["meta"]
    lines = [f"**Fused perturbation kernels** ({'quick run' if meta.get('quick') else 'full run'}): "
             f"{source(path, meta)}", ""]
    in_graph = lambda r: (f"{r['in_graph_ms']:.3f}", f"{r['in_graph_fraction_of_copy']:.0%}")  # noqa: E731
    return lines + table(("batch", "op", "variant", "ms", "GB/s", "of copy", "vs eager", "ms in a graph",
                          "of copy in a graph"),
                         [(f"{r['shape']} {'x'.join(map(str, r['dims']))}", r["op"], r["backend"], f"{r['time_ms']:.3f}",
                           f"{r['gbps']:.1f}", f"{r['fraction_of_copy']:.0%}", f"{r['speedup_vs_eager']:.1f}x",
                           *(in_graph(r) if r.get("in_graph_ms") else ("-", "-")))
                          for r in data["records"]])


def clamp_probe_section(path, data):
    meta = data["meta"]
    lines = [f"**clamp's gradient at its bounds** under torch {meta['torch']} (`bench/clamp_probe.py`; our "
             f"`clamp_input` mode is the inclusive mask the paper's code ran with): {source(path, meta)}", ""]
    return lines + table(("device", "mask", "clamp(x, 0, 1) gradient at 0, 0.5, 1"),
                         [(d, r["mask"], r["clamp(x, 0, 1)"]) for d, r in data["probe"].items()])


def loader_label(record):
    """The loader, and for nvjpeg in processes of its own how many decoded."""
    procs = record.get("decode_processes", 0)
    return f"{record['loader']} ({procs} decoding processes)" if procs else record["loader"]


def loader_section(path, data):
    meta = data["meta"]
    lines = [f"**Data loaders** on {meta.get('images', '?')} images of `{Path(meta.get('data', '?')).name}`: "
             f"{source(path, meta)}", ""]
    def fed(r, kind):
        return f"{r[f'gpus_fed_{kind}']:.2f} ({r[f'step_{kind}']['method']})" if f"gpus_fed_{kind}" in r else "-"
    def warmup(r):
        return f"{r['warmup_pass_s']:.1f} s" if "warmup_pass_s" in r else "-"
    return lines + table(("loader", "images/s", "batch", "image size", "workers", "GPUs fed, natural",
                          "GPUs fed, free-4", "warm-up pass (starting included)"),
                         [(loader_label(r), f"{r['images_per_s']:,.0f}", r["batch_size"], r["image_size"], r["workers"],
                           fed(r, "natural"), fed(r, "free-4"), warmup(r)) for r in data["records"]])


def projection_section(path, data):
    doc = data["projection"]
    lines = [f"**Projected wall time** of `{doc['preset']}` ({doc['method']}) on one device, from the step rates "
             f"measured at each phase's size: {source(path, data['meta'])}", ""]
    rows = [(f"{r['until']:g}", r["image_size"], r["batch_size"], f"{r['method']} ({r['file']})",
             f"{r['images_per_s']:,.0f}", f"{r['hours']:.2f}") for r in doc["phases"]]
    rows.append(("total", "", "", "", "", f"{doc['hours_one_device']:.2f}"))
    return lines + table(("until epoch", "image size", "batch", "rate from", "images/s", "hours"), rows) + [
        "", "Beside: " + "; ".join(doc["others"]) + ". Data loading not counted."]


def demo_section(path, data):
    meta, c = data["meta"], data["comparison"]
    a = c["attack"]
    lines = [f"**Embedded default** (`make demo`, {a['dataset']}, {a['name']} at eps {a['epsilon']:g}): "
             f"{source(path, meta)}", ""]
    return lines + table(("model", "clean", "robust"),
                         [(m, f"{c[m]['clean_acc']:.1%}", f"{c[m]['robust_acc']:.1%}") for m in ("natural", "free")])


def results() -> list:
    """(path, document) of every results file in RESULTS, a file that is not
    one (a stray note, a cut-off write) named in one line, not a traceback."""
    return [(path, read_json(path, "a results file (one JSON document with a \"meta\")"))
            for path in sorted(RESULTS.glob("*.json"))]


@contextlib.contextmanager
def incomplete(path, what):
    """A context in which a results file short of what its section reads is
    an InputError naming the file, not a KeyError from deep in a table."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as exc:
        raise InputError(f"{path}: not a complete {what} ({type(exc).__name__}: {exc}); fix it or move it "
                         f"out of {RESULTS}") from None


def compare_section(docs=None) -> str:
    """One table of every bench/compare.py result: a row per method and run,
    naming its data and device."""
    rows, runs, steps_seen = [], [], set()
    for path, data in results() if docs is None else docs:
        if "compare" not in data:
            continue
        with incomplete(path, "bench/compare.py result"):
            steps_seen.add(compare_rows(path, data, rows, runs))
    if not rows:
        return "No comparison committed yet (run bench/compare.py).\n"
    head = ["data", "device", "method", "passes", "training time", "clean", "k", "PGD-k", "CW-k", "file"]
    if len(steps_seen) == 1:  # one k for all: in the header
        k = steps_seen.pop()
        head[7:9] = [f"PGD-{k}", f"CW-{k}"]
        del head[6]
        rows = [r[:6] + r[7:] for r in rows]
    lines = table(head, rows)
    return "\n".join(lines + ["", "Runs:", ""] + [f"- {r}" for r in runs]) + "\n"


def compare_rows(path, data, rows, runs) -> int:
    """Adds a bench/compare.py result's table rows to ``rows`` and its run's
    line to ``runs``; returns the k of its PGD-k and CW-k columns."""
    meta = data["meta"]
    if meta.get("recipe", "equal-steps") == "equal-steps":
        budget = (f"{meta['epochs_equivalent']:g} epochs-equivalent, batch {meta['batch_size']}, "
                  f"{meta['precision']}, peak LR {meta['lr']:g}"
                  + (f" (free: {meta['free_lr']:g})" if meta.get("free_lr", meta["lr"]) != meta["lr"] else ""))
    else:
        budget = (f"recipe {meta['recipe']} with every budget x{meta['budget_scale']:.3g}, batch "
                  f"{meta['batch_size']} (its peak LRs x{meta['recipe_lr_scale']:.3g}), {meta['precision']}")
    runs.append(f"`{path.name}`: {meta['data']}, {meta['train_images']:,} training images, {meta['arch']}, "
                f"{budget}, eps {meta['epsilon'] * 255:.3g}/255, {meta['eval_samples']:,} test images "
                f"attacked; {meta['device']}, {str(meta['date'])[:10]}"
                + (" (`--quick`)" if meta.get("quick") else ""))
    steps = meta["eval_steps"][0]
    for r in data["compare"]:
        if "same_run_as" in r:  # the run of an earlier row (its recipe row), listed once
            continue
        e = r["eval"]

        def cell(key):
            lo, hi = e[key + "_ci95"]
            return f"{e[key]:.1%} ({lo:.1%}-{hi:.1%})"
        label = r["label"] + (f" [{r['group']}]" if r.get("group") else "")
        rows.append((meta["data"], meta["device"], label, r["passes"], f"{r['train_seconds'] / 60:.1f} min",
                     cell("clean_top1"), steps, cell(f"pgd-{steps}"), cell(f"cw-{steps}"), f"`{path.name}`"))
    return steps


KNOB_NAMES = {"pack_bytes": "x bytes a pack", "full_grid": "one thread a pack (else grid-stride)",
              "u8_lut": "uint8 table", "f64_division": "fp64 division", "rgb_steps": "RGB steps a thread",
              "streaming": "streaming hints", "min_blocks": "min. blocks per SM",
              "rgb_coalesced": "a warp's RGB elements contiguous"}


def kernel_variants_section(path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    knobs = [k for k in KNOB_NAMES if k in rows[0]]  # the knobs of the kernel version measured
    lines = [f"**CUDA kernel tuning** (`bench/kernel_variants.sh`: update_and_make_input_, uint8 x, bf16 grad "
             f"and out, channels_last; one build per setting; every setting computed the same bits): "
             f"`{path.name}`", ""]
    return lines + table(("batch", *(KNOB_NAMES[k] for k in knobs), "ms", "ms in a graph", "of copy in a graph"),
                         [(r["shape"], *(r[k] for k in knobs), f"{r['op_ms']:.4f}", f"{r['op_in_graph_ms']:.4f}",
                           f"{r['op_in_graph_gbps'] / r['copy_in_graph_gbps']:.0%}") for r in rows])


def render(docs=None) -> str:
    docs = results() if docs is None else docs
    sections = []
    for path, data in docs:
        if "compare" in data:
            continue  # in the comparison section
        records = data.get("records")
        first = records[0] if isinstance(records, list) and records and isinstance(records[0], dict) else {}
        section = (train_step_section if "ratios" in data else demo_section if "comparison" in data else
                   clamp_probe_section if "probe" in data else projection_section if "projection" in data else
                   kernels_section if "op" in first else loader_section if "loader" in first else None)
        if section:  # other kinds (bench/stem_grad.py's) have no section
            with incomplete(path, section.__name__.replace("_section", "").replace("_", "-") + " result"):
                sections.append(section(path, data))
    for path in sorted(RESULTS.glob("kernel-variants-*.jsonl")):
        with incomplete(path, "bench/kernel_variants.sh result"):
            sections.append(kernel_variants_section(path))
    if not sections:
        return "No results committed yet."
    gpu = any("CPU" not in str(data["meta"].get("device", "CPU")) for _, data in docs)
    head = [] if gpu else ["No GPU result has been committed yet: every figure below was measured on a CPU.", ""]
    return "\n".join(head + ["\n".join(s) + "\n" for s in sections]).rstrip() + "\n"


# what rows of bench/compare.py runs must share to stand in one table: the data, model, precision, device
# and the same attacks on the same test images
ROW_KEYS = ("label", "method", "passes", "replays", "train_seconds", "eval")
MERGE_KEYS = ("data", "dataset", "train_images", "arch", "precision", "device", "epsilon", "eval_step_size",
              "eval_steps", "restart_steps", "restarts", "eval_samples", "batch_size", "schedule", "cuda_graph",
              "compile")


def merge_view(meta) -> dict:
    """What of a run's meta its merged rows must share: MERGE_KEYS, and the
    budget the README's line of the run states, which is the first file's
    (recipe and budget scale; equal-steps: epochs and LRs)."""
    recipe = meta.get("recipe", "equal-steps")  # the files written before recipes are equal-steps runs
    budget = ("epochs_equivalent", "lr") if recipe == "equal-steps" else ("budget_scale",)
    view = {k: meta.get(k) for k in MERGE_KEYS + budget}
    if recipe == "equal-steps":
        view["free_lr"] = meta.get("free_lr", meta.get("lr"))
    return {"recipe": recipe, **view}


def merge(paths: list[Path], out: Path) -> int:
    """The rows of several bench/compare.py results (runs split over GPU
    sessions) in one JSON, table and plot, refusing results that differ in
    what MERGE_KEYS names."""
    from compare import write_outputs, written
    inputs = [p for p in paths if p.resolve() == out.resolve()]
    if inputs:  # its rows would be replaced by the merge, and merged_from would name a file that no longer holds them
        raise InputError(f"--out {out} is one of the files merged: name another file")
    twice = [p for i, p in enumerate(paths) if p.resolve() in {q.resolve() for q in paths[:i]}]
    if twice:
        raise InputError(f"{twice[0]} is named twice: its rows would stand in the table twice")
    docs = [read_json(p, "a bench/compare.py result", ("compare",)) for p in paths]
    for path, doc in zip(paths, docs):
        rows = doc["compare"]
        if not isinstance(rows, list) or not rows or not all(
                isinstance(r, dict) and isinstance(r.get("eval"), dict) and all(k in r for k in ROW_KEYS)
                for r in rows):
            raise InputError(f"{path}: its \"compare\" is not a list of bench/compare.py rows (each with "
                             f"{', '.join(ROW_KEYS)})")
        for r in rows:  # the meta's eval_samples heads the table: a row attacked on other images does not belong
            if r["eval"].get("samples") != doc["meta"].get("eval_samples") or not r["eval"].get("samples"):
                raise InputError(f"{path}: its row {r['label']!r} was attacked on {r['eval'].get('samples')!r} "
                                 f"test images, its meta says {doc['meta'].get('eval_samples')!r}; not merged")
    base = docs[0]["meta"]
    for path, doc in zip(paths[1:], docs[1:]):
        mine, first = merge_view(doc["meta"]), merge_view(base)
        diff = [f"{k} ({mine[k]!r}, not {first.get(k)!r})" for k in mine if mine[k] != first.get(k)]
        if diff:
            raise InputError(f"{path} differs from {paths[0]} in {', '.join(diff)}; not merged")
    rows, seen = [], {}
    for path, doc in zip(paths, docs):
        for r in doc["compare"]:
            key = json.dumps(r, sort_keys=True)
            if key in seen:  # a copy of a result file under another name
                raise InputError(f"{path}: its row {r['label']!r} ({r.get('group', '-')}) is also in {seen[key]}; "
                                 "not merged")
            seen[key] = path
            rows.append(r)
    meta = {**base, "merged_from": [p.name for p in paths], "quick": any(d["meta"].get("quick") for d in docs)}
    import torch
    table, _ = write_outputs(out, rows, meta, torch.device("cpu"),
                             f"{base['data']}, {base['arch']}, eps {base['epsilon'] * 255:.3g}/255 ({base['device']})")
    print(table)
    print(f"wrote {written(out, any(r.get('group') == 'sweep' for r in rows))} from {len(paths)} files")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--merge", nargs="+", type=Path, metavar="FILE",
                   help="bench/compare.py results of the same data, model and precision to merge into --out")
    p.add_argument("--out", type=Path, help="with --merge: the merged results file (JSON; .md and .png beside it)")
    args = p.parse_args(argv)
    if bool(args.merge) != bool(args.out):
        p.error("--merge and --out go together")
    if args.merge:
        from compare import beside_problem
        problem = not_results(args.out) or beside_problem(args.out, sweep=None)  # a stale sweep plot: at writing
        if problem:
            p.error(f"--out {args.out}: {problem}")
        try:
            return merge(args.merge, args.out)
        except InputError as exc:
            print(f"report.py --merge: {exc}", file=sys.stderr)
            return 2
    if args.readme.exists() and not args.readme.is_file():  # a pipe: read_text waited forever
        p.error(f"--readme {args.readme}: not a regular file")
    try:
        text = args.readme.read_text(encoding="utf-8")
    except OSError as exc:
        p.error(f"--readme {args.readme}: {exc.strerror}")
    except UnicodeDecodeError as exc:
        p.error(f"--readme {args.readme}: not UTF-8 text (byte {exc.start})")
    try:
        docs = results()
        bodies = (compare_section(docs), render(docs))
    except InputError as exc:  # a stray or broken file in bench/results: named, the README left as it is
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    new = text
    for name, body in zip(SECTIONS, bodies):
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in new or end not in new.split(start, 1)[1]:  # an end before its start too
            print(f"{args.readme}: no {start} ... {end} section", file=sys.stderr)
            return 2
        before, rest = new.split(start, 1)
        _, after = rest.split(end, 1)
        new = f"{before}{start}\n{body}{end}{after}"
    if args.check:
        if new != text:
            print(f"{args.readme} is out of date with bench/results: run python bench/report.py", file=sys.stderr)
            return 1
        return 0
    try:
        write_result(args.readme, new)  # whole or not at all
    except OSError as exc:
        p.exit(2, f"{p.prog}: error: --readme {args.readme}: cannot be written ({exc.strerror or exc})\n")
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
