"""Audio pipeline: decoding, every bad-input case, batching modes, transcripts, espeak-ng speech."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v_train.data import AudioDataModule, DataError, SpeechDataModule
from d2v_train.data.audio_io import decode_audio, receptive_field
from d2v_train.data.common import SkipItem

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng not installed (apt-get install -y --no-install-recommends espeak-ng)")


def tone(seconds: float, sr: int = 16000, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else x


def write(path: Path, data: np.ndarray, sr: int = 16000, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, **kw)
    return path


def module(path: Path | str, **kw) -> AudioDataModule:
    kw.setdefault("val_fraction", 0.0)
    kw.setdefault("max_tokens", 200_000)
    dm = AudioDataModule(str(path), **kw)
    dm.setup()
    return dm


def all_batches(dm: AudioDataModule) -> list[dict]:
    return list(dm.train_dataloader())


# ------------------------------------------------------------------------------------- decoding


def test_receptive_field_of_default_stack() -> None:
    assert receptive_field([10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]) == 400


@pytest.mark.parametrize("sr", [8000, 22050, 44100])
def test_resampled_to_16k(tmp_path: Path, sr: int) -> None:
    wav = decode_audio(str(write(tmp_path / "a.wav", tone(1.0, sr), sr)))
    assert wav.dtype == torch.float32 and abs(len(wav) - 16000) <= 1
    spectrum = torch.fft.rfft(wav).abs()  # the 440 Hz tone survives resampling
    assert abs(int(spectrum.argmax()) - 440) <= 2


def test_stereo_mixed_down(tmp_path: Path) -> None:
    wav = decode_audio(str(write(tmp_path / "st.flac", tone(0.5, channels=2))))
    assert wav.dim() == 1 and len(wav) == 8000
    ref = tone(0.5) * 0.75  # mean of channel gains 0.5 and 1.0
    assert np.allclose(wav.numpy(), ref, atol=1e-3)


def test_ogg_decodes(tmp_path: Path) -> None:
    assert len(decode_audio(str(write(tmp_path / "a.ogg", tone(0.5), format="OGG", subtype="VORBIS")))) > 7000


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda p: p.write_bytes(b"RIFF\x00\x00not really a wave"), "unreadable"),
        (lambda p: write(p, np.zeros(0, np.float32)), "empty"),
        (lambda p: write(p, np.array([0.1, np.nan, np.inf, 0.2] * 200, np.float32), subtype="FLOAT"), "non_finite"),
    ],
)
def test_decode_errors_are_skip_reasons(tmp_path: Path, make, reason: str) -> None:
    p = tmp_path / "x.wav"
    make(p)
    with pytest.raises(SkipItem) as e:
        decode_audio(str(p))
    assert e.value.reason == reason


# --------------------------------------------------------------------------------- bad folders


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    write(root / "good" / "a.wav", tone(1.0))
    write(root / "good" / "b.flac", tone(2.0, 44100), 44100)
    write(root / "good" / "c8k.wav", tone(1.5, 8000), 8000)
    write(root / "stereo.wav", tone(1.0, channels=2))
    write(root / "empty.wav", np.zeros(0, np.float32))
    write(root / "short.wav", tone(0.02))  # 320 samples < 400 receptive field
    write(root / "nan.wav", np.array([0.1, np.nan] * 4000, np.float32), subtype="FLOAT")
    (root / "corrupt.wav").write_bytes(b"RIFF1234WAVEfmt garbage")
    (root / "notes.txt").write_text("not audio")
    return root


def test_messy_folder_counted_skips(messy: Path) -> None:
    dm = module(messy, batching="pad")
    assert len(dm.train_set) == 5  # a, b, c8k, stereo, nan (NaN only shows when decoded)
    assert dm.skip_counts() == {"empty": 1, "too_short": 1, "unreadable": 1}
    batches = all_batches(dm)
    assert sum(len(b["inputs"]) for b in batches) == 4
    assert dm.skip_counts() == {"empty": 1, "too_short": 1, "unreadable": 1, "non_finite": 1}
    for b in batches:
        assert torch.isfinite(b["inputs"]).all()


def test_messy_folder_with_workers(messy: Path) -> None:
    dm = module(messy, batching="pad", num_workers=2)
    all_batches(dm)
    assert dm.skip_counts()["non_finite"] == 1  # counted inside a worker, seen by the main process


def test_strict_names_the_file(messy: Path) -> None:
    with pytest.raises(DataError, match=r"(empty|short|corrupt)\.wav"):
        module(messy, strict=True)


def test_empty_folder_error_names_folder_and_extensions(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.md").write_text("hi")
    with pytest.raises(DataError, match=r"nothing.*\.wav.*\.flac.*\.ogg"):
        module(tmp_path / "nothing")


def test_folder_of_only_bad_files_errors_with_counts(tmp_path: Path) -> None:
    write(tmp_path / "bad" / "empty.wav", np.zeros(0, np.float32))
    with pytest.raises(DataError, match=r"no usable files.*'empty': 1"):
        module(tmp_path / "bad")


def test_missing_path() -> None:
    with pytest.raises(DataError, match="does not exist"):
        module("/definitely/not/here")


# ------------------------------------------------------------------------------------ manifest


def test_manifest_missing_file_and_wrd_transcripts(tmp_path: Path) -> None:
    write(tmp_path / "wavs" / "a.wav", tone(1.0))
    write(tmp_path / "wavs" / "b.wav", tone(0.5))
    (tmp_path / "train.tsv").write_text(f"{tmp_path / 'wavs'}\na.wav\t16000\ngone.wav\t16000\nb.wav\t8000\n")
    (tmp_path / "train.wrd").write_text("hello world\nlost\nbye\n")
    dm = module(tmp_path / "train.tsv", labels="transcript", batching="pad")
    assert dm.skip_counts() == {"missing": 1}
    assert len(dm.train_set) == 2
    b = all_batches(dm)[0]
    assert b["labels"].shape[0] == 2 and dm.vocab is not None and "|" in dm.vocab.symbols
    texts = sorted("".join(dm.vocab.symbols[i] for i in row if i >= 0) for row in b["labels"].tolist())
    assert texts == ["bye", "hello|world"]


def test_txt_transcripts_beside_files(tmp_path: Path) -> None:
    write(tmp_path / "a.wav", tone(1.0))
    (tmp_path / "a.txt").write_text("go left")
    write(tmp_path / "b.wav", tone(1.0))  # no transcript: counted skip
    dm = module(tmp_path, labels="transcript")
    assert dm.skip_counts() == {"bad_label": 1} and len(dm.train_set) == 1


# ------------------------------------------------------------------------------------ batching


def test_crop_to_shortest_and_max_sample_size(tmp_path: Path) -> None:
    for i, secs in enumerate([1.0, 1.2, 1.5, 3.0]):
        write(tmp_path / f"{i}.wav", tone(secs))
    dm = module(tmp_path, batching="crop", max_sample_size=20_000, max_tokens=200_000)
    for b in all_batches(dm):
        assert b["padding_mask"] is None
        assert b["inputs"].shape[1] == min(20_000, 16_000)  # shortest in the batch
        # normalised per utterance
        assert torch.allclose(b["inputs"].mean(1), torch.zeros(len(b["inputs"])), atol=1e-2)


def test_pad_mode_padding_mask_and_budget(tmp_path: Path) -> None:
    for i in range(12):
        write(tmp_path / f"{i}.wav", tone(0.5 + 0.1 * i))
    dm = module(tmp_path, batching="pad", max_tokens=40_000, normalize=False)
    batches = all_batches(dm)
    assert sum(len(b["inputs"]) for b in batches) == 12
    for b in batches:
        assert b["inputs"].numel() <= 40_000
        if b["padding_mask"] is not None:
            assert (b["inputs"][b["padding_mask"]] == 0).all()
            lengths = (~b["padding_mask"]).sum(1)
            assert lengths.max() == b["inputs"].shape[1]


def test_crops_are_seeded(tmp_path: Path) -> None:
    for i in range(4):
        write(tmp_path / f"{i}.wav", np.random.default_rng(i).standard_normal(16000 + 4000 * i).astype(np.float32) * 0.1)
    a = [b["inputs"] for b in module(tmp_path, max_sample_size=8000, seed=7).train_dataloader()]
    b = [b["inputs"] for b in module(tmp_path, max_sample_size=8000, seed=7, num_workers=2).train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_length_filters(tmp_path: Path) -> None:
    for i, secs in enumerate([0.5, 1.0, 2.0]):
        write(tmp_path / f"{i}.wav", tone(secs))
    dm = module(tmp_path, min_sample_size=10_000, max_length=20_000)
    assert len(dm.train_set) == 1 and dm.skip_counts() == {"too_short": 1, "too_long": 1}


def test_saved_datasets_dir(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    paths = [str(write(tmp_path / "w" / f"{i}.wav", tone(1.0 + i * 0.1))) for i in range(3)]
    raw = write(tmp_path / "w" / "raw.wav", tone(1.0, 8000), 8000).read_bytes()
    ds = datasets.Dataset.from_dict(
        {"audio": [{"path": p, "bytes": None} for p in paths] + [{"path": None, "bytes": raw}], "label": ["a", "b", "a", "b"]}
    ).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "saved"))
    dm = module(tmp_path / "saved", labels="class", label_column="label", batching="pad")
    b = all_batches(dm)
    assert sum(len(x["inputs"]) for x in b) == 4 and dm.classes == ["a", "b"]
    assert dm.skip_counts() == {}


# --------------------------------------------------------------------------------------- speech


@pytest.fixture(scope="session")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("espeak")


SMALL = dict(words=["yes", "no", "up", "down"], accents=["en-us", "en"], variants=["m1", "f1"], val_accents=["en-029"])


@needs_espeak
def test_speech_words(speech_cache: Path) -> None:
    dm = SpeechDataModule(cache_dir=str(speech_cache), **SMALL, max_tokens=16000 * 8)
    dm.setup()
    assert len(dm.train_set) == 16 and len(dm.val_set) == 8
    assert dm.classes == ["down", "no", "up", "yes"] and dm.skip_counts() == {}
    batches = list(dm.train_dataloader())
    assert sum(len(b["labels"]) for b in batches) == 16
    for b in batches:
        assert b["inputs"].numel() <= 16000 * 8 and b["labels"].dtype == torch.long
    assert len(list(dm.val_dataloader())) >= 1


@needs_espeak
def test_speech_sentences_have_transcripts(speech_cache: Path) -> None:
    dm = SpeechDataModule(cache_dir=str(speech_cache), kind="sentences", num_sentences=4, **SMALL)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["labels"].dim() == 2 and (b["labels"] != -100).any()
    assert dm.vocab is not None and "|" in dm.vocab.symbols


def test_speech_without_espeak_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import d2v_train.data.espeak as espeak

    monkeypatch.setattr(espeak.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get install .*espeak-ng"):
        SpeechDataModule(cache_dir=str(tmp_path), **SMALL).setup()


FAKE_ESPEAK = """#!{python}
import sys, time
out = sys.argv[sys.argv.index("-w") + 1]
if "silent" not in sys.argv[-1]:
    open(out, "wb").write(b"RIFF")
time.sleep(0.3)
"""


def test_two_runs_synthesising_the_same_clip_at_once_both_succeed(tmp_path: Path) -> None:
    """A sweep starts several runs on an empty cache: each writer needs its own temporary file."""
    import sys
    import threading

    from d2v_train.data.espeak import Utterance, synthesize

    binary = tmp_path / "espeak-ng"
    binary.write_text(FAKE_ESPEAK.format(python=sys.executable))
    binary.chmod(0o755)
    clip = Utterance("hello", "en-us+m3", 150, 50, tmp_path / "cache" / "hello.wav")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            synthesize(clip, str(binary))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    writers = [threading.Thread(target=run) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert not errors, errors
    assert clip.out.read_bytes() == b"RIFF"
    assert sorted(p.name for p in clip.out.parent.iterdir()) == ["hello.wav"]  # no temporary left

    mute = Utterance("silent", "en-us+m3", 150, 50, tmp_path / "cache" / "silent.wav")
    with pytest.raises(DataError, match=r"'en-us\+m3' \(silent.wav\): it wrote nothing"):
        synthesize(mute, str(binary))
    assert not mute.out.exists()
