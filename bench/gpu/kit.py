"""The GPU kit: on a machine with JAX and no TensorFlow, generate mocks, train the paper-size models, run the GPU benchmarks.

Two commands, each inside the 10 minutes a device command may run:

* ``--stage icl``: 20,000 domain-randomised mock clusters and 512 held-out ones rendered with
  every core; the paper's ICL model (224 px, N = 6) trained 20 epochs on them with bfloat16
  mixed precision on the JAX backend; the checkpoint measured on the held-out mocks
  (``checkpoints/evaluate.py``).
* ``--stage nnclr bench``: 45,000 mock galaxies, 400 host-matched pairs of visible features
  for the classifier and 500 for the test; NNCLR at the paper's configuration (25 epochs, batch
  220, 128 px, no binning) with its fine-tuned classifier, measured on the test pairs
  (``nnclr_test.py``); then the GPU rows of the benchmarks: ICL inference with the mixture
  summary (against the original's way), the ICL training step and NNCLR training (fp32
  baseline and bfloat16 in the same run).
* ``--stage all`` runs the three (more than 10 minutes at full size: use it for ``--dry-run``).

Every step is the project's own command (``python -m data.generate``, ``train.py``,
``nnclr_train.py``, ``checkpoints/evaluate.py``, ``nnclr_test.py``, ``bench/*.py``) run with
``KERAS_BACKEND=jax``. The kit keeps a deadline (``--deadline``, 570 s by default): a step
that would pass it is stopped, the training keeps its best checkpoint so far, and the results
say so. What comes back in ``--out`` (at most 8 files, each well under 16 MiB):

    icl_paper.weights.h5, icl_paper.config.json, results_icl.json,
    nnclr_encoder.keras, nnclr_classifier.keras, nnclr_config.json, results_nnclr.json,
    results_bench.json

``results_<stage>.json`` holds every step's command, wall time, exit status (and the end of
its output when it failed), the training history, the evaluation metrics and the benchmark
rows with the machine. The kit's own log (``kit.log``) and each step's output stay in the work
folder; the kit prints every line of its log, so the device call's output shows it. At the end
the kit prints what to commit where.

``--dry-run`` runs the same chain at tiny size on the CPU, with TensorFlow made unimportable
in every command (``bench/gpu/no_tensorflow``), as on the GPU machine; the tests run it.

Usage::

    python bench/gpu/fetch_wheels.py                      # once, where the package index is reachable
    python bench/gpu/kit.py --dry-run --stage all --out /tmp/kit   # rehearsal on the CPU, about 2 minutes
    # on the GPU machine, carrying bench/gpu/wheels:
    python3 bench/gpu/kit.py --stage icl --out "$OUT"
    python3 bench/gpu/kit.py --stage nnclr bench --out "$OUT"
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WHEELS = HERE / "wheels"
NO_TENSORFLOW = HERE / "no_tensorflow"

#: Packages installed from the carried wheels when they are missing.
PACKAGES = ("keras", "namex", "optree", "astropy", "pyerfa", "astropy-iers-data", "photutils")

#: The stages, in the order ``--stage all`` runs them.
STAGES = ("icl", "nnclr", "bench")

#: Default deadline in seconds from the kit's start: a device command may run 600 s.
DEADLINE = 570


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each step of the kit is."""

    icl_mocks: int
    icl_heldout: int
    icl_architecture: str
    icl_epochs: int
    icl_batch_size: int
    precision: str
    tidal_galaxies: int
    tidal_train_pairs: int
    tidal_test_pairs: int
    nnclr_arguments: tuple
    cache_memory_gib: float
    bench_icl_inference: tuple
    bench_icl_inference_fast: tuple
    bench_train_step: tuple
    bench_nnclr: tuple


#: The paper-size runs of the GPU machine.
PAPER = Sizes(
    icl_mocks=20_000, icl_heldout=512, icl_architecture="paper", icl_epochs=20, icl_batch_size=50,
    precision="mixed_bfloat16",
    tidal_galaxies=45_000, tidal_train_pairs=400, tidal_test_pairs=500,
    nnclr_arguments=("--epochs", "25", "--batch-size", "220", "--classifier-epochs", "50"),
    cache_memory_gib=24,
    bench_icl_inference=("--batch-sizes", "256", "--batches", "1", "--repeats", "1", "--jit"),
    bench_icl_inference_fast=("--no-baseline", "--batch-sizes", "32", "1024", "4096", "--batches", "4", "--repeats", "3",
                              "--jit"),
    bench_train_step=("--batch-size", "50", "--steps", "100"),
    bench_nnclr=("--steps", "30", "--inference-batches", "20"),
)

