"""The one place that names what a run leaves in outputs/<run>/.

outputs/<run>/
  recipe.json         the resolved recipe the run started with (checked on resume)
  data_order.json     this stack's defaults that decide which rows each step sees, as the run
                      started with them (a resumed run keeps them)
  checkpoints/        checkpoint-N/ with a completion marker; the newest complete one resumes
  adapter/            the finished peft adapter + tokenizer (chat_template) + run.json
  run.json            what the run did: data counts, losses, speed, memory, versions
  merged/             the merged model (safetensors, tokenizer, merge.json)
  eval.json, eval.png the comparison of base, adapter and merged models
  gguf/               llama.cpp exports of merged/, per quantization type Q:
    <run>-Q.gguf        the model (in place only once the export passed verification)
    <run>-Q.export.json what was converted, how, the tensor types, and the comparison with merged/
                        (written last: its presence means the GGUF beside it is the one it describes)
    <run>-Q.Modelfile   for `ollama create <name> -f <run>-Q.Modelfile`
  upload/<what>/      the folder `python -m training push` uploads
outputs/.<run>.lock   held by the train, merge, export, eval or push of the run while it runs, and shared
                      by a merge or eval of another run that reads its adapter or merged model, and by
                      a train, merge or eval whose base model is its merged model (training.run_lock);
                      .<run>.train.lock is the lock of earlier versions

The servers read outputs/<run>/merged/ (and its merge.json) and outputs/<run>/gguf/ without
importing this module (serving depends on nothing in training); serving.model_dir and
serving.backends.llamacpp name the same files, and a test holds the two to the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ADAPTER = "adapter"
MERGED = "merged"
RUN_RECORD = "run.json"
MERGE_RECORD = "merge.json"
GGUF = "gguf"
CHECKPOINTS = "checkpoints"
UPLOAD = "upload"
ARTIFACTS = (ADAPTER, MERGED)  # what can be published or evaluated by name


@dataclass(frozen=True)
class RunDir:
    path: Path
    # A merged model outside a run folder (export --merged DIR, DIR not named merged/): DIR's name.
    # DIR is then this run's merged model and names its exports, which go to gguf/ beside it.
    model: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_merged(cls, merged: str | Path) -> RunDir:
        """The run whose merged model is MERGED: outputs/<run>/ for outputs/<run>/merged, else the
        folder that holds MERGED, with MERGED's name as the model's."""
        merged = Path(merged).resolve()
        return cls(merged.parent, None if merged.name == MERGED else merged.name)

    @classmethod
    def of_base_model(cls, name: str) -> RunDir | None:
        """The run whose merged model is the base model NAME (continued fine-tuning of a merge), which
        its merge --force or train --force would replace: NAME a directory named merged/ or holding a
        merge's merge.json. None for a Hub id, tiny://..., or a directory no merge wrote (a lock beside
        a folder of the user's own models would guard nothing and leave a hidden file there)."""
        base = Path(name)
        if not base.is_dir() or (base.resolve().name != MERGED and not (base / MERGE_RECORD).is_file()):
            return None
        return cls.of_merged(base)

    @classmethod
    def of_adapter(cls, adapter: str | Path) -> RunDir | None:
        """The run whose commands replace ADAPTER: outputs/<run> for its adapter/, its
        checkpoints/checkpoint-N/ (which training rotates away) and its upload/adapter/; None for
        an adapter elsewhere, which no command of this stack writes."""
        adapter = Path(adapter).resolve()
        if adapter.parent.name in (CHECKPOINTS, UPLOAD):
            return cls(adapter.parent.parent)
        if adapter.name == ADAPTER:
            return cls(adapter.parent)
        return None

    @property
    def name(self) -> str:
        return self.model or self.path.name

    @property
    def recipe_json(self) -> Path:
        return self.path / "recipe.json"

    @property
    def data_order_json(self) -> Path:
        return self.path / "data_order.json"

    @property
    def lock(self) -> Path:
        """Held by the train, merge, export, eval or push of this run while it runs
        (training.run_lock); beside the run folder, which train --force deletes."""
        return self.path.with_name(f".{self.path.name}.lock")

    @property
    def legacy_lock(self) -> Path:
        """The lock of versions before the one above, taken by train alone; removed when the run is
        next locked, unless such a version's train still holds it (training.run_lock)."""
        return self.path.with_name(f".{self.path.name}.train.lock")

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def run_json(self) -> Path:
        return self.path / RUN_RECORD

    @property
    def profile(self) -> Path:
        return self.path / "profile"

    @property
    def merged(self) -> Path:
        return self.path / (self.model or MERGED)

    @property
    def eval_json(self) -> Path:
        return self.path / "eval.json"

    @property
    def eval_png(self) -> Path:
        return self.path / "eval.png"

    @property
    def gguf_dir(self) -> Path:
        return self.path / GGUF

    def gguf(self, quant: str) -> Path:
        return self.gguf_dir / f"{self.name}-{quant}.gguf"

    def gguf_record(self, quant: str) -> Path:
        return self.gguf_dir / f"{self.name}-{quant}.export.json"

    def gguf_modelfile(self, quant: str) -> Path:
        return self.gguf_dir / f"{self.name}-{quant}.Modelfile"

    def artifact(self, what: str) -> Path:
        """adapter/ or merged/."""
        if what not in ARTIFACTS:
            raise ValueError(f"unknown artifact {what!r}; one of {', '.join(ARTIFACTS)}")
        return self.path / what

    def upload(self, what: str) -> Path:
        return self.path / UPLOAD / what

    def is_trained(self) -> bool:
        """A finished training run: the adapter and its record are in place (written last)."""
        return (self.adapter / "adapter_config.json").is_file() and (self.adapter / RUN_RECORD).is_file()
