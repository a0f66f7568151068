"""Built-in exporter `gguf`: a run's merged model, its LoRA adapter alone, or a plain model as GGUF for
llama.cpp (and what runs on it: Ollama, LM Studio, llama-cpp-python).

The conversion is llama.cpp's own: its `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py`, run in a
subprocess with the gguf-py of the same llama.cpp commit (as llama.cpp runs them; PyPI's `gguf` 0.19.0 is
older than the gguf-py these converters need, though both say 0.19.0). No PyPI package ships those
converters, so on first use they are taken from the pinned llama-cpp-python sdist (`pip download`, its
sha256 required), extracted into ftk's cache with llama.cpp's LICENSE; `llama_cpp` / `FTK_LLAMA_CPP`
points at a llama.cpp checkout instead (no download). Types other than the converter's own (q4_k_m, ...)
are made by llama.cpp's quantizer through llama-cpp-python. Only the standard library at import time."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ftk import hookimpl
from ftk.errors import FtkError, RunError

# The converters come from this llama-cpp-python release, which vendors llama.cpp at LLAMA_CPP_COMMIT;
# the tests check the export with llama-cpp-python of the same version. Moving the pin: change the three
# together with the llama-cpp-python pin of the test extra in pyproject.toml.
LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# ggml-org/llama.cpp at release b11312: the commit llama-cpp-python 0.3.36's changelog names (0c1e57098)
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
LLAMA_CPP_RELEASE = "b11312"
# what is taken from the sdist's vendor/llama.cpp/: the converters, their model code, the chat templates
# some models' conversion reads, their gguf-py (found by the converters beside them) and the licenses
_VENDOR = "vendor/llama.cpp/"
_KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE", "conversion/", "models/templates/",
         "gguf-py/gguf/", "gguf-py/LICENSE")
_NEEDED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/llama.py", "gguf-py/gguf/__init__.py")

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py / convert_lora_to_gguf.py write
# llama.cpp's quantizer's types that need no importance matrix (the llama_ftype names, lower case)
QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                  "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")

OPTIONS_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"enum": [*CONVERTER_TYPES, *QUANTIZE_TYPES], "default": "f16",
                 "description": "f32, f16, bf16, q8_0: written by llama.cpp's converter; the others by llama.cpp's "
                                "quantizer from an f16 (bf16 for a bf16 model) conversion, through llama-cpp-python. "
                                "An adapter takes f32, f16, bf16 or q8_0."},
        "adapter_only": {"type": "boolean", "default": False,
                         "description": "Write the LoRA adapter as a GGUF LoRA (llama.cpp's --lora over the base "
                                        "model's GGUF) instead of the merged model."},
        "llama_cpp": {"type": ["string", "null"], "default": None,
                      "description": "A llama.cpp checkout whose converters (and gguf-py) to use instead of the "
                                     f"pinned ones (llama.cpp {LLAMA_CPP_RELEASE}); default: $FTK_LLAMA_CPP."},
    },
    "additionalProperties": False,
}


def _missing() -> str | None:
    # the converters' own imports beyond ftk's dependencies (gguf-py comes with them; it needs numpy, tqdm,
    # pyyaml and requests, which transformers brings)
    gone = [m for m in ("sentencepiece",) if importlib.util.find_spec(m) is None]
    return f"needs {' and '.join(gone)}: pip install 'ftk[gguf]'" if gone else None


# -- the converters -----------------------------------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("FTK_CACHE_DIR") or "~/.cache/ftk").expanduser() / "llama.cpp"


def converters(options: dict) -> tuple[Path, bool]:
    """(the folder holding convert_hf_to_gguf.py, whether it is the user's llama.cpp checkout)."""
    given = options.get("llama_cpp") or os.environ.get("FTK_LLAMA_CPP")
    if given:
        d = Path(given).expanduser()
        missing = [f for f in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py") if not (d / f).is_file()]
        if missing:
            who = "llama_cpp" if options.get("llama_cpp") else "FTK_LLAMA_CPP"
            raise FtkError(f"{who}: {d} is not a llama.cpp checkout (no {', '.join(missing)})")
        return d.resolve(), True
    d = _cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if not _complete(d):
        d.parent.mkdir(parents=True, exist_ok=True)
        with _locked(d.parent / f".{d.name}.lock"):  # one fetch at a time; the others then find it done
            if not _complete(d):
                fetch_converters(d)
    return d, False


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: unlocked (the rename still puts a whole copy in place)
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _source_note() -> str:
    return (f"llama.cpp {LLAMA_CPP_RELEASE} ({LLAMA_CPP_COMMIT}), from the vendor/llama.cpp of llama-cpp-python "
            f"{LLAMA_CPP_PYTHON} (sdist sha256 {SDIST_SHA256})\n")


def _complete(d: Path) -> bool:
    """Whether ``d`` holds what this ftk extracts (SOURCE, written last, says from which sdist)."""
    try:
        return all((d / f).is_file() for f in _NEEDED) and (d / "SOURCE").read_text() == _source_note()
    except OSError:
        return False


def fetch_converters(dest: Path) -> None:
    """Download the pinned llama-cpp-python sdist with pip (hash required; pip's cache and index settings
    apply) and extract the converters into ``dest``, renamed into place whole."""
    import tarfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
               "-r", str(req), "-d", str(Path(tmp) / "dl"), "--quiet"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list((Path(tmp) / "dl").glob("*.tar.gz"))
        if p.returncode != 0 or len(sdists) != 1:
            said = _last_line(p.stderr + p.stdout) or f"exit {p.returncode}"
            raise FtkError(f"cannot get llama.cpp's converters (pip download llama-cpp-python=={LLAMA_CPP_PYTHON}: "
                           f"{said}); set FTK_LLAMA_CPP to a llama.cpp checkout instead")
        out = Path(tmp) / "converters"
        with tarfile.open(sdists[0]) as tar:
            for m in tar:
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if not rel.startswith(_VENDOR) or not m.isfile():
                    continue
                rel = rel[len(_VENDOR):]
                parts = rel.split("/")
                if ".." in parts or "__pycache__" in parts or not any(
                        rel == k or (k.endswith("/") and rel.startswith(k)) for k in _KEEP):
                    continue
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
        missing = [f for f in _NEEDED if not (out / f).is_file()]
        if missing:
            raise FtkError(f"llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist lacks {', '.join(missing)}")
        (out / "SOURCE").write_text(_source_note())
        if dest.exists():  # an incomplete or older copy: moved aside (removed with tmp)
            os.replace(dest, Path(tmp) / "old")
        try:
            os.replace(out, dest)
        except OSError:  # another process put them there first: theirs are the same files
            if not _complete(dest):
                raise


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_converter(script: Path, args: list[str]) -> None:
    """Run one of llama.cpp's converters (they import the gguf-py beside them, unless NO_LOCAL_GGUF is set in
    the environment: then the installed `gguf` package); its refusal (an ERROR line) is a FtkError, a crash
    a RunError, each one line (FTK_DEBUG=1 prints its whole output)."""
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if p.returncode == 0:
        return
    out = p.stdout + p.stderr
    if os.environ.get("FTK_DEBUG"):
        print(out, file=sys.stderr)
    errors = [ln.split(":", 2)[-1].strip() for ln in out.splitlines() if ln.startswith("ERROR:")]
    if errors:
        raise FtkError(f"llama.cpp's {script.name} refused it: {errors[0]}")
    raise RunError(f"llama.cpp's {script.name} failed: {_last_line(out) or f'exit {p.returncode}'}"
                   + ("" if os.environ.get("FTK_DEBUG") else " (FTK_DEBUG=1 shows its output)"))


def need_quantizer(kind: str) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise FtkError(f"--type {kind}: needs llama.cpp's quantizer: pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON}' "
                       f"(or use {', '.join(CONVERTER_TYPES)})")


def quantize(src: Path, dest: Path, kind: str) -> str:
    """``src`` (GGUF) quantized to ``kind`` by llama.cpp's llama_model_quantize (llama-cpp-python), in a
    subprocess (it prints to the C stderr and may abort); returns llama-cpp-python's version."""
    from importlib.metadata import version

    need_quantizer(kind)
    code = ("import ctypes, sys, llama_cpp\n"
            "ftype = getattr(llama_cpp, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3].upper(), None)\n"
            "if ftype is None or not hasattr(llama_cpp, 'llama_model_quantize'):\n"
            "    print('this llama-cpp-python cannot quantize to ' + sys.argv[3], file=sys.stderr); sys.exit(3)\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            "p.ftype = ftype\n"
            "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))\n"
            "sys.exit(0 if rc == 0 else 4)\n")
    p = subprocess.run([sys.executable, "-c", code, str(src), str(dest), kind], capture_output=True, text=True)
    if p.returncode != 0 or not dest.is_file():
        if os.environ.get("FTK_DEBUG"):
            print(p.stdout + p.stderr, file=sys.stderr)
        raise RunError(f"llama.cpp's quantizer failed to write {kind}: {_last_line(p.stderr) or f'exit {p.returncode}'}")
    return version("llama-cpp-python")


# -- the adapter ----------------------------------------------------------------------------------------
def lora_for_llama_cpp(adapter_dir: Path, work: Path) -> tuple[Path, list[str]]:
    """The adapter folder convert_lora_to_gguf.py should read, and notes. llama.cpp scales a LoRA by
    alpha / rank (PEFT's plain LoRA); what it cannot express is refused in one line, and rsLoRA (PEFT:
    alpha / sqrt(rank)) is written with the alpha that gives the same scale."""
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FtkError(f"{cfg_path}: unreadable ({e})") from None
    why = "a GGUF LoRA (llama.cpp) cannot express it; export the merged model instead (leave out --adapter-only)"
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise FtkError(f"--adapter-only: {adapter_dir} is a {cfg.get('peft_type')} adapter, not LoRA; {why}")
    for key, what in (("use_dora", "DoRA"), ("alpha_pattern", "per-module alpha (alpha_pattern)"),
                      ("modules_to_save", f"full copies of {cfg.get('modules_to_save')} (modules_to_save)"),
                      ("lora_bias", "LoRA biases (lora_bias)")):
        if cfg.get(key):
            raise FtkError(f"--adapter-only: the adapter uses {what}; {why}")
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            full = [k for k in f.keys() if "lora_" not in k]
        if full:
            raise FtkError(f"--adapter-only: the adapter also holds full weights ({full[0]}"
                           f"{f' and {len(full) - 1} more' if len(full) > 1 else ''}: tokens were added or "
                           f"modules saved whole); {why}")
    if not cfg.get("use_rslora"):
        return adapter_dir, []
    if cfg.get("rank_pattern"):
        raise FtkError(f"--adapter-only: the adapter uses rsLoRA with per-module ranks (rank_pattern); {why}")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    copy = work / "adapter-rslora"
    copy.mkdir()
    for f in adapter_dir.iterdir():
        if f.is_file() and f.name != "adapter_config.json":
            os.symlink(f.resolve(), copy / f.name)
    cfg.update(use_rslora=False, lora_alpha=alpha * math.sqrt(r))
    (copy / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return copy, [f"rsLoRA: written with alpha {alpha * math.sqrt(r):g} (= {alpha:g}·√{r}), so llama.cpp's "
                  f"alpha/rank scale equals PEFT's alpha/√rank"]


# -- the exporter ---------------------------------------------------------------------------------------
def export_gguf(options: dict, ctx) -> list[str]:
    kind, adapter_only = options["type"], options["adapter_only"]
    if adapter_only and ctx.source_kind == "model":
        raise FtkError(f"--adapter-only: {ctx.source} is a model, not a run or an adapter")
    if adapter_only and kind not in CONVERTER_TYPES:
        raise FtkError(f"--type {kind}: an adapter is written as {', '.join(CONVERTER_TYPES)} "
                       f"(llama.cpp's quantizer takes whole models)")
    if kind not in CONVERTER_TYPES:
        need_quantizer(kind)  # says what to install before anything slow runs
    tools, own = converters(options)
    notes = [f"llama.cpp converters: {tools}" + ("" if own else f" (llama.cpp {LLAMA_CPP_RELEASE}, "
                                                               f"from llama-cpp-python {LLAMA_CPP_PYTHON})")]
    work, staging = Path(ctx.work_dir), Path(ctx.staging)
    if adapter_only:
        lora, more = lora_for_llama_cpp(Path(ctx.adapter_dir), work)
        run_converter(tools / "convert_lora_to_gguf.py",
                      [str(lora), "--base", ctx.base_model(), "--outfile", str(staging), "--outtype", kind])
        return notes + more + ["apply it to the base model's GGUF: llama-cli -m BASE.gguf --lora " + Path(ctx.output).name]
    model = ctx.merged_model("float32")
    if kind in CONVERTER_TYPES:
        run_converter(tools / "convert_hf_to_gguf.py", [model, "--outfile", str(staging), "--outtype", kind])
        return notes
    inter = "bf16" if _config_dtype(Path(ctx.base_model())) == "bfloat16" else "f16"  # the base's own precision
    middle = work / f"model-{inter}.gguf"
    run_converter(tools / "convert_hf_to_gguf.py", [model, "--outfile", str(middle), "--outtype", inter])
    lcpp = quantize(middle, staging, kind)
    return notes + [f"quantized to {kind} from {inter} by llama.cpp's quantizer (llama-cpp-python {lcpp})"]


def _config_dtype(model: Path) -> str | None:
    try:
        cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype")


@hookimpl
def ftk_register_exporters(register):
    register("gguf", export_gguf, description="GGUF for llama.cpp: the merged model, the LoRA adapter alone "
             "(--adapter-only) or a plain model, by llama.cpp's own converters", options_schema=OPTIONS_SCHEMA,
             unavailable=_missing())