#: The rehearsal on a CPU: the same chain at tiny size.
DRY_RUN = Sizes(
    icl_mocks=24, icl_heldout=8, icl_architecture="tiny", icl_epochs=1, icl_batch_size=8,
    precision="mixed_bfloat16",
    tidal_galaxies=48, tidal_train_pairs=16, tidal_test_pairs=8,
    nnclr_arguments=("--tiny", "--epochs", "1", "--classifier-epochs", "1", "--split-sizes", "8", "2", "6"),
    cache_memory_gib=1,
    bench_icl_inference=("--tiny", "--batch-sizes", "2", "--batches", "1", "--repeats", "1"),
    bench_icl_inference_fast=("--tiny", "--no-baseline", "--batch-sizes", "4", "--batches", "1", "--repeats", "1"),
    bench_train_step=("--tiny", "--batch-size", "4", "--steps", "1"),
    bench_nnclr=("--tiny", "--batch-size", "4", "--steps", "1", "--inference-batch-size", "4", "--inference-batches", "1"),
)


@dataclasses.dataclass
class Step:
    """One command of the chain and what became of it."""

    name: str
    argv: list
    reserve: float = 0.0  # seconds kept, before the deadline, for the steps after this one
    produces: pathlib.Path = None  # what the step writes that later steps read, if stopping early leaves it usable
    seconds: float = 0.0
    status: str = "not run"  # ok, failed (exit N), stopped at the deadline, skipped
    tail: str = ""


