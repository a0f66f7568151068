"""`ftk export --format gguf` checked with the real client: llama.cpp (through llama-cpp-python, the same
llama.cpp the converters come from) loads what ftk wrote, and its greedy tokens equal plain transformers'.

On the tiny shared LLaMA (its own SentencePiece tokenizer): a LoRA adapter on every linear layer with a
random B (so merging changes the greedy tokens: a dropped adapter fails the test) is exported merged (f16,
from a run folder) and alone (a GGUF LoRA applied to the base's GGUF, exported from the plain model folder);
both give transformers' greedy tokens on the merged model. q8_0 and a llama.cpp-quantized type load and
run; bad input is one line and exit 2 with nothing left behind."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODEL_DIR

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park"]
NEW_TOKENS = 20
FTK = [sys.executable, "-m", "ftk"]


def hf_greedy(model, prompt_ids: list[list[int]], eos: int) -> list[list[int]]:
    import torch

    out = []
    for ids in prompt_ids:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos)
        out.append(gen[0, len(ids):].tolist())
    return out


def lcpp_greedy(path: Path, prompt_ids: list[list[int]], lora: Path | None = None) -> list[list[int]]:
    """llama.cpp's greedy continuation (argmax of its logits) of the same prompt token ids."""
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=128, n_threads=2, logits_all=True,
                          verbose=False)
    out = []
    for ids in prompt_ids:
        llm.reset()
        llm.eval(ids)
        new = []
        while len(new) < NEW_TOKENS:
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(tok)
            if tok == llm.token_eos():
                break
            llm.eval([tok])
        out.append(new)
    llm.close()
    return out


def ftk(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*FTK, *map(str, args)], capture_output=True, text=True)


def ftk_here(capsys, *args) -> subprocess.CompletedProcess:
    """The same command line run in this process (its main(), as the `ftk` script calls it): no start-up."""
    from ftk.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, stop.value.code, out, err)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*FTK, "export", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An adapter with random B on every linear layer, in an adapter folder and in a run folder; transformers'
    greedy tokens for the base and the merged model; the merged (from the run), base and adapter GGUFs and
    the base as q8_0 and q4_k_m, exported concurrently (each conversion is a process of its own)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("gguf")
    jobs = {kind: (tmp / f"base-{kind}.gguf", start(MODEL_DIR, "--format", "gguf", "--type", kind, "--out",
                                                    tmp / f"base-{kind}.gguf"))
            for kind in ("f16", "q8_0", "q4_k_m")}
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    base_tokens = hf_greedy(base, prompt_ids, tok.eos_token_id)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.15)
    adapter = tmp / "adapter"
    peft_model.save_pretrained(adapter)
    ac = json.loads((adapter / "adapter_config.json").read_text())
    ac["base_model_name_or_path"] = str(MODEL_DIR)
    (adapter / "adapter_config.json").write_text(json.dumps(ac))
    run = tmp / "run"  # a finished run's layout: adapter/ beside recipe.json
    shutil.copytree(adapter, run / "adapter")
    (run / "recipe.json").write_text("{}")
    jobs["merged"] = (tmp / "merged-f16.gguf", start(run, "--format", "gguf", "--out", tmp / "merged-f16.gguf"))
    jobs["lora"] = (tmp / "lora-f16.gguf", start(adapter, "--format", "gguf", "--adapter-only", "--type", "f16",
                                                 "--out", tmp / "lora-f16.gguf"))
    rslora = tmp / "rslora"  # the same weights, scaled by alpha/√r (rsLoRA) instead of alpha/r
    shutil.copytree(adapter, rslora)
    (rslora / "adapter_config.json").write_text(json.dumps({**ac, "use_rslora": True}))
    jobs["rslora"] = (tmp / "rslora.gguf", start(rslora, "--format", "gguf", "--adapter-only", "--out",
                                                 tmp / "rslora.gguf"))
    merged = peft_model.merge_and_unload()  # transformers + PEFT on their own: the reference
    merged_tokens = hf_greedy(merged, prompt_ids, tok.eos_token_id)

    out = {"tmp": tmp, "adapter": adapter, "run": run, "rslora_dir": rslora, "prompt_ids": prompt_ids,
           "base_tokens": base_tokens, "merged_tokens": merged_tokens, "stdout": {}}
    for name, (path, proc) in jobs.items():
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr
        assert stdout.strip().endswith(f"exported to {path}") and path.is_file()
        name = name if name in ("merged", "lora", "rslora") else f"base-{name}"
        out[name], out["stdout"][name] = path, stdout
    out["base"] = out["base-f16"]
    assert sorted(f.name for f in tmp.iterdir() if f.name.startswith(".")) == []  # no leftovers
    return out


