"""Probe tasks of the embedded corpora: the docstring-module task and spoken words by unseen voices."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from d2v_train.data import DocstringsDataModule, SpeechDataModule
from d2v_train.data.audio_io import decode_audio, normalize_waveform
from d2v_train.data.common import DataError
from d2v_train.data.embedded import stdlib_docstrings
from d2v_train.data.probe_tasks import docstring_module_task, strip_module_name
from d2v_train.data.tasks_audio import trim_silence

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def test_strip_module_name_removes_every_spelling() -> None:
    text = "Use email.message.Message; the EMAIL package (see _email) parses emails and email."
    out = strip_module_name(text, "email")
    assert "email" not in out.lower().replace("emails", "")  # a longer word stays a word
    assert "emails" in out and out.startswith("Use ;")


def test_docstring_task_is_balanced_disjoint_and_labelled_by_source() -> None:
    pairs = [(m, f"{m} function number {i} handles {m[::-1]} records, see {m}.sub") for m in ("alpha", "beta", "gamma") for i in range(12)]
    pairs += [("delta", f"delta thing {i} described at length here") for i in range(3)]  # too few: not a class
    pairs += [("_private", f"private helper {i} described at length here") for i in range(20)]  # private: never a class
    pairs += [("alpha", "a text shared by two modules, long enough"), ("beta", "a text shared by two modules, long enough")]
    task = docstring_module_task(pairs, num_classes=3, per_class=10, min_chars=10, val_fraction=0.3, seed=1)
    assert task.classes == ["alpha", "beta", "gamma"]
    assert len(task.train) == 21 and len(task.val) == 9
    assert {t for t, _ in task.train}.isdisjoint({t for t, _ in task.val})
    for text, label in task.train + task.val:
        module = task.classes[label]
        assert module not in text and "shared" not in text
        assert any(strip_module_name(doc, module) == text for m, doc in pairs if m == module)
    with pytest.raises(DataError, match="needs 4 modules"):
        docstring_module_task(pairs, num_classes=4, per_class=10, min_chars=10)


def test_docstrings_probe_sets_tokenize_the_task(tmp_path: Path) -> None:
    dm = DocstringsDataModule(cache_dir=str(tmp_path), max_files=60, vocab_size=1000, max_length=64, probe_classes=3, probe_per_class=8)
    probes = dm.probe_sets()
    assert probes is not None and probes.num_classes == 3 and len(probes.class_names) == 3
    assert len(probes.train) == 3 * 6 and len(probes.val) == 3 * 2  # 8 per class, 30% (2) held out
    texts = {strip_module_name(doc, m): m for m, doc in stdlib_docstrings(60)}
    from d2v_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(dm.tokenizer_path))
    for split in (probes.train, probes.val):
        for i in range(len(split)):
            item = split[i]
            ids = item["inputs"].tolist()
            assert ids[0] == dm.special_token_ids["bos"] and ids[-1] == dm.special_token_ids["eos"] and len(ids) <= 64
            decoded = tok.decode(ids[1:-1])
            source = [m for t, m in texts.items() if t.startswith(decoded[:40])]
            assert source and probes.class_names[item["labels"]] in source
    batch = probes.collate_fn([probes.train[i] for i in range(4)])
    assert batch["inputs"].shape[0] == 4 and batch["labels"].dtype == torch.long
    assert DocstringsDataModule(cache_dir=str(tmp_path), path=str(dm.path)).probe_sets() is None


@needs_espeak
def test_speech_probe_holds_out_voices_and_labels_the_spoken_word(tmp_path: Path) -> None:
    words = ["yes", "no", "stop"]
    dm = SpeechDataModule(cache_dir=str(tmp_path), words=words, accents=["en-us"], variants=["m1", "f1"], probe_accents=["en-029"])
    train_voices, val_voices = dm.probe_voices()
    assert train_voices == ["en-us+m1", "en-us+f1"] and val_voices == ["en-029+m1", "en-029+f1"]
    probes = dm.probe_sets()
    assert probes is not None and probes.class_names == words and probes.num_classes == 3
    assert len(probes.train) == 6 and len(probes.val) == 6
    # labels match the source: the pretraining corpus files, labelled by their folder (the word)
    dm.setup()
    corpus = dm.corpus_dir() / "train"
    for i in range(len(probes.train)):
        item = probes.train[i]
        word, voice = words[item["labels"]], train_voices[i // len(words)]
        source = trim_silence(decode_audio(str(corpus / word / f"{voice}_s150_p50.wav"), 16000))
        assert item["inputs"].shape == source.shape
        assert torch.allclose(item["inputs"], normalize_waveform(source), atol=1e-5)
    batch = probes.collate_fn([probes.val[i] for i in range(3)])
    assert sorted(batch["labels"].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="disjoint"):
        SpeechDataModule(cache_dir=str(tmp_path), accents=["en-us"], probe_accents=["en-us"])


@needs_espeak
def test_grown_speech_corpus_leaves_the_probe_alone_and_is_synthesised_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import d2v_train.data.espeak as espeak

    calls: list[str] = []
    real = espeak.synthesize
    monkeypatch.setattr(espeak, "synthesize", lambda u, binary: (calls.append(u.voice), real(u, binary))[1])
    grown = dict(words=["yes"], accents=["en-us"], variants=["m1", "f1", "m2"], rates=[170, 150], pitches=[50],
                 probe_variants=["m1", "f1"], probe_rate=150, probe_accents=["en-029"], synth_threads=2)  # fmt: skip
    dm = SpeechDataModule(cache_dir=str(tmp_path), **grown)
    dm.setup()
    assert len(dm.train_set) == 6 and len(calls) == 6  # 3 variants x 2 rates, no held-out accent
    assert not any("en-029" in f.name for f in dm.corpus_dir().rglob("*.wav"))
    # the probe is the small corpus's: its variants, one rate, whatever the pretraining corpus holds
    small = SpeechDataModule(cache_dir=str(tmp_path), words=["yes"], accents=["en-us"], variants=["m1", "f1"], probe_accents=["en-029"])
    assert dm.probe_voices() == small.probe_voices() == (["en-us+m1", "en-us+f1"], ["en-029+m1", "en-029+f1"])
    assert dm.probe_clip("yes", "en-us+m1") == small.probe_clip("yes", "en-us+m1")
    # a second module on the same cache synthesises nothing
    calls.clear()
    again = SpeechDataModule(cache_dir=str(tmp_path), **grown)
    again.setup()
    assert calls == [] and len(again.train_set) == 6
    with pytest.raises(ValueError, match="probe_variants"):
        SpeechDataModule(cache_dir=str(tmp_path), probe_variants=[])


def test_docstrings_extra_packages_join_the_corpus_not_the_probe_and_are_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import omegaconf

    import d2v_train.data.embedded as embedded

    plain = DocstringsDataModule(cache_dir=str(tmp_path), max_files=3, vocab_size=400, max_length=64)
    plain.setup()
    dm = DocstringsDataModule(cache_dir=str(tmp_path), max_files=3, extra_packages=["omegaconf"], vocab_size=400, max_length=64)
    dm.setup()
    assert Path(dm.path) != Path(plain.path) and dm.tokenizer_path != plain.tokenizer_path  # own corpus, own BPE
    corpus, small = Path(dm.path).read_text(encoding="utf-8"), Path(plain.path).read_text(encoding="utf-8")
    # the package's docstrings, read from its own files (3 of them: max_files caps each package too)
    assert embedded.package_location("omegaconf") == Path(omegaconf.__file__).parent
    extra = [doc for _, doc in embedded.package_docstrings("omegaconf", 3)]
    assert extra and all(doc in corpus for doc in extra) and not any(doc in small for doc in extra)
    assert corpus.startswith(small) and len(corpus) > len(small)
    # the probe's source pairs stay the standard library's
    pairs = embedded.docstrings_by_module(Path(dm.path).parent, 3)
    assert pairs == embedded.docstrings_by_module(Path(plain.path).parent, 3) and pairs and "omegaconf" not in {m for m, _ in pairs}
    # cached: a second module reads no source file
    monkeypatch.setattr(embedded, "source_docstrings", lambda *a: pytest.fail("re-read the sources"))
    again = DocstringsDataModule(cache_dir=str(tmp_path), max_files=3, extra_packages=["omegaconf"], vocab_size=400, max_length=64)
    again.setup()
    assert again.path == dm.path and len(again.train_set) == len(dm.train_set)
    with pytest.raises(ValueError, match="data.extra_packages: 'no_such_pkg_x'"):
        DocstringsDataModule(cache_dir=str(tmp_path), extra_packages=["no_such_pkg_x"]).setup()