class Kit:
    """Runs the steps of one or both stages against a deadline and collects what they wrote."""

    def __init__(self, out, work, sizes, dry_run, deadline, workers):
        self.out, self.work, self.sizes, self.dry_run = out, work, sizes, dry_run
        self.started = time.monotonic()
        self.deadline = deadline
        self.workers = workers
        self.python = sys.executable
        self.env = dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1")
        self.log = work / "kit.log"

    # -- running ------------------------------------------------------------------------------

    def say(self, line):
        stamp = f"[{time.monotonic() - self.started:6.1f} s]"
        print(f"{stamp} {line}", flush=True)
        with self.log.open("a") as handle:
            handle.write(f"{stamp} {line}\n")

    def left(self):
        return self.deadline - (time.monotonic() - self.started)

    def run(self, step):
        """Run ``step`` with what is left of the deadline; record its status, time and output tail."""
        left = self.left() - step.reserve
        if left < 5:
            step.status = "skipped: no time left before the deadline"
            self.say(f"{step.name}: {step.status}")
            return step
        self.say(f"{step.name}: {' '.join(step.argv)}")
        output = self.work / f"{step.name}.log"
        start = time.monotonic()
        with output.open("w") as handle:
            process = subprocess.Popen([self.python, *step.argv], cwd=ROOT, env=self.env, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = process.wait(timeout=left)
                step.status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 15)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)
                    process.wait()
                step.status = "stopped at the deadline"
        step.seconds = time.monotonic() - start
        step.tail = "\n".join(output.read_text(errors="replace").splitlines()[-15:])
        self.say(f"{step.name}: {step.status} after {step.seconds:.1f} s")
        if step.status != "ok":
            with self.log.open("a") as handle:
                handle.write(step.tail + "\n")
        return step

    def run_all(self, steps):
        failed = set()
        for step, needs in steps:
            missing = [name for name in needs if name in failed]
            if missing:
                step.status = f"skipped: needs {', '.join(missing)}"
                self.say(f"{step.name}: {step.status}")
                failed.add(step.name)
                continue
            self.run(step)
            # A training stopped at the deadline still serves the later steps if it wrote its checkpoint.
            usable = step.status == "ok" or (step.status == "stopped at the deadline" and step.produces is not None
                                             and step.produces.exists())
            if not usable:
                failed.add(step.name)
        return [step for step, _ in steps]

    # -- the environment ------------------------------------------------------------------------

    def prepare(self):
        """Put the carried wheels (GPU machine) or the TensorFlow block (dry run) on the commands' path."""
        paths = [str(ROOT)]
        if self.dry_run:
            paths.insert(0, str(NO_TENSORFLOW))
        elif importlib.util.find_spec("keras") is None:
            site = self.work / "site"
            if not WHEELS.is_dir():
                raise SystemExit(f"error: Keras is not installed and {WHEELS} is missing: run bench/gpu/fetch_wheels.py "
                                 "and carry bench/gpu/wheels")
            self.say(f"installing {', '.join(PACKAGES)} from {WHEELS}")
            # --no-deps: with --target pip ignores what is installed and would look for NumPy & co.
            # among the wheels; PACKAGES is exactly what the machine lacks.
            subprocess.run([self.python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links",
                            str(WHEELS), "--target", str(site), *PACKAGES], check=True)
            paths.insert(0, str(site))
        self.env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])

    def generate(self, name, kind, n, seed, out, *extra):
        target = ["--out-dir", str(out)] if out.suffix != ".h5" else ["--out", str(out)]
        return Step(name, ["-m", "data.generate", kind, "--n", str(n), "--seed", str(seed), *target,
                           "--workers", str(self.workers), "--quiet", *extra])

    # -- the stages -----------------------------------------------------------------------------

    def icl(self):
        s, w = self.sizes, self.work
        run_dir = w / "icl_run"
        steps = [
            (self.generate("generate_icl_train", "clusters", s.icl_mocks, 3131, w / "icl_train", "--distribution", "randomised"), []),
            (self.generate("generate_icl_heldout", "clusters", s.icl_heldout, 3132, w / "icl_heldout.h5", "--distribution", "randomised"), []),
            (Step("train_icl", ["train.py", str(w / "icl_train"), "--label-key", "f_icl_sb_ideal", "--architecture",
                                s.icl_architecture, "--epochs", str(s.icl_epochs), "--batch-size", str(s.icl_batch_size),
                                "--precision", s.precision, "--cache-memory", str(s.cache_memory_gib),
                                "--out-dir", str(run_dir)], reserve=40, produces=run_dir / "best.weights.h5"),
             ["generate_icl_train"]),
            (Step("evaluate_icl", ["checkpoints/evaluate.py", str(run_dir / "best.weights.h5"), str(w / "icl_heldout.h5"),
                                   "--out-dir", str(w / "icl_eval")]), ["train_icl", "generate_icl_heldout"]),
        ]
        steps = self.run_all(steps)
        copied = self.collect({run_dir / "best.weights.h5": "icl_paper.weights.h5",
                               run_dir / "best.config.json": "icl_paper.config.json"})
        return self.results("icl", steps, copied, {
            "history": read_csv_rows(run_dir / "history.csv"),
            "heldout_metrics": read_json(w / "icl_eval" / "metrics.json"),
        })

    def nnclr(self):
        s, w = self.sizes, self.work
        run_dir = w / "nnclr_run"
        unlabelled, pairs, test = w / "tidal_unlabelled.h5", w / "tidal_pairs_train.h5", w / "tidal_pairs_test.h5"
        steps = [
            (self.generate("generate_tidal", "tidal", s.tidal_galaxies, 4242, unlabelled), []),
            (self.generate("generate_tidal_pairs", "tidal_pairs", s.tidal_train_pairs, 4343, pairs, "--distribution", "visible"), []),
            (self.generate("generate_tidal_test", "tidal_pairs", s.tidal_test_pairs, 5151, test, "--distribution", "visible"), []),
            (Step("train_nnclr", ["nnclr_train.py", str(unlabelled), str(pairs), "--labelled", str(pairs), "--out-dir",
                                  str(run_dir), "--precision", s.precision, *s.nnclr_arguments], reserve=150,
                                  produces=run_dir / "classifier.keras"),
             ["generate_tidal", "generate_tidal_pairs"]),
            (Step("test_nnclr", ["nnclr_test.py", str(unlabelled), "--run-dir", str(run_dir), "--test-data", str(test),
                                 "--visible-only", "--out-dir", str(w / "nnclr_eval")], reserve=120),
             ["train_nnclr", "generate_tidal_test"]),
        ]
        steps = self.run_all(steps)
        copied = self.collect({run_dir / "encoder.keras": "nnclr_encoder.keras",
                               run_dir / "classifier.keras": "nnclr_classifier.keras",
                               run_dir / "config.json": "nnclr_config.json"})
        return self.results("nnclr", steps, copied, {
            "history": read_json(run_dir / "nnclr_history.json"),
            "test_metrics": read_json(w / "nnclr_eval" / "metrics.json"),
        })

    def bench(self):
        s, w = self.sizes, self.work
        benches = {
            "bench_icl_inference": ["bench/bench_icl_inference.py", *s.bench_icl_inference, "--json"],
            "bench_icl_inference_fast": ["bench/bench_icl_inference.py", *s.bench_icl_inference_fast, "--json"],
            "bench_train_step": ["bench/bench_train_step.py", *s.bench_train_step, "--json"],
            "bench_nnclr": ["bench/bench_nnclr.py", *s.bench_nnclr, "--out"],
        }
        steps = self.run_all([(Step(name, [*argv, str(w / f"{name}.json")]), []) for name, argv in benches.items()])
        return self.results("bench", steps, {}, {name: read_json(w / f"{name}.json") for name in benches})

    # -- results ----------------------------------------------------------------------------------

    def collect(self, files):
        copied = {}
        for source, name in files.items():
            if source.is_file():
                shutil.copyfile(source, self.out / name)
                copied[name] = source.stat().st_size
        return copied

    def results(self, stage, steps, copied, extra):
        results = {
            "stage": stage,
            "dry_run": self.dry_run,
            "sizes": dataclasses.asdict(self.sizes),
            "complete": all(step.status == "ok" for step in steps),
            "steps": [{"name": step.name, "command": ["python", *step.argv], "seconds": round(step.seconds, 1),
                       "status": step.status, "tail": step.tail if step.status != "ok" else ""} for step in steps],
            "files": copied,
            **extra,
        }
        path = self.out / f"results_{stage}.json"
        path.write_text(json.dumps(results, indent=1, default=str))
        return results