def test_the_adapter_changes_the_greedy_tokens(exported):
    # otherwise equal tokens below could come from an export that dropped the adapter
    assert all(b != m for b, m in zip(exported["base_tokens"], exported["merged_tokens"]))
    assert all(len(m) == NEW_TOKENS for m in exported["merged_tokens"])


def test_merged_f16_gives_transformers_greedy_tokens(exported):
    assert lcpp_greedy(exported["merged"], exported["prompt_ids"]) == exported["merged_tokens"]


def test_base_gguf_gives_the_base_greedy_tokens_and_tokenizes_as_transformers(exported):
    assert lcpp_greedy(exported["base"], exported["prompt_ids"]) == exported["base_tokens"]
    for path in (exported["base"], exported["merged"]):  # the GGUF carries the model's own tokenizer
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
        assert [llm.tokenize(p.encode(), add_bos=True) for p in PROMPTS] == exported["prompt_ids"]
        llm.close()


def test_adapter_only_gguf_on_the_base_gguf_gives_the_merged_tokens(exported):
    import gguf

    reader = gguf.GGUFReader(exported["lora"])
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.lora.alpha").contents() == 8.0
    names = [t.name for t in reader.tensors]
    assert len(names) == 5 * 7 * 2 and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    tokens = lcpp_greedy(exported["base"], exported["prompt_ids"], lora=exported["lora"])
    assert tokens == exported["merged_tokens"]


@pytest.mark.parametrize("kind,file_type", [("q8_0", 7), ("q4_k_m", 15)])
def test_quantized_types_load_and_run(exported, kind, file_type):
    """q8_0 comes from llama.cpp's converter, q4_k_m from its quantizer (llama-cpp-python's binding)."""
    import gguf

    path = exported[f"base-{kind}"]
    assert gguf.GGUFReader(path).get_field("general.file_type").contents() == file_type
    tokens = lcpp_greedy(path, exported["prompt_ids"][:1])
    assert len(tokens[0]) == NEW_TOKENS


