"""`ftk chat`, driven as a person drives it: through a pseudo-terminal (stdlib pty), on a run folder whose
adapter has random LoRA B weights (so the adapter visibly changes the replies). Each reply must equal what
plain transformers + PEFT decode greedily from the prompt the data pipeline renders for the same
conversation; the prompts themselves must be the data pipeline's token ids (DailyDialog's roles format,
Alpaca's instruction format, a tokenizer's chat template)."""
from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import sys
import time

import pytest

from conftest import ALPACA, DAILYDIALOG, MODEL_DIR
from ftk.manager import get_manager

MAX_NEW = 16
FIRST, SECOND = "Hi, how are you doing today?", "What would you like to eat?"


# -- the run and the reference ---------------------------------------------------------------------
def _recipe(out) -> dict:
    return {"model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 50},
                                  {"loader": "dailydialog", "path": str(DAILYDIALOG)}],
                     "max_length": 128, "cache": False},
            "training": {"max_steps": 1, "report_to": ["none"]},
            "output_dir": str(out)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as `ftk run` leaves it (recipe.json, adapter/ with its tokenizer), the adapter's LoRA B
    weights random instead of trained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftk.recipe import load_recipe
    from ftk.run import redact

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("chat") / "run"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps(redact(dict(load_recipe(data=_recipe(out)))), indent=2))
    torch.manual_seed(0)  # LoRA A's init: the same adapter whatever ran before in this process
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(MODEL_DIR)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.06)
    model.save_pretrained(out / "adapter")
    AutoTokenizer.from_pretrained(str(MODEL_DIR)).save_pretrained(out / "adapter")
    return out


@pytest.fixture(scope="module")
def ref(run):
    """Plain transformers + PEFT: the adapter on the base, greedy decoding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(MODEL_DIR)), str(run / "adapter"))
    return model.eval(), tok


def pipeline_ids(tok, example, turn: int = -1) -> list[int]:
    """The data pipeline's ids of ``example`` before its ``turn``-th trained span (the reply the model learnt)."""
    from ftk.tokens import prepare_tokenizer, tokenize_examples

    block = tokenize_examples([example], prepare_tokenizer(tok), progress=False)
    ids, mask = block.ids.tolist(), block.mask.tolist()
    starts = [k for k in range(1, len(mask)) if mask[k] and not mask[k - 1]]
    return ids[:starts[turn]]


def conversation_prompt(tok, turns: list[str]) -> list[int]:
    """The pipeline's prompt for the reply to the last of ``turns`` (user, assistant, user, ...), in the
    DailyDialog format, before a reply whose first word carries its space ("well", as most words do in
    LLaMA's vocabulary)."""
    from ftk.loaderkit import conversation_example

    msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
    return pipeline_ids(tok, conversation_example(msgs + [{"role": "assistant", "content": "well, yes."}]))


def greedy(ref, ids: list[int], stop: str = "\nUser:") -> str:
    """transformers' greedy continuation of ``ids``, as text, cut at EOS and at the turn boundary."""
    import torch

    model, tok = ref
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, num_beams=1, pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    text = tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    return text.split(stop)[0].strip()


