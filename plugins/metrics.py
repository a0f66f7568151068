"""Built-in metrics: `perplexity`, `bleu`, `rouge`."""
from ftk.hookspecs import hookimpl


def _todo(options):
    raise NotImplementedError("metrics land with the evaluation issue")


@hookimpl
def ftk_register_metrics(register):
    register("perplexity", _todo, description="exp(token-weighted NLL) over the trained tokens",
             options_schema={"type": "object"})
    register("bleu", _todo, description="Corpus BLEU (sacreBLEU 13a), 0-1 scale", options_schema={"type": "object"})
    register("rouge", _todo, description="ROUGE-1/2/L/Lsum F-measure (rouge-score)", options_schema={"type": "object"})