def read_json(path):
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_csv_rows(path):
    import csv

    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return None


def what_to_commit(results):
    """The lines that say where each returned file goes in the repository."""
    lines = []
    for stage in results:
        if stage["stage"] == "icl" and "icl_paper.weights.h5" in stage["files"]:
            lines.append("icl_paper.weights.h5 + icl_paper.config.json -> checkpoints/ (model card: checkpoints/README.md, "
                         "numbers from results_icl.json 'heldout_metrics'; rerun checkpoints/evaluate.py there on the "
                         "GalSim and real-like sets)")
        if stage["stage"] == "nnclr" and "nnclr_encoder.keras" in stage["files"]:
            lines.append("nnclr_encoder.keras, nnclr_classifier.keras, nnclr_config.json -> checkpoints/nnclr_paper/ as "
                         "encoder.keras, classifier.keras, config.json (a run folder nnclr_test.py --run-dir reads)")
        for key, value in stage.items():
            if key.startswith("bench_") and value:
                lines.append(f"{key} -> bench/RESULTS.md, GPU row: {json.dumps(value.get('rows') or value.get('training'))}")
        if not stage["complete"]:
            lines.append(f"stage {stage['stage']} is NOT complete: " + "; ".join(
                f"{step['name']}: {step['status']}" for step in stage["steps"] if step["status"] != "ok"))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", nargs="+", choices=STAGES + ("all",), default=["all"],
                        help="what to run, in this order (default all: icl nnclr bench)")
    parser.add_argument("--out", required=True, help="folder for what comes back ($OUT on the GPU machine)")
    parser.add_argument("--work", help="folder for the mocks and run folders (default: a folder beside --out)")
    parser.add_argument("--dry-run", action="store_true", help="the same chain at tiny size on the CPU, TensorFlow blocked")
    parser.add_argument("--deadline", type=float, default=DEADLINE, help=f"seconds the whole command may take (default {DEADLINE})")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes rendering mocks (default: every core)")
    args = parser.parse_args(argv)
    if args.deadline <= 0 or args.workers < 1:
        parser.error("--deadline must be positive and --workers at least 1")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(args.work) if args.work else out.parent / f"{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    kit = Kit(out, work, DRY_RUN if args.dry_run else PAPER, args.dry_run, args.deadline, args.workers)
    stages = list(STAGES) if "all" in args.stage else list(dict.fromkeys(args.stage))
    kit.say(f"GPU kit, stages {' '.join(stages)}{' (dry run)' if args.dry_run else ''}; work folder {work}")
    kit.prepare()
    results = [getattr(kit, stage)() for stage in stages]
    kit.say("what to commit where:")
    for line in what_to_commit(results):
        kit.say(f"  {line}")
    return 0 if all(stage["complete"] for stage in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