# -- a terminal ------------------------------------------------------------------------------------
_CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class Terminal:
    """``ftk chat ...`` on a pseudo-terminal: keys in, the screen's text out (escape codes dropped)."""

    def __init__(self, *args):
        env = {**os.environ, "TERM": "xterm", "COLUMNS": "200"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: ftk with the terminal as stdin, stdout and stderr
            try:
                # Ctrl-C as at a person's terminal, even where the tests were started in the background
                # (a shell without job control starts background jobs with SIGINT ignored, and exec keeps that)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(sys.executable, [sys.executable, "-m", "ftk", "chat", *map(str, args)], env)
            finally:
                os._exit(127)
        self.screen = ""

    def read_until(self, pattern: str, timeout: float = 120) -> str:
        """The screen from where the last read stopped up to ``pattern`` (a regex on the cleaned text)."""
        start, deadline = len(self.screen), time.time() + timeout
        while not re.search(pattern, self.screen[start:]):
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"no {pattern!r} on the screen after {timeout}s: {self.screen[start:]!r}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the program ended
                data = b""
            if not data:
                raise AssertionError(f"ftk chat ended before {pattern!r}: {self.screen[start:]!r}")
            self.screen += _CSI.sub("", data.decode("utf-8", "replace")).replace("\r", "")
        return self.screen[start:]

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def say(self, message: str) -> str:
        """Type a message and Enter; the reply (what was printed after the echoed line, before the next prompt)."""
        self.type(message + "\r")
        shown = self.read_until(r"\n> $")
        echoed, _, rest = shown.partition("\n")
        assert echoed.endswith(message), shown
        return rest[: -len("> ")].rstrip("\n")

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        """(exit status, the rest of the screen) once the program ends."""
        deadline, rest = time.time() + timeout, ""
        while time.time() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    data = b""
                rest += _CSI.sub("", data.decode("utf-8", "replace")).replace("\r", "")
                if not data:
                    break
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        while pid == 0 and time.time() < deadline + 10:  # the screen closed as it exits: reap it
            select.select([], [], [], 0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:  # still running: stop it rather than hang the suite
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)
            raise AssertionError(f"ftk chat still running {timeout}s after the last key: {self.screen + rest!r}")
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status), rest


def test_a_conversation_in_a_terminal(run, ref):
    """Type, read the streamed reply, go on with history, /reset, Ctrl-C at the prompt."""
    model, tok = ref
    term = Terminal(run, "--max-new-tokens", MAX_NEW)
    banner = term.read_until(r"\n> $")
    assert "data.datasets[1] (dailydialog): 'User: ' ... '\\nAssistant: ' (multi-turn)" in banner, banner
    assert "decoding: greedy" in banner
    first = term.say(FIRST)
    assert first == greedy(ref, conversation_prompt(tok, [FIRST])) and first
    with model.disable_adapter():  # the adapter is applied: the base model answers otherwise
        assert first != greedy(ref, conversation_prompt(tok, [FIRST]))
    second = term.say(SECOND)  # the model sees the first exchange: equal to the 3-turn rendering's reply
    assert second == greedy(ref, conversation_prompt(tok, [FIRST, first, SECOND]))
    assert second != greedy(ref, conversation_prompt(tok, [SECOND]))
    term.type("/reset\r")
    assert "(history cleared)" in term.read_until(r"\n> $")
    assert term.say(SECOND) == greedy(ref, conversation_prompt(tok, [SECOND]))  # a first turn again
    term.type("/help\r")
    assert "/reset" in term.read_until(r"\n> $")
    term.type("\x03")  # Ctrl-C at the prompt: a clean exit
    code, rest = term.wait()
    assert code == 0 and "Traceback" not in term.screen + rest and "interrupted" not in rest, term.screen + rest


def test_piped_input_gets_plain_replies_one_per_message(run, ref, monkeypatch, capsys):
    """Not a terminal: every line is a message, stdout holds only the replies; /exit ends the chat (exit 0)
    and nothing after it is read. Given the run's adapter folder, the chat finds the run's recipe beside it.
    (In this process, stdin a file: what a pipe gives.)"""
    from ftk.cli import main

    _, tok = ref
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{FIRST}\n\n/reset\n{FIRST}\n/exit\n{SECOND}\n"))
    with pytest.raises(SystemExit) as e:
        main(["chat", str(run / "adapter"), "--max-new-tokens", str(MAX_NEW)])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    reply = greedy(ref, conversation_prompt(tok, [FIRST]))
    assert out == f"{reply}\n{reply}\n"  # no prompt, no banner, nothing after /exit
    assert "(history cleared)" in err and "Traceback" not in err


# -- the prompts are the data pipeline's -------------------------------------------------------------
def _entry_examples(recipe: dict, i: int, tok) -> list:
    from ftk.data import load_entry

    return list(load_entry(i, recipe["data"]["datasets"][i], recipe, tok, get_manager()).train)


