"""``README.md`` model card of an export: what the model is, how it was trained (data, updates,
objective, final metrics), how to load it, what it is for. Every statement comes from the run's
records (``RunRecord``); what is not known is said to be unknown, never guessed.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .run_record import RunRecord

# transformers class -> (pipeline task or None, loading snippet's class)
USAGE: dict[str, tuple[Optional[str], str]] = {
    "Data2VecAudioModel": (None, "AutoModel"),
    "Data2VecTextModel": ("feature-extraction", "AutoModel"),
    "Data2VecVisionModel": ("image-feature-extraction", "AutoModel"),
    "Data2VecAudioForCTC": ("automatic-speech-recognition", "AutoModelForCTC"),
    "Data2VecAudioForSequenceClassification": ("audio-classification", "AutoModelForAudioClassification"),
    "Data2VecAudioForAudioFrameClassification": (None, "AutoModelForAudioFrameClassification"),
    "Data2VecAudioForXVector": (None, "AutoModelForAudioXVector"),
    "Data2VecTextForMaskedLM": ("fill-mask", "AutoModelForMaskedLM"),
    "Data2VecTextForCausalLM": ("text-generation", "AutoModelForCausalLM"),
    "Data2VecTextForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "Data2VecTextForMultipleChoice": (None, "AutoModelForMultipleChoice"),
    "Data2VecTextForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
    "Data2VecTextForQuestionAnswering": (None, "AutoModelForQuestionAnswering"),  # pipeline gone in transformers 5
    "Data2VecVisionForImageClassification": ("image-classification", "AutoModelForImageClassification"),
    "Data2VecVisionForSemanticSegmentation": ("image-segmentation", "AutoModelForSemanticSegmentation"),
}
# Hub tags for classes without a pipeline
_HUB_TAG = {
    "Data2VecAudioModel": "feature-extraction",
    "Data2VecAudioForAudioFrameClassification": "audio-classification",
    "Data2VecTextForMultipleChoice": "multiple-choice",
    "Data2VecTextForQuestionAnswering": "question-answering",
}
_PREPROCESSOR_CLASS = {"audio": "AutoFeatureExtractor", "text": "AutoTokenizer", "vision": "AutoImageProcessor"}
_EXAMPLE_INPUT = {
    "audio": ("\"speech.wav\"", "a file path or a 16 kHz float array"),
    "text": ("\"Some text.\"", ""),
    "vision": ("\"image.png\"", "a path, URL or PIL image"),
}
_OBJECTIVE = {
    "pretraining": ("data2vec self-supervised pretraining: the student encoder sees masked input and regresses "
                    "the average of the top-{top_k} layer outputs of an EMA teacher that sees the full input"),
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _data_line(record: RunRecord) -> str:
    data = record.data
    if not data:
        return "not recorded with this model"
    name = str(data.get("_target_", "?")).rsplit(".", 1)[-1]
    details = [f"{k}={_fmt(data[k])}" for k in ("path", "kind", "image_size", "sample_rate", "max_length", "vocab_size")
               if data.get(k) is not None]
    return f"`{name}`" + (f" ({', '.join(details)})" if details else "")


def _training_lines(record: RunRecord, architecture: str) -> list[str]:
    if record.kind not in ("pretraining", "finetuning"):
        return [f"- Source: a {record.kind} model (`{record.source.name if record.source else '?'}`); "
                "how it was trained is not recorded with it."]
    config, hparams = record.config, record.hparams
    lines = []
    if record.kind == "pretraining":
        top_k = (hparams.get("objective") or config.get("objective") or {}).get("top_k", "K")
        lines.append("- Objective: " + _OBJECTIVE["pretraining"].format(top_k=top_k) + ".")
        lines.append(f"- Weights: the {record.weights} encoder"
                     + (" (the EMA teacher)." if record.weights == "teacher" else "."))
    else:
        task = hparams.get("task") or (config.get("head") or {}).get("task") or "?"
        start = config.get("pretrained") or "a randomly initialised encoder"
        lines.append(f"- Objective: supervised fine-tuning for `{task}` ({architecture}), starting from {start}.")
    lines.append(f"- Data: {_data_line(record)}.")
    trainer = config.get("trainer") or {}
    if record.updates is not None:
        steps = f"{record.updates:,} updates"
    elif record.step is not None:
        steps = f"about {record.step:,} updates (the last logged step)"
    else:
        steps = "the number of updates is not recorded"
    if trainer.get("max_steps") not in (None, -1):
        steps += f" (max_steps={trainer['max_steps']})"
    lines.append(f"- Training: {steps}.")
    optim = hparams.get("optim") or config.get("optim") or {}
    if optim:
        keys = [k for k in ("lr", "weight_decay", "warmup_steps", "scheduler") if optim.get(k) is not None]
        lines.append("- Optimiser: AdamW, " + ", ".join(f"{k}={_fmt(optim[k])}" for k in keys) + ".")
    if config.get("seed") is not None:
        lines.append(f"- Seed: {config['seed']}.")
    return lines


def _metrics_lines(record: RunRecord) -> list[str]:
    if not record.metrics:
        return ["No metrics were recorded with this model."]
    shown = {k: v for k, v in record.metrics.items()
             if not k.startswith(("epoch", "lr", "time/", "data/", "global_step")) and not k.endswith("/lr")}
    rows = ["| metric | last value |", "|---|---|"]
    rows += [f"| {k} | {_fmt(v)} |" for k, v in sorted(shown.items())]
    where = f" (last logged at step {record.step:,})" if record.step is not None else ""
    return [f"Last values the run logged{where}:", "", *rows]


def _usage(architecture: str, modality: str) -> list[str]:
    task, auto = USAGE.get(architecture, (None, "AutoModel"))
    example, comment = _EXAMPLE_INPUT[modality]
    if task is not None:
        return ["```python", "from transformers import pipeline", "",
                f"pipe = pipeline(\"{task}\", model=\"PATH_OR_REPO\")",
                f"print(pipe({example}))" + (f"  # {comment}" if comment else ""), "```"]
    pre = _PREPROCESSOR_CLASS[modality]
    return ["```python", f"from transformers import {auto}, {pre}", "",
            f"model = {auto}.from_pretrained(\"PATH_OR_REPO\")",
            f"preprocess = {pre}.from_pretrained(\"PATH_OR_REPO\")", "```"]


def _intended_use(architecture: str, modality: str, labels: Optional[dict[str, str]]) -> str:
    if architecture.endswith("Model"):
        return (f"A {modality} representation model: fine-tune it on a downstream task, or use its hidden "
                "states as features. It makes no predictions by itself.")
    names = ""
    if labels:
        shown = list(labels.values())[:12]
        names = " Labels: " + ", ".join(f"`{n}`" for n in shown) + (" ..." if len(labels) > 12 else "") + "."
    return (f"The task it was fine-tuned for ({architecture}), on data like its training data; check its metrics "
            f"on your own data before relying on it.{names}")


def model_card(
    model: nn.Module,
    architecture: str,
    record: RunRecord,
    preprocessing: Optional[str],
    notes: list[str],
    labels: Optional[dict[str, str]] = None,
) -> str:
    """The card's Markdown (with the Hub's YAML header)."""
    encoder = getattr(model, "encoder", model)
    modality = encoder.modality
    config = encoder.config
    count = sum(p.numel() for p in model.parameters())
    task = USAGE.get(architecture, (None, ""))[0] or _HUB_TAG.get(architecture)
    header = ["---", "library_name: transformers", *( [f"pipeline_tag: {task}"] if task else []),
              "tags:", "- data2vec", f"- {modality}", "- d2v_train", "---", ""]
    shape = f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads"
    lines = [
        f"# data2vec {modality}: {architecture}",
        "",
        f"A data2vec {modality} model exported by d2v_train from a {record.kind} "
        f"{'checkpoint' if record.kind in ('pretraining', 'finetuning') else 'source'}: "
        f"transformers' `{architecture}`, {count:,} parameters ({shape}).",
        "",
        "## How it was trained",
        "",
        *_training_lines(record, architecture),
        "",
        "## Results",
        "",
        *_metrics_lines(record),
        "",
        "## Input",
        "",
        (f"Preprocessing (in `preprocessor_config.json`): {preprocessing}." if preprocessing else
         "Text is tokenised by the bundled tokenizer (`tokenizer.json`)." if modality == "text" else
         "No preprocessing settings are known for this model."),
        *[f"\n{note}" for note in notes],
        "",
        "## How to use",
        "",
        *_usage(architecture, modality),
        "",
        "## Intended use",
        "",
        _intended_use(architecture, modality, labels),
        "",
    ]
    return "\n".join(header + lines)
