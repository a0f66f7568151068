"""The specification's Python API (section 6) and extension examples (section 8), written as the
specification writes them, run on the tiny pretrained LLaMA and the real shared data: Alpaca plus
DailyDialog (through the user's own CustomDatasetLoader, which tokenizes itself), mixed "balanced".
Prints base and fine-tuned perplexity, BLEU, ROUGE-1/2/L and the custom metric.

    python examples/spec_api.py [--steps 30] [--out runs/spec_api]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset, DatasetDict

from ftk import (DataConfig, EvalConfig, LLAMATrainer, LoRAConfig, ModelConfig, PerplexityEvaluator,
                 QualitativeEvaluator, TrainingConfig)

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "stories260K"
ALPACA = SHARED / "data" / "alpaca" / "alpaca_sample.json"
DAILYDIALOG = SHARED / "data" / "dailydialog"


# -- section 8.1: a custom dataset loader ---------------------------------------------------------
class CustomDatasetLoader:
    """DailyDialog's native files, tokenized here: the dialogue so far is the prompt (not trained),
    the next utterance the response (trained)."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def _rows(self, split: str, limit: int) -> list[dict]:
        rows = []
        lines = (DAILYDIALOG / split / f"dialogues_{split}.txt").read_text(encoding="utf-8").splitlines()
        for line in lines[:limit]:
            turns = [t.strip() for t in line.split("__eou__") if t.strip()]
            if len(turns) < 2:
                continue
            turns = turns[-3:]  # the last exchange: a short context and its reply
            prompt = "".join(f"{'User' if i % 2 == 0 else 'Assistant'}: {t}\n" for i, t in enumerate(turns[:-1]))
            prompt += f"{'User' if len(turns) % 2 == 1 else 'Assistant'}: "
            p = self.tokenizer(prompt)["input_ids"]
            r = self.tokenizer(turns[-1] + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            if len(p) + len(r) <= self.max_length:
                rows.append({"input_ids": p + r, "labels": [-100] * len(p) + r})
        return rows

    def load(self) -> DatasetDict:
        return DatasetDict({"train": Dataset.from_list(self._rows("train", 400)),
                            "validation": Dataset.from_list(self._rows("validation", 40))})


# -- section 8.3: a custom evaluator --------------------------------------------------------------
class CustomEvaluator:
    """Distinct-2: the share of distinct word bigrams among all generated bigrams (higher: less
    repetitive)."""

    higher_is_better = True

    def compute_metric(self, predictions, references) -> float:
        bigrams = [tuple(w[i:i + 2]) for w in (p.split() for p in predictions) for i in range(len(w) - 1)]
        return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="runs/spec_api")
    args = ap.parse_args(argv)

    # -- section 6 ---------------------------------------------------------------------------------
    model_config = ModelConfig(
        model_name=str(MODEL),
        use_4bit=True,
        bnb_4bit_compute_dtype="bfloat16",
        bnb_4bit_quant_type="nf4",
        use_nested_quant=True,
        cache_dir=None,
    )
    lora_config = LoRAConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )
    data_config = DataConfig(
        datasets=[CustomDatasetLoader, {"loader": "alpaca", "path": str(ALPACA), "max_examples": 400}],
        mixing="balanced",
        max_length=256,
    )
    training_config = TrainingConfig(max_steps=args.steps, batch_size=4, gradient_accumulation_steps=1,
                                     learning_rate=2e-3, report_to=["none"])
    eval_config = EvalConfig(metrics=["perplexity", "bleu", "rouge", CustomEvaluator()], max_samples=8,
                             generation={"max_new_tokens": 24, "num_beams": 1})
    trainer = LLAMATrainer(model_config=model_config, lora_config=lora_config, data_config=data_config,
                           training_config=training_config, eval_config=eval_config, output_dir=args.out,
                           overwrite=True)
    trainer.train()
    results = trainer.evaluate()

    # the evaluators on the trained model, as section 6 uses them
    qualitative = QualitativeEvaluator(trainer.model, trainer.tokenizer)
    text = "Once upon a time"
    sample = qualitative.generate_response(prompt=text, max_length=24, temperature=0.7)
    ppl = PerplexityEvaluator(trainer.model, trainer.tokenizer).compute_perplexity(trainer.eval_dataloader())

    keys = ("perplexity", "bleu", "rouge1", "rouge2", "rougeL", "CustomEvaluator")
    print(f"{'metric':<16}{'base':>12}{'fine-tuned':>12}")
    for k in keys:
        print(f"{k:<16}{results['base'][k]:>12.4f}{results['finetuned'][k]:>12.4f}")
    print(f"PerplexityEvaluator on the validation split: {ppl:.4f}")
    print(f"sampled at temperature 0.7: {text}{sample}")
    return {"results": results, "perplexity": ppl, "sample": sample}


if __name__ == "__main__":
    main()