def test_dailydialog_prompts_are_the_token_ids_training_saw(run, ref):
    """For real DailyDialog conversations: the chat prompt for the 4th turn after a 3-turn history equals the
    pipeline's ids before that turn; where the 4th turn's first letter has no token of its own with the space
    in this 512-token vocabulary, the space stands alone before it, and the prompt is the same without it."""
    from ftk import chat
    from ftk.cmd_chat import run_recipe
    from ftk.loaderkit import conversation_example

    _, tok = ref
    recipe = run_recipe(run / "recipe.json")
    fmt = chat.run_format(recipe, get_manager(), tok)
    assert fmt.source == "data.datasets[1] (dailydialog)" and fmt.multi_turn and fmt.stops == ("\nUser:",)
    exact = spaced = 0
    for ex in [e for e in _entry_examples(recipe, 1, tok) if len(e.messages) >= 4][:40]:
        history = ex.messages[:3]
        want = pipeline_ids(tok, conversation_example(ex.messages[:4]))
        got, pending = chat.prompt_ids(tok, fmt.text(tok, history))
        if got == want:
            exact += 1
            assert pending == " "  # the space that goes with the reply's first word
        else:
            assert got + tok.convert_tokens_to_ids(["▁"]) == want, (history, ex.messages[3])
            spaced += 1
    assert exact >= 10 and exact + spaced == 40


def test_alpaca_prompts_are_the_token_ids_training_saw(run, ref):
    """A single-turn format: each message is rendered alone, as the pipeline renders an instruction."""
    from ftk import chat
    from ftk.cmd_chat import run_recipe

    _, tok = ref
    recipe = run_recipe(run / "recipe.json")
    fmt = chat.run_format(recipe, get_manager(), tok, dataset=0)
    assert fmt.source == "data.datasets[0] (alpaca)" and not fmt.multi_turn
    examples = [e for e in _entry_examples(recipe, 0, tok) if "### Input:" not in e.text][:20]
    assert len(examples) == 20
    for ex in examples:
        got, _ = chat.prompt_ids(tok, fmt.text(tok, [ex.messages[0]]))
        assert got == pipeline_ids(tok, ex)
    session = chat.Session(fmt, tok)
    session.add("first", "reply")
    assert session.history == []  # nothing carried over: each message stands alone


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_prompts_are_the_token_ids_training_saw(ref, tmp_path):
    """A dataset entry with "template": "chat": the tokenizer's chat template, as the pipeline renders it."""
    from transformers import AutoTokenizer

    from ftk import chat
    from ftk.data import _render

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    tok.chat_template = CHATML
    data = tmp_path / "conv.jsonl"
    turns = ["Hello there.", "Hi! Nice to see you.", "Shall we go?", "Yes, let us go now."]
    data.write_text(json.dumps({"messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": t}
                                             for k, t in enumerate(turns)]}) + "\n")
    recipe = {"data": {"datasets": [{"loader": "custom", "path": str(data), "shape": "conversation",
                                     "template": "chat", "format": "auto", "fields": {}, "roles": {}}],
                       "on_error": "raise", "max_length": 128}, "training": {"seed": 1}}
    fmt = chat.run_format(recipe, get_manager(), tok)
    assert fmt.template and fmt.stops == ("<|im_end|>",)
    ex = _entry_examples(recipe, 0, tok)[0]
    rendered = _render([ex], recipe["data"]["datasets"][0], tok, "data.datasets[0]")[0]
    got, _ = chat.prompt_ids(tok, fmt.text(tok, ex.messages[:3]))
    assert got == pipeline_ids(tok, rendered)


