"""Built-in dataset loader `dailydialog`: multi-turn conversations.

Sources: the native layout (a folder with ``dialogues_text.txt``, or split folders
``train/ validation/ test/`` with ``dialogues_<split>.txt``), the original per-split zip archives
(``train.zip``; a ``validation.zip`` beside it is used as the validation split), or a hub id.
One dialogue per line, utterances separated by ``__eou__``; ``dialogues_act_*``/``dialogues_emotion_*``
label files are checked against the text and kept in ``Example.meta``.

Modes: ``conversation`` (default): one example per dialogue, speakers alternate User/Assistant and
the loss is on the Assistant (responding) turns. ``next_turn``: one example per responding turn,
context -> that turn, loss on that turn only.
"""
from ftk.hookspecs import hookimpl

SCHEMA = {
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1, "format": "path-or-hub-id",
                 "description": "Native-layout folder, a split zip (or a folder of them), or a hub dataset id."},
        "mode": {"enum": ["conversation", "next_turn"], "default": "conversation",
                 "description": "conversation: whole dialogue, loss on responding turns; next_turn: context -> one turn."},
        "speakers": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 2, "maxItems": 2,
                     "default": ["User", "Assistant"],
                     "description": "Labels of the first and the responding speaker in the default format."},
        "labels": {"type": "boolean", "default": True,
                   "description": "Read the act/emotion label files (checked against the text, kept as metadata)."},
        "subset": {"type": ["string", "null"], "default": None, "description": "Hub dataset configuration name."},
        "revision": {"type": ["string", "null"], "default": None, "description": "Hub dataset revision."},
    },
}

EOU = "__eou__"


def parse_dialogue(line, acts=None, emotions=None):
    """Utterances of one native-format line (and its label lists), or BadRecord."""
    from ftk.loaderkit import BadRecord

    parts = line.split(EOU)
    if parts and not parts[-1].strip():
        parts = parts[:-1]
    turns = [p.strip() for p in parts]
    if any(not t for t in turns):
        raise BadRecord("empty_turn", f"dialogue has an empty turn (turn {turns.index('')})")
    if len(turns) < 2:
        raise BadRecord("too_few_turns", f"dialogue has {len(turns)} turn(s); at least two are needed")
    meta = {}
    for name, labels in (("acts", acts), ("emotions", emotions)):
        if labels is None:
            continue
        try:
            vals = [int(x) for x in labels.split()]
        except ValueError:
            raise BadRecord(f"bad_{name}", f"{name} line is not a list of integers") from None
        if len(vals) != len(turns):
            raise BadRecord(f"{name}_mismatch", f"{len(vals)} {name} labels for {len(turns)} turns")
        meta[name] = vals
    return turns, meta


def dialogue_examples(turns, meta, mode, speakers):
    from ftk.loaderkit import conversation_example

    names = {"user": speakers[0], "assistant": speakers[1]}
    msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
    if mode == "conversation":
        ex = conversation_example(msgs, names)
        ex.meta.update(meta)
        return [ex]
    out = []
    for k in range(1, len(msgs), 2):
        ex = conversation_example(msgs[: k + 1], names)
        # only the target turn is trained: earlier assistant turns become context
        last = max(i for i, s in enumerate(ex.segments) if s.train)
        for i, s in enumerate(ex.segments):
            s.train = i == last
        ex.meta.update({**{n: v[: k + 1] for n, v in meta.items()}, "turn": k})
        out.append(ex)
    return out


def _native_sources(path):
    """(split, text_member, act_member or None, emotion_member or None, opener) for a path."""
    import re
    import zipfile
    from pathlib import Path

    from ftk.errors import DataError
    from ftk.loaderkit import decode_utf8, read_text

    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: DailyDialog path not found")
    found = []
    if p.is_file() and p.suffix == ".zip":
        zips = [p]
        if re.search(r"train", p.name):
            sib = p.with_name(p.name.replace("train", "validation"))
            if sib.exists():
                zips.append(sib)
    elif p.is_dir() and not any(p.glob("dialogues_*.txt")) and not any((p / s).is_dir() for s in ("train", "validation")):
        zips = sorted(p.glob("*.zip"))
    else:
        zips = []
    for z in zips:
        try:
            with zipfile.ZipFile(z) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise DataError(f"{z}: not a zip archive") from None
        for n in names:
            m = re.search(r"(?:^|/)dialogues_(train|validation|test|text)\.txt$", n)
            if not m:
                continue
            split = m.group(1)
            lab = {k: next((x for x in names if x.endswith(f"dialogues_{k}_{split}.txt")), None) for k in ("act", "emotion")}

            def opener(member, _z=z):
                try:
                    with zipfile.ZipFile(_z) as zz:
                        data = zz.read(member)
                except (zipfile.BadZipFile, OSError) as e:  # e.g. a damaged member (bad CRC)
                    raise DataError(f"{_z}!{member}: cannot read: {e}") from None
                return decode_utf8(data, f"{_z}!{member}")

            found.append((split, n, lab["act"], lab["emotion"], opener, f"{z}!"))
    if p.is_dir() and not zips:
        cands = [("text", p / "dialogues_text.txt")] + [(s, p / s / f"dialogues_{s}.txt") for s in ("train", "validation", "test")]
        for split, f in cands:
            if f.exists():
                base = f.parent
                tag = "" if split == "text" else f"_{split}"
                lab = {k: (str(base / f"dialogues_{k}{tag}.txt") if (base / f"dialogues_{k}{tag}.txt").exists() else None)
                       for k in ("act", "emotion")}
                found.append((split, str(f), lab["act"], lab["emotion"], read_text, ""))
    if not found:
        raise DataError(f"{path}: no DailyDialog files found (expected dialogues_text.txt, "
                        f"train/dialogues_train.txt or a split zip such as train.zip)")
    return found