def _one_error(p: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    return lines[0]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(exported, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    line = _one_error(ftk_here(capsys, "export", MODEL_DIR, "--format", "gguf", "--type", "q9", "--out", out))
    assert "--type: 'q9' is not one of 'f32', 'f16'" in line
    line = _one_error(ftk_here(capsys, "export", MODEL_DIR, "--format", "gguf", "--option", "colour=1", "--out", out))
    assert "--option colour: unknown key 'colour'" in line
    line = _one_error(ftk_here(capsys, "export", MODEL_DIR, "--format", "onnx", "--out", out))
    assert "unknown exporter 'onnx'; available: gguf" in line
    line = _one_error(ftk_here(capsys, "export", MODEL_DIR, "--format", "gguf", "--adapter-only", "--out", out))
    assert "is a model, not a run or an adapter" in line
    line = _one_error(ftk_here(capsys, "export", exported["adapter"], "--format", "gguf", "--adapter-only", "--type", "q4_k_m",
                          "--out", out))
    assert "--type q4_k_m: an adapter is written as f32, f16, bf16, q8_0" in line
    line = _one_error(ftk_here(capsys, "export", tmp_path / "nowhere", "--format", "gguf", "--out", out))
    assert "no such folder" in line
    (tmp_path / "empty").mkdir()
    assert "not a run, adapter or model folder" in _one_error(ftk_here(capsys, "export", tmp_path / "empty", "--format", "gguf",
                                                                  "--out", out))
    line = _one_error(ftk_here(capsys, "export", MODEL_DIR, "--format", "gguf", "--option", f"llama_cpp={tmp_path}", "--out", out))
    assert f"llama_cpp: {tmp_path} is not a llama.cpp checkout (no convert_hf_to_gguf.py" in line
    assert sorted(f.name for f in tmp_path.iterdir()) == ["empty"]

    out.write_text("keep me")
    line = _one_error(ftk_here(capsys, "export", MODEL_DIR, "--format", "gguf", "--out", out))
    assert "exists (add --overwrite to replace it)" in line and out.read_text() == "keep me"


def test_adapters_llama_cpp_cannot_express_are_refused(exported, tmp_path, capsys):
    dora = tmp_path / "dora"
    shutil.copytree(exported["adapter"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    line = _one_error(ftk_here(capsys, "export", dora, "--format", "gguf", "--adapter-only", "--out", tmp_path / "x.gguf"))
    assert "the adapter uses DoRA; a GGUF LoRA (llama.cpp) cannot express it; export the merged model" in line


def test_a_converter_refusal_is_one_line_and_leaves_nothing(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}))
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    line = _one_error(ftk("export", model, "--format", "gguf", "--out", out))
    assert "llama.cpp's convert_hf_to_gguf.py refused it: Model NoSuchForCausalLM is not supported" in line
    assert list(out.parent.iterdir()) == []


def test_missing_sentencepiece_is_one_line(tmp_path):
    code = ("import sys; sys.modules['sentencepiece'] = None\n"
            "from ftk.cli import main\n"
            f"main(['export', {str(MODEL_DIR)!r}, '--format', 'gguf', '--out', {str(tmp_path / 'x.gguf')!r}])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "exporter 'gguf' needs sentencepiece: pip install 'ftk[gguf]'" in _one_error(p)
    assert list(tmp_path.iterdir()) == []


def test_converters_come_from_the_pinned_llama_cpp(exported):
    import os

    from ftk.plugins import export_gguf as eg

    if os.environ.get("FTK_LLAMA_CPP"):
        pytest.skip("FTK_LLAMA_CPP points at a llama.cpp checkout")
    d, own = eg.converters({})
    assert not own and d.name == f"llama-cpp-python-{eg.LLAMA_CPP_PYTHON}"
    assert (d / "LICENSE").is_file() and (d / "conversion" / "llama.py").is_file()
    assert (d / "gguf-py" / "gguf" / "lazy.py").is_file()  # the converters' own gguf-py, found beside them
    assert eg.LLAMA_CPP_COMMIT in (d / "SOURCE").read_text()
    from importlib.metadata import version

    assert version("llama-cpp-python") == eg.LLAMA_CPP_PYTHON  # the client is the same llama.cpp release


def test_rslora_adapter_only_gives_peft_merged_tokens(exported):
    """rsLoRA scales by alpha/√r in PEFT and llama.cpp knows alpha/r only: the GGUF carries alpha·√r."""
    import gguf
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(exported["rslora_dir"])).merge_and_unload()
    want = hf_greedy(merged, exported["prompt_ids"], 2)
    assert want != exported["merged_tokens"]  # the scale differs from plain LoRA's: it matters here
    assert "note: rsLoRA: written with alpha 16 (= 8·√4)" in exported["stdout"]["rslora"]
    assert gguf.GGUFReader(exported["rslora"]).get_field("adapter.lora.alpha").contents() == 16.0
    assert lcpp_greedy(exported["base"], exported["prompt_ids"], lora=exported["rslora"]) == want