# -- the pieces ----------------------------------------------------------------------------------------
def test_a_reply_stops_at_the_turn_boundary_and_beam_search_prints_it_whole(ref):
    """Streaming stops generating at the stop text (fewer forward passes) and trims it; beam search gives
    transformers' beam search reply, trimmed the same way."""
    import torch

    from ftk import chat

    model, tok = ref
    ids = conversation_prompt(tok, [FIRST])
    full = greedy(ref, ids, stop="\x00")
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    fmt = chat.ChatFormat("test", {}, (stop,))
    calls = []
    hook = model.get_base_model().register_forward_hook(lambda *a: calls.append(1))
    kwargs = dict(max_new_tokens=MAX_NEW, do_sample=False, num_beams=1, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.eos_token_id, use_cache=True)
    printed = []
    try:
        reply, stopped = chat.generate_reply(model, tok, ids, " ", fmt, kwargs, printed.append)
    finally:
        hook.remove()
    assert reply == full[:full.index(stop)].strip() and not stopped
    assert "".join(printed) == reply and len(printed) > 1  # streamed in pieces
    assert len(calls) < MAX_NEW, (len(calls), full, stop)
    # beam search: the whole reply at once, equal to transformers' 2-beam search
    printed = []
    reply, _ = chat.generate_reply(model, tok, ids, " ", chat.ChatFormat("t", {}, ("\nUser:",)),
                                   {**kwargs, "num_beams": 2}, printed.append)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, num_beams=2, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    text = tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    assert reply == text.split("\nUser:")[0].strip()
    assert printed == [reply]


def test_reply_text_as_tokens_arrive(ref):
    """Decoded in context, what may still become a stop text held back, cut at EOS, at a stop text and at a
    stop text that is one special token (a chat template's end of turn), special tokens never shown."""
    from transformers import AutoTokenizer

    from ftk import chat

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    end = tok.convert_tokens_to_ids("<|end|>")
    prompt, pending = chat.prompt_ids(tok, "User: hi\nAssistant: ")
    assert tok.convert_ids_to_tokens(prompt[-1]) == ":" and pending == " "
    enc = tok.backend_tokenizer.encode("User: hi\nAssistant: the dog ran.\nUser: ok", add_special_tokens=False)
    reply_ids = enc.ids[len(prompt) - 1:]  # the prompt's tokens, then the reply's (BOS is not in enc)
    r = chat.ReplyText(tok, prompt[-1], pending, ("\nUser:", "<|end|>"), {tok.eos_token_id})
    seen = []
    for k in range(1, len(reply_ids) + 1):
        if r.update(reply_ids[:k]):
            break
        seen.append(r.shown)
    assert r.done and r.result() == "the dog ran." and seen[0] == "the"
    assert all("\n" not in s and "User" not in s for s in seen)  # the stop text never shows, not even in part
    r = chat.ReplyText(tok, prompt[-1], pending, ("<|end|>",), {tok.eos_token_id})
    assert r.update(reply_ids[:3] + [tok.bos_token_id] + reply_ids[3:4] + [end] + reply_ids[4:])
    assert "<s>" not in r.text and r.result() == tok.decode(reply_ids[:4], skip_special_tokens=True).strip()
    r = chat.ReplyText(tok, prompt[-1], pending, (), {tok.eos_token_id})
    assert r.update(reply_ids[:3] + [tok.eos_token_id] + reply_ids[3:]) and r.result() == "the dog"


def test_ctrl_c_during_a_reply_stops_that_reply(ref):
    from ftk import chat

    model, tok = ref
    ids = conversation_prompt(tok, [FIRST])
    calls = []

    def interrupt(*a):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt

    hook = model.get_base_model().register_forward_hook(interrupt)
    kwargs = dict(max_new_tokens=MAX_NEW, do_sample=False, num_beams=1, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.eos_token_id, use_cache=True)
    try:
        reply, stopped = chat.generate_reply(model, tok, ids, " ", chat.conversation_format(), kwargs, lambda s: None)
    finally:
        hook.remove()
    assert stopped and reply and greedy(ref, ids).startswith(reply) and reply != greedy(ref, ids)
    # the loop says so and goes on; the reply so far stays in the history
    session = chat.Session(chat.conversation_format(), tok)
    out, err = io.StringIO(), io.StringIO()
    chat.chat_loop(session, lambda i, p, w: (w("partial") or ("partial", True)), False,
                   io.StringIO("hello\n/bogus\n"), out, err)
    assert out.getvalue() == "partial\n" and "(reply stopped)" in err.getvalue()
    assert "unknown command /bogus" in err.getvalue()
    assert session.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "partial"}]