def _read_split(src, policy, mode, speakers, use_labels=True):
    from ftk.loaderkit import BadRecord

    split, text_m, act_m, emo_m, opener, prefix = src
    if not use_labels:
        act_m = emo_m = None
    lines = opener(text_m).splitlines()
    labels = {}
    for name, m in (("acts", act_m), ("emotions", emo_m)):
        if m:
            labels[name] = opener(m).splitlines()
            if len(labels[name]) != len(lines):
                from ftk.errors import DataError

                raise DataError(f"{prefix}{m}: {len(labels[name])} lines but {prefix}{text_m} has {len(lines)} dialogues")
    out = []
    for n, line in enumerate(lines, 1):
        try:  # a blank line is a dialogue with no turns: an error like any too-short dialogue
            turns, meta = parse_dialogue(line, *(labels[k][n - 1] if k in labels else None for k in ("acts", "emotions")))
        except BadRecord as e:
            policy.bad(f"{prefix}{text_m}:{n}", e)
            continue
        for ex in dialogue_examples(turns, meta, mode, speakers):
            ex.meta["where"] = f"{prefix}{text_m}:{n}"
            out.append(ex)
    return out


def load(options, ctx):
    from pathlib import Path

    from ftk.components import LoadedData
    from ftk.errors import DataError
    from ftk.loaderkit import BadRecord, RecordPolicy, file_fingerprint, load_hub

    tmpl = options.get("template") or "default"
    if tmpl not in ("default", "chat"):
        raise DataError(f"dailydialog: template {tmpl!r} is not supported; use \"default\" or \"chat\"")
    policy = RecordPolicy(ctx.on_error)
    mode, speakers = options["mode"], options["speakers"]
    path = options["path"]
    if Path(path).exists() or path.startswith((".", "/", "~")):
        srcs = _native_sources(path)
        by_split = {}
        for s in srcs:
            by_split.setdefault(s[0], []).extend(_read_split(s, policy, mode, speakers, options["labels"]))
        train = by_split["train"] if "train" in by_split else by_split.get("text")  # [] if all were skipped
        if train is None:
            raise DataError(f"{path}: no training split (found {', '.join(sorted(by_split))})")
        files = sorted({s[5].rstrip("!") or s[1] for s in srcs} | {m for s in srcs if not s[5] for m in s[1:4] if m})
        return LoadedData(train=train, validation=by_split.get("validation"), skipped=policy.skipped,
                          fingerprint=f"dailydialog:{file_fingerprint(*files)}:{mode}")
    train_rows, val_rows, fp = load_hub(path, ctx, options)

    def convert(rows, name):
        for i, r in enumerate(rows):
            try:
                turns = r.get("dialog") or r.get("utterances") or r.get("dialogue")
                if not isinstance(turns, list):
                    raise BadRecord("missing_dialog", "row has no 'dialog' list")
                line = f" {EOU} ".join(str(t) for t in turns) + f" {EOU}"
                meta_in = {k: " ".join(map(str, r[k])) for k in ("act", "emotion") if isinstance(r.get(k), list)}
                t, meta = parse_dialogue(line, meta_in.get("act"), meta_in.get("emotion"))
            except BadRecord as e:
                policy.bad(f"{name} row {i}", e)
                continue
            yield from dialogue_examples(t, meta, mode, speakers)

    train = convert(train_rows, f"{path} train")
    val = list(convert(val_rows, f"{path} validation")) if val_rows is not None else None
    return LoadedData(train=train if ctx.streaming else list(train), validation=val, skipped=policy.skipped,
                      fingerprint=f"dailydialog:{fp}:{mode}")


@hookimpl
def ftk_register_datasets(register):
    register("dailydialog", load, description="DailyDialog conversations (native folders, original zips, hub id)",
             options_schema=SCHEMA)