def test_end_of_input_or_ctrl_c_at_the_prompt_ends_the_chat(monkeypatch, ref):
    """Ctrl-D (EOF) and Ctrl-C at a terminal's prompt end the loop normally (the command then exits 0; the
    terminal test above presses Ctrl-C for real)."""
    import builtins

    from ftk import chat

    for key in (EOFError, KeyboardInterrupt):
        typed = iter(["hello", key])

        def fake_input(prompt, typed=typed):
            k = next(typed)
            if isinstance(k, type):
                raise k
            return k

        monkeypatch.setattr(builtins, "input", fake_input)
        out = io.StringIO()
        session = chat.Session(chat.conversation_format(), ref[1])
        chat.chat_loop(session, lambda i, p, w: (w("hi") or ("hi", False)), True, None, out, io.StringIO())
        assert out.getvalue() == "hi\n\n" and len(session.history) == 2


def test_the_oldest_turns_are_dropped_when_the_context_is_full(ref):
    from ftk import chat

    _, tok = ref
    fmt = chat.conversation_format()
    session = chat.Session(fmt, tok, limit=None, max_new=10)
    for k in range(3):
        session.add(f"message number {k}", f"answer number {k}")
    full = len(session.prompt("the last one", print)[0])
    session.limit = full + 10 - 1  # one token short: the oldest exchange must go
    notes = []
    ids, _ = session.prompt("the last one", notes.append)
    assert [m["content"] for m in session.history] == ["message number 1", "answer number 1",
                                                       "message number 2", "answer number 2"]
    last = [{"role": "user", "content": "the last one"}]
    assert ids == chat.prompt_ids(tok, fmt.text(tok, session.history + last))[0]
    session.limit = 12  # nothing fits: not sent, said once more (a different note)
    assert session.prompt("the last one", notes.append) is None and session.history == []
    assert len(notes) == 2 and "dropping the oldest turns" in notes[0] and "not sent" in notes[1]


def test_format_told_from_examples_wherever_labels_repeat_content():
    """A content that also stands in a speaker label does not throw the format off (most examples agree)."""
    from ftk import chat
    from ftk.loaderkit import conversation_example

    convs = [[{"role": "user", "content": c}, {"role": "assistant", "content": d}]
             for c, d in (("Us", "yes"), ("hi", "no"), ("ok", "fine"))]
    fmt = chat.infer_format(((m, conversation_example(m).text) for m in convs), "x")
    assert fmt.pieces == {("lead", "user"): "User: ", ("gap", "user", "assistant"): "\nAssistant: "}
    assert fmt.missing(["system", "user"]) == "no system turn at the start"
    assert not fmt.multi_turn and fmt.stops == ("User:",)


# -- bad input: one line, exit 2, no traceback --------------------------------------------------------
def _main(capsys, *args) -> tuple[int, str]:
    from ftk.cli import main

    with pytest.raises(SystemExit) as e:
        main(["chat", *map(str, args)])
    return e.value.code, capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    code, err = _main(capsys, tmp_path / "nowhere")
    assert code == 2 and err == f"error: chat: {tmp_path / 'nowhere'}: not found (give a run folder, an adapter " \
                                "folder or a model folder)\n"
    code, err = _main(capsys, tmp_path)
    assert code == 2 and err.count("\n") == 1 and "not a run folder (recipe.json and adapter/)" in err
    code, err = _main(capsys, run, "--no-sample", "--temperature", "0.5")
    assert (code, err) == (2, "error: --temperature: only applies when sampling, but --no-sample is given; drop one\n")
    code, err = _main(capsys, run, "--system", "Be brief.")
    assert code == 2 and err == ("error: --system: the format of data.datasets[1] (dailydialog) has no system "
                                 "turn at the start\n")
    code, err = _main(capsys, run, "--dataset", "5")
    assert code == 2 and err == "error: --dataset: 5 is not an entry of the run's data.datasets (0..1)\n"
    code, err = _main(capsys, run, "--max-new-tokens", "600")
    assert code == 2 and err == "error: --max-new-tokens: 600 must be below the model's context length 512\n"
